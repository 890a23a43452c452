"""
What writing a file piece by piece costs this machine, by method (no network,
no Dragonfly): the receive copy into a buffer, then the write.

    python -m bench.writepath [--size-mib 1024] [--piece-mib 8] [--rounds 3] [--dir /var/tmp]
                              [METHOD ...]

Methods: C{pwrite} (into a sparse file, writeback started per piece, as the
store did), C{pwrite-falloc} (the file's blocks reserved first), C{mmap} (the
piece copied into a shared mapping of the file), C{direct} and
C{direct-falloc} (C{O_DIRECT} from an aligned buffer, as
L{dragonfly.core.files.write_piece}).  Methods alternate within each round,
with a C{sync} between runs; each prints its wall time and CPU seconds
(user, system) for the whole file.  On a busy machine compare runs within
one round only.

    python -m bench.writepath --upload [--size-mib 512] [--piece-mib 4] [--rounds 2]

instead writes each piece (C{buffered}, C{direct}, or C{willneed}: direct and
then L{dragonfly.core.files.read_back}, as the store and the CDN do) and
2 ms later C{sendfile}s it to a socket pair, as the seed uploads a piece it
just stored: the writing and the sending thread's CPU per GiB and the
C{sendfile} latency per piece (it runs in the reactor thread).

    python -m bench.writepath --cdn|--cdn-whole [--size-mib 512] [--piece-mib 4] [--rounds 2]

instead runs the CDN's body writer (L{cdn_writer}) with its whole-file hash
in a chain of its own (C{DRAGONFLY_CDN_SPLIT_HASH=1}) and without,
alternated, each in a child process: wall time, CPU per GiB, and how long
after its last byte each piece was published.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import subprocess
import sys
import time

from dragonfly.core.files import preallocate, read_back, start_writeback, write_direct

METHODS = ("pwrite", "pwrite-falloc", "mmap", "direct", "direct-falloc")


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def one(method: str, path: str, piece: int, count: int, src: bytes) -> dict[str, float]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, piece * count)
    if method.endswith("-falloc"):
        preallocate(fd, piece * count)
    buf = bytearray(piece)
    m = mmap.mmap(fd, piece * count) if method == "mmap" else None
    (u0, s0), t0 = cpu(), time.perf_counter()
    for i in range(count):
        off = i * piece
        buf[:] = src  # the receive copy
        if method.startswith("pwrite"):
            view = memoryview(buf)
            o = off
            while view:
                n = os.pwrite(fd, view, o)
                view, o = view[n:], o + n
            start_writeback(fd, off, piece)
        elif method == "mmap":
            assert m is not None
            m[off:off + piece] = buf
            start_writeback(fd, off, piece)
        elif write_direct(path, memoryview(buf), off) != piece:
            raise SystemExit(f"{path}: this file system refuses O_DIRECT")
    if m is not None:
        m.close()
    (u1, s1), t1 = cpu(), time.perf_counter()
    os.close(fd)
    os.unlink(path)
    return {"seconds": t1 - t0, "user": u1 - u0, "system": s1 - s0}


def thread_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime


def upload(mode: str, path: str, piece: int, count: int) -> str:
    """Write each piece (C{mode}), then sendfile it to a socket pair; a line of results."""
    import socket
    import threading

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    buf = mmap.mmap(-1, piece)  # page-aligned, as a pool buffer
    buf[:] = os.urandom(piece)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)

    def drain() -> None:
        m = bytearray(1 << 20)
        while b.recv_into(m):
            pass

    reader = threading.Thread(target=drain)
    reader.start()
    wcpu = scpu = 0.0
    lat = []
    try:
        for i in range(count):
            off = i * piece
            c0 = thread_cpu()
            if mode == "buffered":
                os.pwrite(fd, buf, off)
                start_writeback(fd, off, piece)
            else:
                wfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
                try:
                    os.pwrite(wfd, buf, off)
                    if mode == "willneed":
                        read_back(wfd, off, piece)
                finally:
                    os.close(wfd)
            wcpu += thread_cpu() - c0
            time.sleep(0.002)  # the reactor comes to it a moment later
            c0, t0 = thread_cpu(), time.perf_counter()
            sent = 0
            while sent < piece:
                sent += os.sendfile(a.fileno(), fd, off + sent, piece - sent)
            lat.append(time.perf_counter() - t0)
            scpu += thread_cpu() - c0
    finally:
        a.shutdown(socket.SHUT_WR)
        reader.join()
        a.close()
        b.close()
        os.close(fd)
        os.unlink(path)
    gib = piece * count / (1 << 30)
    lat.sort()
    return (f"{mode:9s} write CPU-s/GiB {wcpu / gib:.2f}  sendfile CPU-s/GiB {scpu / gib:.2f}  sendfile ms "
            f"p50 {lat[len(lat) // 2] * 1e3:.1f} p90 {lat[int(len(lat) * 0.9)] * 1e3:.1f} max {lat[-1] * 1e3:.1f}")


def cdn_writer(split: bool, path: str, piece: int, size: int, read: int, whole: bool = True) -> str:
    """
    The CDN's body writer (L{dragonfly.core.bodywriter.ChunkedFileWriter})
    with a real reactor and worker pool, fed C{read}-byte reads as fast as
    it takes them (its pauses obeyed): wall time, the process's CPU, and how
    long after its last byte arrived each piece was published (p50 / p90).
    C{whole}: with the whole-file hash (a task with a sha256 digest's) or not.
    """
    from twisted.internet import reactor
    from twisted.web.client import ResponseDone

    from dragonfly.core import bodywriter
    from dragonfly.core.threads import WorkerPool

    pool = WorkerPool(reactor, 4)
    pool.startService()
    src = os.urandom(read)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    arrived: dict[int, float] = {}
    waits: list[float] = []

    def stored(index: int, digest: str) -> None:
        waits.append(time.perf_counter() - arrived[index])

    writer = bodywriter.ChunkedFileWriter(pool, reactor, fd, piece, size, on_chunk=stored, whole_hash=whole)
    writer._split = split

    class Source:
        paused = False
        sent = 0
        whole = 0  # the pieces whose last byte was given

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            if self.paused:
                self.paused = False
                reactor.callLater(0, feed)

        def stopProducing(self) -> None:
            self.paused = True

    source = Source()

    def feed() -> None:
        if source.paused:
            return
        if source.sent >= size:
            writer.connectionLost(Failure(ResponseDone()))
            return
        n = min(read, size - source.sent)
        writer.dataReceived(src[:n] if n < read else src)
        source.sent += n
        now = time.perf_counter()
        while source.whole * piece < source.sent and ((source.whole + 1) * piece <= source.sent or source.sent == size):
            arrived[source.whole] = now
            source.whole += 1
        reactor.callLater(0, feed)

    from twisted.python.failure import Failure

    result: list[object] = []
    writer.done.addBoth(result.append).addBoth(lambda _: reactor.stop())
    writer.makeConnection(source)  # type: ignore[arg-type]
    (u0, s0), t0 = cpu(), time.perf_counter()
    reactor.callLater(0, feed)
    reactor.run()
    (u1, s1), t1 = cpu(), time.perf_counter()
    pool.stopService()
    os.unlink(path)
    gib = size / (1 << 30)
    waits.sort()
    return (f"split {'on ' if split else 'off'} whole {'on ' if whole else 'off'} {t1 - t0:6.2f} s  CPU-s/GiB {(u1 - u0 + s1 - s0) / gib:.2f} "
            f"(user {(u1 - u0) / gib:.2f}, system {(s1 - s0) / gib:.2f})  piece published after its last byte, ms: "
            f"p50 {waits[len(waits) // 2] * 1e3:.1f} p90 {waits[int(len(waits) * 0.9)] * 1e3:.1f}"
            + ("" if isinstance(result[0], tuple) else f"  FAILED {result[0]}"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("methods", nargs="*", default=list(METHODS), help=f"of {', '.join(METHODS)}")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--piece-mib", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--upload", action="store_true", help="write then sendfile each piece: buffered, direct, willneed")
    ap.add_argument("--cdn", action="store_true",
                    help="the CDN's body writer, its whole-file hash in its own chain (split) or not, alternated")
    ap.add_argument("--cdn-whole", action="store_true",
                    help="the CDN's body writer with its whole-file hash (a task with a sha256 digest) and without, alternated")
    args = ap.parse_args()
    if args.cdn or args.cdn_whole:
        path = os.path.join(args.dir, f"writepath-{os.getpid()}.data")
        for r in range(args.rounds):
            runs = [(True, True), (False, True)] if args.cdn else [(False, True), (False, False)]
            for split, whole in runs if r % 2 == 0 else runs[::-1]:
                subprocess.run(["sync"], check=False)
                time.sleep(0.3)
                # one reactor per process: each run in a child
                code = ("import sys; from bench.writepath import cdn_writer; "
                        f"print(cdn_writer({split}, {path!r}, {args.piece_mib << 20}, {args.size_mib << 20}, 1 << 20, {whole}))")
                try:
                    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                                         timeout=900)
                except subprocess.TimeoutExpired:
                    print(f"round {r + 1} split {split}: no result in 900 s", flush=True)
                    continue
                finally:
                    if os.path.exists(path):
                        os.unlink(path)
                print(f"round {r + 1} piece {args.piece_mib} MiB {out.stdout.strip() or out.stderr.strip()[-300:]}", flush=True)
        return
    if args.upload:
        piece, count = args.piece_mib << 20, args.size_mib // args.piece_mib
        path = os.path.join(args.dir, f"writepath-{os.getpid()}.data")
        for r in range(args.rounds):
            for mode in ("buffered", "direct", "willneed"):
                subprocess.run(["sync"], check=False)
                time.sleep(0.3)
                print(f"round {r + 1} piece {args.piece_mib} MiB {upload(mode, path, piece, count)}", flush=True)
        return
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}")
    piece = args.piece_mib << 20
    count = args.size_mib // args.piece_mib
    src = os.urandom(piece)
    path = os.path.join(args.dir, f"writepath-{os.getpid()}.data")
    gib = piece * count / (1 << 30)
    try:
        for r in range(args.rounds):
            for method in args.methods:
                subprocess.run(["sync"], check=False)
                time.sleep(0.5)
                got = one(method, path, piece, count, src)
                print(f"round {r + 1} {method:14s} {got['seconds'] / gib:6.2f} s/GiB  CPU-s/GiB {((got['user'] + got['system']) / gib):5.2f}"
                      f" (user {got['user'] / gib:.2f}, system {got['system'] / gib:.2f})", flush=True)
    finally:
        if os.path.exists(path):
            os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("methods", nargs="*", default=list(METHODS), help=f"of {', '.join(METHODS)}")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--piece-mib", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--upload", action="store_true", help="write then sendfile each piece: buffered, direct, willneed")
    args = ap.parse_args()
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

"""
The block protocol alone, on loopback TCP, between two processes.

    python -m bench.block_loopback [--size-mib 1024] [--piece-mib 4] [--window 4]

A sender process serves a file of random bytes (read from the page cache:
the file is written, then read once, before the clock starts) as a seed side;
this process connects, asks for every piece with C{--window} requests in
flight and drops each piece as it arrives (no hashing, no disk): what is
measured is the protocol's own cost per byte.  Prints GB/s and the CPU
seconds per GiB of each process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from dragonfly.core.bitmap import Bitmap  # noqa: E402
from dragonfly.core.ratelimit import TokenBucket  # noqa: E402
from dragonfly.protocol.block import BlockFactory  # noqa: E402

TASK = "ab" * 32


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def user_cpu() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


class _Base:
    clock = reactor

    def __init__(self, count: int, piece: int) -> None:
        self.count = count
        self.piece = piece

    def piece_length(self, index: int) -> int | None:
        return self.piece if 0 <= index < self.count else None

    def attached(self, conn): ...
    def on_bitfield(self, conn): ...
    def on_have(self, conn, index): ...
    def on_reject(self, conn, index, reason): ...
    def on_digests(self, conn, first, digests): ...
    def on_uploaded(self, conn, n): ...
    def download_limits(self): return []


class Seed(_Base):
    accepts_pieces = False

    def __init__(self, path: str, count: int, piece: int, zero_copy: bool, fault: str | None = None) -> None:
        super().__init__(count, piece)
        self.fd = os.open(path, os.O_RDONLY)
        self.bitmap = Bitmap(count)
        for i in range(count):
            self.bitmap.set(i)
        send_fd = self.fd
        if fault == "short":
            # sendfile reads from a copy cut in the middle of a piece
            short = tempfile.TemporaryFile()
            short.write(os.pread(self.fd, count * piece // 2 + piece // 3, 0))
            short.flush()
            self._short = short
            send_fd = short.fileno()
        elif fault == "badfd":
            send_fd = os.open(os.devnull, os.O_WRONLY)  # sendfile cannot read it
        if zero_copy:
            self.piece_file = lambda i: (send_fd, i * piece, piece)

    def local_bitmap(self):
        return self.bitmap

    def attached(self, conn):
        self.cpu0, self.user0 = cpu(), user_cpu()

    def read_piece(self, index: int):
        return deferToThread(os.pread, self.fd, self.piece, index * self.piece)

    def on_piece(self, conn, index, data): ...

    def detached(self, conn, reason):
        print(json.dumps({"cpu": cpu() - self.cpu0, "user": user_cpu() - self.user0}), flush=True)
        reactor.stop()


class Sink(_Base):
    accepts_pieces = True

    def __init__(self, count: int, piece: int, window: int, factory: BlockFactory, verify: str | None = None) -> None:
        super().__init__(count, piece)
        self.verify_fd = os.open(verify, os.O_RDONLY) if verify else None
        self.wrong = 0
        self.window = window
        self.factory = factory
        self.next = 0
        self.got = 0
        self.start = 0.0
        self.cpu0 = 0.0

    def local_bitmap(self):
        return Bitmap(self.count)

    def read_piece(self, index: int):
        return succeed(b"")

    def on_bitfield(self, conn):
        self.start, self.cpu0, self.user0 = time.perf_counter(), cpu(), user_cpu()
        for _ in range(self.window):
            self._ask(conn)

    def _ask(self, conn):
        if self.next < self.count:
            conn.request(self.next, 0.0)
            self.next += 1

    def on_piece(self, conn, index, data):
        if self.verify_fd is not None and os.pread(self.verify_fd, self.piece, index * self.piece) != data:
            self.wrong += 1
        self.factory.release(data)
        self.got += 1
        if self.got == self.count:
            self.elapsed = time.perf_counter() - self.start
            self.cpu_used = cpu() - self.cpu0
            self.user_used = user_cpu() - self.user0
            conn.transport.loseConnection()
        else:
            self._ask(conn)

    def detached(self, conn, reason):
        reactor.stop()


def serve(path: str, count: int, piece: int, zero_copy: bool, fault: str | None, upload_limit: int = 0) -> None:
    seed = Seed(path, count, piece, zero_copy, fault)
    limit = TokenBucket(upload_limit, reactor) if upload_limit else None
    factory = BlockFactory("seed", lambda tid: seed, clock=reactor, upload_limit=limit)

    def listening(port):
        print(json.dumps({"port": port.getHost().port}), flush=True)

    TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory).addCallback(listening)
    reactor.run()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--piece-mib", type=int, default=4)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--no-zero-copy", action="store_true", help="the seed offers no piece_file")
    ap.add_argument("--verify", action="store_true", help="compare every piece received with the file")
    ap.add_argument("--fault", choices=["short", "badfd"], help="make the seed's sendfile fail (tests the fallback)")
    ap.add_argument("--upload-limit", type=int, default=0, help="the seed's upload limit, bytes/s (0: none)")
    ap.add_argument("--serve", nargs=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    piece = args.piece_mib << 20
    count = args.size_mib // args.piece_mib
    if args.serve:
        serve(args.serve[0], count, piece, not args.no_zero_copy, args.fault, args.upload_limit)
        return
    with tempfile.NamedTemporaryFile(prefix="block-bench-") as f:
        for _ in range(count):
            f.write(os.urandom(piece))
        f.flush()
        with open(f.name, "rb") as r:  # into the page cache
            while r.read(1 << 24):
                pass
        cmd = [*os.environ.get("BENCH_SENDER_WRAP", "").split(), sys.executable, "-m", "bench.block_loopback", "--size-mib", str(args.size_mib),
               "--piece-mib", str(args.piece_mib), "--serve", f.name]
        if args.no_zero_copy:
            cmd.append("--no-zero-copy")
        if args.fault:
            cmd += ["--fault", args.fault]
        if args.upload_limit:
            cmd += ["--upload-limit", str(args.upload_limit)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        port = json.loads(proc.stdout.readline())["port"]
        factory = BlockFactory("sink", lambda tid: None, clock=reactor)
        sink = Sink(count, piece, args.window, factory, f.name if args.verify else None)
        conn = factory.client(sink, TASK, "seed")
        factory.connect(TCP4ClientEndpoint(reactor, "127.0.0.1", port), conn)
        reactor.run()
        sender = json.loads(proc.stdout.readline())
        sender_cpu = sender["cpu"]
        proc.wait()
    gib = count * piece / (1 << 30)
    nbytes = count * piece
    print(json.dumps({
        "bytes": nbytes, "seconds": round(sink.elapsed, 3), "GBps": round(nbytes / sink.elapsed / 1e9, 3),
        "receiver_cpu_s_per_gib": round(sink.cpu_used / gib, 3),
        "sender_cpu_s_per_gib": round(sender_cpu / gib, 3),
        "receiver_user_s_per_gib": round(sink.user_used / gib, 3),
        "sender_user_s_per_gib": round(sender["user"] / gib, 3),
        "zero_copy_offered": not args.no_zero_copy,
        **({"wrong_pieces": sink.wrong} if args.verify else {}),
    }))
    if args.verify and (sink.wrong or sink.got != count):
        sys.exit(1)


if __name__ == "__main__":
    main()

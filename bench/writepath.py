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
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import subprocess
import sys
import time

from dragonfly.core.files import preallocate, start_writeback, write_direct

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("methods", nargs="*", default=list(METHODS), help=f"of {', '.join(METHODS)}")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--piece-mib", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
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

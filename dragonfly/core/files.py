"""Blocking file helpers, called in the worker pool only."""

from __future__ import annotations

import json
import os
from typing import Any


def pread_exact(path: str, offset: int, size: int) -> bytes:
    """Read exactly C{size} bytes at C{offset} of C{path}."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"{path}: short read at {offset}: {len(data)} of {size} bytes")
    return data


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of C{data} at C{offset} of C{fd}, and start writing it back (L{start_writeback})."""
    view = memoryview(data)
    start, size = offset, len(view)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    start_writeback(fd, start, size)


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None


def start_writeback(fd: int, offset: int, size: int) -> None:
    """
    Ask the kernel to start writing C{size} bytes at C{offset} back to disk
    now, without waiting (Linux C{sync_file_range(SYNC_FILE_RANGE_WRITE)}).

    Pieces arrive faster than the kernel's lazy writeback drains them, and
    once a few GiB are dirty every further write pays for it: on the test
    machines a 4 MiB C{pwrite} cost 2-4 s of system time per GiB with a
    backlog of dirty pages, 0.5-1 s with writeback started piece by piece
    (docs/benchmarks.md).  Elsewhere, or if the call fails, nothing happens.
    """
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            f = libc.sync_file_range
            f.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            f.restype = ctypes.c_int
            _sync_file_range = f
        except (OSError, AttributeError):
            pass
    if _sync_file_range and size > 0:
        _sync_file_range(fd, offset, size, _SYNC_FILE_RANGE_WRITE)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write C{obj} as JSON to C{path} so that readers never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def unlink_quietly(path: str) -> None:
    """Remove C{path} if it exists."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file, read in large blocks (run it in a worker pool)."""
    import hashlib  # here: dfget loads this module and must start fast

    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            block = os.read(fd, chunk)
            if not block:
                return h.hexdigest()
            h.update(block)
    finally:
        os.close(fd)


class HomeLocked(Exception):
    """Another process holds the lock of a daemon's home."""


def lock_home(home: str, name: str) -> int:
    """
    Hold C{HOME/NAME.lock} for as long as this process lives (a POSIX record
    lock: the kernel drops it when the process ends, however it ends), so two
    daemons never share one home and delete each other's files.  Returns the
    lock file's descriptor; raises L{HomeLocked} naming the holder's pid.
    """
    import fcntl

    os.makedirs(home, exist_ok=True)
    path = os.path.join(home, f"{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise HomeLocked(f"another {name} (pid {holder}) already serves {home}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd

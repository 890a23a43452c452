"""Blocking file helpers, called in the worker pool only."""

from __future__ import annotations

import errno
import json
import mmap
import os
import threading
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


#: O_DIRECT's alignment of offsets, lengths and memory (a page: the largest logical block in common use)
DIRECT_ALIGN = 4096
#: a piece not in page-aligned memory is written with O_DIRECT through a per-thread aligned buffer
#: this large, a chunk at a time
DIRECT_CHUNK = 1 << 20
#: DRAGONFLY_DIRECT_WRITES=0 writes every piece through the page cache, for same-run comparisons
DIRECT_WRITES = os.environ.get("DRAGONFLY_DIRECT_WRITES", "1") != "0"
#: DRAGONFLY_DIRECT_READBACK=1: readahead of what was written with O_DIRECT (L{read_back}); off by default,
#: it cost the receiving dfpeer 0.23-0.28 CPU s/GiB in same-run datapath comparisons (docs/benchmarks.md)
DIRECT_READBACK = os.environ.get("DRAGONFLY_DIRECT_READBACK", "0") == "1"
#: how far past a read the kernel's readahead may go (its largest window: read_ahead_kb of the test VM's disk)
KERNEL_READAHEAD = 8 << 20
_direct_buffers = threading.local()


def write_piece(path: str, data: bytes | bytearray | memoryview, offset: int) -> None:
    """
    Write all of C{data} at C{offset} of C{path}: its page-aligned part
    with C{O_DIRECT} where the file system allows it (L{write_direct}),
    the rest (an unaligned tail, or all of it) through the page cache with
    L{pwrite_all}.
    """
    view = memoryview(data)
    done = 0
    if DIRECT_WRITES and offset % DIRECT_ALIGN == 0 and len(view) >= DIRECT_ALIGN:
        done = write_direct(path, view[: len(view) - len(view) % DIRECT_ALIGN], offset)
    if done < len(view):
        fd = os.open(path, os.O_WRONLY)
        try:
            pwrite_all(fd, view[done:], offset + done)
        finally:
            os.close(fd)


def write_direct(path: str, view: memoryview, offset: int) -> int:
    """
    Write C{view} (its length and C{offset} multiples of L{DIRECT_ALIGN})
    at C{offset} of C{path} with C{O_DIRECT}: from a page-aligned buffer of
    this thread, L{DIRECT_CHUNK} at a time, or straight from C{view} when
    its memory is page-aligned (a pool buffer,
    L{dragonfly.protocol.receive.aligned}), to the device: no page of the
    page cache is filled, no kernel copy.  Returns the bytes written: fewer
    (0 at first) when the file system refuses direct I/O (EINVAL), and the
    caller writes the rest through the page cache.  Other errors
    (no space, I/O) are raised.

    Why: on the test VMs a buffered C{pwrite} of a piece cost 0.5-3.5 CPU-s
    per GiB, most of it the kernel's copy into fresh page-cache pages
    (C{copy_folio_from_iter_atomic}); with C{O_DIRECT} the same GiB cost
    0.14-0.28, the copy into the aligned buffer included (docs/benchmarks.md).
    The bytes are not kept in the page cache: an upload of the piece
    (C{sendfile} in the reactor thread) reads them from the disk, unless
    L{read_back} (DRAGONFLY_DIRECT_READBACK=1) asked the kernel to read
    them back in the background.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return 0
        raise
    if _page_aligned(view):
        try:
            done = _pwrite_direct(fd, view, offset)  # from the piece's own (pool) buffer: no copy at all
            read_back(fd, offset, done)
            return done
        finally:
            os.close(fd)
    buf = getattr(_direct_buffers, "buf", None)
    if buf is None:
        buf = _direct_buffers.buf = mmap.mmap(-1, DIRECT_CHUNK, flags=mmap.MAP_PRIVATE)  # anonymous: page-aligned
    done = 0
    try:
        while done < len(view):
            n = min(DIRECT_CHUNK, len(view) - done)
            buf[:n] = view[done:done + n]
            with memoryview(buf)[:n] as chunk:
                wrote = _pwrite_direct(fd, chunk, offset + done)
            done += wrote
            if wrote < n:
                return done  # refused part-way: the caller writes the rest through the page cache
        read_back(fd, offset, done)
    finally:
        os.close(fd)
    return done


def read_back(fd: int, offset: int, size: int) -> None:
    """
    Start reading C{size} bytes at C{offset} of C{fd}, just written with
    C{O_DIRECT}, back into the page cache, without waiting
    (C{POSIX_FADV_WILLNEED}: the kernel's readahead, no copy to user space).

    Why: a piece is uploaded soon after it is written (the SuperNode seeds
    each piece as it is fetched), with C{sendfile} in the reactor thread.
    Without it, each C{sendfile} of a piece written with C{O_DIRECT} read it
    from the disk: on the test VM 1.1-3.1 ms per call (p50, 1-4 MiB) and
    0.16-0.39 CPU-s/GiB; after it 0.1-0.5 ms and 0.05-0.12, for 0.04-0.1
    CPU-s/GiB more in the writer.  But in datapath runs it cost the
    receiving dfpeer 0.23-0.28 CPU-s/GiB (the readahead's fresh pages), for
    every piece, uploaded or not: off unless DRAGONFLY_DIRECT_READBACK=1
    (docs/benchmarks.md).
    """
    if DIRECT_READBACK and size > 0:
        try:
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):
            pass


def warm_pages(fd: int, offset: int, size: int, exact: bool = True) -> int:
    """
    Bring C{size} bytes at C{offset} of C{fd} into the page cache and wait
    for them; with C{exact}, those and no more.  Returns the bytes warmed:
    fewer when the file ends sooner.

    How: C{sendfile} to C{/dev/null} reads the pages, copying nothing, with
    the kernel's readahead (large folios, and up to its window past the
    range: L{KERNEL_READAHEAD}).  With C{exact}, on a descriptor of its own
    for the same file (C{/proc/self/fd}), told that it reads at random (no
    readahead past what it asks), the kernel is first asked for the whole
    range at once (C{POSIX_FADV_WILLNEED}: 4 KiB pages, about 0.36 CPU s/GiB
    on the test VM against 0.04-0.13 with readahead).  Where C{/dev/null}
    takes no C{sendfile}, the reads are only asked for, and C{size} is returned.

    Why: a piece written with C{O_DIRECT} is not in the page cache, and the
    content stream (L{dragonfly.peer.stream}) sends it with C{sendfile} in
    the reactor thread, which read it from the disk first, and the kernel's
    readahead with it, past the stream's frontier too, into blocks not
    written yet: zero-filled pages that the pieces' C{O_DIRECT} writes then
    threw away (a fifth of a streaming dfpeer's samples, in the reactor).
    Warmed here, in the pool, the reactor's C{sendfile} finds every page in
    memory and reads none; C{exact} near the frontier (docs/benchmarks.md,
    "The content stream reads ahead in the pool").
    """
    own = None
    if exact:
        try:
            own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
            os.posix_fadvise(own, 0, 0, os.POSIX_FADV_RANDOM)
            os.posix_fadvise(own, offset, size, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):
            pass
    src = fd if own is None else own
    done = 0
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            while done < size:
                try:
                    n = os.sendfile(null, src, offset + done, size - done)
                except InterruptedError:
                    continue
                except OSError:
                    return size  # (asked for, not waited for)
                if n == 0:
                    break
                done += n
        finally:
            os.close(null)
    finally:
        if own is not None:
            os.close(own)
    return done


def _page_aligned(view: memoryview) -> bool:
    """C{view}'s memory starts on a page boundary (a pool buffer): O_DIRECT may write from it as it is."""
    if view.readonly or not view.c_contiguous:
        return False
    import ctypes

    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor) % mmap.PAGESIZE == 0
    finally:
        del anchor


def _pwrite_direct(fd: int, view: memoryview, offset: int) -> int:
    """Write C{view} at C{offset} of an O_DIRECT C{fd}; the bytes written (fewer when it refused: EINVAL)."""
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return done  # the caller writes the rest through the page cache
            raise
    return done


def _libc_call(name: str, *argtypes: str) -> Any:
    """
    The C library's function C{name} taking C{argtypes} (ctypes type names
    without C{c_}) and returning an C{int}, or False where there is none
    (another C library, another system): the callers then do without.
    """
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        f = getattr(libc, name)
        f.argtypes = [getattr(ctypes, "c_" + t) for t in argtypes]
        f.restype = ctypes.c_int
        return f
    except (OSError, AttributeError):
        return False


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
        _sync_file_range = _libc_call("sync_file_range", "int", "longlong", "longlong", "uint")
    if _sync_file_range and size > 0:
        _sync_file_range(fd, offset, size, _SYNC_FILE_RANGE_WRITE)


_fallocate: Any = None
#: DRAGONFLY_PREALLOCATE=0 leaves files sparse, for same-run comparisons (bench.datapath --ab-env)
PREALLOCATE = os.environ.get("DRAGONFLY_PREALLOCATE", "1") != "0"


def preallocate(fd: int, size: int) -> bool:
    """
    Reserve the disk blocks of the first C{size} bytes of C{fd} now (Linux
    C{fallocate(2)}, mode 0: the file's size and contents do not change),
    so that the pieces written later into the sparse file need no block
    allocation each.  On the test machines a 1 GiB file written piece by
    piece cost 0.35-1.27 CPU-s with its blocks reserved against 0.44-4.0
    without, in 9 alternated pairs (docs/benchmarks.md).  Never emulated by
    writing zeros (as glibc's C{posix_fallocate} would where the file
    system cannot); False when the blocks were not reserved (no such call,
    no support, no space: the writes then allocate as before).
    """
    global _fallocate
    if _fallocate is None:
        _fallocate = _libc_call("fallocate64", "int", "int", "longlong", "longlong")
    if not _fallocate or size <= 0 or not PREALLOCATE:
        return False
    return bool(_fallocate(fd, 0, 0, size) == 0)


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

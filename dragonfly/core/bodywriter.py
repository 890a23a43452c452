"""
Stream an HTTP response body into a file, in order, off the reactor thread.

The body is gathered into blocks (at most C{block_size}, never across a
chunk boundary; a block is handed over early when the pool is idle, so a slow
body reaches the disk a little at a time).  Each block is hashed and written
at its offset in the worker pool, one after another, the blocks that queue up
while a pool job runs all in the next one (one hand-off per batch; each
block still written by itself, see L{_store_blocks}): a SHA-256 per chunk (a
piece on the SuperNode's CDN, updated as the chunk's blocks arrive) and a
whole-file SHA-256, in the same pass; through the page cache, or (C{direct}: the
CDN's with DRAGONFLY_CDN_DIRECT_WRITES=1) the whole pages with O_DIRECT
(L{AlignedWriter}).  While too many bytes wait for the pool
the response is paused, so a fast origin never fills memory.  A body shorter
or longer than its Content-Length, a lost connection or an origin silent for
C{idle_timeout} fails C{done}; what arrived before is on disk all the same
(the CDN resumes from it).

Writes are strictly sequential and never leave a hole, so after a crash the
file's size is the number of bytes that reached it whole: L{rehash_prefix}
rebuilds the hashes from there and L{ResumePoint} carries them into a new
writer that goes on from that offset.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from collections.abc import Callable
from typing import Any, cast

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from .files import DIRECT_ALIGN, DIRECT_CHUNK, DIRECT_WRITES, _pwrite_direct, pwrite_all, read_back, start_writeback
from .ratelimit import TokenBucket
from .threads import WorkerPool


class BodyError(Exception):
    """The body could not be stored whole; C{code} is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@define
class ResumePoint:
    """
    Where a body stored earlier stopped: C{offset} bytes on disk, the
    SHA-256 of each whole chunk before it, the whole-file hash over those
    bytes and the hash of the chunk cut at C{offset} (hashlib objects).
    C{whole}: whether C{file_hash} took those bytes (a writer that keeps no
    whole-file hash needs none, L{rehash_prefix}).
    """

    offset: int
    digests: list[str] = field(factory=list)
    file_hash: Any = field(factory=hashlib.sha256)
    chunk_hash: Any = field(factory=hashlib.sha256)
    whole: bool = True


def rehash_prefix(path: str, offset: int, chunk_size: int, read_size: int = 1 << 20, whole: bool = True) -> ResumePoint:
    """
    Hash the first C{offset} bytes of C{path} chunk by chunk (run it in the
    worker pool), and into the whole-file hash too unless C{whole} is false
    (a fetch that keeps none: half the CPU).  A file shorter than
    C{offset} gives a shorter point.
    """
    point = ResumePoint(0, whole=whole)
    fd = os.open(path, os.O_RDONLY)
    try:
        while point.offset < offset:
            room = chunk_size - point.offset % chunk_size
            block = os.pread(fd, min(read_size, room, offset - point.offset), point.offset)
            if not block:
                break
            if whole:
                point.file_hash.update(block)
            point.chunk_hash.update(block)
            point.offset += len(block)
            if point.offset % chunk_size == 0:
                point.digests.append(point.chunk_hash.hexdigest())
                point.chunk_hash = hashlib.sha256()
    finally:
        os.close(fd)
    return point


#: DRAGONFLY_CDN_SPLIT_HASH=1 hashes the whole file in a pool chain of its own beside the chunks' (each
#: chunk is then published after its own hash and write only, and the two hashes may run on two cores);
#: off by default: it adds a pool hand-off per block or so, and on the 2-core test machine, busy, it moved
#: neither the CPU nor the time of a fetch in same-run comparisons (docs/benchmarks.md)
CDN_SPLIT_HASH = os.environ.get("DRAGONFLY_CDN_SPLIT_HASH", "0") == "1"

#: DRAGONFLY_CDN_DIRECT_WRITES=1 writes the CDN's bodies' whole pages with O_DIRECT (L{AlignedWriter}).
#: Off by default: on the test VM it makes the SuperNode's own CPU steady (pool system 0.6-0.8 s/GiB where
#: the page cache's fresh pages cost it 0.5-9 from run to run), but the first peer's copy out of the seed's
#: pages read back from the disk then cost it up to 2 s/GiB more, and on a quiet machine the SuperNode and
#: its first peer together took more CPU and time with it than without (docs/benchmarks.md)
CDN_DIRECT_WRITES = DIRECT_WRITES and os.environ.get("DRAGONFLY_CDN_DIRECT_WRITES", "0") == "1"


class AlignedWriter:
    """
    Writes a stream of bytes to C{fd} in order, from any offset on: the
    whole pages with C{O_DIRECT} (gathered in a page-aligned buffer of
    C{capacity} bytes, written whenever it is full and at the end of each
    L{write}), the rest through the page cache: the head up to the first
    page boundary, and at L{flush} (a piece's end, the body's end) the tail
    of less than a page.  A page is never written both ways.  Bytes of an
    unfinished page stay in the buffer until more come or L{flush}, so the
    file's size only ever counts bytes that are on it whole, in order.

    Falls back to the page cache alone when C{direct} is false or the file
    system refuses C{O_DIRECT}.  One thread at a time (the writer's pool jobs
    run one after another).  Why: see L{dragonfly.core.files.write_direct}.
    """

    def __init__(self, fd: int, direct: bool = True, capacity: int = DIRECT_CHUNK) -> None:
        assert capacity % DIRECT_ALIGN == 0 and capacity > 0
        self.fd = fd
        self.direct = direct
        self._capacity = capacity
        self._dfd: int | None = None  # the same file opened with O_DIRECT, at first use
        self._buf: mmap.mmap | None = None
        self._at = 0  # the file offset of the buffer's first byte (page-aligned)
        self._fill = 0  # bytes in the buffer, not yet on the file
        self._broken = False

    @property
    def end(self) -> int:
        """The offset after the last byte given (on the file or in the buffer)."""
        return self._at + self._fill

    def write(self, parts: list[Any], offset: int) -> int:
        """Write the buffers C{parts} one after another at C{offset}; the bytes taken."""
        if self._fill and offset != self.end:
            self.flush()  # not the next bytes: what waits goes first
        try:
            if not self.direct or not self._open_direct():
                size = self._buffered(parts, offset)
            else:
                size = self._gather(parts, offset)
        except BaseException:
            self._broken = True
            raise
        return size

    def _buffered(self, parts: list[Any], offset: int) -> int:
        self.flush()
        size = pwritev_all(self.fd, parts, offset)
        start_writeback(self.fd, offset, size)
        self._at = offset + size
        return size

    def _gather(self, parts: list[Any], offset: int) -> int:
        assert self._buf is not None
        size = 0
        views = [memoryview(p).cast("B") for p in parts]
        for i, view in enumerate(views):
            size += len(view)
            while view:
                if not self.direct:  # refused on the way: the rest through the page cache
                    rest = [view, *views[i + 1:]]
                    return size - len(view) + self._buffered(rest, offset)
                if self._fill == 0 and offset % DIRECT_ALIGN:
                    # a head before the first page boundary: through the page cache
                    n = min(DIRECT_ALIGN - offset % DIRECT_ALIGN, len(view))
                    pwrite_all(self.fd, view[:n], offset)
                    offset += n
                    view = view[n:]
                    self._at = offset
                    continue
                if self._fill == 0:
                    self._at = offset
                n = min(self._capacity - self._fill, len(view))
                self._buf[self._fill:self._fill + n] = view[:n]
                self._fill += n
                offset += n
                view = view[n:]
                if self._fill == self._capacity:
                    self._drain(self._capacity)
        if self._fill >= DIRECT_ALIGN:
            self._drain(self._fill - self._fill % DIRECT_ALIGN)
        return size

    def _open_direct(self) -> bool:
        if self._dfd is None:
            try:
                self._dfd = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT, errno.EACCES, errno.ENXIO):
                    raise
                self.direct = False
                return False
            self._buf = mmap.mmap(-1, self._capacity, flags=mmap.MAP_PRIVATE)  # anonymous: page-aligned
        return True

    def _drain(self, n: int) -> None:
        """Write the buffer's first C{n} bytes (whole pages) with O_DIRECT; keep the rest."""
        assert self._buf is not None and self._dfd is not None
        view = memoryview(self._buf)
        try:
            done = _pwrite_direct(self._dfd, view[:n], self._at)
            if done < n:  # the file system refused: this and all the rest through the page cache
                self.direct = False
                pwrite_all(self.fd, view[done:self._fill], self._at + done)
                start_writeback(self.fd, self._at + done, self._fill - done)
                n = self._fill
            else:
                read_back(self._dfd, self._at, n)
            rest = self._fill - n
            if rest:
                view[:rest] = view[n:self._fill]
        finally:
            view.release()
        self._at += n
        self._fill -= n

    def flush(self) -> None:
        """Write the bytes waiting in the buffer (less than a page) through the page cache."""
        if self._fill and not self._broken:
            assert self._buf is not None
            view = memoryview(self._buf)
            try:
                pwrite_all(self.fd, view[:self._fill], self._at)
            finally:
                view.release()
        self._at += self._fill
        self._fill = 0

    def close(self) -> None:
        """Flush, then close both descriptors."""
        try:
            self.flush()
        finally:
            if self._dfd is not None:
                os.close(self._dfd)
                self._dfd = None
            if self._buf is not None:
                self._buf.close()
                self._buf = None
            os.close(self.fd)


def _store_blocks(out: AlignedWriter, offset: int, blocks: list[tuple[list[Any], Any, bool]], file_hash: Any) -> tuple[list[str | None], str | None]:
    """
    Store consecutive blocks from C{offset} on, in order, in one pool job:
    hash each block's C{parts} into its chunk's hash (and into C{file_hash}
    unless None), then write them all with one call; C{(the digest of each
    block that ends its chunk, else None; None or why the write failed)}.
    A failed write publishes none of them (the caller gives up on the body).

    One write per block, not one for the batch: in same-run datapath
    comparisons a batch written with one C{pwritev} (and one writeback
    start) of up to 8 MiB cost the SuperNode 2.4-2.8 system CPU s/GiB in its
    pool against 0.5-1.1, and halved the fetch's speed (docs/benchmarks.md).
    """
    digests: list[str | None] = []
    for block, chunk_hash, last in blocks:
        for part in block:
            if file_hash is not None:
                file_hash.update(part)
            chunk_hash.update(part)
        digests.append(cast(str, chunk_hash.hexdigest()) if last else None)
        try:
            offset += out.write(block, offset)
            if last:
                out.flush()  # the piece is published: every byte of it on the file
        except OSError as e:
            return [], str(e)
    return digests, None


def _hash_parts(file_hash: Any, parts: list[Any]) -> None:
    for part in parts:
        file_hash.update(part)


def pwritev_all(fd: int, parts: list[Any], offset: int) -> int:
    """Write the buffers C{parts} one after another at C{offset} of C{fd}, whole; the bytes written."""
    views = [memoryview(p) for p in parts if len(p)]
    total = sum(len(v) for v in views)
    while views:
        n = os.pwritev(fd, views[:1024], offset)
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    return total


class HeldBody(Protocol):
    """
    A response body that pauses its transport while any reason holds it (no
    file yet, a rate-limit debt, the disk behind) and resumes it when the
    last reason is gone.  Subclasses call L{_hold} and L{_release}, set
    C{_rate_held} while a rate hold is out, and call L{_held_bytes} first in
    C{dataReceived}.
    """

    _holds = 0
    _rate_held = False
    _error: Exception | None = None

    def _source(self) -> IPushProducer | None:
        """The transport a response body is delivered by: it pauses, resumes and stops."""
        return cast("IPushProducer | None", self.transport)

    def _hold(self) -> None:
        """Pause the body for one more reason."""
        self._holds += 1
        source = self._source()
        if self._holds == 1 and source is not None:
            source.pauseProducing()

    def _release(self) -> None:
        """One reason fewer; the last one resumes the body (unless it failed)."""
        self._holds -= 1
        source = self._source()
        if self._holds == 0 and source is not None and self._error is None:
            source.resumeProducing()

    def _rate_ok(self) -> None:
        self._rate_held = False
        self._release()

    def _held_bytes(self) -> None:
        """
        Bytes came: if held, pause again.  twisted.web's Response.deliverBody
        resumes the transport right after connectionMade, so a hold taken
        before the body began would otherwise never pause it (idempotent).
        """
        if self._holds:
            source = self._source()
            if source is not None:
                source.pauseProducing()


class ChunkedFileWriter(HeldBody):
    """
    Give to C{response.deliverBody}.  C{done} fires with C{(total bytes,
    whole-file sha256 hex)} once every chunk is on disk (C{total} counts the
    resumed prefix too).

    @param fd: the file to write, or None to hold the body (paused) until
        L{attach} gives it.
    @param on_chunk: called in order in the reactor thread with C{(index,
        sha256 hex)} as each chunk reaches the disk.
    @param on_bytes: called with the size of each piece of body received.
    @param start: go on from a body stored earlier (the response carries the
        bytes from C{start.offset} on).
    @param whole_hash: False: no whole-file hash (a side fetch of a few
        pieces, whose bytes are not the file's), C{done} fires with "" for it.
    @param direct: write the whole pages with C{O_DIRECT} (L{AlignedWriter};
        the CDN's, L{CDN_DIRECT_WRITES}), else through the page cache.
    """

    #: pause the body while this many bytes wait for the pool; resume at half
    MAX_PENDING_BYTES = 8 << 20
    #: bytes asked of the socket per read (Twisted's default is 64 KiB)
    READ_SIZE = 1 << 20
    #: hand a block over once it is this big ... (DRAGONFLY_CDN_BLOCK_KIB, for same-machine comparisons; with
    #: reads of up to READ_SIZE a block is mostly one read: 256 KiB cost the SuperNode 0.4-0.75 CPU s/GiB
    #: less than 1024 and fetched faster, in same-run datapath comparisons both ways round, docs/benchmarks.md)
    BLOCK = int(os.environ.get("DRAGONFLY_CDN_BLOCK_KIB", "256")) << 10
    #: ... or this big, when the pool has nothing to do
    MIN_BLOCK = 256 << 10

    def __init__(
        self,
        pool: WorkerPool,
        clock: Any,
        fd: int | None,
        chunk_size: int,
        expected_length: int | None = None,
        idle_timeout: float = 60.0,
        on_chunk: Callable[[int, str], None] | None = None,
        on_bytes: Callable[[int], None] | None = None,
        limit: TokenBucket | None = None,
        start: ResumePoint | None = None,
        whole_hash: bool = True,
        direct: bool = False,
    ) -> None:
        self._pool = pool
        self._direct = direct
        self._whole = whole_hash
        self._clock = clock
        self._fd = fd
        self._out: AlignedWriter | None = self._aligned(fd, chunk_size) if fd is not None else None
        self._chunk = chunk_size
        self._expected = expected_length
        self._idle_timeout = idle_timeout
        self._on_chunk = on_chunk
        self._on_bytes = on_bytes
        start = start if start is not None else ResumePoint(0)
        if whole_hash and not start.whole:
            raise ValueError("a whole-file hash cannot go on from a resume point that kept none")
        self._index = start.offset // chunk_size  # the chunk being filled
        self._hash = start.file_hash
        self._chunk_hash = start.chunk_hash
        self.total = start.offset  # bytes received, the resumed prefix included
        #: the bytes on the file from its start, in order (the resumed prefix included): a
        #: cut body goes on from here (what was received and not written is asked for again)
        self.written = start.offset
        # the bytes received and not yet handed to the pool: the buffers the
        # transport gave (or slices of them), never copied
        self._parts: list[Any] = []
        self._buffered = 0
        self._buf_at = start.offset  # the file offset of the first buffered byte
        self._pending = 0  # bytes handed to the pool, not yet written
        # blocks gathered and not yet given to the pool: (offset, parts, chunk index, chunk hash, last);
        # the next pool job takes all of them (L{_store_queued})
        self._queue: list[tuple[int, list[Any], int, Any, bool]] = []
        self._queued = False  # a job that takes the queue waits in the chain
        # the whole-file hash's own chain (CDN_SPLIT_HASH): the blocks it has not hashed yet, in order
        self._split = CDN_SPLIT_HASH
        self._file_parts: list[Any] = []
        self._file_pending = 0  # bytes given to that chain, not yet hashed
        self._file_running = False
        self._file_waiters: list[Deferred[None]] = []
        self._paused = False
        self._holds = 0
        self._limit = limit
        self._rate_held = False
        # the pool jobs, in order; they wait for the file when there is none yet
        self._opened: Deferred[None] = succeed(None) if fd is not None else Deferred()
        self._chain: Deferred[Any] = self._opened
        self._idle: IDelayedCall | None = None
        self._error: BodyError | None = None
        self.done: Deferred[tuple[int, str]] = Deferred()
        if fd is None:
            self._hold()

    def _aligned(self, fd: int, chunk_size: int) -> AlignedWriter:
        # pieces that end off a page boundary would share a page between two
        # pieces, written both ways: the page cache alone then
        return AlignedWriter(fd, self._direct and chunk_size % DIRECT_ALIGN == 0)

    def connectionMade(self) -> None:
        """Arm the idle timer and read the socket in large blocks."""
        self._idle = self._clock.callLater(self._idle_timeout, self._stalled)
        # read the socket in large blocks: the cost of a body is per read as
        # much as per byte (the transport given is a proxy of the connection's)
        tcp: Any = getattr(self.transport, "_producer", None)
        if isinstance(getattr(tcp, "bufferSize", None), int) and tcp.bufferSize < self.READ_SIZE:
            tcp.bufferSize = self.READ_SIZE
        source = self._source()
        if self._holds and source is not None:
            source.pauseProducing()

    def attach(self, fd: int) -> None:
        """The file is open: take the body."""
        self._fd = fd
        self._out = self._aligned(fd, self._chunk)
        self._opened.callback(None)
        self._release()

    def attach_failed(self, error: BodyError) -> None:
        """The file could not be opened: fail C{done} with C{error}."""
        self.abort(error)
        self._opened.callback(None)

    def _stalled(self) -> None:
        self.abort(BodyError("SOURCE_TIMEOUT", f"origin sent nothing for {self._idle_timeout:.0f}s"))

    def abort(self, error: BodyError) -> None:
        """Stop reading and fail C{done} with C{error}."""
        if self._error is None:
            self._error = error
        source = self._source()
        if source is not None:
            source.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        """Count, charge against the rate limit, and gather the bytes into chunks."""
        if self._error is not None:
            return
        self._held_bytes()
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        n = len(data)
        self.total += n
        if self._on_bytes is not None:
            self._on_bytes(n)
        if self._limit is not None:
            # every byte is charged, also bytes that were already on their
            # way when the body was paused: their debt delays the next hold
            delay = self._limit.reserve(n)
            if delay > 0 and not self._rate_held:
                self._rate_held = True
                self._hold()
                self._clock.callLater(delay, self._rate_ok)
        if self._expected is not None and self.total > self._expected:
            self.abort(BodyError("SOURCE_TOO_LONG", f"origin sent more than its Content-Length of {self._expected} bytes"))
            return
        rest: bytes | memoryview = data
        while rest:
            room = self._chunk - (self._buf_at + self._buffered) % self._chunk
            if len(rest) < room:
                self._parts.append(rest)
                self._buffered += len(rest)
                break
            view = memoryview(rest)
            self._parts.append(view[:room])
            self._buffered += room
            rest = view[room:]
            self._submit(last=True)
        if self._buffered >= self.BLOCK or (self._pending == 0 and self._buffered >= self.MIN_BLOCK):
            self._submit(last=False)

    def _submit(self, last: bool) -> None:
        """Hand the gathered bytes to the pool; C{last}: they end a chunk."""
        parts, self._parts = self._parts, []
        size, self._buffered = self._buffered, 0
        offset = self._buf_at
        self._buf_at += size
        index, chunk_hash = self._index, self._chunk_hash
        if last:
            self._index += 1
            self._chunk_hash = hashlib.sha256()
        self._pending += size
        if self._split and self._whole:
            # the whole-file hash goes on in its own chain, beside this one: a
            # chunk is published once its own hash and its write are done
            self._file_parts.extend(parts)
            self._file_pending += size
            if not self._file_running:
                self._hash_next()
        self._check_backlog()
        self._queue.append((offset, parts, index, chunk_hash, last))
        if not self._queued:
            # one job in the chain takes every block queued by the time the
            # jobs before it are done: while the pool is busy, blocks gather,
            # and the next job stores them with one hand-off and one write
            self._queued = True
            self._chain.addCallback(self._store_queued)

    def _store_queued(self, _: Any) -> Deferred[None] | None:
        """Store the blocks queued so far in one pool job; publish the chunks they end."""
        self._queued = False
        jobs, self._queue = self._queue, []
        size = sum(len(p) for job in jobs for p in job[1])
        if self._error is not None or not jobs:
            self._pending -= size
            return None
        offset = jobs[0][0]
        file_hash = self._hash if self._whole and not self._split else None
        blocks = [(parts, chunk_hash, last) for _, parts, _, chunk_hash, last in jobs]

        def stored(result: tuple[list[str | None], str | None]) -> None:
            digests, why = result
            self._pending -= size
            if why is not None:
                self.abort(BodyError("STORE_FAILED", f"cannot write at offset {offset}: {why}"))
            else:
                self.written = offset + size
            for job, digest in zip(jobs, digests, strict=False):
                if digest is not None and self._error is None and self._on_chunk is not None:
                    self._on_chunk(job[2], digest)
            self._check_backlog()

        def failed(f: Failure) -> None:
            self._pending -= size
            self.abort(BodyError("STORE_FAILED", f"cannot write at offset {offset}: {f.getErrorMessage()}"))

        return self._pool.run(_store_blocks, self._out, offset, blocks, file_hash).addCallbacks(stored, failed)

    def _check_backlog(self) -> None:
        """Pause the body while either chain is C{MAX_PENDING_BYTES} behind; resume once both are at half."""
        backlog = max(self._pending, self._file_pending)
        if backlog >= self.MAX_PENDING_BYTES and not self._paused:
            self._paused = True
            self._hold()
        elif self._paused and backlog <= self.MAX_PENDING_BYTES // 2:
            self._paused = False
            self._release()

    def _hash_next(self) -> None:
        """Hash every block waiting for the whole-file hash, in order, in one pool job; then the next ones."""
        parts, self._file_parts = self._file_parts, []
        if not parts or self._error is not None:
            self._file_running = False
            self._file_pending = 0
            waiters, self._file_waiters = self._file_waiters, []
            for d in waiters:
                d.callback(None)
            if parts:
                self._check_backlog()
            return
        self._file_running = True
        size = sum(len(p) for p in parts)

        def hashed(_: Any) -> None:
            self._file_pending -= size
            self._check_backlog()
            self._hash_next()

        def failed(f: Failure) -> None:
            self.abort(BodyError("STORE_FAILED", f"cannot hash the body: {f.getErrorMessage()}"))
            self._file_parts.clear()
            self._hash_next()

        self._pool.run(_hash_parts, self._hash, parts).addCallbacks(hashed, failed)

    def _hashed_all(self) -> Deferred[None]:
        """Fires once the whole-file hash has taken every block given to it."""
        if not self._file_running:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._file_waiters.append(d)
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The body ended: write the rest, then fire C{done} (or fail it)."""
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        complete = bool(reason.check(ResponseDone) or (reason.check(PotentialDataLoss) and self._expected is None))
        if complete and self._expected is not None and self.total != self._expected:
            complete = False
        if self._error is None and (self._buffered or (complete and self.total % self._chunk)):
            # the rest: the last chunk when the body is whole, else bytes a
            # resumed fetch will not need again
            self._submit(last=complete)

        def close(_: Any) -> Any:
            out, self._out, self._fd = self._out, None, None
            return self._pool.run(out.close) if out is not None else None

        def settle(_: Any) -> None:
            if self._error is not None:
                self.done.errback(self._error)
            elif not complete:
                if reason.check(ResponseDone):
                    why = f"origin sent {self.total} of {self._expected} bytes"
                else:
                    why = f"origin connection lost after {self.total} bytes: {reason.getErrorMessage()}"
                self.done.errback(BodyError("SOURCE_TRUNCATED", why))
            else:
                self.done.callback((self.total, self._hash.hexdigest() if self._whole else ""))

        self._chain.addCallback(close)
        self._chain.addBoth(lambda _: self._hashed_all())
        self._chain.addBoth(settle)


class DiscardBody(Protocol):
    """Reads and drops a response body (an error page we do not need)."""

    def dataReceived(self, data: bytes) -> None:
        """Drop the bytes."""
        pass


class AbortBody(DiscardBody):
    """Take no body: close the connection at once (an answer no longer wanted)."""

    def makeConnection(self, transport: Any) -> None:
        """Stop the body's transport as soon as it is given."""
        super().makeConnection(transport)  # type: ignore[no-untyped-call]
        transport.stopProducing()

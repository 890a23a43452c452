"""
The whole-file SHA-256 of a download, computed while it runs.

A request that names a whole-file digest (C{dfget --digest sha256:...},
every registry blob through dfdaemon) is checked end to end once the last
piece is in.  Re-reading and hashing the whole file then puts the hash of
every byte on the path of the file's last byte (about 0.6 s for 256 MiB).
L{WholeHash} keeps a running SHA-256 over the contiguous prefix of verified
and stored pieces instead, so that at the end only what is left of the
prefix is hashed:

  - a piece that is the next one of the prefix, or a few after it, is
    hashed from its buffer, which its owner keeps until then
    (L{WholeHash.offer} returns a Deferred for that); at most
    L{WholeHash.MAX_HELD} buffers are kept;
  - pieces stored ahead of the prefix are hashed from the file when the
    prefix reaches them, read in large blocks (L{update_hash});
  - every update runs in the worker pool, one job at a time and in order
    (a hashlib object must not be updated from two threads at once), never
    on the reactor thread;
  - L{WholeHash.reset} starts over (a new geometry, the whole file again
    from the origin, a failed task); the hasher is made again lazily.

It never trusts the SuperNode for the whole-file digest: the bytes hashed
are the ones verified piece by piece and written, in file order.  When a
job fails (the file went away under it), L{WholeHash.finish} falls back to
hashing the whole file again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from ..core.bitmap import Bitmap
from ..core.pieces import piece_span

#: C{(hasher, offset, size, data)}: update C{hasher} in the pool with C{data},
#: or (C{data} None) with the task file's bytes C{[offset, offset + size)}
Update = Callable[[Any, int, int, "bytes | bytearray | None"], Deferred]


class StartedOver(Exception):
    """L{WholeHash.finish} was waited on when the hash started over (the task moved on)."""


class Geometry(Protocol):
    """What L{WholeHash} reads of the task's pieces (L{dragonfly.peer.pieces.TaskPieces})."""

    length: int | None
    piece_size: int
    count: int | None
    have: Bitmap | None


#: blocks a file span is read in (one buffer, reused)
READ_BLOCK = 4 << 20


def update_hash(hasher: Any, path: str, offset: int, size: int, data: bytes | bytearray | None = None) -> None:
    """
    Blocking (run it in the pool): C{hasher.update} with C{data}, or with
    the C{size} bytes of the file at C{path} from C{offset}, read in
    L{READ_BLOCK} blocks into one buffer.
    """
    if data is not None:
        hasher.update(data)
        return
    buf = bytearray(min(READ_BLOCK, size))
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        while size > 0:
            want = min(len(buf), size)
            got = os.preadv(fd, [view[:want]], offset)
            if got <= 0:
                raise OSError(f"{path}: short read at {offset}")
            hasher.update(view[:got])
            offset += got
            size -= got
    finally:
        os.close(fd)


class WholeHash:
    """
    The running SHA-256 of one task's file.

    @param pieces: the task's geometry and which pieces are stored.
    @param update: runs one update in the pool (see L{Update}).
    @param whole: the SHA-256 of the whole file, read again (a Deferred
        firing with hex): the fallback when a job failed.
    @param new_hasher: makes the hasher (C{hashlib.sha256}).
    """

    #: buffers kept until hashed, of pieces this close to the prefix's end
    #: (the pool stores pieces that arrived in order a little out of order)
    MAX_HELD = 4
    #: a catch-up from the file reads at most this many bytes per job
    MAX_READ = 64 << 20

    def __init__(
        self, pieces: Geometry, update: Update, whole: Callable[[], Deferred],
        new_hasher: Callable[[], Any] | None = None,
    ) -> None:
        if new_hasher is None:
            import hashlib

            new_hasher = hashlib.sha256
        self._pieces = pieces
        self._update = update
        self._whole = whole
        self._new_hasher = new_hasher
        #: off: offers are ignored and L{finish} reads the whole file
        self.enabled = True
        self._generation = 0
        self._hasher: Any = None
        #: the first piece no job has taken yet (the prefix, once the jobs are done)
        self._next = 0
        self._busy = False
        self._broken = False
        #: piece -> (its buffer, fired when hashed or dropped)
        self._held: dict[int, tuple[bytes | bytearray, Deferred]] = {}
        self._waiters: list[Deferred] = []
        #: bytes hashed from buffers and from the file (for tests and logs)
        self.from_buffers = 0
        self.from_file = 0

    @property
    def prefix(self) -> int:
        """The pieces hashed or being hashed (the prefix's end once the jobs are done)."""
        return self._next

    def reset(self) -> None:
        """Start over: the pieces hashed so far no longer count; buffers kept are given back."""
        self._generation += 1
        self._hasher = None
        self._next = 0
        self._busy = False
        self._broken = False
        held, self._held = self._held, {}
        for _, done in held.values():
            done.callback(None)
        self.from_buffers = self.from_file = 0
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(StartedOver("the file started over before its whole-file hash was done"))

    def offer(self, index: int, data: bytes | bytearray | None) -> Deferred | None:
        """
        Piece C{index} was verified and stored from C{data} (in the reactor
        thread; None: its bytes are no longer in memory, they are read from
        the file when the prefix gets there).  None: done with C{data}; else
        a Deferred that fires when C{data} may be given back (it was hashed,
        or dropped).
        """
        if data is None or not self.enabled or self._broken or index < self._next or index in self._held:
            self._pump()
            return None
        if index >= self._next + self.MAX_HELD or len(self._held) >= self.MAX_HELD:
            # far ahead of the prefix (read back when it gets there), or enough kept
            self._pump()
            return None
        done: Deferred = Deferred()
        self._held[index] = (data, done)
        self._pump()
        return done

    def finish(self) -> Deferred:
        """Every piece is stored: fires with the file's hex SHA-256 (the rest of the prefix hashed first)."""
        count, length = self._pieces.count, self._pieces.length
        if not self.enabled or count is None or length is None:
            return self._whole()
        if count == 0:
            return succeed(self._new_hasher().hexdigest())
        d: Deferred = Deferred()
        self._waiters.append(d)
        self._pump()
        return d

    # -- the jobs ------------------------------------------------------------------

    def _stored(self, index: int) -> bool:
        have = self._pieces.have
        return have is not None and index in have

    def _pump(self) -> None:
        """Start the next job, if none runs; answer the waiters when the prefix is the whole file."""
        if self._busy or not self.enabled:
            return
        count, length, piece_size = self._pieces.count, self._pieces.length, self._pieces.piece_size
        if count is None or length is None:
            return
        if self._broken or (self._next >= count and self._waiters):
            self._answer()
            return
        if self._next in self._held:
            index = self._next
            data, done = self._held.pop(index)
            offset, size = piece_span(index, length, piece_size)
            if len(data) != size:
                done.callback(None)
                self._break()
                self._pump()
                return
            self._start(index + 1, offset, size, data, done)
            self.from_buffers += size
            return
        end = self._next
        offset = self._next * piece_size
        while end < count and self._stored(end) and end not in self._held and (end - self._next) * piece_size < self.MAX_READ:
            end += 1
        if end == self._next:
            if self._waiters:
                # finishing, yet the next piece is not stored: cannot happen; read the file again
                self._break()
                self._answer()
            return
        last_offset, last_size = piece_span(end - 1, length, piece_size)
        size = last_offset + last_size - offset
        self._start(end, offset, size, None, None)
        self.from_file += size

    def _start(self, end: int, offset: int, size: int, data: bytes | bytearray | None, done: Deferred | None) -> None:
        if self._hasher is None:
            self._hasher = self._new_hasher()
        self._busy = True
        self._next = end
        generation = self._generation

        def over(result: Any) -> None:
            if done is not None:
                done.callback(None)
            if generation != self._generation:
                return
            self._busy = False
            if isinstance(result, Failure):
                self._break()
            self._pump()

        self._update(self._hasher, offset, size, data).addBoth(over)

    def _break(self) -> None:
        """A job failed: give the buffers back; L{finish} reads the whole file again."""
        self._broken = True
        held, self._held = self._held, {}
        for _, done in held.values():
            done.callback(None)

    def _answer(self) -> None:
        waiters, self._waiters = self._waiters, []
        if not waiters:
            return
        if self._broken:
            for d in waiters:
                self._whole().chainDeferred(d)
            return
        sha = self._hasher.hexdigest() if self._hasher is not None else self._new_hasher().hexdigest()
        for d in waiters:
            d.callback(sha)

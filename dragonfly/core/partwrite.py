"""
Large pieces hashed and written part by part while they arrive, so that a
piece in flight holds a few MiB of memory whatever its size
(L{dragonfly.peer.pieces.TaskPieces.part}).

The parts of a piece are written into the task's file before the piece's
SHA-256 is known to match: into a region that is not served (a piece is
served once it is in the task's bitmap, which happens only after its digest
matched) and that a later copy overwrites when it did not match.  What must
never happen is a write over a piece already verified, or two copies of one
piece interleaving their parts: L{WriteGuard} keeps, for one task file, the
pieces verified and written (I{sealed}) and the one copy of each piece that
may write parts (its I{owner} token), and every write of a part or of a
whole verified piece takes its lock, so a part written after a piece was
sealed, or by a copy that lost its turn, is not written at all.  The
lock is the piece's own (one of L{STRIPES}, by index): pieces of one file
are written by several pool threads at once, as the disk takes them best
(a task-wide lock wrote a file one piece at a time: pieces of 2 MiB,
1-5 ms each, then set the pace of a whole download; docs/benchmarks.md).

Once a part is hashed and written, its pages of the piece's buffer go back
to the system (C{MADV_DONTNEED}); the buffer (L{dragonfly.protocol.receive.aligned})
asks for huge pages, so the next piece faults them in 2 MiB at a time.

A whole piece of a few MiB is hashed and written I{side by side}
(L{Beside}): one pool thread hashes it while another writes it into its
region under the same guard (a token, as for parts), and whichever ends
last seals it when it matched.  The piece's buffer and its place in the
in-flight budget are then held for the longer of the two, not their sum:
the next request waits for that (docs/benchmarks.md).

The blocking functions run in the worker pool (L{dragonfly.core.store.TaskStore}).
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import threading
from typing import Any

from .files import write_piece

__all__ = [
    "PART", "BESIDE_FROM", "WriteGuard", "Beside", "drop_pages", "write_part", "seal_part", "write_guarded",
    "hash_beside", "write_beside",
]

#: the parts a large piece is hashed and written in (a huge page)
PART = 2 << 20
#: DRAGONFLY_PART_DROP=0 keeps the parts' pages (same-run comparisons of their cost)
DROP = os.environ.get("DRAGONFLY_PART_DROP", "1") != "0"
#: whole pieces of this size and more are hashed and written side by side (L{Beside});
#: DRAGONFLY_BESIDE_FROM_MIB=0 turns it off (same-run comparisons, bench.datapath --ab-env)
BESIDE_FROM = int(os.environ.get("DRAGONFLY_BESIDE_FROM_MIB", "4")) << 20
#: the locks of one L{WriteGuard}: piece i takes lock i % STRIPES, so writes of different pieces
#: go side by side; DRAGONFLY_GUARD_STRIPES=1: one lock for the file, as before (same-run comparisons)
STRIPES = max(1, int(os.environ.get("DRAGONFLY_GUARD_STRIPES", "64")))


class WriteGuard:
    """
    Who may write which piece of one task file (see the module docstring).
    Checking that a copy may write a piece, writing it and sealing it are
    done under that piece's lock (L{lock_for}); C{sealed} and C{owners}
    change only under it or in the reactor thread.
    """

    def __init__(self, stripes: int | None = None) -> None:
        self.locks = [threading.Lock() for _ in range(stripes or STRIPES)]
        #: pieces verified and written
        self.sealed: set[int] = set()
        #: piece -> the token of the copy that may write its parts
        self.owners: dict[int, int] = {}
        #: the file's geometry changed: no part may be written any more
        self.dead = False
        self._tokens = itertools.count(1)

    def lock_for(self, index: int) -> threading.Lock:
        """The lock that piece C{index}'s writes and seal are made under."""
        return self.locks[index % len(self.locks)]

    def claim(self, index: int) -> int | None:
        """A token for a copy of piece C{index} to write its parts with, or None (sealed, or another copy writes)."""
        if self.dead or index in self.sealed or index in self.owners:
            return None
        token = self.owners[index] = next(self._tokens)
        return token

    def release(self, index: int, token: int) -> None:
        """The copy holding C{token} writes no more parts of C{index}."""
        if self.owners.get(index) == token:
            del self.owners[index]

    def may_write(self, index: int, token: int) -> bool:
        """Under L{lock_for}(C{index}): the copy holding C{token} may write a part of C{index}."""
        return not self.dead and index not in self.sealed and self.owners.get(index) == token


def drop_pages(buf: Any, start: int, end: int) -> None:
    """Give the pages of C{buf[start:end]} back to the system (C{start} on a page), when C{buf} is an anonymous map."""
    base = memoryview(buf).obj
    if not DROP or not isinstance(base, mmap.mmap) or end <= start or start % mmap.PAGESIZE:
        return
    length = min(-(-(end - start) // mmap.PAGESIZE) * mmap.PAGESIZE, len(base) - start)
    try:
        base.madvise(mmap.MADV_DONTNEED, start, length)
    except (OSError, ValueError):  # pragma: no cover - only a size mistake
        pass


def write_part(
    path: str, guard: WriteGuard, index: int, token: int, hasher: Any, buf: Any, start: int, end: int, offset: int,
) -> None:
    """
    Blocking: C{hasher.update} with C{buf[start:end]}, write it at
    C{offset + start} of C{path} if the copy may still write, then drop its pages.
    """
    view = memoryview(buf)[start:end]
    hasher.update(view)
    with guard.lock_for(index):
        if guard.may_write(index, token):
            write_piece(path, view, offset + start)
    drop_pages(buf, start, end)


def seal_part(
    path: str, guard: WriteGuard, index: int, token: int, hasher: Any, buf: Any, start: int, offset: int, digest: bytes,
) -> bool | None:
    """
    Blocking: the last part, C{buf[start:]}: True when the piece matched
    C{digest} and is all written (now sealed), False when it did not match,
    None when this copy could not write all of it (a verified copy came
    first, or it lost its turn).
    """
    view = memoryview(buf)[start:]
    try:
        hasher.update(view)
        if hasher.digest() != digest:
            return False
        with guard.lock_for(index):
            if not guard.may_write(index, token):
                return None
            write_piece(path, view, offset + start)
            guard.sealed.add(index)
        return True
    finally:
        drop_pages(buf, start, len(buf))


def write_guarded(path: str, guard: WriteGuard, index: int, offset: int, data: Any, digest: bytes) -> bool:
    """
    Blocking: a whole piece, checked against C{digest}, then written and
    sealed (not written again when a verified copy is there already).
    """
    if hashlib.sha256(data).digest() != digest:
        return False
    with guard.lock_for(index):
        if index in guard.sealed:
            return True
        write_piece(path, data, offset)
        if not guard.dead:
            guard.sealed.add(index)
    return True


class Beside:
    """
    One whole piece hashed (L{hash_beside}) and written (L{write_beside}) in
    two pool threads at once, by the copy holding C{token} of C{guard}.  The
    job that ends last seals the piece when it matched C{digest} and was
    written whole; C{result} is then True, False when it did not match,
    None when this copy could not write it (a verified copy came first, or
    the file's geometry changed), and C{error} what either job raised.
    """

    __slots__ = ("path", "guard", "index", "token", "offset", "data", "digest", "lock", "left", "matched", "wrote",
                 "error", "result")

    def __init__(self, path: str, guard: WriteGuard, index: int, token: int, offset: int, data: Any, digest: bytes) -> None:
        self.path, self.guard, self.index, self.token = path, guard, index, token
        self.offset, self.data, self.digest = offset, data, digest
        self.lock = threading.Lock()
        self.left = 2
        self.matched = False
        self.wrote = False
        self.error: BaseException | None = None
        self.result: bool | None = None

    def _end(self) -> None:
        """One of the two jobs is over: the last one seals (or not)."""
        with self.lock:
            self.left -= 1
            if self.left:
                return
        if self.error is not None or not self.matched:
            self.result = None if self.error is not None else False
            return
        guard = self.guard
        with guard.lock_for(self.index):
            if self.wrote and guard.may_write(self.index, self.token):
                guard.sealed.add(self.index)
                self.result = True


def hash_beside(b: Beside) -> None:
    """Blocking: the SHA-256 half of L{Beside}."""
    try:
        b.matched = hashlib.sha256(b.data).digest() == b.digest
    except Exception as e:  # pragma: no cover - hashing a buffer does not fail
        b.error = e
    finally:
        b._end()


def write_beside(b: Beside) -> None:
    """
    Blocking: the write half of L{Beside}: the piece into its region, not
    served until sealed, unless the copy may no longer write.
    """
    try:
        with b.guard.lock_for(b.index):
            if b.guard.may_write(b.index, b.token):
                write_piece(b.path, b.data, b.offset)
                b.wrote = True
    except Exception as e:
        b.error = e
    finally:
        b._end()

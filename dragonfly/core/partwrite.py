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

Once a part is hashed and written, its pages of the piece's buffer are
moved (C{mremap}, page tables only) into the process's L{PageBank}, a few
part-sized slots, and the next part to arrive, of this piece or another,
gets pages moved out of it into its place before its first byte: the parts
keep reusing the same few MiB of memory without a page fault or a page
cleared, while a piece in flight still holds only its parts waiting for the
pool.  When the bank is full the pages go back to the system
(C{MADV_DONTNEED}), when it is empty a part faults fresh ones in, as
before the bank (the buffer, L{dragonfly.protocol.receive.aligned}, asks
for huge pages: a fault per 2 MiB).

A whole piece of a few MiB is hashed and written I{side by side}
(L{Beside}): one pool thread hashes it while another writes it into its
region under the same guard (a token, as for parts), and whichever ends
last seals it when it matched.  The piece's buffer and its place in the
in-flight budget are then held for the longer of the two, not their sum:
the next request waits for that (docs/benchmarks.md).

The blocking functions run in the worker pool (L{dragonfly.core.store.TaskStore}).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any

from .files import write_piece

__all__ = [
    "PART", "BESIDE_FROM", "WriteGuard", "Beside", "PageBank", "drop_pages", "give_pages", "take_pages", "drop_bank",
    "write_part", "seal_part", "write_guarded", "hash_beside", "write_beside",
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


_MREMAP_MAYMOVE, _MREMAP_FIXED, _MREMAP_DONTUNMAP = 1, 2, 4
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc_mremap() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        f = libc.mremap
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None
    f.restype = ctypes.c_void_p
    f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return f


_mremap = _libc_mremap()


def _address(buf: Any) -> int:
    """The address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _move(src: int, dst: int, size: int) -> bool:
    """
    Move the pages of C{[src, src + size)} to C{dst} (page tables only; huge
    pages whole when both are on a huge page), replacing what was mapped
    there; C{src} stays mapped, empty (C{MREMAP_DONTUNMAP}).
    """
    if _mremap is None:
        return False
    flags = _MREMAP_MAYMOVE | _MREMAP_FIXED | _MREMAP_DONTUNMAP
    return bool(_mremap(src, size, size, flags, dst) == dst)


class PageBank:
    """
    The pages of up to C{slots} parts (L{PART} bytes each) between two
    pieces' parts: L{put} moves a written part's pages in, L{get} moves
    them out under the next part to arrive (module docstring).  Any thread.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._lock = threading.Lock()
        self._map = mmap.mmap(-1, slots * PART, flags=mmap.MAP_PRIVATE)
        try:
            self._map.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # pragma: no cover - no huge pages here
            pass
        self._base = _address(self._map)
        self._full: list[int] = []  # slots holding a part's pages
        self._empty = list(range(slots - 1, -1, -1))
        #: parts moved in, moved out, and not moved in (bank full) since start (tests, traces)
        self.counts = {"put": 0, "got": 0, "full": 0, "empty": 0}
        self.usable = _mremap is not None and self._base % mmap.PAGESIZE == 0 and self._probe()

    def _probe(self) -> bool:
        """This kernel moves pages that way (Linux 5.7 and later)."""
        with self._lock:
            slot = self._empty[-1] if self._empty else None
        if slot is None:  # pragma: no cover - a bank of no slot
            return False
        addr = self._base + slot * PART
        return _move(addr, addr + PART, mmap.PAGESIZE) if self.slots > 1 else True

    @property
    def held(self) -> int:
        """The parts whose pages the bank holds."""
        return len(self._full)

    def put(self, addr: int) -> bool:
        """Move the pages of the part at C{addr} into a slot; False when none is free (nothing moved)."""
        return self._move_slot(self._empty, self._full, lambda slot: _move(addr, self._base + slot * PART, PART),
                               "put", "full")

    def get(self, addr: int) -> bool:
        """Move a slot's pages under the part at C{addr}; False when the bank holds none (nothing moved)."""
        return self._move_slot(self._full, self._empty, lambda slot: _move(self._base + slot * PART, addr, PART),
                               "got", "empty")

    def _move_slot(self, source: list[int], sink: list[int], move: Callable[[int], bool], done: str, none: str) -> bool:
        """Take a slot from C{source}, C{move} its pages, and file it in C{sink} (back in C{source} if that failed)."""
        with self._lock:
            if not source:
                self.counts[none] += 1
                return False
            slot = source.pop()
        ok = move(slot)
        with self._lock:
            (sink if ok else source).append(slot)
            if ok:
                self.counts[done] += 1
        return ok

    def clear(self) -> None:
        """Give every slot's pages back to the system (no download under way)."""
        with self._lock:
            full, self._full = self._full, []
            for slot in full:
                try:
                    self._map.madvise(mmap.MADV_DONTNEED, slot * PART, PART)
                except (OSError, ValueError):  # pragma: no cover - only a size mistake
                    pass
            self._empty.extend(full)


#: the parts' pages kept between parts (L{PageBank}): DRAGONFLY_PART_RING=N slots (default 4,
#: 8 MiB); 0: no bank, each part's pages dropped once written (same-run comparisons)
RING = max(0, int(os.environ.get("DRAGONFLY_PART_RING", "4")))
_bank: PageBank | None = None


def bank() -> PageBank | None:
    """The process's L{PageBank}, made when first asked; None when off or not possible here."""
    global _bank
    if RING and _bank is None and DROP:
        try:
            made = PageBank(RING)
        except (OSError, ValueError):  # pragma: no cover
            return None
        _bank = made if made.usable else None
        if _bank is None:
            globals()["RING"] = 0
    return _bank


def drop_bank() -> None:
    """No download under way: the bank's pages back to the system."""
    if _bank is not None:
        _bank.clear()


def _part_address(buf: Any, start: int) -> int | None:
    """The address of C{buf[start:start + PART]} when it can take a part's pages: in an anonymous map, on a huge page."""
    view = memoryview(buf)
    base = view.obj
    if not isinstance(base, mmap.mmap) or view.readonly:
        return None
    addr = _address(view)
    offset = addr - _address(base)
    if (addr + start) % PART or offset + start + PART > len(base):
        return None
    return addr + start


def give_pages(buf: Any, start: int, end: int) -> None:
    """
    The parts of C{buf[start:end]} (C{start} on a part) are written: their
    pages into the bank (L{PageBank.put}), or back to the system (L{drop_pages}).
    """
    b = bank()
    if b is None:
        drop_pages(buf, start, end)
        return
    for at in range(start, end, PART):
        addr = _part_address(buf, at)
        if addr is None or not b.put(addr):
            drop_pages(buf, at, min(at + PART, end))


def take_pages(buf: Any, start: int) -> bool:
    """
    The part C{buf[start:start + PART]} is about to arrive, none of its
    bytes in yet: pages from the bank under it (L{PageBank.get}), if any.
    """
    b = bank()
    if b is None:
        return False
    addr = _part_address(buf, start)
    return addr is not None and b.get(addr)


def write_part(
    path: str, guard: WriteGuard, index: int, token: int, hasher: Any, buf: Any, start: int, end: int, offset: int,
) -> None:
    """
    Blocking: C{hasher.update} with C{buf[start:end]}, write it at
    C{offset + start} of C{path} if the copy may still write, then its
    pages to the bank or the system (L{give_pages}).
    """
    view = memoryview(buf)[start:end]
    hasher.update(view)
    with guard.lock_for(index):
        if guard.may_write(index, token):
            write_piece(path, view, offset + start)
    del view
    give_pages(buf, start, end)


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
        del view
        give_pages(buf, start, len(buf))


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

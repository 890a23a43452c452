"""
Whole pieces of a few MiB hashed in one pool thread while another writes
them (dragonfly/core/partwrite.py's L{Beside}, L{TaskPieces._write_beside}):
the piece counts as held only once it matched, what did not match is never
sealed (a good copy overwrites it), and nothing is written over a sealed
piece.

The store runs the real blocking functions on a file in C{tmp_path}, the two
halves one after the other, in either order, or on two threads at once.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from typing import Any

import pytest
from twisted.internet import defer

from dragonfly.core.partwrite import BESIDE_FROM, Beside, WriteGuard, hash_beside, write_beside, write_guarded
from dragonfly.peer.metrics import PeerStats
from dragonfly.peer.pieces import TaskPieces
from dragonfly.protocol.receive import aligned

from .test_peer_pieces import Task

TID = "b" * 64
PIECE = BESIDE_FROM + 12_288  # whole (not in parts), side by side
BODY = os.urandom(2 * PIECE)
PIECES = [BODY[:PIECE], BODY[PIECE:]]
DIGESTS = [hashlib.sha256(p).digest() for p in PIECES]


class BesideStore:
    """A task file on disk; write_beside runs the two halves in C{order} ("hash", "write" or "threads")."""

    def __init__(self, path: str, order: str = "hash") -> None:
        self.path = path
        with open(path, "wb") as f:
            f.truncate(len(BODY))
        self.order = order
        self.besides = 0
        self.fail: Exception | None = None

    def write_part(self, *args: Any) -> defer.Deferred:  # pragma: no cover - pieces here are whole
        raise AssertionError("no parts here")

    def seal_part(self, *args: Any) -> defer.Deferred:  # pragma: no cover
        raise AssertionError("no parts here")

    def write_guarded(self, task_id: str, guard: Any, index: int, offset: int, data: Any, digest: bytes) -> defer.Deferred:
        return defer.succeed(write_guarded(self.path, guard, index, offset, bytes(data), digest))

    def write_beside(self, task_id: str, guard: Any, index: int, token: int, offset: int, data: Any,
                     digest: bytes) -> defer.Deferred:
        self.besides += 1
        path = self.path if self.fail is None else str(self.path) + ".missing/x"
        b = Beside(path, guard, index, token, offset, data, digest)
        if self.order == "threads":
            t = threading.Thread(target=write_beside, args=(b,))
            t.start()
            hash_beside(b)
            t.join()
        elif self.order == "hash":
            hash_beside(b)
            write_beside(b)
        else:
            write_beside(b)
            hash_beside(b)
        assert b.left == 0
        if b.error is not None:
            return defer.fail(b.error)
        return defer.succeed(b.result)

    def content(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


def make(tmp_path: Any, order: str = "hash") -> tuple[TaskPieces, BesideStore, Task, list[Any]]:
    store = BesideStore(str(tmp_path / "task"), order)
    task = Task()
    released: list[Any] = []
    pieces = TaskPieces(TID, store, PeerStats(), released.append, task, random.Random(1))  # type: ignore[arg-type]
    pieces.size(len(BODY), PIECE)
    pieces.set_digests(0, DIGESTS)
    return pieces, store, task, released


def arrive(pieces: TaskPieces, conn: Any, index: int, body: bytes) -> Any:
    buf = aligned(len(body))
    assert pieces.part(conn, index, buf, 0) > len(body)  # kept whole
    buf[:] = body
    pieces.arrived(conn, index, buf, "remote_peer")
    return buf


@pytest.mark.parametrize("order", ["hash", "write", "threads"])
def test_a_whole_piece_is_hashed_and_written_side_by_side(tmp_path: Any, order: str) -> None:
    pieces, store, task, released = make(tmp_path, order)
    conn = object()
    offered: list[tuple[int, Any]] = []
    pieces.on_stored = lambda i, data: offered.append((i, bytes(data) if data is not None else None)) and None
    buf = arrive(pieces, conn, 1, PIECES[1])
    assert store.besides == 1
    assert task.events == [("stored", conn, 1, PIECE)]
    assert pieces.have is not None and 1 in pieces.have
    assert store.content()[PIECE:] == PIECES[1]
    assert released == [buf]
    assert offered == [(1, PIECES[1])]  # the buffer still holds the piece: the whole-file hash takes it
    guard = pieces._guard
    assert guard is not None and 1 in guard.sealed and guard.owners == {}


@pytest.mark.parametrize("order", ["hash", "write", "threads"])
def test_a_corrupt_piece_is_never_sealed_and_a_good_copy_overwrites_it(tmp_path: Any, order: str) -> None:
    pieces, store, task, released = make(tmp_path, order)
    conn = object()
    bad = bytearray(PIECES[0])
    bad[PIECE // 2] ^= 1
    arrive(pieces, conn, 0, bytes(bad))
    assert task.events == [("corrupt", conn, 0, PIECE)]
    assert pieces.have is not None and 0 not in pieces.have
    guard = pieces._guard
    assert guard is not None and 0 not in guard.sealed and guard.owners == {}
    assert pieces.picker is not None
    pieces.picker.add(conn)
    pieces.picker.corrupt(conn, 0)
    arrive(pieces, conn, 0, PIECES[0])
    assert task.events[-1] == ("stored", conn, 0, PIECE)
    assert store.content()[:PIECE] == PIECES[0]


def test_nothing_is_written_over_a_sealed_piece(tmp_path: Any) -> None:
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.truncate(PIECE)
    guard = WriteGuard()
    token = guard.claim(0)
    assert token is not None
    assert write_guarded(path, guard, 0, 0, PIECES[0], DIGESTS[0]) is True  # another copy, verified, first
    junk = os.urandom(PIECE)
    b = Beside(path, guard, 0, token, 0, junk, hashlib.sha256(junk).digest())
    write_beside(b)
    hash_beside(b)
    assert b.result is None and not b.wrote  # this copy could not write it: not held through it
    with open(path, "rb") as f:
        assert f.read() == PIECES[0]


def test_a_piece_another_copy_writes_goes_the_old_way(tmp_path: Any) -> None:
    pieces, store, task, released = make(tmp_path)
    guard = pieces._guard
    assert guard is not None
    other = guard.claim(0)  # another copy holds the piece's turn
    assert other is not None
    conn = object()
    arrive(pieces, conn, 0, PIECES[0])
    assert store.besides == 0  # checked, then written under the guard's lock, as before
    assert task.events == [("stored", conn, 0, PIECE)]
    assert store.content()[:PIECE] == PIECES[0] and 0 in guard.sealed
    assert guard.owners == {0: other}


def test_a_failed_write_is_a_store_failure(tmp_path: Any) -> None:
    pieces, store, task, released = make(tmp_path)
    store.fail = OSError("no")
    conn = object()
    buf = arrive(pieces, conn, 0, PIECES[0])
    assert [e[0] for e in task.events] == ["store_failed"]
    assert pieces.have is not None and 0 not in pieces.have
    assert released == [buf]
    guard = pieces._guard
    assert guard is not None and guard.owners == {} and 0 not in guard.sealed

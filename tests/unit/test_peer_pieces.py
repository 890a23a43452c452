"""
Tests for L{dragonfly.peer.pieces.TaskPieces}: the pieces of one download
and the verify-and-store of each, with an in-memory store whose writes can
be held back, and a recording task; no reactor, no files.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest
from twisted.internet import defer

from dragonfly.peer.metrics import PeerStats
from dragonfly.peer.pieces import TaskPieces
from dragonfly.protocol.supernode_api import SyncAnswer

TID = "t" * 64
PIECE = 16
BODY = bytes(range(256))[: 4 * PIECE - 5]  # four pieces, the last short
PIECES = [BODY[i : i + PIECE] for i in range(0, len(BODY), PIECE)]
DIGESTS = [hashlib.sha256(p).digest() for p in PIECES]


class Store:
    """The task's file in memory; with C{hold}, writes wait until L{flush}."""

    def __init__(self) -> None:
        self.file = bytearray(len(BODY))
        self.hold = False
        self.fail: Exception | None = None
        self.pending: list[tuple[defer.Deferred, int, bytes, bytes]] = []
        self.fd: int | None = 9

    def write_verified(self, task_id: str, offset: int, data: bytearray, digest: bytes) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append((d, offset, bytes(data), digest))
        if not self.hold:
            self.flush()
        return d

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for d, offset, data, digest in pending:
            if self.fail is not None:
                d.errback(self.fail)
            elif hashlib.sha256(data).digest() != digest:
                d.callback(False)
            else:
                self.file[offset : offset + len(data)] = data
                d.callback(True)

    def read(self, task_id: str, offset: int, size: int) -> defer.Deferred:
        return defer.succeed(bytes(self.file[offset : offset + size]))

    def served_fd(self, task_id: str) -> int | None:
        return self.fd


class Task:
    """Records what the pieces tell it (L{PieceOutcomes})."""

    def __init__(self) -> None:
        self.accept = True
        self.events: list[tuple[Any, ...]] = []

    def accepting(self) -> bool:
        return self.accept

    def piece_stored(self, conn: Any, index: int, nbytes: int) -> None:
        self.events.append(("stored", conn, index, nbytes))

    def piece_corrupt(self, conn: Any, index: int, nbytes: int) -> None:
        self.events.append(("corrupt", conn, index, nbytes))

    def store_failed(self, index: int, why: str) -> None:
        self.events.append(("store_failed", index, why))

    def source_piece_stored(self, index: int) -> None:
        self.events.append(("source", index))


class Parts:
    def __init__(self) -> None:
        self.store = Store()
        self.stats = PeerStats()
        self.task = Task()
        self.released: list[bytearray] = []
        self.pieces = TaskPieces(TID, self.store, self.stats, self.released.append, self.task, random.Random(1))  # type: ignore[arg-type]

    def sized(self, digests: bool = True) -> TaskPieces:
        self.pieces.size(len(BODY), PIECE)
        if digests:
            for i, d in enumerate(DIGESTS):
                self.pieces.set_digest(i, d)
        return self.pieces


# -- geometry and digests -----------------------------------------------------------


def test_size_and_completed_bytes_with_a_short_last_piece() -> None:
    p = Parts().sized()
    assert (p.length, p.piece_size, p.count) == (len(BODY), PIECE, 4)
    assert p.have is not None and len(p.have) == 0 and p.completed_bytes == 0
    p.have.set(3)
    assert p.completed_bytes == len(PIECES[3]) == PIECE - 5
    p.have_all()
    assert p.completed_bytes == len(BODY)


def test_digests_from_counts_the_leading_known_digests() -> None:
    p = Parts().pieces
    p.set_digest(0, DIGESTS[0])  # before the length is known: ignored
    assert p.digests == [] and p.digests_from == 0
    p.size(len(BODY), PIECE)
    p.set_digest(1, DIGESTS[1])
    assert p.digests_from == 0
    p.set_digest(0, DIGESTS[0])
    assert p.digests_from == 2
    p.set_digest(7, b"x" * 32)  # out of range: ignored
    p.set_digest(-1, b"x" * 32)
    assert p.digests[1:] == [DIGESTS[1], None, None]


def test_a_sync_answer_brings_digests_and_the_seed_allowance() -> None:
    p = Parts().sized(digests=False)
    p.learn(SyncAnswer.from_json({"digestsFrom": 2, "digests": [DIGESTS[2].hex(), DIGESTS[3].hex()], "seedPieces": [2]}))
    assert p.digests == [None, None, DIGESTS[2], DIGESTS[3]] and p.digests_from == 0
    assert p.picker is not None and p.picker.seed_allowed == {2}
    p.learn(SyncAnswer.from_json({"digestsFrom": 0, "digests": [DIGESTS[0].hex(), DIGESTS[1].hex()]}))
    assert p.digests == DIGESTS and p.digests_from == 4 and p.picker.seed_allowed == set()


def test_a_sync_answer_makes_its_pieces_wanted_in_one_call_to_the_picker() -> None:
    p = Parts().sized(digests=False)
    picker = p.picker
    assert picker is not None and not any(picker.wanted(i) for i in range(4))
    calls: list[list[int]] = []
    batch = picker.digests_known
    picker.digests_known = lambda indexes: (calls.append(list(indexes)), batch(indexes))  # type: ignore[method-assign]
    # one digest past the last piece: ignored, as set_digest ignores it
    p.learn(SyncAnswer.from_json({"digestsFrom": 1, "digests": [d.hex() for d in DIGESTS[1:]] + ["00" * 32]}))
    assert calls == [[1, 2, 3]]
    assert p.digests == [None, *DIGESTS[1:]] and p.digests_from == 0
    assert [picker.wanted(i) for i in range(4)] == [False, True, True, True]
    p.set_digest(0, DIGESTS[0])
    assert picker.wanted(0) and p.digests_from == 4


def test_missing_known_and_meta_need_every_digest() -> None:
    parts = Parts()
    p = parts.sized(digests=False)
    assert not p.missing_known() and p.meta() is None
    for i in (0, 1, 2):
        p.set_digest(i, DIGESTS[i])
    assert not p.missing_known()
    assert p.have is not None
    p.have.set(3)  # held pieces need no digest to fetch the rest by Range
    assert p.missing_known()
    assert p.meta() is None
    p.set_digest(3, DIGESTS[3])
    assert p.meta() == {"length": len(BODY), "pieceSize": PIECE, "digests": [d.hex() for d in DIGESTS]}


def test_restore_holds_every_piece_with_its_digest() -> None:
    p = Parts().pieces
    p.restore({"length": len(BODY), "pieceSize": PIECE, "digests": [d.hex() for d in DIGESTS]})
    assert p.have is not None and p.have.complete
    assert p.digests == DIGESTS and p.digests_from == 4


def test_stream_from_reaches_a_picker_made_later() -> None:
    p = Parts().pieces
    p.stream_from = 2
    p.size(len(BODY), PIECE)
    assert p.picker is not None and p.picker.stream_from == 2
    p.stream_from = None
    assert p.picker.stream_from is None


# -- serving ----------------------------------------------------------------------------


def test_file_and_read_give_a_verified_piece_span() -> None:
    parts = Parts()
    p = parts.sized()
    assert p.file(3) is None  # not held
    assert p.have is not None
    p.have.set(3)
    assert p.file(3) == (9, 3 * PIECE, PIECE - 5)
    parts.store.fd = None  # no descriptor open: read instead
    assert p.file(3) is None
    parts.store.file[:] = BODY
    assert p.read(1).result == PIECES[1]


# -- arriving ---------------------------------------------------------------------------


def test_a_good_piece_is_written_counted_and_told() -> None:
    parts = Parts()
    p = parts.sized()
    data = bytearray(PIECES[1])
    p.arrived("conn", 1, data, "remote_peer")
    assert parts.task.events == [("stored", "conn", 1, PIECE)]
    assert bytes(parts.store.file[PIECE : 2 * PIECE]) == PIECES[1]
    assert p.have is not None and 1 in p.have
    assert parts.stats.traffic["remote_peer"] == PIECE
    assert parts.released == [data]


def test_a_corrupt_piece_is_discarded_and_asked_again() -> None:
    parts = Parts()
    p = parts.sized()
    p.arrived("liar", 0, bytearray(b"x" * PIECE), "remote_peer")
    assert parts.task.events == [("corrupt", "liar", 0, PIECE)]
    assert parts.stats.discarded["corrupt"] == PIECE and parts.stats.traffic["remote_peer"] == 0
    assert p.have is not None and 0 not in p.have
    assert len(parts.released) == 1
    # whom to believe less, and asking again, is the task's (through the picker)
    assert p.picker is not None
    p.picker.add("liar")
    p.picker.corrupt("liar", 0)
    p.arrived("honest", 0, bytearray(PIECES[0]), "remote_peer")
    assert parts.task.events[-1] == ("stored", "honest", 0, PIECE)


def test_a_duplicate_is_not_written_twice() -> None:
    parts = Parts()
    p = parts.sized()
    parts.store.hold = True
    p.arrived("a", 2, bytearray(PIECES[2]), "remote_peer")
    p.arrived("b", 2, bytearray(PIECES[2]), "supernode")  # the endgame's second copy, while the first is checked
    assert len(parts.store.pending) == 1
    assert parts.stats.discarded["duplicate"] == PIECE and len(parts.released) == 1
    parts.store.flush()
    assert parts.task.events == [("stored", "a", 2, PIECE)]
    p.arrived("c", 2, bytearray(PIECES[2]), "remote_peer")  # too late
    assert parts.stats.discarded["duplicate"] == 2 * PIECE and len(parts.released) == 3


def test_nothing_is_written_when_the_task_takes_no_pieces() -> None:
    parts = Parts()
    p = parts.sized()
    parts.task.accept = False
    p.arrived("a", 0, bytearray(PIECES[0]), "remote_peer")
    assert parts.store.pending == [] and parts.task.events == []
    assert parts.stats.discarded["duplicate"] == PIECE and len(parts.released) == 1


@pytest.mark.parametrize("good", [True, False])
def test_a_piece_written_after_the_task_stopped_taking_pieces_is_not_held(good: bool) -> None:
    parts = Parts()
    p = parts.sized()
    parts.store.hold = True
    p.arrived("a", 0, bytearray(PIECES[0] if good else b"x" * PIECE), "remote_peer")
    parts.task.accept = False  # e.g. gone back to the origin meanwhile
    parts.store.flush()
    assert parts.task.events == []
    assert parts.stats.discarded["duplicate" if good else "corrupt"] == PIECE
    assert p.picker is not None and 0 not in p.picker.verifying


def test_a_failed_write_is_told_and_the_piece_wanted_again() -> None:
    parts = Parts()
    p = parts.sized()
    parts.store.fail = OSError("disk full")
    p.arrived("a", 0, bytearray(PIECES[0]), "remote_peer")
    assert parts.task.events == [("store_failed", 0, "disk full")]
    assert len(parts.released) == 1
    assert p.picker is not None and p.picker.wanted(0)


# -- from the origin ----------------------------------------------------------------------


def test_a_piece_from_the_origin_is_checked_and_held_once() -> None:
    parts = Parts()
    p = parts.sized()
    assert p.from_source(2, bytearray(PIECES[2])).result is True
    assert p.have is not None and 2 in p.have
    assert p.from_source(2, bytearray(PIECES[2])).result is True
    assert parts.task.events == [("source", 2)]
    assert p.from_source(3, bytearray(b"z" * len(PIECES[3]))).result is False
    assert 3 not in p.have and parts.task.events == [("source", 2)]

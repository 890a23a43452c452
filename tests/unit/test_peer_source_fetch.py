"""
Tests for L{dragonfly.peer.source.SourceFetch}: how a task goes back to the
origin (by piece or whole), with a scripted origin and the task's real
L{TaskPieces} over an in-memory store; no sockets, no reactor.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from dragonfly.peer.metrics import PeerStats
from dragonfly.peer.outcome import TaskFailed
from dragonfly.peer.pieces import TaskPieces
from dragonfly.peer.source import FromSource, SourceFetch, SourceMismatch

PIECE = 8
BODY = bytes(range(5 * PIECE - 2))
PIECES = [BODY[i : i + PIECE] for i in range(0, len(BODY), PIECE)]
SHA = hashlib.sha256(BODY).hexdigest()
OTHER = b"another version of the file"
OTHER_SHA = hashlib.sha256(OTHER).hexdigest()


class Store:
    def __init__(self) -> None:
        self.file = bytearray(len(BODY))

    def write_verified(self, task_id: str, offset: int, data: bytearray, digest: bytes) -> defer.Deferred:
        if hashlib.sha256(data).digest() != digest:
            return defer.succeed(False)
        self.file[offset : offset + len(data)] = data
        return defer.succeed(True)

    def sha256(self) -> defer.Deferred:
        return defer.succeed(hashlib.sha256(self.file).hexdigest())


class Outcomes:
    def accepting(self) -> bool:
        return False

    def source_piece_stored(self, index: int) -> None:
        pass


class Origin:
    """Answers Range requests from C{body}, with scripted errors first; records what was asked."""

    def __init__(self, pieces: TaskPieces, body: bytes = BODY) -> None:
        self.pieces = pieces
        self.body = body
        self.errors: list[Exception] = []
        self.asked: list[list[tuple[int, int]]] = []
        self.wholes = 0
        self.forgotten = 0

    async def runs(self, runs: list[tuple[int, int]]) -> tuple[int, str] | None:
        self.asked.append(list(runs))
        if self.errors:
            raise self.errors.pop(0)
        for first, last in runs:
            for i in range(first, last + 1):
                if not await self.pieces.from_source(i, bytearray(self.body[i * PIECE : (i + 1) * PIECE])):
                    raise SourceMismatch(f"piece {i}")
        return None

    async def whole(self) -> tuple[int, str]:
        self.wholes += 1
        return len(self.body), hashlib.sha256(self.body).hexdigest()

    def forget(self) -> None:
        self.forgotten += 1


def setup(held: list[int], body: bytes = BODY) -> tuple[SourceFetch, Origin, Store, TaskPieces]:
    store = Store()
    pieces = TaskPieces("t", store, PeerStats(), lambda b: None, Outcomes(), random.Random(0))  # type: ignore[arg-type]
    pieces.size(len(BODY), PIECE)
    for i, p in enumerate(PIECES):
        pieces.set_digest(i, hashlib.sha256(p).digest())
    assert pieces.have is not None
    for i in held:
        store.file[i * PIECE : (i + 1) * PIECE] = PIECES[i]
        pieces.have.set(i)
    origin = Origin(pieces, body)
    fetch = SourceFetch(pieces, origin.whole, origin.runs, origin.forget, store.sha256, lambda *a, **k: None)
    return fetch, origin, store, pieces


def result(d: Any) -> Any:
    out: list[Any] = []
    defer.Deferred.fromCoroutine(d).addBoth(out.append)
    assert out, "did not finish"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_by_piece_asks_only_for_the_missing_runs_and_checks_the_whole() -> None:
    fetch, origin, store, pieces = setup([0, 2])
    got = result(fetch.fetch(True, None, SHA))
    assert got == FromSource(len(BODY), SHA, verified=True)
    assert origin.asked == [[(1, 1), (3, 4)]] and origin.wholes == 0 and origin.forgotten == 0
    assert bytes(store.file) == BODY and pieces.have is not None and pieces.have.complete


def test_by_piece_without_a_digest_to_check_the_whole_against() -> None:
    fetch, _, _, _ = setup([1])
    assert result(fetch.fetch(True, None, None)) == FromSource(len(BODY), None, verified=True)


def test_by_piece_whole_file_mismatch_fails() -> None:
    fetch, _, _, _ = setup([1])
    with pytest.raises(TaskFailed) as e:
        result(fetch.fetch(True, "0" * 64, SHA))
    assert e.value.code == "DIGEST_MISMATCH"


def test_a_cut_answer_is_asked_again_for_the_rest_only() -> None:
    fetch, origin, store, _ = setup([0])
    origin.errors = [TaskFailed("SOURCE_TRUNCATED", "cut"), TaskFailed("SOURCE_TIMEOUT", "silent")]
    assert result(fetch.fetch(True, SHA, None)).verified
    assert origin.asked == [[(1, 4)]] * 3 and bytes(store.file) == BODY


def test_cut_answers_give_up_after_the_attempts() -> None:
    fetch, origin, _, _ = setup([0])
    origin.errors = [TaskFailed("SOURCE_TRUNCATED", "cut")] * SourceFetch.ATTEMPTS
    with pytest.raises(TaskFailed) as e:
        result(fetch.fetch(True, None, None))
    assert e.value.code == "SOURCE_TRUNCATED" and len(origin.asked) == SourceFetch.ATTEMPTS


def test_an_origin_error_is_not_asked_again() -> None:
    fetch, origin, _, _ = setup([0])
    origin.errors = [TaskFailed("SOURCE_ERROR", "500", 500)]
    with pytest.raises(TaskFailed) as e:
        result(fetch.fetch(True, None, None))
    assert e.value.origin_status == 500 and len(origin.asked) == 1


def test_another_version_at_the_origin_gets_the_whole_file_unchecked() -> None:
    fetch, origin, _, _ = setup([0], body=OTHER.ljust(len(BODY), b"."))
    got = result(fetch.fetch(True, None, SHA))
    assert not got.verified and origin.wholes == 1 and origin.forgotten == 1
    assert got.sha256 == hashlib.sha256(OTHER.ljust(len(BODY), b".")).hexdigest()


def test_without_pieces_the_whole_file_as_a_new_file() -> None:
    fetch, origin, _, _ = setup([], body=OTHER)
    assert result(fetch.fetch(False, None, SHA)) == FromSource(len(OTHER), OTHER_SHA, verified=False)
    assert origin.asked == [] and origin.forgotten == 1


def test_the_whole_file_is_checked_against_the_requested_digest() -> None:
    fetch, _, _, _ = setup([], body=OTHER)
    with pytest.raises(TaskFailed) as e:
        result(fetch.fetch(False, SHA, None))
    assert e.value.code == "DIGEST_MISMATCH" and "origin content" in e.value.message

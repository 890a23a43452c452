"""
Tests for L{dragonfly.peer.source}: the Range plan and the body collector of
back-to-source by piece (fake transport, L{Clock}; no sockets).
"""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from dragonfly.core.bodywriter import BodyError
from dragonfly.core.ratelimit import TokenBucket
from dragonfly.peer.source import (
    RangeCollector,
    SourceMismatch,
    byte_span,
    missing_runs,
    parse_content_range,
)

PIECE = 10
BODY = bytes(range(97))  # ten pieces, the last of 7 bytes
DIGESTS = [hashlib.sha256(BODY[i : i + PIECE]).digest() for i in range(0, len(BODY), PIECE)]


@given(st.integers(0, 40).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, max(n - 1, 0))), st.integers(0, 5))))
def test_missing_runs_cover_exactly_the_missing_pieces(case: tuple[int, set[int], int]) -> None:
    count, have, bound = case
    have = {i for i in have if i < count}
    runs = missing_runs(have, count, bound)
    covered = [i for a, b in runs for i in range(a, b + 1)]
    assert covered == [i for i in range(count) if i not in have]
    assert all(a <= b for a, b in runs)
    if bound:
        assert all(b - a + 1 <= bound for a, b in runs)
    # runs are maximal unless bounded
    if not bound:
        assert all(runs[k][1] + 1 < runs[k + 1][0] for k in range(len(runs) - 1))


def test_byte_span_of_the_last_short_piece() -> None:
    assert byte_span((0, 0), 97, PIECE) == (0, 9)
    assert byte_span((3, 9), 97, PIECE) == (30, 96)


@given(st.integers(0, 10**12), st.integers(0, 10**6), st.integers(1, 10**6))
def test_content_range_round_trip(first: int, extra: int, more: int) -> None:
    last = first + extra
    total = last + more
    assert parse_content_range(f"bytes {first}-{last}/{total}".encode()) == (first, last, total)
    assert parse_content_range(f"bytes {first}-{last}/*") == (first, last, None)


@given(st.binary(max_size=40))
def test_content_range_never_crashes(raw: bytes) -> None:
    out = parse_content_range(raw)
    assert out is None or (out[0] <= out[1] and (out[2] is None or out[1] < out[2]))


def test_content_range_rejects() -> None:
    for bad in (None, b"", b"bytes 5-3/10", b"bytes 0-10/10", b"items 0-1/2", b"bytes */10"):
        assert parse_content_range(bad) is None


class FakeTransport:
    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class Disk:
    """Verifies like the store; answers when told (or at once)."""

    def __init__(self, hold: bool = False) -> None:
        self.file = bytearray(len(BODY))
        self.hold = hold
        self.waiting: list[tuple[defer.Deferred, bool]] = []
        self.written: list[int] = []

    def on_piece(self, index: int, data: bytearray) -> defer.Deferred:
        ok = hashlib.sha256(data).digest() == DIGESTS[index]
        if ok:
            self.file[index * PIECE : index * PIECE + len(data)] = data
            self.written.append(index)
        d: defer.Deferred = defer.Deferred()
        if self.hold:
            self.waiting.append((d, ok))
        else:
            d.callback(ok)
        return d

    def flush(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, ok in waiting:
            d.callback(ok)


def collector(run: tuple[int, int], disk: Disk, clock: Clock | None = None, **kw: object) -> tuple[RangeCollector, FakeTransport]:
    c = RangeCollector(clock or Clock(), run, len(BODY), PIECE, disk.on_piece, **kw)  # type: ignore[arg-type]
    t = FakeTransport()
    c.makeConnection(t)
    return c, t


def outcome(d: defer.Deferred) -> object:
    box: list[object] = []
    d.addBoth(box.append)
    assert box, "not fired"
    return box[0]


def test_collects_a_run_in_odd_chunks() -> None:
    disk = Disk()
    c, _ = collector((3, 9), disk)
    body = BODY[30:]
    for k in range(0, len(body), 7):
        c.dataReceived(body[k : k + 7])
    c.connectionLost(Failure(ResponseDone()))
    assert outcome(c.done) == len(body)
    assert disk.written == list(range(3, 10))
    assert bytes(disk.file[30:]) == body and bytes(disk.file[:30]) == bytes(30)


@given(
    st.integers(0, 9).flatmap(lambda a: st.tuples(st.just(a), st.integers(a, 9))),
    st.lists(st.integers(1, 40), min_size=1, max_size=100),
)
def test_any_chunking_gives_the_same_pieces(run: tuple[int, int], sizes: list[int]) -> None:
    disk = Disk()
    handed: list[tuple[int, bytes, bytearray]] = []

    def on_piece(index: int, data: bytearray) -> defer.Deferred:
        handed.append((index, bytes(data), data))
        return disk.on_piece(index, data)

    c = RangeCollector(Clock(), run, len(BODY), PIECE, on_piece)
    c.makeConnection(FakeTransport())
    first, last = byte_span(run, len(BODY), PIECE)
    body, k, n = BODY[first : last + 1], 0, 0
    while k < len(body):
        step = sizes[n % len(sizes)]
        c.dataReceived(body[k : k + step])
        k, n = k + step, n + 1
    c.connectionLost(Failure(ResponseDone()))
    assert outcome(c.done) == len(body)
    assert disk.written == list(range(run[0], run[1] + 1))
    assert bytes(disk.file[first : last + 1]) == body
    # a piece handed on is never touched again by the collector
    for index, copy, data in handed:
        assert bytes(data) == copy == BODY[index * PIECE : index * PIECE + PIECE]


def test_a_cut_body_fails_after_storing_the_whole_pieces() -> None:
    disk = Disk()
    c, _ = collector((0, 9), disk)
    c.dataReceived(BODY[:45])
    c.connectionLost(Failure(PotentialDataLoss()))
    err = outcome(c.done)
    assert isinstance(err, Failure) and isinstance(err.value, BodyError) and err.value.code == "SOURCE_TRUNCATED"
    assert disk.written == [0, 1, 2, 3]


def test_a_clean_close_short_of_the_range_is_truncated() -> None:
    disk = Disk()
    c, _ = collector((0, 1), disk)
    c.dataReceived(BODY[:15])
    c.connectionLost(Failure(ResponseDone()))
    err = outcome(c.done)
    assert isinstance(err, Failure) and err.value.code == "SOURCE_TRUNCATED"


def test_too_long_is_refused() -> None:
    disk = Disk()
    c, t = collector((0, 0), disk)
    c.dataReceived(BODY[:11])
    assert t.stopped
    c.connectionLost(Failure(ResponseDone()))
    err = outcome(c.done)
    assert isinstance(err, Failure) and err.value.code == "SOURCE_TOO_LONG"
    assert disk.written == []


def test_a_piece_of_another_version_is_a_mismatch() -> None:
    disk = Disk()
    c, t = collector((0, 2), disk)
    c.dataReceived(BODY[:10] + bytes(20))
    assert t.stopped
    c.connectionLost(Failure(ResponseDone()))
    err = outcome(c.done)
    assert isinstance(err, Failure) and isinstance(err.value, SourceMismatch)
    assert disk.written == [0]


def test_paused_while_pieces_wait_for_the_disk_and_done_only_after_them() -> None:
    disk = Disk(hold=True)
    c, t = collector((0, 3), disk)
    c.dataReceived(BODY[:20])
    assert t.paused
    c.dataReceived(BODY[20:40])
    c.connectionLost(Failure(ResponseDone()))
    assert not c.done.called
    disk.flush()
    assert outcome(c.done) == 40 and not t.paused


def test_paced_by_the_local_limit() -> None:
    clock = Clock()
    disk = Disk()
    bucket = TokenBucket(10, clock, burst=10)
    c, t = collector((0, 9), disk, clock=clock, limits=[bucket, None])
    c.dataReceived(BODY[:30])  # 20 bytes over the burst: 2 s of debt
    assert t.paused
    clock.advance(1.9)
    assert t.paused
    clock.advance(0.2)
    assert not t.paused


def test_silent_origin_times_out() -> None:
    clock = Clock()
    disk = Disk()
    c, t = collector((0, 1), disk, clock=clock, idle_timeout=5.0)
    c.dataReceived(BODY[:5])
    clock.advance(4.0)
    c.dataReceived(BODY[5:8])
    clock.advance(4.0)
    assert not t.stopped
    clock.advance(1.5)
    assert t.stopped
    c.connectionLost(Failure(ResponseDone()))
    err = outcome(c.done)
    assert isinstance(err, Failure) and err.value.code == "SOURCE_TIMEOUT"

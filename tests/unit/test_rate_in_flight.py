"""
A download whose pieces arrive fast keeps more of them in flight
(L{Neighbours.limits}): at least what arrives in L{RATE_TIME} at the
measured rate (L{ArrivalRate}), within L{RATE_MOST_BYTES}, one piece over
the floor at most; a slow one (the swarm's 80 Mbit/s hosts, 1 MiB pieces)
keeps its floor.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.task import Clock

from dragonfly.core.bitmap import Bitmap
from dragonfly.peer.neighbours import ArrivalRate, Neighbours, rate_pieces
from dragonfly.peer.picker import Picker

MIB = 1 << 20
COUNT = 64


class Conn:
    def __init__(self, name: str) -> None:
        self.remote_id = name
        self.closed = False
        self.asked: list[int] = []

    def request(self, index: int, now: float) -> None:
        self.asked.append(index)

    def cancel(self, index: int) -> None:
        pass


def download(piece_size: int, in_flight: int = 6 * MIB) -> tuple[Neighbours, Picker[Any], Clock, list[int]]:
    picker: Picker[Any] = Picker(COUNT)
    for i in range(COUNT):
        picker.digest_known(i)
    clock = Clock()
    arrived: list[int] = []
    daemon = SimpleNamespace(per_connection=1, in_flight_bytes=in_flight, link_rate=None, trace=False)
    task = SimpleNamespace(
        daemon=daemon, clock=clock, task_id="t" * 64, piece_size=piece_size, picker=picker, downloading=True,
        syncer=SimpleNamespace(resting=False), stream_from=None, seed_conn=None,
        # (the store: checked at once, as TaskPieces.arrived does)
        piece_arrived=lambda conn, index, data, kind: (arrived.append(index), picker.verify(index)),
    )
    n = Neighbours(task)  # type: ignore[arg-type]
    n.RATE_TIME, n.RATE_MOST_BYTES, n.RATE_MORE = 0.05, 24 * MIB, 1  # the defaults, whatever the environment says
    return n, picker, clock, arrived


def test_arrival_rate_is_bytes_over_the_gaps() -> None:
    r = ArrivalRate()
    assert r.rate is None
    r.arrived(1.0, 8 * MIB)
    assert r.rate is None  # one piece: no gap yet
    r.arrived(1.01, 8 * MIB)
    assert r.rate == pytest.approx(8 * MIB / 0.01)
    for k in range(2, 40):
        r.arrived(1.0 + k * 0.01, 8 * MIB)
    assert r.rate == pytest.approx(8 * MIB / 0.01)


def test_a_pause_brings_the_rate_down_at_once_and_it_recovers() -> None:
    r = ArrivalRate()
    t = 0.0
    for _ in range(10):
        r.arrived(t, MIB)
        t += 0.001
    fast = r.rate
    assert fast is not None
    t += 1.0  # nothing for a second
    r.arrived(t, MIB)
    slow = r.rate
    assert slow is not None and slow < fast / 100
    for _ in range(40):
        t += 0.001
        r.arrived(t, MIB)
    again = r.rate
    assert again is not None and again > fast / 2


def test_rate_pieces() -> None:
    # off, unknown
    assert rate_pieces(None, 8 * MIB, 0.05, 32 * MIB) == 0
    assert rate_pieces(1e9, 8 * MIB, 0.0, 32 * MIB) == 0
    assert rate_pieces(1e9, 8 * MIB, 0.05, 0) == 0
    # the swarm's host: 80 Mbit/s, 1 MiB pieces: one piece, under any floor
    assert rate_pieces(10e6, MIB, 0.05, 32 * MIB) == 1
    # 700 MB/s, 8 MiB pieces: 35 MB in 0.05 s is 5 pieces, 4 fit in 32 MiB
    assert rate_pieces(700e6, 8 * MIB, 0.05, 32 * MIB) == 4
    assert rate_pieces(700e6, 8 * MIB, 0.05, 64 * MIB) == 5
    assert rate_pieces(float("inf"), 8 * MIB, 0.05, 32 * MIB) == 4
    # a piece larger than the most: none
    assert rate_pieces(1e9, 40 * MIB, 0.05, 32 * MIB) == 0


def test_a_fast_download_keeps_more_pieces_in_flight() -> None:
    n, picker, clock, _ = download(8 * MIB)
    assert n.limits() == (1, 2)  # two of 8 MiB: the 16 MiB floor
    n.arrivals.arrived(0.0, 8 * MIB)
    n.arrivals.arrived(0.012, 8 * MIB)  # 8 MiB in 12 ms: 700 MB/s
    assert n.limits() == (1, 3)  # what arrives in 50 ms, within 24 MiB
    # slower again: back to the floor
    n.arrivals.arrived(1.0, 8 * MIB)
    assert n.limits() == (1, 2)


def test_one_piece_more_than_the_floor_at_most() -> None:
    # 2 MiB pieces at 500 MB/s: 12 arrive in 50 ms (24 MiB), the floor is 4, one more is kept
    n, picker, clock, _ = download(2 * MIB)
    assert n.limits() == (1, 4)
    n.arrivals.arrived(0.0, 2 * MIB)
    n.arrivals.arrived(0.004, 2 * MIB)
    assert n.limits() == (1, 5)
    n.RATE_MORE = 3
    assert n.limits() == (1, 7)


def test_the_swarm_keeps_its_floor() -> None:
    n, picker, clock, _ = download(MIB)
    before = n.limits()
    assert before == (1, 6)  # --in-flight 6M of 1 MiB pieces
    t = 0.0
    for _ in range(50):  # 1 MiB every 0.1 s: 80 Mbit/s
        n.arrivals.arrived(t, MIB)
        t += 0.1
    assert n.limits() == before
    for _ in range(50):  # even at 20 MB/s
        n.arrivals.arrived(t, MIB)
        t += 0.05
    assert n.limits() == before
    for _ in range(50):  # or at 1 GB/s: the floor's one more (5) is under --in-flight's 6
        n.arrivals.arrived(t, MIB)
        t += 0.001
    assert n.limits() == before


def test_arrivals_raise_the_requests_a_fill_sends() -> None:
    n, picker, clock, arrived = download(8 * MIB)
    a = Conn("a")
    picker.add(a)
    have = Bitmap(COUNT)
    for i in range(COUNT):
        have.set(i)
    picker.bitfield(a, have)
    n.fill()
    assert len(a.asked) == 1  # not measured yet: one request on the connection
    # pieces come every 10 ms, each stored at once
    body = bytearray(8 * MIB)
    for _ in range(6):
        clock.advance(0.01)
        index = min(picker.outstanding(a))
        n.on_piece(a, index, body)
        assert arrived[-1] == index and index in picker.verifying
        picker.stored(index)
        n.fill()
    assert picker.in_flight == 3  # what 50 ms carry at 840 MB/s, within 24 MiB


def test_rate_floor_off(monkeypatch: pytest.MonkeyPatch) -> None:
    n, picker, clock, _ = download(8 * MIB)
    monkeypatch.setattr(n, "RATE_TIME", 0.0)
    n.arrivals.arrived(0.0, 8 * MIB)
    n.arrivals.arrived(0.012, 8 * MIB)
    assert n.limits() == (1, 2)

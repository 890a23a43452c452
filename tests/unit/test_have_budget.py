"""
A HAVE that asks its neighbour for the piece at once (L{Neighbours.on_have},
L{Picker.offer}) keeps to the same budget as a fill (L{Neighbours.fill}):
the pieces in flight and those received and still being verified and
written (their buffers are held) count against the task's limit.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.task import Clock

from dragonfly.core.bitmap import Bitmap
from dragonfly.peer.neighbours import Neighbours
from dragonfly.peer.picker import Picker

COUNT = 32


class Conn:
    def __init__(self, name: str) -> None:
        self.remote_id = name
        self.closed = False
        self.asked: list[int] = []

    def request(self, index: int, now: float) -> None:
        self.asked.append(index)

    def __repr__(self) -> str:
        return self.remote_id


def swarm() -> tuple[Neighbours, Picker[Any]]:
    picker: Picker[Any] = Picker(COUNT)
    for i in range(COUNT):
        picker.digest_known(i)
    daemon = SimpleNamespace(per_connection=COUNT, in_flight_bytes=6 << 20, link_rate=None)
    task = SimpleNamespace(
        daemon=daemon, clock=Clock(), task_id="t" * 64, piece_size=1 << 20, picker=picker, downloading=True,
        syncer=SimpleNamespace(resting=False), stream_from=None, seed_conn=None,
    )
    return Neighbours(task), picker  # type: ignore[arg-type]


def holding(indexes: range) -> Bitmap:
    b = Bitmap(COUNT)
    for i in indexes:
        b.set(i)
    return b


def test_a_have_counts_the_pieces_being_verified_as_a_fill_does() -> None:
    n, picker = swarm()
    _, limit = n.limits()
    a, b = Conn("a"), Conn("b")
    for c in (a, b):
        picker.add(c)
    picker.bitfield(a, holding(range(COUNT // 2)))
    picker.bitfield(b, Bitmap(COUNT))
    n.fill()
    assert len(a.asked) == limit  # the whole budget, from a
    # two of them arrive and are being verified: still in the budget
    for i in a.asked[:2]:
        picker.received(a, i)
        assert picker.verify(i)
    n.fill()
    assert len(a.asked) == limit  # a fill asks nothing more
    n.on_have(b, COUNT - 1)  # nor does a HAVE of a piece only b holds
    assert b.asked == []
    # one is written: room for one request, which the HAVE takes
    picker.stored(a.asked[0])
    n.on_have(b, COUNT - 1)
    assert b.asked == [COUNT - 1]
    n.on_have(b, COUNT - 2)
    assert b.asked == [COUNT - 1]

"""
A dfpeer's picker fills once per batch of frames read together
(L{Neighbours.hold_fills}), and not at all for a seed HAVE outside the seed
allowance: the seed is asked only for its allowance.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.task import Clock

from dragonfly.core.bitmap import Bitmap
from dragonfly.peer import neighbours as nb
from dragonfly.peer.neighbours import Neighbours
from dragonfly.protocol import frames as F
from dragonfly.protocol.connection import BlockConnection
from dragonfly.protocol.receive import Receiver


class Picker:
    def __init__(self) -> None:
        self.fills = 0
        self.seed_allowed: set[int] = set()
        self.stream_window = 0
        self.verifying: set[int] = set()

    def fill(self, *a: Any, **k: Any) -> list[Any]:
        self.fills += 1
        return []

    def have(self, conn: Any, index: int) -> None:
        pass

    def starving(self) -> bool:
        return False


def neighbours() -> tuple[Neighbours, Picker]:
    picker = Picker()
    daemon = SimpleNamespace(per_connection=1, in_flight_bytes=6 << 20, link_rate=None)
    task = SimpleNamespace(
        daemon=daemon, clock=Clock(), task_id="t" * 64, piece_size=1 << 20, picker=picker, downloading=True,
        syncer=SimpleNamespace(resting=False), stream_from=None, set_digest=lambda i, d: None,
    )
    return Neighbours(task), picker  # type: ignore[arg-type]


def test_fills_asked_for_while_held_become_one_at_release() -> None:
    n, picker = neighbours()
    n.fill()
    assert picker.fills == 1
    n.hold_fills()
    n.hold_fills()  # nested: the outer release fills
    n.fill()
    n.fill()
    n.release_fills()
    assert picker.fills == 1
    n.release_fills()
    assert picker.fills == 2
    n.hold_fills()
    n.release_fills()  # nothing asked: no fill
    n.release_fills()  # unmatched: ignored
    assert picker.fills == 2


def test_a_seed_have_fills_only_for_the_seed_allowance() -> None:
    n, picker = neighbours()
    seed = SimpleNamespace(closed=False)
    n.seed_conn = seed
    n.on_have(seed, 5)
    assert picker.fills == 0
    picker.seed_allowed = {7}
    n.on_have(seed, 7)
    assert picker.fills == 1


def test_every_event_fills_when_batching_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nb, "BATCH_FILLS", False)
    n, picker = neighbours()
    seed = SimpleNamespace(closed=False)
    n.seed_conn = seed
    n.hold_fills()
    n.fill()
    n.on_have(seed, 5)
    assert picker.fills == 2
    n.release_fills()
    assert picker.fills == 2


class Side:
    """A side that counts the fills its callbacks ask for and the ones it runs."""

    accepts_pieces = True
    block_version = 1

    def __init__(self) -> None:
        self.n, self.picker = neighbours()
        self.have = Bitmap(8)

    def local_bitmap(self) -> Bitmap:
        return self.have

    def attached(self, conn: Any) -> None:
        pass

    def on_bitfield(self, conn: Any) -> None:
        self.n.fill()

    def on_digests(self, conn: Any, first: int, digests: list[bytes]) -> None:
        self.n.fill()

    def on_have(self, conn: Any, index: int) -> None:
        self.n.fill()

    def hold_fills(self) -> None:
        self.n.hold_fills()

    def release_fills(self) -> None:
        self.n.release_fills()

    def download_limits(self) -> list[Any]:
        return []


def test_the_receiver_holds_the_fills_of_one_read() -> None:
    side = Side()
    conn = BlockConnection(object(), "me", lambda t: None, side=side, task_id="ab" * 32, version=1)
    conn.connection_made()
    rx = Receiver(conn, lambda actions: None, None)
    hello = F.encode_hello(bytes.fromhex("ab" * 32), "you", 1)
    # HELLO, BITFIELD, DIGESTS and two HAVEs in one read: one fill
    data = hello + F.encode_bitfield(Bitmap(8)) + b"".join(F.encode_digests(0, [b"\0" * 32])) \
        + F.encode_have(1) + F.encode_have(2)
    rx.data_received(data)
    assert not conn.closed
    assert side.picker.fills == 1
    # the next read: one more
    rx.data_received(F.encode_have(3) + F.encode_have(4))
    assert side.picker.fills == 2

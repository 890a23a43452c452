"""
The dfpeer opens one connection to the seed at a time: a sync answer that
names the seed again while the first connection is still in its handshake
must not open a second one (it would take the first's place as the seed's,
and the first's DIGESTS would then be refused as a stranger's).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from dragonfly.peer.neighbours import Neighbours
from dragonfly.protocol.supernode_api import Parent
from dragonfly.supernode.scheduler import SEED_ID


class Proto:
    def __init__(self, remote: str) -> None:
        self.remote_id = remote
        self.transport: Any = None
        self.closed = False


class Factory:
    def __init__(self) -> None:
        self.made: list[Proto] = []

    def client(self, side: Any, task_id: str, remote: str) -> Proto:
        proto = Proto(remote)
        self.made.append(proto)
        return proto

    def connect(self, endpoint: Any, proto: Proto) -> Any:
        proto.transport = object()  # TCP is up; the handshake is not over
        return succeed(proto)


def test_the_seed_is_not_connected_twice_during_its_handshake() -> None:
    factory = Factory()
    daemon = SimpleNamespace(peer_id="me", endpoint=lambda ip, port: (ip, port), block_factory=factory)
    task = SimpleNamespace(daemon=daemon, clock=Clock(), task_id="t" * 64, _log=lambda *a, **k: None)
    n = Neighbours(task)  # type: ignore[arg-type]
    seed = Parent(SEED_ID, "10.0.0.9", 8001, seed=True)
    n.connect(seed)
    n.connect(seed)
    assert len(factory.made) == 1 and n._seed_proto is factory.made[0]
    # once that connection is gone, the seed is connected again
    factory.made[0].closed = True
    n.connect(seed)
    assert len(factory.made) == 2 and n._seed_proto is factory.made[1]
    # other parents are not affected
    n.connect(Parent("peer-b", "10.0.0.2", 8002))
    assert len(factory.made) == 3


def test_pieces_in_flight_hold_about_16_mib_at_the_least_not_4_large_pieces() -> None:
    MiB = 1 << 20

    def limit(piece_size: int, in_flight: int = 6 * MiB) -> int:
        daemon = SimpleNamespace(per_connection=1, in_flight_bytes=in_flight)
        task = SimpleNamespace(daemon=daemon, clock=Clock(), task_id="t" * 64, piece_size=piece_size)
        return Neighbours(task).limits()[1]  # type: ignore[arg-type]

    # small pieces: --in-flight, or 4 at the least, as before
    assert [limit(s * MiB) for s in (1, 2, 4)] == [6, 4, 4]
    assert limit(1 * MiB, 32 * MiB) == 32
    # large ones: what fits in 16 MiB, and never under 2 (each is a buffer in memory)
    assert [limit(s * MiB) for s in (8, 15, 60)] == [2, 2, 2]
    assert limit(15 * MiB, 64 * MiB) == 4


def test_a_known_fast_link_keeps_what_it_carries_in_flight_time_requested() -> None:
    MiB = 1 << 20

    def limit(link_rate: int | None, piece_size: int = 2 * MiB) -> int:
        daemon = SimpleNamespace(per_connection=1, in_flight_bytes=6 * MiB, link_rate=link_rate)
        task = SimpleNamespace(daemon=daemon, clock=Clock(), task_id="t" * 64, piece_size=piece_size)
        return Neighbours(task).limits()[1]  # type: ignore[arg-type]

    # unknown, or a link that carries less than --in-flight in LINK_TIME: unchanged
    assert limit(None) == limit(125 * MiB) == 4
    # 10 Gbit/s (1250 MB/s): 0.05 s is 62.5 MB, 29 pieces of 2 MiB
    assert limit(1_250_000_000) == 29
    # large pieces: never fewer than without the link
    assert limit(1_250_000_000, 60 * MiB) == 2


def test_limits_follow_what_they_are_worked_out_from() -> None:
    MiB = 1 << 20
    daemon = SimpleNamespace(per_connection=1, in_flight_bytes=6 * MiB, link_rate=None)
    task = SimpleNamespace(daemon=daemon, clock=Clock(), task_id="t" * 64, piece_size=1 * MiB)
    n = Neighbours(task)  # type: ignore[arg-type]
    assert n.limits() == (1, 6)
    assert n.limits() == (1, 6)
    daemon.in_flight_bytes = 32 * MiB
    assert n.limits() == (1, 32)
    task.piece_size = 4 * MiB
    assert n.limits() == (1, 8)
    daemon.per_connection = 2
    assert n.limits() == (2, 8)
    daemon.link_rate = 1_250_000_000
    assert n.limits() == (2, 14)


def test_the_limit_grows_with_the_neighbours_not_with_the_seed() -> None:
    MiB = 1 << 20
    daemon = SimpleNamespace(per_connection=1, in_flight_bytes=6 * MiB, link_rate=None)
    task = SimpleNamespace(daemon=daemon, clock=Clock(), task_id="t" * 64, piece_size=1 * MiB)
    n = Neighbours(task)  # type: ignore[arg-type]
    assert n.NEIGHBOUR_BYTES == 0  # off by default (DRAGONFLY_NEIGHBOUR_MIB turns it on)
    n.NEIGHBOUR_BYTES = 16 * MiB
    seed = Proto(SEED_ID)
    n.conns.add(seed)
    n.seed_conn = seed
    peers = [Proto(f"peer-{i}") for i in range(20)]
    n.conns.update(peers[:6])
    assert n.limits() == (1, 6)  # six neighbours (the seed does not count): --in-flight
    n.conns.update(peers[6:9])
    assert n.limits() == (1, 9)  # nine: one piece each
    n.conns.update(peers[9:])
    assert n.limits() == (1, 16)  # twenty: what fits in 16 MiB
    n.conns.difference_update(peers[8:])
    assert n.limits() == (1, 8)
    task.piece_size = 4 * MiB
    assert n.limits() == (1, 4)  # 8 pieces of 4 MiB do not fit: 16 MiB of them
    n.NEIGHBOUR_BYTES = 0
    task.piece_size = 1 * MiB
    assert n.limits() == (1, 6)  # off

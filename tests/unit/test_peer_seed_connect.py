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

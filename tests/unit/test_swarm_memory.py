"""
A whole swarm in memory: a real SuperNode (CDN, scheduler, seed, REST API)
and real dfpeers, on one fake reactor.  The REST calls go through
L{treq.testing.StubTreq}; the block connections are wired with
L{twisted.test.iosim} between the factories listening on the memory
reactor.  No sockets, no threads, time only moves when the test moves it.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import ConnectionCompleter, IOPump

from dragonfly.peer.daemon import PeerDaemon
from dragonfly.protocol.block import BlockFactory
from dragonfly.supernode.api import SupernodeApi
from dragonfly.supernode.cdn import Cdn
from dragonfly.supernode.node import SuperNode
from dragonfly.supernode.scheduler import SEED_ID, Scheduler

from .test_supernode_api import PIECE, FakeHttp, FakeResponse, SyncPool

URL = "http://origin.test/files/swarm.bin"
BODY = random.Random(11).randbytes(24 * PIECE + 300)  # 25 pieces, the last short
SEED_PORT = 8001


class NoOrigin:
    """The dfpeers' own origin client: the swarm must never need it."""

    def get(self, url: str, **kw: Any) -> Any:
        raise AssertionError(f"a dfpeer went to the origin for {url}")


class MemorySwarm:
    def __init__(self, root: str, peers: int) -> None:
        self.reactor = MemoryReactorClock()
        self.origin = FakeHttp()
        self.node = SuperNode(
            lambda track: Cdn(root + "/supernode", self.origin, SyncPool(), self.reactor, piece_size=PIECE, on_new_task=track),
            Scheduler(rng=random.Random(0)),
            self.reactor,
            "10.0.0.9",
            SEED_PORT,
        )
        self.reactor.listenTCP(SEED_PORT, BlockFactory(SEED_ID, self.node.seed_side, clock=self.reactor))
        self.api = StubTreq(SupernodeApi(self.node, process_metrics=False).resource())
        self.completer = ConnectionCompleter(self.reactor)
        self.pumps: list[IOPump] = []
        self.peers = []
        for i in range(peers):
            daemon = PeerDaemon(
                self.reactor, f"{root}/peer{i}", ["supernode.test:80"], f"10.0.1.{i}", SyncPool(), NoOrigin(),
                supernode_http=self.api,
            )
            daemon.listening(40000 + i)
            self.reactor.listenTCP(40000 + i, daemon.block_factory)
            self.peers.append(daemon)

    def step(self, seconds: float = 0.01) -> None:
        """Answer REST calls, complete connections, move bytes, then let time pass."""
        for _ in range(3):
            self.api.flush()
            while (pump := self.completer.succeedOnce()) is not None:
                self.pumps.append(pump)
            for pump in self.pumps:
                pump.pump()
        self.reactor.advance(seconds)

    def run_until(self, done: Any, limit: float = 60.0) -> float:
        start = self.reactor.seconds()
        while not done():
            assert self.reactor.seconds() - start < limit, "the swarm did not finish in time"
            self.step()
        return self.reactor.seconds() - start


def downloaded(swarm: MemorySwarm) -> tuple[list[Any], float]:
    """Every dfpeer registers and downloads URL: the tasks, and the seconds once the origin answered."""
    for daemon in swarm.peers:
        Deferred.fromCoroutine(daemon.register())
    swarm.run_until(lambda: all(d.registered for d in swarm.peers), 5)
    tasks = [daemon.download({"url": URL}) for daemon in swarm.peers]
    swarm.run_until(lambda: len(swarm.origin.calls) == 1, 5)
    swarm.origin.serve(FakeResponse(body=BODY))
    elapsed = swarm.run_until(lambda: all(t.status in ("success", "failed") for t in tasks))
    return tasks, elapsed


def test_a_swarm_in_memory_fetches_the_origin_once_and_shares(tmp_path: Any) -> None:
    swarm = MemorySwarm(str(tmp_path), peers=4)
    tasks, elapsed = downloaded(swarm)

    assert [t.status for t in tasks] == ["success"] * 4, [t.error for t in tasks]
    for daemon, task in zip(swarm.peers, tasks, strict=True):
        with open(daemon.store.data_path(task.task_id), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(BODY).digest()
    # the origin once; the seed about one copy (super-seeding), not one per
    # peer: the rest went peer to peer
    assert len(swarm.origin.calls) == 1
    assert swarm.node.seed_bytes < 2 * len(BODY)
    for task in tasks:
        assert task.traffic["back_to_source"] == 0
        assert task.traffic["supernode"] + task.traffic["remote_peer"] == len(BODY)
    assert sum(t.traffic["remote_peer"] for t in tasks) > 2 * len(BODY)
    assert elapsed < 30


def test_a_forgotten_dfpeer_registers_again_and_announces_what_it_holds(tmp_path: Any) -> None:
    swarm = MemorySwarm(str(tmp_path), peers=2)
    tasks, _ = downloaded(swarm)
    tid = tasks[0].task_id
    first, second = swarm.peers
    pieces = len(swarm.node.scheduler.availability(tid))
    assert swarm.node.scheduler.availability(tid) == [2] * pieces

    # the SuperNode lost the first peer (a TTL, a restart): its next heartbeat
    # registers it again and re-announces the finished task, piece by piece
    swarm.node.remove_peer(first.peer_id)
    assert swarm.node.scheduler.availability(tid) == [1] * pieces
    Deferred.fromCoroutine(first.heartbeat())
    swarm.run_until(lambda: swarm.node.scheduler.availability(tid) == [2] * pieces, 5)

    # the second evicts the task: the SuperNode is told it no longer holds it
    Deferred.fromCoroutine(second.evict(tid))
    swarm.run_until(lambda: swarm.node.scheduler.availability(tid) == [1] * pieces, 5)
    assert second.peer_id not in swarm.node.task_detail(tid).peers


def test_a_dfpeer_with_no_download_under_way_keeps_no_piece_buffers(tmp_path: Any) -> None:
    # the pool would keep up to 16 buffers of each piece size forever: an
    # idle dfpeer's memory would be what its last downloads needed
    swarm = MemorySwarm(str(tmp_path), peers=3)
    tasks, _ = downloaded(swarm)
    assert [t.status for t in tasks] == ["success"] * 3, [t.error for t in tasks]
    swarm.step()
    for daemon in swarm.peers:
        pool = daemon.block_factory.pool
        assert pool.free(PIECE) == 0 and pool.free(len(BODY) % PIECE) == 0
    # and a buffer taken during a download is reused while it lasts
    pool = swarm.peers[0].block_factory.pool
    buf = pool.take(PIECE)
    pool.give(buf)
    assert pool.take(PIECE) is buf

"""
A restarted SuperNode and the dfpeers that re-announce what they hold (in
memory, L{tests.unit.test_swarm_memory.MemorySwarm}): a re-announce is a
sync, never a registration, so it never makes the CDN ask the origin
anything (no revalidation, no fetch of a new version nobody asked for).
"""

from __future__ import annotations

import os
import random
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred

from dragonfly.supernode.api import SupernodeApi
from dragonfly.supernode.cdn import Cdn
from dragonfly.supernode.node import SuperNode
from dragonfly.supernode.scheduler import Scheduler

from .test_supernode_api import PIECE, SyncPool
from .test_swarm_memory import SEED_PORT, MemorySwarm, downloaded


def restart_supernode(swarm: MemorySwarm, root: str, keep_cache: bool = True) -> SuperNode:
    """A new SuperNode process on the same home, which revalidates every registration with the origin."""
    if not keep_cache:
        repo = os.path.join(root, "supernode", "repo")
        for name in os.listdir(repo):
            os.unlink(os.path.join(repo, name))
    node = SuperNode(
        lambda track: Cdn(
            root + "/supernode", swarm.origin, SyncPool(), swarm.reactor, piece_size=PIECE, on_new_task=track,
            revalidate_after=0.0,
        ),
        Scheduler(rng=random.Random(1)),
        swarm.reactor,
        "10.0.0.9",
        SEED_PORT,
    )
    assert node.cdn.load() == (1 if keep_cache else 0)
    swarm.node = node
    swarm.api = StubTreq(SupernodeApi(node, process_metrics=False).resource())
    for daemon in swarm.peers:
        daemon.client._http = swarm.api
    return node


def heartbeats(swarm: MemorySwarm) -> None:
    """Each dfpeer's next heartbeat: the restarted SuperNode does not know it, so it registers and re-announces."""
    for daemon in swarm.peers:
        Deferred.fromCoroutine(daemon.heartbeat())


def test_a_re_announce_joins_the_swarm_without_asking_the_origin(tmp_path: Any) -> None:
    root = str(tmp_path)
    swarm = MemorySwarm(root, peers=2)
    tasks, _ = downloaded(swarm)
    tid = tasks[0].task_id
    assert len(swarm.origin.calls) == 1
    node = restart_supernode(swarm, root)
    pieces = node.cdn.tasks[tid].piece_count
    assert pieces and node.scheduler.availability(tid) == [0] * pieces

    heartbeats(swarm)
    swarm.run_until(lambda: node.scheduler.availability(tid) == [2] * pieces, 5)
    swarm.run_until(lambda: all(d.registered for d in swarm.peers), 5)
    # nothing asked of the origin: no conditional GET, no new version fetched
    assert len(swarm.origin.calls) == 1
    assert node.cdn.origin_fetches == 0 and node.cdn.tasks[tid].status == "success"
    assert sorted(node.task_detail(tid).peers) == sorted(d.peer_id for d in swarm.peers)


def test_a_copy_of_another_version_is_dropped_on_re_announce(tmp_path: Any) -> None:
    root = str(tmp_path)
    swarm = MemorySwarm(root, peers=2)
    tasks, _ = downloaded(swarm)
    tid = tasks[0].task_id
    node = restart_supernode(swarm, root)
    pieces = node.cdn.tasks[tid].piece_count
    stale, fresh = swarm.peers
    stale.tasks[tid].syncer.version = "0123456789abcdef"  # it holds content the cache no longer has

    heartbeats(swarm)
    swarm.run_until(lambda: tid not in stale.tasks, 5)
    swarm.run_until(lambda: node.scheduler.availability(tid) == [1] * pieces, 5)
    assert node.task_detail(tid).peers == [fresh.peer_id]
    assert len(swarm.origin.calls) == 1


def test_a_task_the_supernode_lost_is_not_fetched_on_re_announce(tmp_path: Any) -> None:
    root = str(tmp_path)
    swarm = MemorySwarm(root, peers=2)
    tasks, _ = downloaded(swarm)
    tid = tasks[0].task_id
    node = restart_supernode(swarm, root, keep_cache=False)

    heartbeats(swarm)
    swarm.run_until(lambda: all(d.registered for d in swarm.peers), 5)
    for _ in range(50):
        swarm.step(0.1)
    # the CDN fetches it when a download registers it, not before
    assert tid not in node.cdn.tasks and len(swarm.origin.calls) == 1
    # and the dfpeers keep serving their verified copies
    assert all(tid in d.tasks for d in swarm.peers)


def test_a_restarted_dfpeer_remembers_when_a_supernode_last_answered(tmp_path: Any) -> None:
    """So a dfpeer restarted while its SuperNode restarts waits for it rather than sending downloads to the origin."""
    from twisted.internet.task import Clock

    from dragonfly.peer.daemon import SEEN_FILE, PeerDaemon

    home = str(tmp_path / "peer")
    os.makedirs(home)
    clock = Clock()
    clock.advance(1000.0)
    first = PeerDaemon(clock, home, ["supernode.test:80"], "10.0.1.1", SyncPool(), None)
    assert first.supernode_seen is None
    first.supernode_seen = clock.seconds() - 4.0  # answered 4 s ago
    assert os.path.exists(os.path.join(home, SEEN_FILE))

    later = Clock()  # a new process: its reactor's clock starts elsewhere
    later.advance(50.0)
    second = PeerDaemon(later, home, ["supernode.test:80"], "10.0.1.1", SyncPool(), None)
    second.recall_supernode_seen()
    assert second.supernode_seen is not None
    assert 3.5 <= later.seconds() - second.supernode_seen <= 10.0

    # a home where no SuperNode ever answered: nothing to wait for
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    third = PeerDaemon(later, empty, ["supernode.test:80"], "10.0.1.1", SyncPool(), None)
    third.recall_supernode_seen()
    assert third.supernode_seen is None

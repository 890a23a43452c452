"""
The dfpeer's periodic loops run on L{dragonfly.core.periodic} (a
C{TimerService} with the clock injected): L{PeerGc}'s collections and a
task's stall check; no module of dragonfly/peer makes its own LoopingCall.
"""

from __future__ import annotations

import ast
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

import dragonfly.peer
from dragonfly.peer.gc import PeerGc


class Daemon:
    """Expires the tasks it is told to, once each; may fail."""

    def __init__(self) -> None:
        self.expired: list[str] = []
        self.evicted: list[str] = []
        self.calls = 0
        self.fail = False

    def expire_tasks(self, ttl: float) -> list[str]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("boom")
        expired, self.expired = self.expired, []
        return expired

    def evictable(self, task_id: str) -> bool:
        return True

    async def evict(self, task_id: str) -> None:
        self.evicted.append(task_id)


def gc(clock: Clock, daemon: Daemon, ready: defer.Deferred | None = None) -> PeerGc:
    return PeerGc(daemon, clock, 60.0, 3600.0, None, ready=ready)  # type: ignore[arg-type]


def test_collections_run_at_start_then_every_interval_until_stopped() -> None:
    clock, daemon = Clock(), Daemon()
    daemon.expired = ["t1"]
    service = gc(clock, daemon)
    service.startService()
    assert daemon.calls == 1 and daemon.evicted == ["t1"] and service.expired_tasks == 1
    clock.advance(60)
    assert daemon.calls == 2
    service.stopService()
    clock.advance(600)
    assert daemon.calls == 2 and clock.getDelayedCalls() == []


def test_a_failing_collection_does_not_stop_the_loop() -> None:
    clock, daemon = Clock(), Daemon()
    daemon.fail = True
    service = gc(clock, daemon)
    service.startService()
    clock.advance(60)
    assert daemon.calls == 2
    daemon.fail = False
    daemon.expired = ["t2"]
    clock.advance(60)
    assert daemon.evicted == ["t2"]
    service.stopService()


def test_stopped_before_the_restore_finished_it_never_runs() -> None:
    clock, daemon, ready = Clock(), Daemon(), defer.Deferred()
    service = gc(clock, daemon, ready)
    service.startService()
    service.stopService()
    ready.callback(None)
    clock.advance(600)
    assert daemon.calls == 0


def test_no_hand_made_looping_call_in_the_peer_package() -> None:
    root = os.path.dirname(dragonfly.peer.__file__)
    found = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(root, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names: list[Any] = []
            if isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            if "LoopingCall" in names:
                found.append(name)
    assert found == []


def test_a_disk_job_refused_by_the_stopped_pool_is_no_failure_at_shutdown() -> None:
    from twisted.logger import LogLevel, capturedLogs

    from dragonfly.core.threads import PoolStopped

    class Disk:
        def __init__(self) -> None:
            self.pending: defer.Deferred = defer.Deferred()

        def run(self) -> defer.Deferred:
            return self.pending

    def collect_then(stop_first: bool) -> list[Any]:
        clock, daemon, disk = Clock(), Daemon(), Disk()
        service = PeerGc(daemon, clock, 60.0, 3600.0, disk)  # type: ignore[arg-type]
        with capturedLogs() as events:
            service.startService()  # the first collection waits on the disk job
            if stop_first:
                service.stopService()
            disk.pending.errback(PoolStopped("the worker pool stopped"))
            if not stop_first:
                service.stopService()
        return [e for e in events if e.get("log_level") is LogLevel.critical]

    # refused because the dfpeer is stopping: not a failure
    assert collect_then(stop_first=True) == []
    # the same error while the dfpeer runs is one
    assert len(collect_then(stop_first=False)) == 1

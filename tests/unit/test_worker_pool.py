"""
The worker pool at shut-down, with real threads and a fake reactor (its
C{callFromThread} queue drained by hand): a job handed to a stopped pool
fails at once instead of never firing, and the SuperNode's GC, stopped
beside the pool as C{twistd} stops every service at once, is not held up
by a pool job that would never run (a daemon whose start failed used to
wait for the 5 s watchdog).
"""

from __future__ import annotations

import queue
import time
from typing import Any

import pytest
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from dragonfly.core.gc import DiskGc, Usage, Watermark
from dragonfly.core.threads import PoolStopped, WorkerPool
from dragonfly.supernode.gc import SupernodeGc


class ThreadReactor:
    """Only what L{deferToThreadPool} needs: results from the threads, run when drained."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.calls.put((f, args, kwargs))

    def drain(self, until: Any, timeout: float = 5.0) -> bool:
        """Run the queued calls until C{until()} holds (True) or C{timeout} seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                f, args, kwargs = self.calls.get(timeout=min(left, 0.05))
            except queue.Empty:
                continue
            f(*args, **kwargs)
        return True


def outcome(d: Deferred) -> list[Any]:
    got: list[Any] = []
    d.addBoth(got.append)
    return got


def test_a_job_given_to_a_stopped_pool_fails_at_once() -> None:
    reactor = ThreadReactor()
    pool = WorkerPool(reactor, size=2)
    pool.startService()
    got = outcome(pool.run(lambda: 6 * 7))
    assert reactor.drain(lambda: bool(got)) and got == [42]
    pool.stopService()
    late = outcome(pool.run(lambda: 1))
    # before: Twisted's ThreadPool dropped the job silently and this never fired
    assert len(late) == 1 and isinstance(late[0], Failure) and late[0].check(PoolStopped)


class Swarms:
    def expire_tasks(self, now: float, max_age: float) -> list[str]:
        return []

    def expire(self, now: float) -> list[str]:
        return []


class Cache:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def expire_parked(self, max_age: float) -> Deferred[int]:
        return self.pool.run(lambda: (time.sleep(0.05), 0)[1])


class Node:
    def __init__(self, pool: WorkerPool) -> None:
        self.scheduler = Swarms()
        self.cdn = Cache(pool)


@pytest.mark.parametrize("disk", [True, False])
def test_the_gc_stopped_with_the_pool_does_not_wait_for_a_dropped_job(tmp_path: Any, disk: bool) -> None:
    reactor, clock = ThreadReactor(), Clock()
    pool = WorkerPool(reactor, size=2)
    measured: list[str] = []

    def usage(path: str) -> Usage:
        measured.append(path)
        return Usage(used=0, total=100)

    collector = DiskGc(
        str(tmp_path), pool, Watermark(percent=80), Watermark(percent=60), candidates=list,
        evict=lambda task_id: None, still_evictable=lambda task_id: True, usage=usage,
    ) if disk else None
    top = MultiService()
    pool.setServiceParent(top)  # the tap's order: the pool first, the GC later
    gc = SupernodeGc(Node(pool), clock, 60.0, 180.0, collector)  # type: ignore[arg-type]
    gc.setServiceParent(top)
    top.startService()  # the GC's first collection starts at once: its parked-file job is in the pool
    stopped = outcome(top.stopService())  # every child stops at once: the pool joins its threads
    assert reactor.drain(lambda: bool(stopped), timeout=3.0), "the shut-down waited for a job the pool dropped"
    assert measured == []  # no disk collection begun after the stop

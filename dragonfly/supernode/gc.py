"""
The SuperNode's garbage collection, run periodically and once at start-up.

  - peers that stopped heartbeating for C{--peer-ttl} are dropped from
    scheduling (checked every few seconds, whether or not anyone syncs);
  - swarms no peer touched for C{--task-expire} are dropped from the
    scheduler (the CDN keeps the cached file for the next peer);
  - the prefixes of cut origin fetches parked for a resume (C{HOME/resume})
    are deleted after C{--task-expire};
  - the CDN cache (C{HOME/repo}) is kept between C{--gc-disk-low} and
    C{--gc-disk-high} by evicting least-recently-used tasks that are not in use
    (see L{dragonfly.core.gc}).

Two loops (L{dragonfly.core.periodic}): the peer check, and the rest.
Stopping lets a collection under way end at its next step: no new pool job
is started once the service stops (the worker pool stops beside it, and a
job it never runs would hold the shut-down up).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..core.gc import DiskGc
from ..core.periodic import periodic
from ..core.threads import PoolStopped
from .node import SuperNode

log = Logger()


class SupernodeGc(MultiService):
    """
    @param interval: seconds between task-expiry and disk collections.
    @param peer_interval: seconds between peer-liveness checks.
    @param task_expire: seconds a swarm may stay untouched.
    @param disk: the CDN cache's disk collector, or None.
    """

    def __init__(
        self,
        node: SuperNode,
        clock: Any,
        interval: float,
        task_expire: float,
        disk: DiskGc | None,
        peer_interval: float = 5.0,
    ) -> None:
        super().__init__()
        self.node = node
        self.clock = clock
        self.interval = interval
        self.task_expire = task_expire
        self.peer_interval = peer_interval
        self.disk = disk
        self.expired_peers = 0
        self.expired_tasks = 0
        self._stopping = False
        # each loop runs at once when started, then every interval; the
        # methods are looked up at each step
        periodic(peer_interval, lambda: self.expire_peers(), clock, "peer expiry").setServiceParent(self)
        periodic(interval, lambda: self.run(), clock, "garbage collection").setServiceParent(self)

    def startService(self) -> None:
        self._stopping = False
        super().startService()

    def stopService(self) -> Deferred:
        # set before the loops stop: a collection waiting on the pool goes no further
        self._stopping = True
        return super().stopService()  # type: ignore[no-any-return]

    def expire_peers(self) -> list[str]:
        """Drop the peers that stopped heartbeating; their ids."""
        dead = self.node.scheduler.expire(self.clock.seconds())
        if dead:
            self.expired_peers += len(dead)
            log.info("dropped {n} peers that stopped heartbeating: {peers}", n=len(dead), peers=dead)
        return dead

    def expire_tasks(self) -> list[str]:
        """Drop the swarms no peer touched for C{task_expire}; their task ids."""
        idle = self.node.scheduler.expire_tasks(self.clock.seconds(), self.task_expire)
        if idle:
            self.expired_tasks += len(idle)
            log.info("dropped {n} idle swarms from the scheduler", n=len(idle), tasks=idle)
        return idle

    def run(self) -> Deferred:
        """One collection: idle swarms, then the disk.  Errors are logged, the loop goes on."""

        async def collect() -> None:
            self.expire_tasks()
            # prefixes of cut origin fetches nobody came back for
            parked = await self.node.cdn.expire_parked(self.task_expire)
            if parked:
                log.info("deleted {n} files of origin fetches parked for a resume", n=parked)
            if self.disk is not None and not self._stopping:
                await self.disk.run()

        def failed(f: Any) -> None:
            if f.check(PoolStopped) and self._stopping:
                log.info("garbage collection cut short by the shut-down")
            else:
                log.failure("garbage collection failed", f)

        d = Deferred.fromCoroutine(collect())
        d.addErrback(failed)
        return d

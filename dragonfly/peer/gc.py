"""
A dfpeer's garbage collection, run every C{--gc-interval} and once at start-up.

  - finished tasks nobody downloaded, joined or fetched a piece of for
    C{--task-expire} are removed from the store (C{HOME/data}) and the
    SuperNode is told (C{DELETE /api/v1/tasks/{id}/peers/{peer}});
  - the store is kept between C{--gc-disk-low} and C{--gc-disk-high} by
    removing least-recently-used tasks (see L{dragonfly.core.gc}).

A task being downloaded or uploaded is never removed.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..core.gc import DiskGc
from ..core.periodic import periodic
from ..core.threads import PoolStopped
from .daemon import PeerDaemon

log = Logger()


class PeerGc(Service):
    """
    @param ready: fires when the daemon restored its finished tasks; the
        first collection runs then (default: at once).
    """

    def __init__(
        self, daemon: PeerDaemon, clock: Any, interval: float, task_expire: float, disk: DiskGc | None,
        ready: Deferred | None = None,
    ) -> None:
        self.daemon = daemon
        self._ready = ready
        self.clock = clock
        self.interval = interval
        self.task_expire = task_expire
        self.disk = disk
        self.expired_tasks = 0
        self._loop: TimerService | None = None

    def startService(self) -> None:
        super().startService()
        if self._ready is None:
            self._start_loop()
        else:

            def ready(result: Any) -> Any:
                self._start_loop()
                return result

            self._ready.addCallback(ready)

    def _start_loop(self) -> None:
        if not self.running:
            return
        self._loop = periodic(self.interval, self.run, self.clock, "garbage collection")
        self._loop.startService()

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            # a collection under way is not waited for (its evictions may wait on the SuperNode)
            self._loop.stopService()

    def run(self) -> Deferred:
        """One collection: expired tasks, then the disk.  Errors are logged, the loop goes on."""

        async def collect() -> None:
            expired = self.daemon.expire_tasks(self.task_expire)
            for task_id in expired:
                if self.daemon.evictable(task_id):
                    await self.daemon.evict(task_id)
                    self.expired_tasks += 1
            if expired:
                log.info("removed {n} tasks unused for {ttl:.0f}s", n=len(expired), ttl=self.task_expire, tasks=expired)
            if self.disk is not None:
                await self.disk.run()

        def failed(f: Any) -> None:
            if f.check(PoolStopped) and not self.running:
                log.info("garbage collection cut short by the shut-down")
            else:
                log.failure("garbage collection failed", f)

        d = Deferred.fromCoroutine(collect())
        d.addErrback(failed)
        return d

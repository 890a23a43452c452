"""
dfdaemon's link to the host's dfpeer: the one running for the same home
(found through C{<home>/peer.json}, as dfget finds it), started in the
background like dfget starts one when none answers.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()


class PeerLink:
    def __init__(
        self, home: str, nodes: list[str] | None, pool: Any, start: bool = True, extra: list[str] | None = None
    ) -> None:
        self.home = home
        self.extra = extra or []
        self.nodes = nodes
        self._pool = pool
        self._start = start
        self._api: str | None = None
        self._waiters: list[Deferred] | None = None

    async def api(self) -> str:
        """The dfpeer's local API URL, starting a dfpeer if none answers."""
        if self._api is not None:
            return self._api
        waiter: Deferred = Deferred()
        if self._waiters is None:
            # the first asker looks (in the pool); the others wait for its answer
            self._waiters = [waiter]
            self._pool.run(self._find_or_start).addBoth(self._found)
        else:
            self._waiters.append(waiter)
        return await waiter

    def _found(self, result: Any) -> None:
        waiters, self._waiters = self._waiters or [], None
        if isinstance(result, str):
            self._api = result
        for w in waiters:
            w.callback(result) if isinstance(result, str) else w.errback(result)

    def forget(self) -> None:
        """The dfpeer stopped answering: look for it (or start one) next time."""
        self._api = None

    def _find_or_start(self) -> str:
        # blocking: runs in the worker pool
        from ..cli.dfget import Failure, running_api, start_daemon

        api = running_api(self.home)
        if api is not None:
            return api
        if not self._start:
            raise RuntimeError(f"no dfpeer answers for {self.home}")
        log.info("starting a dfpeer for {home}", home=self.home)
        try:
            return start_daemon(self.home, self.nodes, 0.0, self.extra)
        except Failure as e:
            raise RuntimeError(e.message) from None

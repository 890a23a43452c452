"""
dfdaemon's link to the host's dfpeer: the one running for the same home
(found through C{<home>/peer.json}, as dfget finds it), started in the
background like dfget starts one when none answers.  Both go through
L{dragonfly.peer.launch}; here on the reactor (L{ReactorIO}: the process is
spawned with C{spawnProcess}, its API polled with timers), so no thread
waits for it.

dfdaemon looks for its dfpeer (and starts one) as it starts (L{PeerLink.warm}),
not at the first blob a client asks for: a dfpeer's start-up (about half a
CPU-second and a second or two of wall time for twistd, its imports and its
registration) would otherwise land inside the first pull.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..peer.launch import LaunchError, ReactorIO, find_running
from ..peer.launch import start as start_dfpeer

log = Logger()


class PeerLink:
    """
    @param reactor: spawns the dfpeer and times the waits.
    @param http: a treq C{HTTPClient} for the dfpeer's loopback API.
    @param start: start a dfpeer when none answers (else L{api} fails).
    @param extra: more C{twistd dfpeer} arguments (token file, CA).
    """

    def __init__(
        self, home: str, nodes: list[str] | None, reactor: Any, http: Any, start: bool = True,
        extra: list[str] | None = None,
    ) -> None:
        self.home = home
        self.extra = extra or []
        self.nodes = nodes
        self._io = ReactorIO(reactor, http)
        self._start = start
        self._api: str | None = None
        self._waiters: list[Deferred] | None = None

    async def api(self) -> str:
        """The dfpeer's local API URL, starting a dfpeer if none answers."""
        if self._api is not None:
            return self._api
        waiter: Deferred = Deferred()
        if self._waiters is None:
            # the first asker looks; the others wait for its answer
            self._waiters = [waiter]
            Deferred.fromCoroutine(self._find_or_start()).addBoth(self._found)
        else:
            self._waiters.append(waiter)
        return await waiter

    def warm(self) -> Deferred:
        """
        Find the dfpeer (starting one if allowed) now, ahead of any request;
        fires with its API URL, or None: a failure is logged, not raised, and
        the next request looks again.
        """

        def failed(f: Any) -> None:
            if self._start:
                log.warn("no dfpeer for {home} yet: {why}", home=self.home, why=f.getErrorMessage())
            else:  # (--no-start-peer: one may come later)
                log.info("no dfpeer for {home} yet: {why}", home=self.home, why=f.getErrorMessage())

        return Deferred.fromCoroutine(self.api()).addErrback(failed)

    def _found(self, result: Any) -> None:
        waiters, self._waiters = self._waiters or [], None
        if isinstance(result, str):
            self._api = result
        for w in waiters:
            w.callback(result) if isinstance(result, str) else w.errback(result)

    def forget(self) -> None:
        """The dfpeer stopped answering: look for it (or start one) next time."""
        self._api = None

    async def _find_or_start(self) -> str:
        api = await find_running(self.home, self._io)
        if api is not None:
            return api
        if not self._start:
            raise RuntimeError(f"no dfpeer answers for {self.home}")
        log.info("starting a dfpeer for {home}", home=self.home)
        try:
            return await start_dfpeer(self.home, self._io, self.nodes, 0.0, self.extra)
        except LaunchError as e:
            raise RuntimeError(e.message) from None

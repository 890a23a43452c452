"""The start-up and shut-down shared by the daemons' listening services."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .files import write_json_atomic

log = Logger()


def default_reactor(reactor: Any = None) -> Any:
    """C{reactor}, or the global one (only a program's C{makeService} reaches for it)."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    return reactor


class ListeningService(Service):
    """
    Binds its ports in order when started (C{_start}, written by a subclass
    with L{listen}), then writes C{info_path} for clients to find it.  If
    start-up fails the reason is logged and the reactor stopped: a daemon that
    cannot listen must not look alive.  Stopping closes the ports and removes
    the info file if it is still this process's.
    """

    what = "service"

    def __init__(self, reactor: Any, info_path: str) -> None:
        self._reactor = reactor
        self.info_path = info_path
        self._ports: list[Any] = []

    def startService(self) -> None:
        """Start the service: run L{_start}, and stop the reactor if it fails."""
        super().startService()  # type: ignore[no-untyped-call]
        Deferred.fromCoroutine(self._start()).addErrback(self._start_failed)

    def _start_failed(self, f: Any) -> None:
        log.failure("{what} could not start", f, what=self.what)
        self._reactor.stop()

    async def _start(self) -> None:
        raise NotImplementedError

    async def listen(self, endpoint: Any, factory: Any) -> Any:
        """Listen on C{endpoint} with C{factory}; the port is closed when the service stops."""
        port = await endpoint.listen(factory)
        self._ports.append(port)
        return port

    def publish(self, info: dict[str, Any]) -> None:
        """Write C{info} and our pid to the info file (atomically; removed when the service stops)."""
        write_json_atomic(self.info_path, {"pid": os.getpid(), **info})

    async def _before_stop(self) -> None:
        """A subclass's last words (leave the SuperNode, ...)."""

    def stopService(self) -> Deferred[None]:
        """Stop the service: the subclass's last words, then close the ports and remove the info file."""
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self._before_stop()
        for port in self._ports:
            await port.stopListening()
        try:
            with open(self.info_path) as f:
                if json.load(f).get("pid") == os.getpid():
                    os.unlink(self.info_path)
        except (OSError, ValueError):
            pass

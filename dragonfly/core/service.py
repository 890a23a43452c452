"""The start-up and shut-down shared by the daemons' listening services."""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

log = Logger()


def default_reactor(reactor: Any = None) -> Any:
    """C{reactor}, or the global one (only a program's C{makeService} reaches for it)."""
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    return reactor


def _leave(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def exit_status_at_exit(status: int) -> None:
    """
    Make the process exit with C{status} once C{twistd} is done (its
    pidfile removed, its log closed): C{twistd} itself exits 0 whenever its
    reactor stops, however it came to stop.
    """
    atexit.register(_leave, status)


class ListeningService(Service):
    """
    Binds its ports in order when started (C{_start}, written by a subclass
    with L{listen}), then writes C{info_path} for clients to find it.  If
    start-up fails the reason is logged, the reactor stopped (at once, or as
    soon as it runs when start-up failed before it did, as a bind made before
    C{twistd} runs its reactor does) and the process exits with status 1: a
    daemon that cannot listen must not look alive.  Stopping closes the
    ports and removes the info file if it is still this process's.
    """

    what = "service"
    #: the exit status of a process whose service could not start
    FAILED_STATUS = 1
    #: seconds the shut-down after a failed start may take before the process exits anyway
    #: (a sibling service's stop may wait for start-up work that never ran)
    FAILED_STOP_GRACE = 5.0

    def __init__(
        self, reactor: Any, info_path: str, exit_status: Callable[[int], None] = exit_status_at_exit,
        exit_now: Callable[[int], None] = _leave,
    ) -> None:
        self._reactor = reactor
        self.info_path = info_path
        self._ports: list[Any] = []
        self._exit_status = exit_status
        self._exit_now = exit_now

    def startService(self) -> None:
        """Start the service: run L{_start}, and stop the reactor if it fails."""
        super().startService()  # type: ignore[no-untyped-call]
        Deferred.fromCoroutine(self._start()).addErrback(self._start_failed)

    def _start_failed(self, f: Any) -> None:
        if f.check(CannotListenError):
            # the reason says it all (which address, which errno): no traceback
            log.critical("{what} could not start: {why}; exiting", what=self.what, why=f.getErrorMessage())
        else:
            log.failure("{what} could not start; exiting", f, what=self.what)
        self._exit_status(self.FAILED_STATUS)
        self._reactor.callLater(self.FAILED_STOP_GRACE, self._stop_too_slow)
        if getattr(self._reactor, "running", True):
            self._reactor.stop()
        else:
            # twistd starts its services before it runs the reactor, and a
            # reactor not running yet cannot be stopped (ReactorNotRunning)
            self._reactor.callWhenRunning(self._reactor.stop)

    def _stop_too_slow(self) -> None:
        log.critical("{what}: the shut-down after the failed start did not finish in {t:g} s; exiting",
                     what=self.what, t=self.FAILED_STOP_GRACE)
        self._exit_now(self.FAILED_STATUS)

    async def _start(self) -> None:
        raise NotImplementedError

    async def listen(self, endpoint: Any, factory: Any) -> Any:
        """Listen on C{endpoint} with C{factory}; the port is closed when the service stops."""
        port = await endpoint.listen(factory)
        self._ports.append(port)
        return port

    def publish(self, info: dict[str, Any]) -> None:
        """Write C{info} and our pid to the info file (atomically; removed when the service stops)."""
        from .files import write_json_atomic  # not before the ports are bound (see dragonfly.supernode.tap)

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

"""
Periodic work on a L{TimerService}, with the clock injected.

A step that fails (raises, or returns a Deferred that fails) is logged and
the loop goes on: a SuperNode that is down for one heartbeat must not stop
the heartbeats.  A step that returns a Deferred is not run again before it
fires (L{twisted.internet.task.LoopingCall}'s rule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger

log = Logger()


def periodic(interval: float, step: Callable[[], Any], clock: Any, what: str = "periodic task") -> TimerService:
    """A service that runs C{step} at once and every C{interval} seconds of C{clock} while it runs."""

    def guarded() -> Any:
        d = maybeDeferred(step)
        d.addErrback(lambda f: log.failure("{what} failed", f, what=what))
        return d

    service = TimerService(interval, guarded)
    service.clock = clock
    return service

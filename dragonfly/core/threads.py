"""
A thread pool for hashing and disk I/O, kept off the reactor thread.

hashlib releases the GIL on large buffers and file reads and writes block, so
both go here; the reactor thread only moves bytes between sockets.

A job handed to a pool that stopped fails at once with L{PoolStopped}:
Twisted's L{ThreadPool} silently drops work given to it after C{stop()},
so its Deferred would never fire, and whoever waits for it (a service's
C{stopService} during a shut-down, say) would wait for ever.  Jobs taken
before the stop still run: C{stop()} waits for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class PoolStopped(Exception):
    """The worker pool stopped (the process is shutting down): the job was not run."""


class WorkerPool(Service):
    """A started/stopped-with-the-service L{ThreadPool}."""

    def __init__(self, reactor: Any, size: int = 4, name: str = "dragonfly-io") -> None:
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=size, name=name)

    def startService(self) -> None:
        """Start the threads."""
        super().startService()  # type: ignore[no-untyped-call]
        self.pool.start()

    def stopService(self) -> None:
        """Stop the threads (waits for the jobs under way)."""
        super().stopService()  # type: ignore[no-untyped-call]
        self.pool.stop()

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run C{f} in the pool; the result arrives in the reactor thread (L{PoolStopped} once it stopped)."""
        if self.pool.joined:
            name = getattr(f, "__name__", repr(f))
            return fail(PoolStopped(f"the worker pool stopped: {name} not run"))
        return deferToThreadPool(self._reactor, self.pool, f, *args, **kwargs)

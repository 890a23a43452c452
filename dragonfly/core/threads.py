"""
A thread pool for hashing and disk I/O, kept off the reactor thread.

hashlib releases the GIL on large buffers and file reads and writes block, so
both go here; the reactor thread only moves bytes between sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


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
        """Run C{f} in the pool; the result arrives in the reactor thread."""
        return deferToThreadPool(self._reactor, self.pool, f, *args, **kwargs)

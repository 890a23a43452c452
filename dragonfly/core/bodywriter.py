"""
Stream an HTTP response body into a file, in order, off the reactor thread.

The body is cut into chunks (a piece each on the SuperNode's CDN); each chunk
is hashed (SHA-256) and written at its offset in the worker pool, one after
another, while a whole-file SHA-256 is updated in the same pass.  While too
many chunks wait for the pool the response is paused, so a fast origin never
fills memory.  A body shorter or longer than its Content-Length, a lost
connection or an origin silent for C{idle_timeout} fails C{done}.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from .files import pwrite_all
from .ratelimit import TokenBucket
from .threads import WorkerPool


class BodyError(Exception):
    """The body could not be stored whole; C{code} is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _store_chunk(fd: int, offset: int, buf: bytearray, file_hash: Any) -> str:
    file_hash.update(buf)
    pwrite_all(fd, buf, offset)
    return hashlib.sha256(buf).hexdigest()


class ChunkedFileWriter(Protocol):
    """
    Give to C{response.deliverBody}.  C{done} fires with C{(total bytes,
    whole-file sha256 hex)} once every chunk is on disk.

    @param on_chunk: called in order in the reactor thread with C{(index,
        sha256 hex)} as each chunk reaches the disk.
    """

    MAX_PENDING = 4

    def __init__(
        self,
        pool: WorkerPool,
        clock: Any,
        fd: int,
        chunk_size: int,
        expected_length: int | None = None,
        idle_timeout: float = 60.0,
        on_chunk: Callable[[int, str], None] | None = None,
        on_bytes: Callable[[int], None] | None = None,
        limit: TokenBucket | None = None,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._fd = fd
        self._chunk = chunk_size
        self._expected = expected_length
        self._idle_timeout = idle_timeout
        self._on_chunk = on_chunk
        self._on_bytes = on_bytes
        self._buf = bytearray()
        self._index = 0
        self.total = 0
        self._pending = 0
        self._paused = False
        self._holds = 0
        self._limit = limit
        self._rate_held = False
        self._chain: Deferred = succeed(None)
        self._hash = hashlib.sha256()
        self._idle: IDelayedCall | None = None
        self._error: BodyError | None = None
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self._idle = self._clock.callLater(self._idle_timeout, self._stalled)

    def _stalled(self) -> None:
        self.abort(BodyError("SOURCE_TIMEOUT", f"origin sent nothing for {self._idle_timeout:.0f}s"))

    def abort(self, error: BodyError) -> None:
        """Stop reading and fail C{done} with C{error}."""
        if self._error is None:
            self._error = error
        if self.transport is not None:
            self.transport.stopProducing()

    def _hold(self) -> None:
        """Pause the body for one more reason (pool back-pressure, rate)."""
        self._holds += 1
        if self._holds == 1 and self.transport is not None:
            self.transport.pauseProducing()

    def _release(self) -> None:
        self._holds -= 1
        if self._holds == 0 and self.transport is not None and self._error is None:
            self.transport.resumeProducing()

    def _rate_ok(self) -> None:
        self._rate_held = False
        self._release()

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        self.total += len(data)
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        if self._limit is not None:
            # every byte is charged, also bytes that were already on their
            # way when the body was paused: their debt delays the next hold
            delay = self._limit.reserve(len(data))
            if delay > 0 and not self._rate_held:
                self._rate_held = True
                self._hold()
                self._clock.callLater(delay, self._rate_ok)
        if self._expected is not None and self.total > self._expected:
            self.abort(BodyError("SOURCE_TOO_LONG", f"origin sent more than its Content-Length of {self._expected} bytes"))
            return
        self._buf += data
        size = self._chunk
        while len(self._buf) >= size:
            piece = self._buf[:size]
            del self._buf[:size]
            self._submit(piece)

    def _submit(self, piece: bytearray) -> None:
        index = self._index
        self._index += 1
        offset = index * self._chunk
        self._pending += 1
        if self._pending >= self.MAX_PENDING and not self._paused:
            self._paused = True
            self._hold()

        def store(_: Any) -> Any:
            if self._error is not None:
                return None
            return self._pool.run(_store_chunk, self._fd, offset, piece, self._hash)

        def stored(digest: str | None) -> None:
            self._pending -= 1
            if digest is not None and self._error is None and self._on_chunk is not None:
                self._on_chunk(index, digest)
            if self._paused and self._pending <= self.MAX_PENDING // 2:
                self._paused = False
                self._release()

        def failed(f: Failure) -> None:
            self._pending -= 1
            self.abort(BodyError("STORE_FAILED", f"cannot write at offset {offset}: {f.getErrorMessage()}"))

        self._chain.addCallback(store)
        self._chain.addCallbacks(stored, failed)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self._buf and self._error is None:
            self._submit(self._buf)
            self._buf = bytearray()
        complete = reason.check(ResponseDone) or (reason.check(PotentialDataLoss) and self._expected is None)

        def close(_: Any) -> None:
            os.close(self._fd)
            if self._error is not None:
                self.done.errback(self._error)
            elif not complete:
                self.done.errback(
                    BodyError("SOURCE_TRUNCATED", f"origin connection lost after {self.total} bytes: {reason.getErrorMessage()}")
                )
            elif self._expected is not None and self.total != self._expected:
                self.done.errback(
                    BodyError("SOURCE_TRUNCATED", f"origin sent {self.total} of {self._expected} bytes")
                )
            else:
                self.done.callback((self.total, self._hash.hexdigest()))

        self._chain.addCallback(close)


class DiscardBody(Protocol):
    """Reads and drops a response body (an error page we do not need)."""

    def dataReceived(self, data: bytes) -> None:
        pass

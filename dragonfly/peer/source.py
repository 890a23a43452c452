"""
Back-to-source by piece: a dfpeer that must go to the origin with part of
the file already verified asks only for the pieces it lacks.

Sans-IO helpers (L{missing_runs}, L{byte_span}, L{parse_content_range}) and
L{RangeCollector}, the body protocol of one C{206} answer: it cuts the body
at piece boundaries, hands each piece to a callback that verifies it against
the SuperNode's SHA-256 and writes it (L{dragonfly.peer.task.PeerTask.source_piece}),
pauses the body while pieces wait for the disk, and paces it by the task's
C{--locallimit} (and the host's C{--totallimit}).  The HTTP requests are the
dfpeer's (L{dragonfly.peer.daemon.PeerDaemon.fetch_pieces}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from ..core.bodywriter import BodyError, HeldBody
from ..core.pieces import piece_span
from ..core.ranges import parse_content_range as parse_content_range
from ..core.ratelimit import TokenBucket, delay_for


class SourceMismatch(Exception):
    """A piece from the origin does not match the SuperNode's digest: the origin holds another version."""


def missing_runs(have: Iterable[int], count: int, max_pieces: int = 0) -> list[tuple[int, int]]:
    """
    The pieces not in C{have} as runs C{(first, last)} (inclusive), in
    order; a run is at most C{max_pieces} long (0: no bound).
    """
    held = set(have)
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for i in range(count + 1):
        missing = i < count and i not in held
        if missing and start is not None and max_pieces and i - start >= max_pieces:
            runs.append((start, i - 1))
            start = None
        if missing and start is None:
            start = i
        elif not missing and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def byte_span(run: tuple[int, int], length: int, piece_size: int) -> tuple[int, int]:
    """The bytes of pieces C{run} as C{(first, last)}, inclusive (an HTTP Range)."""
    first, last = run
    off_last, size_last = piece_span(last, length, piece_size)
    return first * piece_size, off_last + size_last - 1


class RangeCollector(HeldBody):
    """
    The body of a C{206} for pieces C{run}: C{done} fires with the bytes
    read once every piece was verified and written, or fails with a
    L{BodyError} (cut, too long, silent) or L{SourceMismatch}.

    @param on_piece: C{(index, bytes)} -> Deferred firing True when stored,
        False when the bytes do not match the piece's digest.
    """

    #: pieces waiting for the disk before the body is paused
    MAX_PENDING = 2

    def __init__(
        self,
        clock: Any,
        run: tuple[int, int],
        length: int,
        piece_size: int,
        on_piece: Callable[[int, bytearray], Deferred],
        limits: list[TokenBucket | None] | None = None,
        on_bytes: Callable[[int], None] | None = None,
        idle_timeout: float = 60.0,
    ) -> None:
        self._clock = clock
        self._length, self._piece_size = length, piece_size
        self._index, self._last = run
        self._expected = byte_span(run, length, piece_size)[1] - run[0] * piece_size + 1
        self._on_piece = on_piece
        self._limits = [b for b in (limits or []) if b is not None]
        self._on_bytes = on_bytes
        self._idle_timeout = idle_timeout
        self._idle: Any = None
        self._piece = bytearray()  # the bytes of piece self._index so far
        self._holds = 0
        self._pending = 0
        self._rate_held = False
        self._disk_held = False
        self._error: Exception | None = None
        self._ended = False
        self.total = 0
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self._idle = self._clock.callLater(self._idle_timeout, self._stalled)

    def _stalled(self) -> None:
        self._abort(BodyError("SOURCE_TIMEOUT", f"origin sent nothing for {self._idle_timeout:.0f}s"))

    def _abort(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()
        self._maybe_done()

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._held_bytes()
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        self.total += len(data)
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        if self._limits:
            delay = delay_for(list(self._limits), len(data))
            if delay > 0 and not self._rate_held:
                self._rate_held = True
                self._hold()
                self._clock.callLater(delay, self._rate_ok)
        if self.total > self._expected:
            self._abort(BodyError("SOURCE_TOO_LONG", f"origin sent more than the {self._expected} bytes asked"))
            return
        # each byte is copied once, into the piece it belongs to; a full
        # piece is handed on as it is and a new one started
        view = memoryview(data)
        while view and self._index <= self._last:
            size = piece_span(self._index, self._length, self._piece_size)[1]
            need = size - len(self._piece)
            self._piece += view[:need]
            view = view[need:]
            if len(self._piece) == size:
                piece, self._piece = self._piece, bytearray()
                self._submit(self._index, piece)
                self._index += 1

    def _submit(self, index: int, piece: bytearray) -> None:
        self._pending += 1
        if self._pending >= self.MAX_PENDING and not self._disk_held:
            self._disk_held = True
            self._hold()

        def stored(ok: bool) -> None:
            self._pending -= 1
            if not ok:
                self._abort(SourceMismatch(f"piece {index} from the origin does not match the supernode's digest"))
            elif self._disk_held and self._pending < self.MAX_PENDING:
                self._disk_held = False
                self._release()
            self._maybe_done()

        def failed(f: Failure) -> None:
            self._pending -= 1
            self._abort(BodyError("STORE_FAILED", f"cannot write piece {index}: {f.getErrorMessage()}"))

        self._on_piece(index, piece).addCallbacks(stored, failed)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._ended = True
        if self._error is None and not reason.check(ResponseDone):
            self._error = BodyError(
                "SOURCE_TRUNCATED", f"origin connection lost after {self.total} bytes: {reason.getErrorMessage()}"
            )
        elif self._error is None and self.total != self._expected:
            self._error = BodyError("SOURCE_TRUNCATED", f"origin sent {self.total} of {self._expected} bytes")
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.done.called or not self._ended or self._pending:
            return
        if self._error is not None:
            self.done.errback(self._error)
        else:
            self.done.callback(self.total)

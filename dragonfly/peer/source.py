"""
Back to the origin: a dfpeer that must leave the swarm fetches what it
lacks from the origin itself.

L{SourceFetch} decides how: with part of the file already verified and a
digest for every missing piece, only those pieces (Range), each verified
before it is written, then the whole file checked; otherwise, or when the
origin ignores Range or holds another version, the whole file, as a new
file.  The HTTP requests are the dfpeer's
(L{dragonfly.peer.daemon.PeerDaemon.fetch_pieces} and C{fetch_from_source});
the task's state moves are the task's (L{dragonfly.peer.task}).

Sans-IO helpers (L{missing_runs}, L{byte_span}, L{parse_content_range}) and
L{RangeCollector}, the body protocol of one C{206} answer: it cuts the body
at piece boundaries, hands each piece to a callback that verifies it against
the SuperNode's SHA-256 and writes it (L{dragonfly.peer.pieces.TaskPieces.from_source}),
pauses the body while pieces wait for the disk, and paces it by the task's
C{--locallimit} (and the host's C{--totallimit}).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from ..core.bodywriter import BodyError, HeldBody
from ..core.pieces import piece_span
from ..core.ranges import parse_content_range as parse_content_range
from ..core.ratelimit import TokenBucket, delay_for
from .outcome import TaskFailed, TaskLog, check_sha256

if TYPE_CHECKING:
    from .pieces import TaskPieces

#: pieces C{(first, last)}, inclusive
Run = tuple[int, int]


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


@frozen
class FromSource:
    """What the origin gave a task (L{SourceFetch.fetch})."""

    #: the content's length
    length: int
    #: its SHA-256, when computed (by piece: only when the request or the SuperNode named one to check)
    sha256: str | None
    #: every piece checked against the SuperNode's digests; else the origin's whole file, unchecked
    verified: bool


class SourceFetch:
    """
    One task's way back to the origin.

    @param pieces: the task's pieces (which are held, the geometry).
    @param whole: the whole file from the origin into a new file: C{(length, sha256)}.
    @param runs: the pieces of C{runs} by Range, each through
        L{TaskPieces.from_source}: None, or C{(length, sha256)} when the
        origin sent the whole file instead.
    @param forget: stop serving the task's current file (the origin's bytes go to a new one).
    @param sha256: the SHA-256 of the task's file, computed in the pool (a Deferred).
    @param log: the task's log.
    """

    #: a cut or silent origin answer is asked again this many times (the pieces stored stay)
    ATTEMPTS = 3

    def __init__(
        self, pieces: TaskPieces, whole: Callable[[], Awaitable[tuple[int, str]]],
        runs: Callable[[list[Run]], Awaitable[tuple[int, str] | None]], forget: Callable[[], object],
        sha256: Callable[[], Deferred], log: TaskLog,
    ) -> None:
        self._pieces = pieces
        self._whole = whole
        self._runs = runs
        self._forget = forget
        self._sha256 = sha256
        self._log = log

    async def fetch(self, by_piece: bool, want: str | None, known: str | None) -> FromSource:
        """
        Fetch what the task lacks: by piece when C{by_piece} (the file
        holds verified pieces and every missing one has a digest), else the
        whole file.  C{want} is the whole-file SHA-256 the request named,
        C{known} the SuperNode's; a file put together piece by piece is
        checked against C{want} or else C{known}, the origin's whole file
        against C{want} only.

        @raise TaskFailed: the origin failed, or the content is not the one wanted.
        """
        if by_piece:
            whole = await self._by_piece()
            if whole is None:
                return await self._verify(want or known)
        else:
            # the origin's bytes go to a new file: what was served from the old one stops
            self._forget()
            whole = await self._whole()
        length, sha = whole
        if want is not None:
            check_sha256(sha, want, "origin content")
        return FromSource(length, sha, verified=False)

    async def _by_piece(self) -> tuple[int, str] | None:
        """
        Fetch the missing pieces by Range; None when they are all in, or
        C{(length, sha256)} when the origin sent the whole file instead.
        """
        have, count = self._pieces.have, self._pieces.count
        assert have is not None and count is not None
        for attempt in range(self.ATTEMPTS):
            runs = missing_runs(have, count)
            if not runs:
                return None
            try:
                return await self._runs(runs)
            except SourceMismatch as e:
                self._log(LogLevel.warn, "{why}: fetching the whole file", why=str(e))
                self._forget()
                return await self._whole()
            except TaskFailed as e:
                if e.code not in ("SOURCE_TRUNCATED", "SOURCE_TIMEOUT") or attempt + 1 == self.ATTEMPTS:
                    raise
                self._log(LogLevel.info, "origin answer cut ({why}); asking for the rest", why=e.message)
        return None

    async def _verify(self, want: str | None) -> FromSource:
        """Every piece is in and verified: check the whole file when its SHA-256 is known."""
        length = self._pieces.length
        assert length is not None
        if want is None:
            return FromSource(length, None, verified=True)
        sha = await self._sha256()
        check_sha256(sha, want)
        return FromSource(length, sha, verified=True)

"""
The pieces of one download on a dfpeer: their geometry, which of them are
verified, the SuperNode's digest of each, the picker over them
(L{dragonfly.peer.picker}), and the verify-and-store of every piece that
arrives, from a neighbour or from the origin.

A piece is written only after it matched its SHA-256 (in the pool,
L{dragonfly.core.store}), and counts as held only once written.
L{TaskPieces} knows nothing of the connections or the task's state: it
asks its task whether pieces are wanted and tells it what became of each
(L{PieceOutcomes}); of the SuperNode it only reads what a sync answer says
of the pieces (L{TaskPieces.learn}).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ..core.bitmap import Bitmap
from ..core.partwrite import BESIDE_FROM, PART, WriteGuard, take_pages
from ..core.pieces import piece_count, piece_span
from ..core.piecetag import well_formed
from ..protocol.supernode_api import PieceProof, SyncAnswer
from .interfaces import PartStore, Stats, Store
from .picker import Picker


class PieceOutcomes(Protocol):
    """What the task (L{dragonfly.peer.task.PeerTask}) hears of the pieces that arrive."""

    def accepting(self) -> bool:
        """Pieces from neighbours are wanted now (the task is downloading)."""

    def piece_stored(self, conn: Any, index: int, nbytes: int) -> None:
        """Piece C{index} from C{conn} matched its digest and is written (and held)."""

    def piece_corrupt(self, conn: Any, index: int, nbytes: int) -> None:
        """Piece C{index} from C{conn} failed its SHA-256 check."""

    def store_failed(self, index: int, why: str) -> None:
        """Piece C{index} could not be written."""

    def source_piece_stored(self, index: int) -> None:
        """Piece C{index} from the origin matched its digest and is written (and held)."""


#: no further part of this piece is wanted (see L{TaskPieces.part})
NO_PART = 1 << 62
#: DRAGONFLY_PART_WRITES=0: every piece is kept whole until verified (same-run comparisons)
PART_WRITES = os.environ.get("DRAGONFLY_PART_WRITES", "1") != "0"
#: pieces taken in parts and parts written, in this process (memory traces, tests)
PART_COUNTS = {"pieces": 0, "parts": 0}


class _Parts:
    """One large piece arriving on one connection, hashed and written part by part."""

    __slots__ = ("conn", "index", "buf", "token", "hasher", "filled", "queued", "written", "busy", "held", "failed", "finish")

    def __init__(self, conn: Any, index: int, buf: bytearray, token: int) -> None:
        self.conn = conn
        self.index = index
        self.buf = buf
        self.token = token
        self.hasher = hashlib.sha256()
        self.filled = 0  # bytes arrived
        self.queued = 0  # bytes handed to the pool (hashed, or being hashed)
        self.written = 0  # bytes a part job returned for
        self.busy = False
        self.held = False  # the connection's reads are held (L{TaskPieces.PARTS_AHEAD})
        self.failed: Failure | None = None
        self.finish: Callable[[], None] | None = None  # run once no part job is out


class TaskPieces:
    """
    @param task_id: the task's files in C{store}.
    @param release: gives a piece's buffer back (L{dragonfly.protocol.block.BlockFactory.release}).
    @param outcomes: the task, told what became of each piece.
    """

    #: endgame: duplicate requests only for the last few pieces, out this long
    ENDGAME_PIECES = 4
    ENDGAME_AFTER = 1.0
    #: pieces ahead of an in-order stream that go before the rarest: at
    #: least this many, and at least C{STREAM_BYTES} of them, twice the
    #: in-flight floor, so that the requests in flight stay inside the
    #: window while the reader catches up with a piece just stored (a
    #: request outside it goes rarest-first, anywhere in the file)
    STREAM_WINDOW = 4
    STREAM_BYTES = 32 << 20
    #: pieces larger than this are hashed and written in parts while they
    #: arrive (L{part}); smaller ones are kept whole until verified.  Worth
    #: it where two pieces alone pass the 16 MiB in-flight floor
    #: (DRAGONFLY_PARTS_ABOVE_MIB); the parts' pages go round the page bank
    #: (L{dragonfly.core.partwrite.PageBank}) instead of being faulted in
    #: again for each piece (docs/benchmarks.md)
    PARTS_ABOVE = int(os.environ.get("DRAGONFLY_PARTS_ABOVE_MIB", "8")) << 20
    #: a connection stops reading while this much of its piece arrived and
    #: is not hashed and written yet (the socket buffers the rest)
    PARTS_AHEAD = 2 * PART

    def __init__(
        self, task_id: str, store: Store, stats: Stats, release: Callable[[bytearray], None],
        outcomes: PieceOutcomes, rng: random.Random,
    ) -> None:
        self.task_id = task_id
        self._store = store
        self._stats = stats
        self._release = release
        self._outcomes = outcomes
        self._rng = rng
        #: the content's length (None until known), its piece size and count
        self.length: int | None = None
        self.piece_size = 0
        self.count: int | None = None
        #: the verified pieces (None until the length is known)
        self.have: Bitmap | None = None
        #: the SuperNode's SHA-256 of each piece, as far as known
        self.digests: list[bytes | None] = []
        #: every piece before this one has its digest (the sync asks for the rest)
        self.digests_from = 0
        #: the tag a SuperNode gave with each digest, and the tagged origin
        #: (with a piece key, L{dragonfly.core.piecetag}): given back to a
        #: node that takes the task over, never checked here
        self.tags: list[str | None] = []
        self.tags_from = 0
        self.origin: dict[str, Any] | None = None
        self.picker: Picker[Any] | None = None
        self._stream_from: int | None = None
        #: told of each piece verified and stored, with its bytes
        #: (L{dragonfly.peer.wholehash.WholeHash.offer}): a Deferred it returns
        #: holds the buffer back until it fires
        self.on_stored: Callable[[int, bytearray | None], Deferred | None] | None = None
        #: large pieces arriving, by connection (L{part}); who may write which piece
        self._parts: dict[Any, _Parts] = {}
        self._guard: WriteGuard | None = None
        #: the store writes parts (the task store; a test's may not)
        self._by_parts = PART_WRITES and hasattr(store, "write_part")
        self._pstore = cast(PartStore, store)
        #: whole pieces of BESIDE_FROM bytes and more are hashed and written side by side (L{_write_beside})
        self._beside = self._by_parts and BESIDE_FROM > 0 and hasattr(store, "write_beside")

    # -- geometry and digests --------------------------------------------------------

    def size(self, length: int, piece_size: int) -> None:
        """The length is known: no piece held, no digest known, a new picker."""
        self.length, self.piece_size = length, piece_size
        self.count = piece_count(length, piece_size)
        self.have = Bitmap(self.count)
        self.digests = [None] * self.count
        self.digests_from = 0
        self.tags = [None] * self.count
        self.tags_from = 0
        self.picker = Picker(
            self.count, rng=self._rng, have=self.have, endgame_pieces=self.ENDGAME_PIECES,
            endgame_after=self.ENDGAME_AFTER,
            stream_window=max(self.STREAM_WINDOW, -(-self.STREAM_BYTES // max(1, piece_size))),
        )
        self.picker.stream_from = self._stream_from
        if self._guard is not None:
            self._guard.dead = True
        self._guard = WriteGuard() if self._by_parts else None
        for parts in self._parts.values():
            self._hold(parts, False)
            self._guard_release(parts)
        self._parts.clear()

    def have_all(self) -> None:
        """Every piece is held (a finished task restored, or the whole file from the origin)."""
        assert self.have is not None and self.count is not None
        for i in range(self.count):
            self.have.set(i)

    def restore(self, meta: dict[str, Any]) -> None:
        """The pieces of a task finished before a restart (its saved L{meta})."""
        self.size(meta["length"], meta["pieceSize"])
        self.digests = [bytes.fromhex(d) for d in meta["digests"]]
        self.digests_from = len(self.digests)
        tags = meta.get("tags")
        if isinstance(tags, list) and len(tags) == len(self.digests):
            self.tags = [t if well_formed(t) else None for t in tags]
            self._advance_tags()
        origin = meta.get("origin")
        self.origin = origin if isinstance(origin, dict) else None
        self.have_all()

    def meta(self) -> dict[str, Any] | None:
        """C{length}, C{pieceSize}, C{digests} (and tags, origin) to save, or None unless every digest is known."""
        if not all(d is not None for d in self.digests):
            return None
        digests = [d.hex() for d in self.digests if d is not None]
        out: dict[str, Any] = {"length": self.length, "pieceSize": self.piece_size, "digests": digests}
        if self.origin is not None:
            out["tags"] = list(self.tags)
            out["origin"] = self.origin
        return out

    def _advance_tags(self) -> None:
        while self.tags_from < len(self.tags) and self.tags[self.tags_from] is not None:
            self.tags_from += 1

    def proofs(self) -> list[PieceProof]:
        """The pieces held with their digests and tags, for a node that takes the task over."""
        if self.have is None or self.origin is None:
            return []
        out = []
        for i in self.have:
            digest, tag = self.digests[i], self.tags[i] if i < len(self.tags) else None
            if digest is not None and tag is not None:
                out.append(PieceProof(i, digest.hex(), tag))
        return out

    def set_digest(self, index: int, digest: bytes) -> None:
        """The SuperNode's SHA-256 of piece C{index} (out of range: ignored)."""
        self.set_digests(index, [digest])

    def set_digests(self, first: int, digests: list[bytes]) -> None:
        """
        L{set_digest} for pieces C{first}, C{first + 1}, ...: the picker
        learns them in one call (L{Picker.digests_known}).
        """
        count = self.count
        if count is None or not digests:
            return
        known = []
        for k, digest in enumerate(digests):
            index = first + k
            if 0 <= index < count:
                self.digests[index] = digest
                known.append(index)
        if self.picker is not None and known:
            self.picker.digests_known(known)
        while self.digests_from < count and self.digests[self.digests_from] is not None:
            self.digests_from += 1

    def learn(self, answer: SyncAnswer) -> None:
        """What a sync answer says of the pieces: more digests, and the seed allowance."""
        if answer.digests:
            self.set_digests(answer.digests_from, [bytes.fromhex(hexd) for hexd in answer.digests])
        if answer.origin is not None:
            self.origin = answer.origin
        if answer.tags and self.count is not None:
            for k, tag in enumerate(answer.tags):
                i = answer.tags_from + k
                if 0 <= i < self.count and well_formed(tag):
                    self.tags[i] = tag
            self._advance_tags()
        if self.picker is not None:
            self.picker.seed_allowed = set(answer.seed_pieces)

    def missing_known(self) -> bool:
        """The length is known and every piece not held has a digest to check it against."""
        if self.have is None or self.count is None or self.length is None:
            return False
        return all(self.digests[i] is not None for i in range(self.count) if i not in self.have)

    @property
    def stream_from(self) -> int | None:
        """Pieces from here on are preferred while a stream reads them in order."""
        return self._stream_from

    @stream_from.setter
    def stream_from(self, index: int | None) -> None:
        self._stream_from = index
        if self.picker is not None:
            self.picker.stream_from = index

    @property
    def completed_bytes(self) -> int:
        """The bytes of the verified pieces."""
        if self.have is None or self.length is None:
            return 0
        if self.have.complete:
            return self.length
        return sum(piece_span(i, self.length, self.piece_size)[1] for i in self.have)

    # -- serving -------------------------------------------------------------------------

    def read(self, index: int) -> Deferred:
        """The bytes of piece C{index}, read in the pool."""
        assert self.length is not None
        offset, size = piece_span(index, self.length, self.piece_size)
        return self._store.read(self.task_id, offset, size)

    def file(self, index: int) -> tuple[int, int, int] | None:
        """(descriptor, offset, length) of verified piece C{index} in the served file, or None."""
        if self.have is None or index not in self.have or self.length is None:
            return None
        fd = self._store.served_fd(self.task_id)
        if fd is None:
            return None
        offset, size = piece_span(index, self.length, self.piece_size)
        return fd, offset, size

    # -- arriving --------------------------------------------------------------------------

    def part(self, conn: Any, index: int, buf: bytearray, filled: int) -> int:
        """
        The first C{filled} bytes of piece C{index} arriving on C{conn} are
        in C{buf} (0: it starts).  A large piece (over L{PARTS_ABOVE}) is
        hashed and written L{PART} by L{PART} while the rest arrives, into
        a region of the file that is served only once the whole piece
        matched (L{dragonfly.core.partwrite}), and each part's pages of the
        buffer go to the process's page bank once written, from which the
        next part to arrive takes them (or back to the system when the bank
        is full): a piece in flight holds a few MiB whatever its size, and
        the parts reuse the same pages instead of faulting new ones in.
        Answers the C{filled} at which to be called again (L{NO_PART}: never).
        """
        if filled == 0:
            old = self._parts.pop(conn, None)
            if old is not None:  # the connection moved on from a piece it did not finish
                self._hold(old, False)
                self._guard_release(old)
            guard = self._guard
            if (
                guard is None or len(buf) <= self.PARTS_ABOVE or self.have is None or index in self.have
                or self.digests[index] is None or not self._outcomes.accepting()
            ):
                return NO_PART
            token = guard.claim(index)
            if token is None:  # verified already, or another copy writes its parts: kept whole
                return NO_PART
            self._parts[conn] = _Parts(conn, index, buf, token)
            PART_COUNTS["pieces"] += 1
            take_pages(buf, 0)
            return PART
        parts = self._parts.get(conn)
        if parts is None or parts.index != index or parts.buf is not buf:
            return NO_PART
        parts.filled = filled
        whole = filled - filled % PART
        if whole == filled and filled < len(buf):
            # none of the next part's bytes in yet: the pages of a part written before under it
            take_pages(buf, filled)
        if whole > parts.queued and not parts.busy:
            self._next_part(parts, whole)
        if filled - parts.written > self.PARTS_AHEAD:
            self._hold(parts, True)
        return whole + PART

    def _hold(self, parts: _Parts, on: bool) -> None:
        if parts.held != on:
            parts.held = on
            hold = getattr(parts.conn, "hold_reads", None)
            if hold is not None:
                hold(on)

    def _next_part(self, parts: _Parts, end: int) -> None:
        assert self._guard is not None
        start, parts.queued, parts.busy = parts.queued, end, True
        PART_COUNTS["parts"] += 1
        d = self._pstore.write_part(
            self.task_id, self._guard, parts.index, parts.token, parts.hasher, parts.buf, start, end,
            parts.index * self.piece_size,
        )
        d.addBoth(self._part_done, parts, end)

    def _part_done(self, result: Any, parts: _Parts, end: int) -> None:
        parts.busy = False
        parts.written = end
        if isinstance(result, Failure) and parts.failed is None:
            parts.failed = result
        if parts.finish is None and self._parts.get(parts.conn) is parts:
            # still arriving: the next parts, and reading again once little is waiting
            whole = parts.filled - parts.filled % PART
            if whole > parts.queued and parts.failed is None:
                self._next_part(parts, whole)
            if parts.failed is not None or parts.filled - parts.written <= self.PARTS_AHEAD:
                self._hold(parts, False)
        if parts.finish is not None:
            finish, parts.finish = parts.finish, None
            finish()

    def drop_parts(self, conn: Any) -> None:
        """C{conn} is gone: a piece it was sending in parts will not be finished."""
        parts = self._parts.pop(conn, None)
        if parts is not None:
            self._guard_release(parts)

    def dropped(self, conn: Any, buf: bytearray) -> None:
        """
        C{conn} will not finish the piece arriving into C{buf} (cancelled, or
        the connection closed): the buffer is released once no part job of
        it is out (a pool thread may still hash or write from it).
        """
        parts = self._parts.get(conn)
        if parts is None or parts.buf is not buf:
            self._release(buf)
            return
        self.drop_parts(conn)
        self._hold(parts, False)
        self._after_parts(parts, lambda: self._release(buf))

    def _guard_release(self, parts: _Parts) -> None:
        if self._guard is not None:
            self._guard.release(parts.index, parts.token)

    def _after_parts(self, parts: _Parts, then: Callable[[], None]) -> None:
        """Run C{then} once no part job of C{parts} is out."""
        if parts.busy:
            parts.finish = then
        else:
            then()

    def arrived(self, conn: Any, index: int, data: bytearray, kind: str) -> None:
        """
        Piece C{index} came from C{conn} (C{kind}: supernode or remote_peer):
        verify and write it, then tell the task; its buffer is released
        either way.
        """
        picker = self.picker
        assert picker is not None
        digest = self.digests[index]
        parts = self._parts.pop(conn, None)
        if parts is not None:
            self._hold(parts, False)
        if parts is not None and (parts.index != index or parts.buf is not data):
            self._guard_release(parts)
            parts = None
        if not self._outcomes.accepting() or digest is None or not picker.verify(index):
            # a duplicate from the endgame, or too late; (a digest is always
            # known: only pieces with one are requested)
            self._stats.count(self._stats.discarded, "duplicate", len(data))
            if parts is None:
                self._release(data)
            else:
                self._guard_release(parts)
                self._after_parts(parts, lambda: self._release(data))
            return
        if parts is not None:
            self._after_parts(parts, lambda: self._seal(conn, index, data, kind, digest, parts))
            return
        if self._beside and len(data) >= BESIDE_FROM and self._write_beside(conn, index, data, kind, digest):
            return
        d = self._write_whole(index, data, digest)
        d.addBoth(self._released, data, index)
        d.addCallbacks(self._written, self._not_written, callbackArgs=(conn, index, kind, len(data)), errbackArgs=(index,))

    def _write_beside(self, conn: Any, index: int, data: bytearray, kind: str, digest: bytes) -> bool:
        """
        Piece C{index}, whole, hashed in one pool thread while another
        writes it into its region (L{dragonfly.core.partwrite.Beside}): its
        buffer and its place in the in-flight budget are held for the longer
        of the two instead of their sum, so the next request goes sooner.
        False when this copy may not write it that way (another copy writes
        it in parts): the caller checks, then writes.
        """
        guard = self._guard
        assert guard is not None
        token = guard.claim(index)
        if token is None:
            return False
        d = self._pstore.write_beside(self.task_id, guard, index, token, index * self.piece_size, data, digest)
        d.addBoth(self._sealed, conn, index, data, kind, index, token, True, self.picker)
        return True

    def _write_whole(self, index: int, data: bytearray, digest: bytes) -> Deferred:
        """Check a whole piece against C{digest} and write it (through the guard when parts are written)."""
        if self._guard is not None:
            return self._pstore.write_guarded(self.task_id, self._guard, index, index * self.piece_size, data, digest)
        return self._store.write_verified(self.task_id, index * self.piece_size, data, digest)

    def _seal(self, conn: Any, index: int, data: bytearray, kind: str, digest: bytes, parts: _Parts) -> None:
        """All the parts but the last are hashed and written: the last one, then the digest."""
        assert self._guard is not None
        if parts.failed is not None:
            d: Deferred = Deferred()
            d.errback(parts.failed)
        else:
            d = self._pstore.seal_part(
                self.task_id, self._guard, index, parts.token, parts.hasher, data, parts.queued,
                index * self.piece_size, digest,
            )

        d.addBoth(self._sealed, conn, index, data, kind, parts.index, parts.token, False, self.picker)

    def _sealed(
        self, result: bool | None | Failure, conn: Any, index: int, data: bytearray, kind: str, claimed: int,
        token: int, whole: bool, picker: Picker[Any] | None,
    ) -> None:
        """
        A piece written under a guard token (in parts, or L{_write_beside})
        is sealed, or not: C{whole}, its buffer still holds its bytes (the
        parts' pages are gone, so the whole-file hash reads the file).
        """
        if self._guard is not None:
            self._guard.release(claimed, token)
        if result is None:
            # this copy could not write all of it (the geometry changed,
            # or a verified copy came first): nothing of it counts
            self._release(data)
            if picker is not None and self.picker is picker:
                picker.unverified(index)
            self._stats.count(self._stats.discarded, "duplicate", len(data))
            return
        self._released(result, data, index, whole)
        if isinstance(result, Failure):
            self._not_written(result, index)
        else:
            self._written(result, conn, index, kind, len(data))

    def _released(self, result: Any, data: bytearray, index: int, whole: bool = True) -> Any:
        held = None
        if result is True and self.on_stored is not None and self._outcomes.accepting():
            held = self.on_stored(index, data if whole else None)
        if held is None:
            self._release(data)
        else:
            held.addBoth(lambda _: self._release(data))
        return result

    def _written(self, ok: bool, conn: Any, index: int, kind: str, nbytes: int) -> None:
        picker, stats = self.picker, self._stats
        assert picker is not None
        if not self._outcomes.accepting():
            picker.unverified(index)
            stats.count(stats.discarded, "duplicate" if ok else "corrupt", nbytes)
        elif not ok:
            stats.count(stats.discarded, "corrupt", nbytes)
            self._outcomes.piece_corrupt(conn, index, nbytes)
        else:
            picker.stored(index)
            stats.count(stats.traffic, kind, nbytes)
            self._outcomes.piece_stored(conn, index, nbytes)

    def _not_written(self, f: Failure, index: int) -> None:
        if self.picker is not None:
            self.picker.unverified(index)
        self._outcomes.store_failed(index, f.getErrorMessage())

    def from_source(self, index: int, data: bytearray) -> Deferred:
        """
        Piece C{index} from the origin: checked against the SuperNode's
        digest and written; fires with True, or False on a mismatch.
        """
        digest = self.digests[index]
        assert digest is not None and self.have is not None
        d = self._write_whole(index, data, digest)

        def stored(ok: bool) -> bool:
            if ok and self.have is not None and index not in self.have:
                if self.on_stored is not None:
                    self.on_stored(index, data)
                self.have.set(index)
                self._outcomes.source_piece_stored(index)
            return ok

        return d.addCallback(stored)

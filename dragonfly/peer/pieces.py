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

import random
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ..core.bitmap import Bitmap
from ..core.pieces import piece_count, piece_span
from ..core.piecetag import well_formed
from ..protocol.supernode_api import PieceProof, SyncAnswer
from .interfaces import Stats, Store
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


class TaskPieces:
    """
    @param task_id: the task's files in C{store}.
    @param release: gives a piece's buffer back (L{dragonfly.protocol.block.BlockFactory.release}).
    @param outcomes: the task, told what became of each piece.
    """

    #: endgame: duplicate requests only for the last few pieces, out this long
    ENDGAME_PIECES = 4
    ENDGAME_AFTER = 1.0
    #: pieces ahead of an in-order stream that go before the rarest
    STREAM_WINDOW = 4

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
        self.on_stored: Callable[[int, bytearray], Deferred | None] | None = None

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
            endgame_after=self.ENDGAME_AFTER, stream_window=self.STREAM_WINDOW,
        )
        self.picker.stream_from = self._stream_from

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
        if self.count is None or not 0 <= index < self.count:
            return
        self.digests[index] = digest
        if self.picker is not None:
            self.picker.digest_known(index)
        while self.digests_from < self.count and self.digests[self.digests_from] is not None:
            self.digests_from += 1

    def learn(self, answer: SyncAnswer) -> None:
        """What a sync answer says of the pieces: more digests, and the seed allowance."""
        for k, hexd in enumerate(answer.digests):
            self.set_digest(answer.digests_from + k, bytes.fromhex(hexd))
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

    def arrived(self, conn: Any, index: int, data: bytearray, kind: str) -> None:
        """
        Piece C{index} came from C{conn} (C{kind}: supernode or remote_peer):
        verify and write it, then tell the task; its buffer is released
        either way.
        """
        picker = self.picker
        assert picker is not None
        digest = self.digests[index]
        if not self._outcomes.accepting() or digest is None or not picker.verify(index):
            # a duplicate from the endgame, or too late; (a digest is always
            # known: only pieces with one are requested)
            self._stats.count(self._stats.discarded, "duplicate", len(data))
            self._release(data)
            return
        d = self._store.write_verified(self.task_id, index * self.piece_size, data, digest)
        d.addBoth(self._released, data, index)
        d.addCallbacks(self._written, self._not_written, callbackArgs=(conn, index, kind, len(data)), errbackArgs=(index,))

    def _released(self, result: Any, data: bytearray, index: int) -> Any:
        held = None
        if result is True and self.on_stored is not None and self._outcomes.accepting():
            held = self.on_stored(index, data)
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
        d = self._store.write_verified(self.task_id, index * self.piece_size, data, digest)

        def stored(ok: bool) -> bool:
            if ok and self.have is not None and index not in self.have:
                if self.on_stored is not None:
                    self.on_stored(index, data)
                self.have.set(index)
                self._outcomes.source_piece_stored(index)
            return ok

        return d.addCallback(stored)

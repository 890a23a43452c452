"""
What a block connection needs of the task it carries: the L{TaskSide}.

A side is the local end of one task, shared by all the task's connections: a
CDN task on the SuperNode (C{dragonfly/supernode/node.py}), a download on a
dfpeer (C{dragonfly/peer/neighbours.py}).  The connection rules
(L{dragonfly.protocol.connection}) tell it what the remote said; the upload
path (L{dragonfly.protocol.upload}) reads from it what to send.  Every
callback receives the connection as its Twisted adapter,
L{dragonfly.protocol.block.BlockProtocol}, whose public surface the side uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred

from ..core.bitmap import Bitmap
from ..core.ratelimit import TokenBucket

if TYPE_CHECKING:
    from .block import BlockProtocol

__all__ = ["TaskSide", "Resolver", "PieceFile"]

#: C{(fd, offset, length)}: a verified piece in a file its side keeps open
PieceFile = tuple[int, int, int]


class TaskSide(TypingProtocol):
    """The local end of a task, shared by all its connections."""

    #: whether this side downloads pieces (False on the seed)
    accepts_pieces: bool

    def local_bitmap(self) -> Bitmap | None:
        """The verified pieces we can serve, or None while the length is unknown."""

    def piece_length(self, index: int) -> int | None:
        """The size of piece C{index}, or None when out of range/unknown."""

    def read_piece(self, index: int) -> Deferred[bytes]:
        """Read a verified piece."""

    # optional: piece_file(index) -> PieceFile | None, a verified piece in a
    # file the side keeps open, for zero-copy uploads (see upload.py).  The fd
    # must stay open while any of the side's connections may be sending
    # from it: abort them (conn.abort) before closing it, or a body waiting
    # for the socket could be sent from whatever file reuses the number.

    # optional: warm_piece(index) -> Deferred | None, reads a piece that
    # piece_file names into the page cache in the pool and fires when it is
    # there (None: nothing to read); the uploader waits for it before the
    # piece's header, and reads the next queued piece ahead (see upload.py).

    # optional: cancel_received(conn, index, where), told that the remote
    # cancelled its request for index, which was "queued" (dropped),
    # "sending" (taken up: dropped if its header is not written yet) or
    # "sent" (already out, or never asked).

    # optional: cancelled_arrived(conn, index, nbytes), told that a piece
    # this side cancelled on conn arrived whole all the same (its bytes were
    # on their way: counted, then dropped).

    # optional: hold_fills() and release_fills(), called around the handling of
    # the frames of one read (see dragonfly/peer/neighbours.py): what the side
    # would redo after each of them (its picker's fill) it may do once, at
    # release_fills.

    def attached(self, conn: BlockProtocol) -> None:
        """A connection finished its handshake for this task."""

    def detached(self, conn: BlockProtocol, reason: str) -> None:
        """A connection closed."""

    def on_bitfield(self, conn: BlockProtocol) -> None: ...

    def on_have(self, conn: BlockProtocol, index: int) -> None: ...

    def on_piece(self, conn: BlockProtocol, index: int, data: bytearray) -> None:
        """A requested piece arrived; give C{data} back with C{factory.release} when done with it."""

    # optional: piece_part(conn, index, buf, filled) -> int, told that the
    # first `filled` bytes of a requested piece arriving into `buf` are in
    # (0: it starts); answers the `filled` at which to be told again, or
    # connection.NO_MARK.  A dfpeer hashes and writes a large piece's parts
    # as they arrive (dragonfly.peer.pieces.TaskPieces.part).

    # optional: piece_dropped(conn, index, buf), told that the piece arriving
    # into `buf` will not be delivered (cancelled while arriving, or the
    # connection closed mid-body): the side may give the buffer back once
    # nothing of its own still reads it.

    def on_reject(self, conn: BlockProtocol, index: int, reason: int) -> None: ...

    def on_digests(self, conn: BlockProtocol, first: int, digests: list[bytes]) -> None: ...

    def on_uploaded(self, conn: BlockProtocol, nbytes: int) -> None: ...

    def download_limits(self) -> list[TokenBucket | None]:
        """The rate limits that pace what this side receives (none: [])."""


#: task id (hex) to the side serving it, or None when this host does not hold it
Resolver = Callable[[str], "TaskSide | None"]

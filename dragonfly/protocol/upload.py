"""
The sending half of a block connection: the pieces the remote requested go
out one at a time, paced, and without a copy through Python when they can.

L{Uploader} drains the connection's upload queue
(L{BlockConnection.next_upload}) and tells the rules when a piece went out
(L{BlockConnection.upload_done}) or could not be read
(L{BlockConnection.upload_failed}).  It is paced twice:
 - by the transport: the adapter is the transport's push producer and hands
   L{pause}/L{resume} on, so nothing more is written while Twisted's write
   buffer is full;
 - by the host's upload limit (a L{TokenBucket}): each piece reserves its
   bytes once, then waits for the time the bucket names.

A piece goes out in one of two ways:
 - copied: C{side.read_piece(index)} (in the pool), then one C{writeSequence}
   of the PIECE header and the bytes;
 - zero copy, when the side offers C{piece_file(index)} (an open fd, offset
   and length of the verified piece) and the transport is a plain TCP
   connection: the header with C{send(MSG_MORE)}, the body with
   C{os.sendfile} from the file straight to the socket.  The uploader then
   drives the socket itself, only while Twisted's own write buffer is empty;
   it holds control frames (L{write}) until the body ends, so nothing cuts
   into a body on the wire; and it waits for writability through the
   transport (it marks the producer paused and asks the transport to write:
   the transport resumes it when the socket is writable).

A sendfile that fails or comes up short (the file shorter than the piece)
falls back, for the rest of that body and every later piece of the
connection, to C{read_piece}: the bytes already sent are skipped, the rest
written from the copy.  A read that fails in the middle of a body closes the
connection (the remote cannot be told anything else mid-body); a read that
fails before the header answers the request with REJECT.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..core.ratelimit import TokenBucket
from . import frames as F
from .connection import Action, BlockConnection
from .side import PieceFile

__all__ = ["Uploader", "Body", "transport_idle", "wake_when_writable"]

log = Logger()

#: control frames go out with C{send} at once when Twisted's write buffer is empty (L{Uploader.write});
#: DRAGONFLY_DIRECT_CONTROL=0 leaves them to Twisted's buffer (same-run comparisons, bench.swarm --ab-env)
DIRECT_WRITES = os.environ.get("DRAGONFLY_DIRECT_CONTROL", "1") != "0"


class Body:
    """A piece body going out with sendfile: C{sent} of C{length} bytes from C{fd} at C{offset}."""

    __slots__ = ("index", "fd", "offset", "length", "sent", "paced", "header", "held", "fallback")

    def __init__(self, index: int, fd: int, offset: int, length: int) -> None:
        self.index, self.fd, self.offset, self.length = index, fd, offset, length
        self.sent = 0
        self.paced = False  # the upload limit let it go
        self.header = False  # its header is on the wire: nothing else may be written before its end
        self.held: list[bytes] = []  # control frames that wait for its end
        self.fallback = False  # the rest comes from read_piece


class Uploader:
    """
    Sends the pieces one connection's remote requested.

    @param conn: the connection's rules.
    @param run: carries out the actions the rules answer with (the adapter).
    @param clock: the upload limit's clock (needed when C{limit} is given).
    @param limit: the host's upload limit, or None.
    @param name: the connection, as it appears in log lines.
    """

    def __init__(
        self,
        conn: BlockConnection,
        run: Callable[[list[Action]], None],
        clock: Any = None,
        limit: TokenBucket | None = None,
        name: object = None,
    ) -> None:
        self._conn = conn
        self._run = run
        self._clock = clock
        self._limit = limit
        self._name = name
        self._transport: Any = None
        self._sock: socket.socket | None = None
        self.zero_copy = True  # until a sendfile fails on this connection
        self.paused = False
        self._pumping = self._repump = False
        self._reading: int | None = None  # index being read with read_piece
        self._ready: tuple[int, bytes] | None = None  # read, waiting to go out
        self._body: Body | None = None  # going out with sendfile
        self._due: float | None = None  # when the upload limit lets the next piece go
        self._timer: Any = None
        self.bytes_out = 0

    def attach(self, transport: Any, sock: socket.socket | None) -> None:
        """
        The connection is up on C{transport}; C{sock} is its socket when it
        is a plain TCP connection (a L{twisted.internet.tcp.Connection}) we
        may write to ourselves, else None (no zero copy).
        """
        self._transport = transport
        self._sock = sock

    @property
    def mid_body(self) -> bool:
        """A zero-copy body is partly on the wire: no other frame may be written before its end."""
        return self._body is not None and self._body.header

    def write(self, data: bytes) -> None:
        """
        Write control frames, after the body on the wire if there is one.

        On a plain TCP socket whose Twisted write buffer is empty the frames
        go out at once with C{send} (L{DIRECT_WRITES}): Twisted's own write
        would register the socket for writability and send them in a later
        turn of the reactor, two C{epoll_ctl} calls and a C{doWrite} per
        frame.  What the socket does not take goes to Twisted's buffer, in
        order.
        """
        if self._body is not None and self._body.header:
            self._body.held.append(data)
            return
        transport = self._transport
        if transport is None:
            return
        sock = self._sock
        if sock is not None and DIRECT_WRITES and getattr(transport, "connected", True) \
                and not transport.disconnecting and transport_idle(transport):
            try:
                n = sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                n = 0  # the connection is going: Twisted's write and read see it
            if n == len(data):
                return
            data = data[n:]
        transport.write(data)

    def drop(self) -> None:
        """Forget the piece in hand (the connection is closing)."""
        self._ready = None
        self._body = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def pause(self) -> None:
        """The transport's buffer is full."""
        self.paused = True

    def resume(self) -> None:
        """The transport drained its buffer (or the socket is writable again)."""
        self.paused = False
        self.pump()
        if self._sock is not None and self._transport.disconnecting:
            self._transport.startWriting()  # let a pending close go through

    def pump(self) -> None:
        """Move uploads along; re-entrant calls become one more turn of the loop."""
        if self._pumping:
            self._repump = True
            return
        self._pumping = True
        try:
            while True:
                self._repump = False
                self._pump_once()
                if not self._repump:
                    break
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        conn = self._conn
        if conn.closed:
            return
        body = self._body
        if body is not None:
            if not body.paced:
                if self.paused or not self._allowed(body.length):
                    return
                body.paced = True
            if not body.fallback:
                self._send_body(body)
            return
        if self._ready is not None and not self.paused:
            index, data = self._ready
            if not self._allowed(len(data)):
                return
            self._ready = None
            self._transport.writeSequence([self._haves(), F.piece_header(index, len(data)), data])
            self.bytes_out += len(data)
            self._run(conn.upload_done(index, len(data)))
        if self._reading is None and self._ready is None and self._body is None:
            self._start(conn.next_upload())

    def _start(self, index: int | None) -> None:
        """Take up the next piece to send (None: nothing waits): from its file, or read it."""
        if index is None:
            return
        span = self._piece_file(index)
        if span is not None:
            self._body = Body(index, *span)
            self._repump = True  # paced like a piece read
            return
        self._reading = index
        d: Deferred[bytes] = self._conn.side.read_piece(index)
        d.addCallbacks(self._piece_read, self._read_failed, callbackArgs=(index,), errbackArgs=(index,))

    def _haves(self) -> bytes:
        """The HAVEs the connection holds, to ride in front of a piece header (one write, one wake-up there)."""
        frames, actions = self._conn.held_haves()
        if actions:
            self._run(actions)
        return frames

    def _allowed(self, nbytes: int) -> bool:
        """The upload limit lets C{nbytes} go now (reserved once, then held until due)."""
        if self._limit is None:
            return True
        now = self._clock.seconds()
        if self._due is None:
            self._due = now + self._limit.reserve(nbytes)
        if now < self._due:
            if self._timer is None:
                self._timer = self._clock.callLater(self._due - now, self._limit_passed)
            return False
        self._due = None
        return True

    def _limit_passed(self) -> None:
        self._timer = None
        self.pump()

    def _piece_file(self, index: int) -> PieceFile | None:
        """Where piece C{index} lies in a file, when it may go out with sendfile."""
        if self._sock is None or not self.zero_copy:
            return None
        side = self._conn.side
        piece_file = getattr(side, "piece_file", None)
        if piece_file is None:
            return None
        try:
            span = piece_file(index)
        except Exception:
            log.failure("piece_file({index}) for {conn}", index=index, conn=self._name)
            return None
        if span is None or span[2] != side.piece_length(index):
            return None
        fd, offset, length = span
        return int(fd), int(offset), int(length)

    def _piece_read(self, data: bytes, index: int) -> None:
        self._reading = None
        if self._conn.closed:
            return
        self._ready = (index, data)
        self.pump()

    def _read_failed(self, f: Failure, index: int) -> None:
        self._reading = None
        log.failure("reading piece {index} for {conn}", f, index=index, conn=self._name)
        self._run(self._conn.upload_failed(index))

    # -- zero-copy bodies ------------------------------------------------------------

    def _send_body(self, body: Body) -> None:
        sock = self._sock
        assert sock is not None
        if not transport_idle(self._transport):
            wake_when_writable(self._transport)
            return
        if not body.header:
            body.header = True
            header = self._haves() + F.piece_header(body.index, body.length)
            try:
                n = sock.send(header, socket.MSG_MORE)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                return  # the connection is going: Twisted sees it
            if n < len(header):
                self._transport.write(header[n:])
                wake_when_writable(self._transport)
                return
        out = sock.fileno()
        while body.sent < body.length:
            try:
                n = os.sendfile(out, body.fd, body.offset + body.sent, body.length - body.sent)
            except (BlockingIOError, InterruptedError):
                wake_when_writable(self._transport)
                return
            except OSError as e:
                self._fall_back(body, f"sendfile failed: {e}")
                return
            if n == 0:
                self._fall_back(body, "the piece's file is shorter than the piece")
                return
            body.sent += n
        self._body_done(body)

    def _fall_back(self, body: Body, why: str) -> None:
        """sendfile failed part-way: the rest of the body comes from read_piece."""
        log.info("zero-copy upload of piece {index} to {conn} falls back to reads: {why}",
                 index=body.index, conn=self._name, why=why)
        self.zero_copy = False
        body.fallback = True

        def read(data: bytes) -> None:
            if self._body is not body:
                return
            if len(data) != body.length:
                self._lose_mid_body(body, f"piece {body.index} read back {len(data)} bytes")
                return
            self._transport.write(data[body.sent:])
            body.sent = body.length
            self._body_done(body)

        def failed(f: Failure) -> None:
            if self._body is body:
                self._lose_mid_body(body, f"piece {body.index} unreadable: {f.getErrorMessage()}")

        d: Deferred[bytes] = self._conn.side.read_piece(body.index)
        d.addCallbacks(read, failed)

    def _lose_mid_body(self, body: Body, why: str) -> None:
        log.info("closing block connection {conn} in the middle of a piece: {why}", conn=self._name, why=why)
        self._run(self._conn.abort(why))

    def _body_done(self, body: Body) -> None:
        self._body = None
        if body.held:
            self._transport.writeSequence(body.held)
        self.bytes_out += body.length
        self._run(self._conn.upload_done(body.index, body.length))


def transport_idle(transport: Any) -> bool:
    """Twisted's write buffer of a C{tcp.Connection} is empty (FileDescriptor's own fields)."""
    return not transport._tempDataLen and len(transport.dataBuffer) == transport.offset


def wake_when_writable(transport: Any) -> None:
    """
    Have C{transport} resume its streaming producer once its buffer is empty
    and the socket writable: a paused producer is resumed by its doWrite.
    """
    transport.producerPaused = True
    transport.startWriting()

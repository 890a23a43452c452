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

What a CANCEL saves: a piece still in the queue is dropped there
(L{BlockConnection}); one taken up whose header is not written yet (waiting
for the upload limit, the pool's read, or the socket) is dropped here; a body
begun goes out whole, since its length is in its header and the frame cannot
end early.  So that the pieces behind a body wait in the queue and not in the
kernel, a block socket holds at most L{UPLOAD_LOWAT} bytes not yet sent
(C{TCP_NOTSENT_LOWAT}: sendfile stops there and the socket is not writable
until it drains): with the send buffer's several MB, sendfile had put the
next pieces into it at once, where no CANCEL reached them.

Before a zero-copy piece's header goes, the side reads it into the page
cache in the pool (C{warm_piece}, when it has one), and the next queued piece
while this one goes out: pieces written with C{O_DIRECT} are not in memory,
and the reactor's sendfile read them from the disk itself.

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
#: the bytes a block socket may hold not yet sent (C{TCP_NOTSENT_LOWAT}): sendfile stops, and the
#: socket is not writable, while more than that waits in the kernel, so the pieces queued behind
#: the body stay in the connection's queue, where a CANCEL drops them (a send buffer of several MB
#: held the next pieces already); DRAGONFLY_UPLOAD_LOWAT_KIB=0: no bound (same-run comparisons)
UPLOAD_LOWAT = max(0, int(os.environ.get("DRAGONFLY_UPLOAD_LOWAT_KIB", "1024"))) << 10
#: Linux's TCP_NOTSENT_LOWAT (the socket module names it from Python 3.12... not everywhere)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
#: a zero-copy piece is read into the page cache in the pool before its header goes out, and the
#: next queued piece while it goes (the side's C{warm_piece}): pieces written with C{O_DIRECT}
#: are not in memory, and the reactor's sendfile read them from the disk itself;
#: DRAGONFLY_UPLOAD_WARM=0: as before (same-run comparisons)
UPLOAD_WARM = os.environ.get("DRAGONFLY_UPLOAD_WARM", "1") != "0"
#: DRAGONFLY_TRACE=1: a log line for each piece a CANCEL dropped after it was taken up
TRACE = bool(os.environ.get("DRAGONFLY_TRACE"))


class Body:
    """A piece body going out with sendfile: C{sent} of C{length} bytes from C{fd} at C{offset}."""

    __slots__ = ("index", "fd", "offset", "length", "sent", "paced", "header", "held", "fallback", "warm")

    def __init__(self, index: int, fd: int, offset: int, length: int) -> None:
        self.index, self.fd, self.offset, self.length = index, fd, offset, length
        self.sent = 0
        self.paced = False  # the upload limit let it go
        self.header = False  # its header is on the wire: nothing else may be written before its end
        self.held: list[bytes] = []  # control frames that wait for its end
        self.fallback = False  # the rest comes from read_piece
        self.warm = False  # read into the page cache (or need not be): it may go out


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
        #: pieces the remote cancelled after they were taken up, before their header went out
        self.withdrawn = 0
        #: the pieces read into the page cache in the pool (True), or being read (False)
        self._warm: dict[int, bool] = {}
        self._warm_off = not UPLOAD_WARM  # (the side's warm_piece failed: sendfile reads itself)
        #: the times a body waited for the pool's read before its header
        self.warm_waits = 0

    def attach(self, transport: Any, sock: socket.socket | None) -> None:
        """
        The connection is up on C{transport}; C{sock} is its socket when it
        is a plain TCP connection (a L{twisted.internet.tcp.Connection}) we
        may write to ourselves, else None (no zero copy).
        """
        self._transport = transport
        self._sock = sock
        if sock is not None and UPLOAD_LOWAT:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, UPLOAD_LOWAT)
            except OSError:
                pass  # (not TCP, or an older kernel: the send buffer holds what it holds)

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
        self._warm.clear()
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
            if not body.header:
                if conn.withdrawn == body.index:
                    self._withdraw(body.index)
                    return
                if not body.warm and not self._warmed(body):
                    return
            if not body.paced:
                if self.paused or not self._allowed(body.length):
                    return
                body.paced = True
            if not body.fallback:
                self._send_body(body)
            return
        if self._ready is not None and not self.paused:
            index, data = self._ready
            if conn.withdrawn == index:
                self._ready = None
                self._withdraw(index)
                return
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

    def _withdraw(self, index: int) -> None:
        """The remote cancelled the piece taken up before any of it went out: drop it, take up the next."""
        self._body = None
        self._warm.pop(index, None)
        self.withdrawn += 1
        if TRACE:
            log.info("trace upload of {index} to {conn} withdrawn before its header", index=index, conn=self._name)
        self._run(self._conn.upload_withdrawn(index))

    def _warmed(self, body: Body) -> bool:
        """
        Piece C{index} is in the page cache (or need not be): read into it in
        the pool first (the side's C{warm_piece}), and the next queued piece
        behind it, one ahead.  False while the read is under way: the pump
        runs again when it ends.
        """
        index = body.index
        warm = None if self._warm_off else getattr(self._conn.side, "warm_piece", None)
        if warm is None:
            body.warm = True
            return True
        state = self._warm.get(index)
        if state is None:
            self._start_warm(warm, index)
            state = self._warm.get(index)
        if state is False:
            self.warm_waits += 1
            return False
        self._warm.pop(index, None)
        body.warm = True
        self._read_ahead()
        return True

    def _read_ahead(self) -> None:
        """The next queued piece into the page cache while this body goes out (one ahead: a cancelled one costs one read)."""
        queue = self._conn.queue
        if not queue or queue[0] in self._warm or self._warm_off or not self.zero_copy:
            return
        warm = getattr(self._conn.side, "warm_piece", None)
        if warm is None:
            return
        for stale in [i for i in self._warm if i not in queue]:
            del self._warm[stale]
        self._start_warm(warm, queue[0])

    def _start_warm(self, warm: Callable[[int], Deferred[int] | None], index: int) -> None:
        try:
            d = warm(index)
        except Exception:
            log.failure("warm_piece({index}) for {conn}", index=index, conn=self._name)
            d = None
        if d is None:
            self._warm[index] = True  # nothing to read first
            return
        self._warm[index] = False

        def done(_: object) -> None:
            if self._warm.get(index) is False:
                self._warm[index] = True
                if self._body is not None and self._body.index == index and not self._body.header:
                    self.pump()

        def failed(f: Failure) -> None:
            log.info("block uploads to {conn} read no more ahead: {why}", conn=self._name, why=f.getErrorMessage())
            self._warm_off = True
            self._warm.clear()
            if self._body is not None and not self._body.header:
                self.pump()

        d.addCallbacks(done, failed)

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
            haves = self._haves()
            header = haves + F.piece_header(body.index, body.length)
            try:
                n = sock.send(header, socket.MSG_MORE)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                body.header = True
                return  # the connection is going: Twisted sees it
            if n == 0:
                # the socket holds enough (UPLOAD_LOWAT): the piece is not begun, a CANCEL may still drop it
                if haves:
                    self._transport.write(haves)
                wake_when_writable(self._transport)
                return
            body.header = True
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
                self._read_ahead()  # (a request that came after the body began)
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

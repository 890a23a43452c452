"""
The block protocol over TCP: a Twisted adapter of the sans-IO rules.

One connection carries one task between two hosts.  The side that connects
sends HELLO naming the task; the accepting side answers with its own HELLO, or
with ERROR and a close when it does not hold the task.  Both then send a
BITFIELD and HAVE frames as they verify pieces, and either side may REQUEST
pieces the other holds: connections are symmetric, as in BitTorrent.  The seed
(the SuperNode) also sends DIGESTS, the SHA-256 of each piece it publishes.

The rules (handshake order, one BITFIELD, request bookkeeping, the upload
queue, timeouts) live in L{dragonfly.protocol.connection.BlockConnection};
this module moves bytes and runs timers for it.  What a connection serves and
what it does with what it receives is decided by its L{TaskSide}: a CDN task on
the SuperNode, a download on a dfpeer.

The data path:
 - uploads are paced by the transport (the protocol is its push producer) and
   by the host's upload limit.  A side that offers C{piece_file(index)} has
   its piece bodies sent with C{os.sendfile} straight from the file to the
   socket (no copy through Python); the adapter then drives the socket itself
   only while Twisted's own write buffer is empty, holds control frames until
   the body ends, and waits for writability through the transport (it marks
   itself paused and asks the transport to write: the transport resumes it
   when the socket is writable).  Any failure falls back to C{read_piece}.
 - a piece body being received is read with C{recv_into} straight into the
   piece's buffer, up to its last byte (never past it: what follows goes
   through the framer), never while reading is paused by a download limit.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..core.bitmap import Bitmap
from ..core.ratelimit import TokenBucket, delay_for
from . import frames as F
from .connection import (
    E_BUSY,
    E_NO_TASK,
    E_PROTOCOL,
    E_TASK_FAILED,
    E_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_QUEUED_REQUESTS,
    Action,
    BlockConnection,
    CancelTimer,
    Close,
    Limits,
    Send,
    SetTimer,
    Upload,
)

__all__ = [
    "BLOCK_PORT_OPTIONS", "block_port_limits", "BlockFactory", "BlockProtocol", "TaskSide", "E_BUSY", "E_NO_TASK", "E_PROTOCOL", "E_TASK_FAILED", "E_TIMEOUT",
]

log = Logger()

#: the most a receiver waits for before it is woken (SO_RCVLOWAT)
RCVLOWAT_MAX = 128 * 1024
#: the most read straight into a piece per wake-up while a download limit applies
PACED_READ = 256 * 1024
#: defaults of the connection limits of a block port
MAX_CONNECTIONS = 1024
MAX_PER_ADDRESS = 64


#: twistd options of a block port, shared by dfpeer and supernode (see docs/configuration.md)
BLOCK_PORT_OPTIONS: list[list[Any]] = [
    ["block-handshake-timeout", None, HANDSHAKE_TIMEOUT,
     "Seconds a block connection has to say HELLO before it is closed (0: no limit).", float],
    ["block-idle-timeout", None, IDLE_TIMEOUT,
     "Seconds of silence after which a block connection with nothing requested either way is closed; "
     "KEEPALIVE is sent every half of it (0: never).", float],
    ["block-max-connections", None, MAX_CONNECTIONS, "Block connections accepted at once; more are refused.", int],
    ["block-max-per-address", None, MAX_PER_ADDRESS, "Block connections accepted at once from one address.", int],
    ["block-max-requests", None, MAX_QUEUED_REQUESTS,
     "Piece requests that may wait on one block connection (more closes it).", int],
]


def block_port_limits(options: Any) -> dict[str, Any]:
    """BlockFactory's keyword arguments from parsed L{BLOCK_PORT_OPTIONS}; ValueError when out of range."""
    limits = {
        "handshake_timeout": options["block-handshake-timeout"],
        "idle_timeout": options["block-idle-timeout"],
        "max_connections": options["block-max-connections"],
        "max_per_address": options["block-max-per-address"],
        "max_queued_requests": options["block-max-requests"],
    }
    for name in ("handshake-timeout", "idle-timeout"):
        if options[f"block-{name}"] < 0:
            raise ValueError(f"--block-{name} must be 0 or more")
    for name in ("max-connections", "max-per-address", "max-requests"):
        if options[f"block-{name}"] < 1:
            raise ValueError(f"--block-{name} must be at least 1")
    return limits


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

    # optional: piece_file(index) -> (fd, offset, length) | None, a verified
    # piece in a file the side keeps open, for zero-copy uploads.  The fd
    # must stay open while any of the side's connections may be sending
    # from it: abort them (conn.abort) before closing it, or a body waiting
    # for the socket could be sent from whatever file reuses the number.

    def attached(self, conn: BlockProtocol) -> None:
        """A connection finished its handshake for this task."""

    def detached(self, conn: BlockProtocol, reason: str) -> None:
        """A connection closed."""

    def on_bitfield(self, conn: BlockProtocol) -> None: ...

    def on_have(self, conn: BlockProtocol, index: int) -> None: ...

    def on_piece(self, conn: BlockProtocol, index: int, data: bytearray) -> None:
        """A requested piece arrived; give C{data} back with C{factory.release} when done with it."""

    def on_reject(self, conn: BlockProtocol, index: int, reason: int) -> None: ...

    def on_digests(self, conn: BlockProtocol, first: int, digests: list[bytes]) -> None: ...

    def on_uploaded(self, conn: BlockProtocol, nbytes: int) -> None: ...

    def download_limits(self) -> list[TokenBucket | None]:
        """The rate limits that pace what this side receives (none: [])."""


Resolver = Callable[[str], "TaskSide | None"]


class BlockFactory(Factory):
    """
    Makes block connections for one host, and sheds what it cannot afford.

    @param peer_id: our id, sent in HELLO.
    @param resolve: task id (hex) to the L{TaskSide} serving it, or None.
    @param max_piece: the largest piece frame accepted.
    @param clock: runs the timers (none without it) and the upload limit.
    @param handshake_timeout: seconds a connection has to complete HELLO.
    @param idle_timeout: seconds of silence after which a connection with
        nothing requested either way is closed (KEEPALIVE every half of it).
    @param max_queued_requests: REQUESTs that may wait on one connection.
    @param max_connections: accepted connections open at once.
    @param max_per_address: accepted connections open at once from one address.
    """

    noisy = False

    def __init__(
        self,
        peer_id: str,
        resolve: Resolver,
        max_piece: int = F.MAX_PIECE_SIZE,
        clock: Any = None,
        upload_limit: TokenBucket | None = None,
        handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = IDLE_TIMEOUT,
        max_queued_requests: int = MAX_QUEUED_REQUESTS,
        max_connections: int = MAX_CONNECTIONS,
        max_per_address: int = MAX_PER_ADDRESS,
    ) -> None:
        self.peer_id = peer_id
        self.clock = clock
        self.upload_limit = upload_limit
        self.resolve = resolve
        self.max_piece = max_piece
        self.set_limits(handshake_timeout, idle_timeout, max_queued_requests, max_connections, max_per_address)
        self.connections: set[BlockProtocol] = set()
        self.accepted: dict[str, int] = {}
        self.refused = 0
        self._free: dict[int, list[bytearray]] = {}

    def set_limits(
        self,
        handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = IDLE_TIMEOUT,
        max_queued_requests: int = MAX_QUEUED_REQUESTS,
        max_connections: int = MAX_CONNECTIONS,
        max_per_address: int = MAX_PER_ADDRESS,
    ) -> None:
        """Set the limits (see the class docstring) of the connections made from now on."""
        self.limits = Limits(handshake_timeout, idle_timeout, max_queued_requests)
        self.max_connections = max_connections
        self.max_per_address = max_per_address

    def buffer(self, size: int) -> bytearray:
        """A receive buffer of C{size} bytes, reused when one is free (no fresh pages per piece)."""
        free = self._free.get(size)
        return free.pop() if free else bytearray(size)

    def release(self, buf: bytearray) -> None:
        """Give back a buffer from L{buffer} once its piece is stored or dropped."""
        free = self._free.setdefault(len(buf), [])
        if len(free) < 16:
            free.append(buf)

    def buildProtocol(self, addr: Any) -> Protocol:
        host = str(getattr(addr, "host", "?"))
        total = sum(self.accepted.values())
        if total >= self.max_connections:
            return self._refuse(host, f"too many block connections ({total})")
        if self.accepted.get(host, 0) >= self.max_per_address:
            return self._refuse(host, f"too many block connections from {host} ({self.accepted[host]})")
        p = BlockProtocol(self)
        p.factory = self
        p.accepted_from = host
        return p

    def _refuse(self, host: str, why: str) -> Protocol:
        self.refused += 1
        log.info("refusing a block connection from {addr}: {why}", addr=host, why=why, refused=self.refused)
        return _Refuse(why)

    def _accepted(self, host: str, delta: int) -> None:
        n = self.accepted.get(host, 0) + delta
        if n > 0:
            self.accepted[host] = n
        else:
            self.accepted.pop(host, None)

    def client(self, side: TaskSide, task_id: str, remote_id: str | None = None) -> BlockProtocol:
        """A protocol for an outgoing connection that will say HELLO for C{task_id}."""
        p = BlockProtocol(self, side=side, task_id=task_id, remote_id=remote_id)
        p.factory = self
        return p

    def connect(self, endpoint: Any, proto: BlockProtocol) -> Deferred[BlockProtocol]:
        """Open an outgoing connection on C{endpoint} for a L{client} protocol."""
        d: Deferred[BlockProtocol] = endpoint.connect(_OneShot(proto))
        return d


class _OneShot(Factory):
    """Hands one prepared protocol to an endpoint, without a log line."""

    noisy = False

    def __init__(self, proto: BlockProtocol) -> None:
        self._proto = proto

    def buildProtocol(self, addr: Any) -> BlockProtocol:
        return self._proto


class _Refuse(Protocol):
    """Answers a connection over the limits with ERROR, then closes."""

    transport: Any

    def __init__(self, why: str) -> None:
        self.why = why

    def connectionMade(self) -> None:
        self.transport.write(F.encode_error(E_BUSY, self.why))
        self.transport.loseConnection()


class _Body:
    """A piece body going out with sendfile: C{sent} of C{length} bytes from C{fd} at C{offset}."""

    __slots__ = ("index", "fd", "offset", "length", "sent", "paced", "header", "held", "fallback")

    def __init__(self, index: int, fd: int, offset: int, length: int) -> None:
        self.index, self.fd, self.offset, self.length = index, fd, offset, length
        self.sent = 0
        self.paced = False  # the upload limit let it go
        self.header = False
        self.held: list[bytes] = []
        self.fallback = False


@implementer(IPushProducer)
class BlockProtocol(Protocol):
    """One block-protocol connection (see the module docstring)."""

    accepted_from: str | None = None
    transport: Any  # a tcp.Connection in production (see _direct), any ITransport in tests

    def __init__(
        self,
        factory: BlockFactory,
        side: TaskSide | None = None,
        task_id: str | None = None,
        remote_id: str | None = None,
    ) -> None:
        self._factory = factory
        self._conn = BlockConnection(
            self, factory.peer_id, factory.resolve, side=side, task_id=task_id, remote_id=remote_id,
            max_piece=factory.max_piece, buffer=factory.buffer, now=self._now, limits=factory.limits,
        )
        self._timers: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._direct = False  # a plain TCP socket we may drive ourselves
        self._zero_copy = True  # until a sendfile fails on this connection
        self._lowat = 1
        self._read_paused = False
        # uploading
        self._paused = False
        self._pumping = self._repump = False
        self._reading: int | None = None  # index being read with read_piece
        self._ready: tuple[int, bytes] | None = None  # read, waiting to go out
        self._body: _Body | None = None  # going out with sendfile
        self._upload_due: float | None = None
        self._upload_timer: Any = None
        self.bytes_out = 0

    # -- the public surface (used by the task sides) -------------------------

    side = property(lambda self: self._conn.side)
    task_id = property(lambda self: self._conn.task_id)
    initiator = property(lambda self: self._conn.initiator)
    remote_have = property(lambda self: self._conn.remote_have)
    requested = property(lambda self: self._conn.requested)
    closed = property(lambda self: self._conn.closed)
    ready = property(lambda self: self._conn.ready)
    last_rx = property(lambda self: self._conn.last_rx)
    _queue = property(lambda self: self._conn.queue)

    @property
    def remote_id(self) -> str | None:
        return self._conn.remote_id

    @property
    def uploading(self) -> bool:
        """A piece is queued, being read or being sent on this connection."""
        return bool(self._conn.queue) or self._conn.sending is not None

    def __repr__(self) -> str:
        return f"<BlockProtocol {self.remote_id or '?'} {self.peer_address()}>"

    def peer_address(self) -> str:
        if self.transport is None:
            return "-"
        addr = self.transport.getPeer()
        return f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}"

    def abort(self, why: str, code: int = E_PROTOCOL) -> None:
        """Close with a logged reason, telling the other side why."""
        self._do(self._conn.abort(why, code))

    def request(self, index: int, now: float) -> None:
        """Ask the remote side for piece C{index}."""
        self._do(self._conn.request(index, now))

    def cancel(self, index: int) -> None:
        """Withdraw a request (the piece came from elsewhere, or timed out)."""
        self._do(self._conn.cancel(index))

    def send_bitfield(self, bitmap: Bitmap) -> None:
        self._do(self._conn.send_bitfield(bitmap))

    def send_have(self, index: int) -> None:
        self._do(self._conn.send_have(index))

    def send_digests(self, first: int, digests: list[bytes]) -> None:
        self._do(self._conn.send_digests(first, digests))

    # -- running the connection's actions ------------------------------------------

    def _now(self) -> float:
        clock = self._factory.clock or getattr(self._conn.side, "clock", None)
        return clock.seconds() if clock is not None else 0.0

    def _do(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                self._write(a.data)
            elif isinstance(a, Upload):
                self._pump()
            elif isinstance(a, SetTimer):
                self._set_timer(a.name, a.delay)
            elif isinstance(a, CancelTimer):
                timer = self._timers.pop(a.name, None)
                if timer is not None and timer.active():
                    timer.cancel()
            else:
                self._close(a)

    def _write(self, data: bytes) -> None:
        if self._body is not None and self._body.header:
            self._body.held.append(data)  # nothing may cut into a body on the wire
        elif self.transport is not None:
            self.transport.write(data)

    def _set_timer(self, name: str, delay: float) -> None:
        clock = self._factory.clock
        if clock is None:
            return
        timer = self._timers.get(name)
        if timer is not None and timer.active():
            timer.reset(delay)
        else:
            self._timers[name] = clock.callLater(delay, lambda: self._do(self._conn.timer_fired(name)))

    def _close(self, a: Close) -> None:
        if a.code is None:
            log.info("block connection {conn} closed: {why}", conn=self, why=a.reason,
                     taskId=self.task_id, peerId=self.remote_id)
        else:
            log.info("closing block connection {conn}: {why}", conn=self, why=a.reason,
                     taskId=self.task_id, peerId=self.remote_id, code=a.code)
        mid_body = self._body is not None and self._body.header
        self._drop_uploads()
        if self.transport is None:
            return
        if a.code is not None and not mid_body:
            self.transport.write(F.encode_error(a.code, a.reason))
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _drop_uploads(self) -> None:
        self._ready = None
        self._body = None
        if self._upload_timer is not None and self._upload_timer.active():
            self._upload_timer.cancel()
        self._upload_timer = None

    # -- connection life -------------------------------------------------------------

    def connectionMade(self) -> None:
        self._factory.connections.add(self)
        if self.accepted_from is not None:
            self._factory._accepted(self.accepted_from, 1)
        handle = getattr(self.transport, "getHandle", None)
        sock = handle() if handle is not None else None
        self._sock = sock if isinstance(sock, socket.socket) else None
        self._direct = self._sock is not None and isinstance(self.transport, tcp.Connection)
        self.transport.registerProducer(self, True)
        self._do(self._conn.connection_made())

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._factory.connections.discard(self)
        if self.accepted_from is not None:
            self._factory._accepted(self.accepted_from, -1)
            self.accepted_from = None
        self._drop_uploads()
        self._do(self._conn.connection_lost(reason.getErrorMessage() if reason is not None else "closed"))
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    # -- receiving ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        conn = self._conn
        if conn.closed:
            return
        self._do(conn.data_received(data))
        n = len(data)
        side = conn.side
        limits = side.download_limits() if side is not None and self._factory.clock is not None else []
        if self._direct and not self._read_paused:
            n += self._read_into_piece(PACED_READ if any(limits) else 1 << 62)
        self._set_lowat(conn.body_remaining)
        if limits:
            self._pace_download(limits, n)

    def _read_into_piece(self, most: int) -> int:
        """Read what the socket holds of the piece body arriving, straight into its buffer."""
        conn, sock, total = self._conn, self._sock, 0
        assert sock is not None
        while total < most and not conn.closed:
            window = conn.rx_window()
            if window is None:
                break
            try:
                n = sock.recv_into(window, min(len(window), most - total))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # Twisted's next read sees the error
            finally:
                window.release()
            if n == 0:
                break  # the end of the stream: Twisted's next read sees it
            total += n
            self._do(conn.rx_filled(n))
        return total

    def _pace_download(self, limits: list[TokenBucket | None], nbytes: int) -> None:
        """Hold reading while the side's download limits (per task, per host) say so."""
        delay = delay_for(limits, nbytes)
        if delay > 0 and not self._read_paused and not self.closed:
            self._read_paused = True
            self.transport.pauseProducing()
            self._factory.clock.callLater(delay, self._resume_reading)

    def _resume_reading(self) -> None:
        self._read_paused = False
        if not self.closed:
            self.transport.resumeProducing()

    def _set_lowat(self, remaining: int) -> None:
        """
        While a piece body arrives nothing else can come before its last byte
        (TCP keeps order), so ask the kernel to wake us only once a good part
        of it is there (Linux honours SO_RCVLOWAT in poll/epoll).  On a link
        slower than the machine this turns one wake-up per segment into one
        per RCVLOWAT_MAX bytes: a tenth of the CPU per byte received.
        """
        want = min(max(remaining, 1), RCVLOWAT_MAX)
        if want == self._lowat or self._sock is None:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            self._lowat = want
        except OSError:
            self._sock = None
            self._direct = False

    # -- uploading -------------------------------------------------------------------------

    def _pump(self) -> None:
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
                if self._paused or not self._upload_allowed(body.length):
                    return
                body.paced = True
            if not body.fallback:
                self._send_body()
            return
        if self._ready is not None and not self._paused:
            index, data = self._ready
            if not self._upload_allowed(len(data)):
                return
            self._ready = None
            self.transport.writeSequence([F.piece_header(index, len(data)), data])
            self.bytes_out += len(data)
            self._do(conn.upload_done(index, len(data)))
        if self._reading is None and self._ready is None and self._body is None:
            next_index = conn.next_upload()
            if next_index is None:
                return
            index = next_index
            span = self._piece_file(index)
            if span is not None:
                self._body = _Body(index, *span)
                self._repump = True  # paced like a piece read
                return
            self._reading = index
            d = conn.side.read_piece(index)
            d.addCallbacks(self._piece_read, self._read_failed, callbackArgs=(index,), errbackArgs=(index,))

    def _upload_allowed(self, nbytes: int) -> bool:
        """
        Pace uploads: a piece waits until the host's upload limit allows it
        (reserved once, then held).
        """
        limit = self._factory.upload_limit
        if limit is None:
            return True
        now = self._factory.clock.seconds()
        if self._upload_due is None:
            self._upload_due = now + limit.reserve(nbytes)
        if now < self._upload_due:
            if self._upload_timer is None:
                self._upload_timer = self._factory.clock.callLater(self._upload_due - now, self._upload_ready)
            return False
        self._upload_due = None
        return True

    def _upload_ready(self) -> None:
        self._upload_timer = None
        self._pump()

    def _piece_file(self, index: int) -> tuple[int, int, int] | None:
        if not (self._direct and self._zero_copy):
            return None
        piece_file = getattr(self._conn.side, "piece_file", None)
        if piece_file is None:
            return None
        try:
            span = piece_file(index)
        except Exception:
            log.failure("piece_file({index}) for {conn}", index=index, conn=self)
            return None
        if span is None or span[2] != self._conn.side.piece_length(index):
            return None
        fd, offset, length = span
        return int(fd), int(offset), int(length)

    def _piece_read(self, data: bytes, index: int) -> None:
        self._reading = None
        if self.closed:
            return
        self._ready = (index, data)
        self._pump()

    def _read_failed(self, f: Failure, index: int) -> None:
        self._reading = None
        log.failure("reading piece {index} for {conn}", f, index=index, conn=self)
        self._do(self._conn.upload_failed(index))

    # -- zero-copy bodies --------------------------------------------------------------------------

    def _transport_idle(self) -> bool:
        """Twisted's write buffer is empty (FileDescriptor's own fields: we checked it is a tcp.Connection)."""
        t = self.transport
        return not t._tempDataLen and len(t.dataBuffer) == t.offset

    def _wake_when_writable(self) -> None:
        """
        Have the transport resume us once its buffer is empty and the socket
        writable: a paused streaming producer is resumed by its doWrite.
        """
        self.transport.producerPaused = True
        self.transport.startWriting()

    def _send_body(self) -> None:
        body, sock = self._body, self._sock
        assert body is not None and sock is not None
        if not self._transport_idle():
            self._wake_when_writable()
            return
        if not body.header:
            body.header = True
            header = F.piece_header(body.index, body.length)
            try:
                n = sock.send(header, socket.MSG_MORE)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                return  # the connection is going: Twisted sees it
            if n < len(header):
                self.transport.write(header[n:])
                self._wake_when_writable()
                return
        out = sock.fileno()
        while body.sent < body.length:
            try:
                n = os.sendfile(out, body.fd, body.offset + body.sent, body.length - body.sent)
            except (BlockingIOError, InterruptedError):
                self._wake_when_writable()
                return
            except OSError as e:
                self._body_fallback(body, f"sendfile failed: {e}")
                return
            if n == 0:
                self._body_fallback(body, "the piece's file is shorter than the piece")
                return
            body.sent += n
        self._body_done(body)

    def _body_fallback(self, body: _Body, why: str) -> None:
        """sendfile failed part-way: the rest of the body comes from read_piece."""
        log.info("zero-copy upload of piece {index} to {conn} falls back to reads: {why}",
                 index=body.index, conn=self, why=why)
        self._zero_copy = False
        body.fallback = True

        def read(data: bytes) -> None:
            if self._body is not body:
                return
            if len(data) != body.length:
                self._lose_mid_body(body, f"piece {body.index} read back {len(data)} bytes")
                return
            self.transport.write(data[body.sent:])
            body.sent = body.length
            self._body_done(body)

        def failed(f: Failure) -> None:
            if self._body is body:
                self._lose_mid_body(body, f"piece {body.index} unreadable: {f.getErrorMessage()}")

        self._conn.side.read_piece(body.index).addCallbacks(read, failed)

    def _lose_mid_body(self, body: _Body, why: str) -> None:
        log.info("closing block connection {conn} in the middle of a piece: {why}", conn=self, why=why)
        self._do(self._conn.abort(why))

    def _body_done(self, body: _Body) -> None:
        self._body = None
        if body.held:
            self.transport.writeSequence(body.held)
        self.bytes_out += body.length
        self._do(self._conn.upload_done(body.index, body.length))

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()
        if self._direct and self.transport.disconnecting:
            self.transport.startWriting()  # let a pending close go through

    def stopProducing(self) -> None:
        self._drop_uploads()

"""
The block protocol over TCP: a thin Twisted layer on the sans-IO framer.

One connection carries one task between two hosts.  The side that connects
sends HELLO naming the task; the accepting side answers with its own HELLO, or
with ERROR and a close when it does not hold the task.  Both then send a
BITFIELD and HAVE frames as they verify pieces, and either side may REQUEST
pieces the other holds: connections are symmetric, as in BitTorrent.  The seed
(the SuperNode) also sends DIGESTS, the SHA-256 of each piece it publishes.

What a connection serves and what it does with what it receives is decided by
its L{TaskSide}: a CDN task on the SuperNode, a download on a dfpeer.

Uploads respect back-pressure: the protocol is a push producer of its
transport and reads the next requested piece (in the worker pool) only while
the transport wants more, with one piece read ahead so the link never idles.
Received piece bytes are copied once, into a buffer of the piece's size.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Any, Callable, Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..core.bitmap import Bitmap
from ..core.ratelimit import TokenBucket, delay_for
from . import frames as F

log = Logger()

#: the most a receiver waits for before it is woken (SO_RCVLOWAT)
RCVLOWAT_MAX = 128 * 1024

# error codes of ERROR frames
E_NO_TASK = 404
E_PROTOCOL = 400
E_TASK_FAILED = 410
E_SHUTDOWN = 503


class TaskSide(TypingProtocol):
    """The local end of a task, shared by all its connections."""

    #: whether this side downloads pieces (False on the seed)
    accepts_pieces: bool

    def local_bitmap(self) -> Bitmap | None:
        """The verified pieces we can serve, or None while the length is unknown."""

    def piece_length(self, index: int) -> int | None:
        """The size of piece C{index}, or None when out of range/unknown."""

    def read_piece(self, index: int) -> "Deferred[bytes]":
        """Read a verified piece."""

    def attached(self, conn: "BlockProtocol") -> None:
        """A connection finished its handshake for this task."""

    def detached(self, conn: "BlockProtocol", reason: str) -> None:
        """A connection closed."""

    def on_bitfield(self, conn: "BlockProtocol") -> None: ...

    def on_have(self, conn: "BlockProtocol", index: int) -> None: ...

    def on_piece(self, conn: "BlockProtocol", index: int, data: bytearray) -> None:
        """A requested piece arrived; give C{data} back with C{factory.release} when done with it."""

    def on_reject(self, conn: "BlockProtocol", index: int, reason: int) -> None: ...

    def on_digests(self, conn: "BlockProtocol", first: int, digests: list[bytes]) -> None: ...

    def on_uploaded(self, conn: "BlockProtocol", nbytes: int) -> None: ...

    def download_limits(self) -> "list[TokenBucket | None]":
        """The rate limits that pace what this side receives (none: [])."""


Resolver = Callable[[str], "TaskSide | None"]


class BlockFactory(Factory):
    """
    Makes block connections for one host.

    @param peer_id: our id, sent in HELLO.
    @param resolve: task id (hex) to the L{TaskSide} serving it, or None.
    @param max_piece: the largest piece frame accepted.
    """

    noisy = False

    def __init__(
        self,
        peer_id: str,
        resolve: Resolver,
        max_piece: int = F.MAX_PIECE_SIZE,
        clock: Any = None,
        upload_limit: TokenBucket | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.clock = clock
        self.upload_limit = upload_limit
        self.resolve = resolve
        self.max_piece = max_piece
        self.connections: set[BlockProtocol] = set()
        self._free: dict[int, list[bytearray]] = {}

    def buffer(self, size: int) -> bytearray:
        """A receive buffer of C{size} bytes, reused when one is free (no fresh pages per piece)."""
        free = self._free.get(size)
        return free.pop() if free else bytearray(size)

    def release(self, buf: bytearray) -> None:
        """Give back a buffer from L{buffer} once its piece is stored or dropped."""
        free = self._free.setdefault(len(buf), [])
        if len(free) < 16:
            free.append(buf)

    def buildProtocol(self, addr: Any) -> "BlockProtocol":
        p = BlockProtocol(self)
        p.factory = self
        return p

    def client(self, side: TaskSide, task_id: str, remote_id: str | None = None) -> "BlockProtocol":
        """A protocol for an outgoing connection that will say HELLO for C{task_id}."""
        p = BlockProtocol(self, side=side, task_id=task_id, remote_id=remote_id)
        p.factory = self
        return p

    def connect(self, endpoint: Any, proto: "BlockProtocol") -> "Deferred[BlockProtocol]":
        """Open an outgoing connection on C{endpoint} for a L{client} protocol."""
        return endpoint.connect(_OneShot(proto))


class _OneShot(Factory):
    """Hands one prepared protocol to an endpoint, without a log line."""

    noisy = False

    def __init__(self, proto: "BlockProtocol") -> None:
        self._proto = proto

    def buildProtocol(self, addr: Any) -> "BlockProtocol":
        return self._proto


@implementer(IPushProducer)
class BlockProtocol(Protocol):
    """One block-protocol connection (see the module docstring)."""

    def __init__(
        self,
        factory: BlockFactory,
        side: TaskSide | None = None,
        task_id: str | None = None,
        remote_id: str | None = None,
    ) -> None:
        self._factory = factory
        self.side = side
        self.task_id = task_id
        self.initiator = side is not None
        self.remote_id = remote_id
        self.remote_have: Bitmap | None = None
        self.ready = False
        self.closed = False
        self._decoder = F.FrameDecoder(max_piece=factory.max_piece)
        self._sock: socket.socket | None = None
        self._lowat = 1
        # downloading
        self.requested: dict[int, float] = {}
        self._cancelled: set[int] = set()
        self._rx_index = -1
        self._rx_buf: bytearray | None = None
        self._rx_off = 0
        self._rx_discard = False
        self.bytes_in = 0
        self.last_rx = 0.0
        # uploading
        self._queue: deque[int] = deque()
        self._reading: int | None = None
        self._ready_piece: tuple[int, bytes] | None = None
        self._paused = False
        self._upload_due: float | None = None
        self._upload_timer: Any = None
        self._read_paused = False
        self.bytes_out = 0

    def __repr__(self) -> str:
        return f"<BlockProtocol {self.remote_id or '?'} {self.peer_address()}>"

    @property
    def uploading(self) -> bool:
        """A piece is queued, being read or being sent on this connection."""
        return bool(self._queue) or self._reading is not None or self._ready_piece is not None

    def peer_address(self) -> str:
        if self.transport is None:
            return "-"
        addr = self.transport.getPeer()
        return f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}"

    # -- connection life -----------------------------------------------------

    def connectionMade(self) -> None:
        self._factory.connections.add(self)
        handle = getattr(self.transport, "getHandle", None)
        sock = handle() if handle is not None else None
        self._sock = sock if isinstance(sock, socket.socket) else None
        self.transport.registerProducer(self, True)
        if self.initiator:
            self.transport.write(F.encode_hello(bytes.fromhex(self.task_id), self._factory.peer_id))

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed = True
        self._factory.connections.discard(self)
        self._queue.clear()
        self._ready_piece = None
        if self._upload_timer is not None and self._upload_timer.active():
            self._upload_timer.cancel()
        if self.side is not None and self.ready:
            self.side.detached(self, reason.getErrorMessage() if reason is not None else "closed")

    def abort(self, why: str, code: int = E_PROTOCOL) -> None:
        """Close with a logged reason, telling the other side why."""
        if self.closed:
            return
        log.info(
            "closing block connection {conn}: {why}", conn=self, why=why,
            taskId=self.task_id, peerId=self.remote_id, code=code,
        )
        self.closed = True
        try:
            self.transport.write(F.encode_error(code, why))
        finally:
            self.transport.loseConnection()

    # -- receiving -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self._decoder.feed(data)
        except F.ProtocolError as e:
            self.abort(f"malformed frame: {e}")
            return
        for event in events:
            if self.closed:
                return
            try:
                self._dispatch(event)
            except F.ProtocolError as e:
                self.abort(str(e))
                return
        self._set_lowat(self._decoder.body_remaining)
        if self.side is not None and self._factory.clock is not None:
            self._pace_download(len(data))

    def _pace_download(self, nbytes: int) -> None:
        """Hold reading while the side's download limits (per task, per host) say so."""
        delay = delay_for(self.side.download_limits(), nbytes)
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

    def _dispatch(self, ev: Any) -> None:
        kind = type(ev)
        if kind is F.PieceData:
            self._on_piece_data(ev)
            return
        if not self.ready:
            if kind is F.Hello:
                self._on_hello(ev)
                return
            if kind is F.ErrorMsg:
                log.info("peer {conn} refused: {code} {msg}", conn=self, code=ev.code, msg=ev.message)
                self.closed = True
                self.transport.loseConnection()
                return
            raise F.ProtocolError(f"{kind.__name__} before HELLO")
        side = self.side
        assert side is not None
        if kind is F.BitfieldMsg:
            if self.remote_have is not None:
                raise F.ProtocolError("second BITFIELD")
            mine = side.local_bitmap()
            if mine is not None and ev.bitmap.count != mine.count:
                raise F.ProtocolError(f"BITFIELD of {ev.bitmap.count} pieces, task has {mine.count}")
            self.remote_have = ev.bitmap
            side.on_bitfield(self)
        elif kind is F.Have:
            if self.remote_have is None:
                raise F.ProtocolError("HAVE before BITFIELD")
            if ev.index >= self.remote_have.count:
                raise F.ProtocolError(f"HAVE {ev.index} out of range")
            if ev.index not in self.remote_have:
                self.remote_have.set(ev.index)
                side.on_have(self, ev.index)
        elif kind is F.Request:
            self._on_request(ev.index)
        elif kind is F.Cancel:
            try:
                self._queue.remove(ev.index)
            except ValueError:
                pass
        elif kind is F.Reject:
            if self.requested.pop(ev.index, None) is not None:
                side.on_reject(self, ev.index, ev.reason)
        elif kind is F.PieceStart:
            self._on_piece_start(ev)
        elif kind is F.PieceEnd:
            self._on_piece_end(ev)
        elif kind is F.Digests:
            side.on_digests(self, ev.first, ev.digests)
        elif kind is F.ErrorMsg:
            log.info("peer {conn} closed with error {code}: {msg}", conn=self, code=ev.code, msg=ev.message)
            self.closed = True
            self.transport.loseConnection()
        elif kind is F.KeepAlive:
            pass
        elif kind is F.Hello:
            raise F.ProtocolError("second HELLO")

    def _on_hello(self, ev: F.Hello) -> None:
        if ev.version != F.PROTOCOL_VERSION:
            self.abort(f"protocol version {ev.version} is not supported (want {F.PROTOCOL_VERSION})")
            return
        task_id = ev.task_id.hex()
        if self.initiator:
            if task_id != self.task_id:
                raise F.ProtocolError("HELLO answered for another task")
            if self.remote_id is not None and ev.peer_id != self.remote_id:
                self.abort(f"peer at {self.peer_address()} says it is {ev.peer_id}, expected {self.remote_id}")
                return
        else:
            side = self._factory.resolve(task_id)
            if side is None:
                self.abort(f"task {task_id} is not held here", E_NO_TASK)
                return
            self.side, self.task_id = side, task_id
            self.transport.write(F.encode_hello(ev.task_id, self._factory.peer_id))
        self.remote_id = ev.peer_id
        self.ready = True
        mine = self.side.local_bitmap()
        if mine is not None:
            self.transport.write(F.encode_bitfield(mine))
        self.side.attached(self)

    # -- sending control frames ----------------------------------------------

    def send_bitfield(self, bitmap: Bitmap) -> None:
        if not self.closed:
            self.transport.write(F.encode_bitfield(bitmap))

    def send_have(self, index: int) -> None:
        if not self.closed and self.ready:
            self.transport.write(F.encode_have(index))

    def send_digests(self, first: int, digests: list[bytes]) -> None:
        if not self.closed and self.ready:
            for frame in F.encode_digests(first, digests):
                self.transport.write(frame)

    def request(self, index: int, now: float) -> None:
        """Ask the remote side for piece C{index}."""
        self.requested[index] = now
        self._cancelled.discard(index)
        self.transport.write(F.encode_request(index))

    def cancel(self, index: int) -> None:
        """Withdraw a request (the piece came from elsewhere, or timed out)."""
        if self.requested.pop(index, None) is not None and not self.closed:
            self._cancelled.add(index)
            self.transport.write(F.encode_cancel(index))

    # -- piece bodies ----------------------------------------------------------

    def _on_piece_start(self, ev: F.PieceStart) -> None:
        side = self.side
        if not side.accepts_pieces:
            raise F.ProtocolError("unsolicited PIECE: this side does not download")
        if ev.index in self.requested:
            want = side.piece_length(ev.index)
            if want != ev.length:
                raise F.ProtocolError(f"PIECE {ev.index} has {ev.length} bytes, expected {want}")
            self._rx_buf = self._factory.buffer(ev.length)
            self._rx_discard = False
        elif ev.index in self._cancelled:
            self._rx_buf = None
            self._rx_discard = True
        else:
            raise F.ProtocolError(f"unsolicited PIECE {ev.index}")
        self._rx_index = ev.index
        self._rx_off = 0

    def _on_piece_data(self, ev: F.PieceData) -> None:
        n = len(ev.data)
        self.bytes_in += n
        self.last_rx = self._now()
        if self._rx_discard:
            return
        buf = self._rx_buf
        buf[self._rx_off:self._rx_off + n] = ev.data
        self._rx_off += n

    def _on_piece_end(self, ev: F.PieceEnd) -> None:
        buf, self._rx_buf = self._rx_buf, None
        if self._rx_discard:
            self._cancelled.discard(ev.index)
            self._rx_discard = False
            return
        if self.requested.pop(ev.index, None) is None:
            return  # cancelled while arriving
        self.side.on_piece(self, ev.index, buf)

    def _now(self) -> float:
        clock = getattr(self.side, "clock", None)
        return clock.seconds() if clock is not None else 0.0

    # -- uploading ---------------------------------------------------------------

    def _on_request(self, index: int) -> None:
        mine = self.side.local_bitmap()
        if mine is None or index not in mine:
            self.transport.write(F.encode_reject(index, F.REJECT_NOT_HELD))
            return
        if index in self._queue or self._reading == index:
            return
        if len(self._queue) >= 64:
            raise F.ProtocolError("more than 64 requests queued")
        self._queue.append(index)
        self._pump()

    def _pump(self) -> None:
        if self.closed:
            return
        if self._ready_piece is not None and not self._paused:
            index, data = self._ready_piece
            limit = self._factory.upload_limit
            if limit is not None:
                # pace uploads: the piece waits until the host's upload
                # limit allows it (reserved once, then held)
                now = self._factory.clock.seconds()
                if self._upload_due is None:
                    self._upload_due = now + limit.reserve(len(data))
                if now < self._upload_due:
                    if self._upload_timer is None:
                        self._upload_timer = self._factory.clock.callLater(self._upload_due - now, self._upload_ready)
                    return
                self._upload_due = None
            self._ready_piece = None
            self.transport.writeSequence([F.piece_header(index, len(data)), data])
            self.bytes_out += len(data)
            self.side.on_uploaded(self, len(data))
        if self._reading is None and self._ready_piece is None and self._queue:
            index = self._queue.popleft()
            self._reading = index
            d = self.side.read_piece(index)
            d.addCallbacks(self._piece_read, self._read_failed, callbackArgs=(index,), errbackArgs=(index,))

    def _upload_ready(self) -> None:
        self._upload_timer = None
        self._pump()

    def _piece_read(self, data: bytes, index: int) -> None:
        self._reading = None
        if self.closed:
            return
        self._ready_piece = (index, data)
        self._pump()

    def _read_failed(self, f: Failure, index: int) -> None:
        self._reading = None
        log.failure("reading piece {index} for {conn}", f, index=index, conn=self)
        if not self.closed:
            self.transport.write(F.encode_reject(index, F.REJECT_NOT_HELD))
            self._pump()

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._queue.clear()
        self._ready_piece = None

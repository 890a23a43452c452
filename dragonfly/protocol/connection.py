"""
The rules of one block connection, without a transport (sans-IO).

L{BlockConnection} takes events (bytes received, the connection made, a timer
fired, a piece sent, the local side's calls) and answers with I{actions}: bytes
to send (L{Send}), timers to set or cancel (L{SetTimer}, L{CancelTimer}), a
piece to upload (L{Upload}) and a close with its reason (L{Close}).  It holds
the connection's state explicitly (L{State}): awaiting HELLO, ready, closing
(decided, the transport not gone yet), closed.
L{dragonfly.protocol.block.BlockProtocol} is its Twisted adapter; tests drive
it with no transport at all.

The local end of the task (a L{dragonfly.protocol.block.TaskSide}) is told
about the remote's frames directly: it is domain state, not I/O.  A side may
call back into the connection while it is told something (request a piece,
abort); actions are kept in one queue in the order they were decided, and
whoever returns to the adapter first hands them all over, so a nested call
never reorders frames.

Shedding idle and hostile connections (see docs/protocol.md):
 - HELLO must arrive within C{handshake_timeout} of the connection;
 - a connection with nothing requested in either direction and no frame
   received for C{idle_timeout} is closed; KEEPALIVE is sent when we have sent
   nothing for half of it, so healthy idle neighbours stay;
 - at most C{max_queued_requests} REQUESTs wait on one connection, besides the
   piece being sent.

Versions: HELLO carries the highest version each end speaks; the acceptor
answers with the lower of the two, and the connection speaks that one
(L{BlockConnection.agreed}).  Version 2 adds HAVE_MANY: with it, a HAVE for
one remote is held for the side's C{have_delay} seconds, and goes with the
next one as one frame, or with any other frame we send it, or alone when the
time is up.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any

from attrs import frozen

from ..core.bitmap import Bitmap
from . import frames as F

# error codes of ERROR frames
E_PROTOCOL = 400
E_NO_TASK = 404
E_TIMEOUT = 408
E_TASK_FAILED = 410
E_BUSY = 429

#: defaults of the limits (BlockFactory's parameters)
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
MAX_QUEUED_REQUESTS = 64


class State(enum.Enum):
    AWAIT_HELLO = "awaiting HELLO"
    READY = "ready"
    CLOSING = "closing"  # we or the remote decided to close; the transport is not gone yet
    CLOSED = "closed"


@frozen
class Limits:
    """Per-connection limits; a timeout of 0 or None turns that timer off."""

    handshake_timeout: float | None = HANDSHAKE_TIMEOUT
    idle_timeout: float | None = IDLE_TIMEOUT
    max_queued_requests: int = MAX_QUEUED_REQUESTS


# -- actions -------------------------------------------------------------------


@frozen
class Send:
    """Write C{data} (one or more whole control frames)."""

    data: bytes


@frozen
class Upload:
    """Requests are waiting: start sending the next piece when free (L{BlockConnection.next_upload})."""


@frozen
class SetTimer:
    """(Re)arm timer C{name} to fire in C{delay} seconds."""

    name: str
    delay: float


@frozen
class CancelTimer:
    name: str


@frozen
class Close:
    """
    Close the connection.  With a C{code}, an ERROR frame carrying C{reason}
    is sent first; without, the remote closed or said why itself.
    """

    reason: str
    code: int | None


Action = Send | Upload | SetTimer | CancelTimer | Close

DEFAULT_LIMITS = Limits()

HANDSHAKE, IDLE, KEEPALIVE, HAVES = "handshake", "idle", "keepalive", "haves"

#: no piece_part call is due (see BlockConnection._rx_mark)
NO_MARK = 1 << 62


class BlockConnection:
    """
    The rules of one connection.

    @param handle: what the side's callbacks receive as the connection (the
        adapter, whose public surface the side uses).
    @param peer_id: our id, sent in HELLO.
    @param resolve: task id (hex) to its side, for accepted connections.
    @param side: the task's side, for a connection we open (then C{task_id}).
    @param remote_id: the peer id we expect to answer, if known.
    @param buffer: gives a receive buffer of a piece's size.
    @param now: the time, in seconds.
    @param version: the highest protocol version offered in HELLO (a side's
        C{block_version} may lower it).
    """

    def __init__(
        self,
        handle: Any,
        peer_id: str,
        resolve: Callable[[str], Any],
        *,
        side: Any = None,
        task_id: str | None = None,
        remote_id: str | None = None,
        max_piece: int = F.MAX_PIECE_SIZE,
        buffer: Callable[[int], bytearray] = bytearray,
        now: Callable[[], float] = lambda: 0.0,
        limits: Limits = DEFAULT_LIMITS,
        version: int = F.PROTOCOL_VERSION,
    ) -> None:
        self.handle = handle
        self.peer_id = peer_id
        self.resolve = resolve
        self.side = side
        self.task_id = task_id
        self.initiator = side is not None
        self.remote_id = remote_id
        self.remote_have: Bitmap | None = None
        self.state = State.AWAIT_HELLO
        self.version = min(version, getattr(side, "block_version", version))
        #: the version both ends speak, once HELLOs were exchanged
        self.agreed = F.PROTOCOL_VERSION
        #: the remote refused our HELLO's version (an older peer): offer it less next time
        self.version_refused = False
        self._haves: list[int] = []  # HAVEs held for one frame (HAVE_MANY)
        self._attached = False  # the side was told attached(): it is told detached() once
        self.limits = limits
        self._buffer = buffer
        self._now = now
        self._decoder = F.FrameDecoder(max_piece=max_piece)
        self._out: list[Action] = []
        # downloading
        self.requested: dict[int, float] = {}
        self._cancelled: set[int] = set()
        self._rx_index = -1
        self._rx_buf: bytearray | None = None
        self._rx_off = 0
        self._rx_len = 0
        self._rx_discard = False
        self._rx_mark = NO_MARK  # the side's piece_part is called again once _rx_off reaches this
        self.last_rx = 0.0
        # uploading
        self.queue: deque[int] = deque()
        self.sending: int | None = None
        #: the piece being sent, when the remote cancelled it (the uploader drops it if its header is not out yet)
        self.withdrawn: int | None = None
        self._last_tx = 0.0
        self._last_active = 0.0

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSING or self.state is State.CLOSED

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def body_remaining(self) -> int:
        """Bytes of the piece body being received still to come (0 outside a body)."""
        return self._decoder.body_remaining

    @property
    def busy(self) -> bool:
        """Something is requested in either direction, or a piece is on its way."""
        return bool(self.requested or self.queue) or self.sending is not None or self.body_remaining > 0

    def _take(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _send(self, data: bytes) -> None:
        if self._haves:
            # the held HAVEs go with whatever we send (one write, one wake-up there)
            data = self._have_frames() + data
            self._out.append(CancelTimer(HAVES))
        self._out.append(Send(data))
        self._last_tx = self._now()

    def _have_frames(self) -> bytes:
        haves, self._haves = self._haves, []
        if len(haves) == 1:
            return F.encode_have(haves[0])
        return b"".join(F.encode_have_many(haves))

    def _close(self, reason: str, code: int | None) -> None:
        if self.closed:
            return
        self.state = State.CLOSING
        self._haves.clear()
        self._out += [
            CancelTimer(HANDSHAKE), CancelTimer(IDLE), CancelTimer(KEEPALIVE), CancelTimer(HAVES), Close(reason, code),
        ]

    # -- events --------------------------------------------------------------

    def connection_made(self) -> list[Action]:
        now = self._now()
        self.last_rx = self._last_tx = self._last_active = now
        if self.limits.handshake_timeout:
            self._out.append(SetTimer(HANDSHAKE, self.limits.handshake_timeout))
        if self.initiator:
            assert self.task_id is not None
            self._send(F.encode_hello(bytes.fromhex(self.task_id), self.peer_id, self.version))
        return self._take()

    def connection_lost(self, reason: str) -> list[Action]:
        """The transport closed (either way); tells the side once, if it was attached."""
        self.state = State.CLOSED
        self.queue.clear()
        self._haves.clear()
        self._out += [CancelTimer(HANDSHAKE), CancelTimer(IDLE), CancelTimer(KEEPALIVE), CancelTimer(HAVES)]
        if self._rx_buf is not None:  # a piece cut off mid-body
            buf, self._rx_buf = self._rx_buf, None
            self._dropped(self._rx_index, buf)
        if self._attached:
            self._attached = False
            self.side.detached(self.handle, reason)
        return self._take()

    def data_received(self, data: bytes | memoryview) -> list[Action]:
        if self.closed:
            return self._take()
        try:
            events = self._decoder.feed(data)
        except F.ProtocolError as e:
            self._close(f"malformed frame: {e}", E_PROTOCOL)
            return self._take()
        self._handle(events)
        return self._take()

    def rx_window(self) -> memoryview | None:
        """
        While a requested piece's body arrives, the part of its buffer still
        to fill (up to the side's next C{piece_part} mark): a reader may fill
        it straight from the socket, then call L{rx_filled}.  None when there is no such body (or it is discarded).
        """
        remaining = self._decoder.body_remaining
        if not remaining or self._rx_discard or self._rx_buf is None or self.state is not State.READY:
            return None
        # up to the side's next piece_part mark at most: it takes the piece part by part
        end = min(self._rx_off + remaining, max(self._rx_mark, self._rx_off + 1))
        return memoryview(self._rx_buf)[self._rx_off:end]

    def rx_filled(self, n: int) -> list[Action]:
        """C{n} bytes were written into the L{rx_window} directly."""
        self._rx_off += n
        if self._rx_off >= self._rx_mark:
            self._rx_part()
        self.last_rx = self._now()
        self._handle(self._decoder.skip_body(n))
        return self._take()

    def timer_fired(self, name: str) -> list[Action]:
        if self.closed:
            return self._take()
        now = self._now()
        if name == HAVES:
            if self._haves:
                self._out.append(Send(self._have_frames()))
                self._last_tx = now
        elif name == HANDSHAKE:
            if self.state is State.AWAIT_HELLO:
                self._close(f"no HELLO within {self.limits.handshake_timeout:g}s", E_TIMEOUT)
        elif name == IDLE and self.limits.idle_timeout:
            timeout = self.limits.idle_timeout
            if self.busy:
                self._last_active = now
                self._out.append(SetTimer(IDLE, timeout))
            else:
                quiet = now - max(self.last_rx, self._last_active)
                if quiet >= timeout:
                    self._close(f"idle for {quiet:.0f}s (nothing requested, nothing received)", E_TIMEOUT)
                else:
                    self._out.append(SetTimer(IDLE, timeout - quiet))
        elif name == KEEPALIVE and self.limits.idle_timeout:
            every = self.limits.idle_timeout / 2
            since = now - self._last_tx
            if since >= every and self.sending is None:
                self._send(F.encode_keepalive())
                since = 0.0
            self._out.append(SetTimer(KEEPALIVE, max(every - since, 0.001)))
        return self._take()

    # -- the side's calls ------------------------------------------------------

    def abort(self, why: str, code: int = E_PROTOCOL) -> list[Action]:
        self._close(why, code)
        return self._take()

    def request(self, index: int, now: float) -> list[Action]:
        self.requested[index] = now
        self._cancelled.discard(index)
        self._last_active = self._now()
        if not self.closed:
            self._send(F.encode_request(index))
        return self._take()

    def cancel(self, index: int) -> list[Action]:
        if self.requested.pop(index, None) is not None and not self.closed:
            self._cancelled.add(index)
            self._send(F.encode_cancel(index))
        return self._take()

    def send_have(self, index: int) -> list[Action]:
        """Announce piece C{index}: now, or held up to the side's C{have_delay} to go with the next (version 2)."""
        if self.state is not State.READY:
            return self._take()
        delay = getattr(self.side, "have_delay", 0.0) if self.agreed >= F.HAVE_MANY_VERSION else 0.0
        if delay <= 0:
            self._send(F.encode_have(index))
        elif self._haves:
            # the second completes the frame: both go now, in this turn (no timer wake-up)
            self._haves.append(index)
            self._out += [CancelTimer(HAVES), Send(self._have_frames())]
            self._last_tx = self._now()
        else:
            self._out.append(SetTimer(HAVES, delay))
            self._haves.append(index)
        return self._take()

    def send_bitfield(self, bitmap: Bitmap) -> list[Action]:
        if not self.closed:
            self._send(F.encode_bitfield(bitmap))
        return self._take()

    def send_digests(self, first: int, digests: list[bytes]) -> list[Action]:
        if self.state is State.READY:
            self._send(b"".join(F.encode_digests(first, digests)))
        return self._take()

    # -- uploads ----------------------------------------------------------------

    def next_upload(self) -> int | None:
        """The next requested piece to send, now marked as being sent; None when none waits."""
        if self.sending is not None or not self.queue or self.state is not State.READY:
            return None
        self.sending = self.queue.popleft()
        self.withdrawn = None
        return self.sending

    def held_haves(self) -> tuple[bytes, list[Action]]:
        """
        The HAVEs held for one frame (L{send_have}), taken to go in the same
        write as a piece body's header: b"" when none.
        """
        if not self._haves or self.closed:
            return b"", []
        self._out.append(CancelTimer(HAVES))
        self._last_tx = self._now()
        return self._have_frames(), self._take()

    def upload_done(self, index: int, nbytes: int) -> list[Action]:
        """Piece C{index} went out whole."""
        if self.sending == index:
            self.sending = None
        self._last_tx = self._last_active = self._now()
        if not self.closed and nbytes and self.side is not None:
            self.side.on_uploaded(self.handle, nbytes)
        if self.queue:
            self._out.append(Upload())
        return self._take()

    def upload_withdrawn(self, index: int) -> list[Action]:
        """Piece C{index}, cancelled by the remote before any of it was written, will not go out."""
        if self.sending == index:
            self.sending = None
        self.withdrawn = None
        if not self.closed and self.queue:
            self._out.append(Upload())
        return self._take()

    def upload_failed(self, index: int) -> list[Action]:
        """Piece C{index} could not be read: the remote is told it is not held."""
        if self.sending == index:
            self.sending = None
        if not self.closed:
            self._send(F.encode_reject(index, F.REJECT_NOT_HELD))
            if self.queue:
                self._out.append(Upload())
        return self._take()

    # -- frames ---------------------------------------------------------------------

    def _handle(self, events: list[F.Event]) -> None:
        for ev in events:
            if self.closed:
                return
            if type(ev) is F.PieceData:
                self._on_piece_data(ev)
                continue
            self.last_rx = self._now()
            try:
                self._dispatch(ev)
            except F.ProtocolError as e:
                self._close(str(e), E_PROTOCOL)
                return

    def _dispatch(self, ev: F.Event) -> None:
        kind = type(ev)
        if kind is F.ErrorMsg:
            assert isinstance(ev, F.ErrorMsg)
            what = "refused" if self.state is State.AWAIT_HELLO else "closed"
            if (self.state is State.AWAIT_HELLO and self.initiator and ev.code == E_PROTOCOL
                    and self.version > F.PROTOCOL_VERSION and ev.message.startswith("protocol version")):
                self.version_refused = True
            self._close(f"remote {what} with error {ev.code}: {ev.message}", None)
            return
        if self.state is State.AWAIT_HELLO:
            if kind is F.Hello:
                assert isinstance(ev, F.Hello)
                self._on_hello(ev)
                return
            raise F.ProtocolError(f"{kind.__name__} before HELLO")
        side = self.side
        if kind is F.PieceStart:
            assert isinstance(ev, F.PieceStart)
            self._on_piece_start(ev)
        elif kind is F.PieceEnd:
            assert isinstance(ev, F.PieceEnd)
            self._on_piece_end(ev)
        elif kind is F.BitfieldMsg:
            assert isinstance(ev, F.BitfieldMsg)
            if self.remote_have is not None:
                raise F.ProtocolError("second BITFIELD")
            mine = side.local_bitmap()
            if mine is not None and ev.bitmap.count != mine.count:
                raise F.ProtocolError(f"BITFIELD of {ev.bitmap.count} pieces, task has {mine.count}")
            self.remote_have = ev.bitmap
            side.on_bitfield(self.handle)
        elif kind is F.Have:
            assert isinstance(ev, F.Have)
            if self.remote_have is None:
                raise F.ProtocolError("HAVE before BITFIELD")
            if ev.index >= self.remote_have.count:
                raise F.ProtocolError(f"HAVE {ev.index} out of range")
            if ev.index not in self.remote_have:
                self.remote_have.set(ev.index)
                side.on_have(self.handle, ev.index)
        elif kind is F.HaveMany:
            assert isinstance(ev, F.HaveMany)
            if self.agreed < F.HAVE_MANY_VERSION:
                raise F.ProtocolError(f"HAVE_MANY on a version {self.agreed} connection")
            have = self.remote_have
            if have is None:
                raise F.ProtocolError("HAVE_MANY before BITFIELD")
            if max(ev.indexes) >= have.count:
                raise F.ProtocolError(f"HAVE_MANY {max(ev.indexes)} out of range")
            for index in ev.indexes:
                if index not in have and not self.closed:
                    have.set(index)
                    side.on_have(self.handle, index)
        elif kind is F.Request:
            assert isinstance(ev, F.Request)
            self._on_request(ev.index)
        elif kind is F.Cancel:
            assert isinstance(ev, F.Cancel)
            where = "queued"
            try:
                self.queue.remove(ev.index)
            except ValueError:
                where = "sent"
                if self.sending == ev.index:
                    # taken up but maybe not begun (its header not written): the uploader drops it then
                    where = "sending"
                    self.withdrawn = ev.index
                    self._out.append(Upload())
            told = getattr(side, "cancel_received", None)
            if told is not None:
                told(self.handle, ev.index, where)
        elif kind is F.Reject:
            assert isinstance(ev, F.Reject)
            if self.requested.pop(ev.index, None) is not None:
                side.on_reject(self.handle, ev.index, ev.reason)
        elif kind is F.Digests:
            assert isinstance(ev, F.Digests)
            side.on_digests(self.handle, ev.first, ev.digests)
        elif kind is F.Hello:
            raise F.ProtocolError("second HELLO")
        # KeepAlive: only last_rx, set above

    def _on_hello(self, ev: F.Hello) -> None:
        # the acceptor may answer with less than we offered, never more
        top = self.version if self.initiator else F.MAX_PROTOCOL_VERSION
        if ev.version < F.PROTOCOL_VERSION or (self.initiator and ev.version > top):
            self._close(
                f"protocol version {ev.version} is not supported (want {F.PROTOCOL_VERSION}..{top})", E_PROTOCOL,
            )
            return
        task_id = ev.task_id.hex()
        if self.initiator:
            if task_id != self.task_id:
                raise F.ProtocolError("HELLO answered for another task")
            if self.remote_id is not None and ev.peer_id != self.remote_id:
                self._close(f"peer says it is {ev.peer_id}, expected {self.remote_id}", E_PROTOCOL)
                return
        else:
            side = self.resolve(task_id)
            if side is None:
                self._close(f"task {task_id} is not held here", E_NO_TASK)
                return
            self.side, self.task_id = side, task_id
            self.version = min(self.version, ev.version, getattr(side, "block_version", self.version))
            self._send(F.encode_hello(ev.task_id, self.peer_id, self.version))
        self.agreed = min(self.version, ev.version)
        self.remote_id = ev.peer_id
        self.state = State.READY
        self._out.append(CancelTimer(HANDSHAKE))
        if self.limits.idle_timeout:
            self._out += [SetTimer(IDLE, self.limits.idle_timeout), SetTimer(KEEPALIVE, self.limits.idle_timeout / 2)]
        mine = self.side.local_bitmap()
        if mine is not None:
            self._send(F.encode_bitfield(mine))
        self._attached = True
        self.side.attached(self.handle)

    def _on_request(self, index: int) -> None:
        mine = self.side.local_bitmap()
        if mine is None or index not in mine:
            self._send(F.encode_reject(index, F.REJECT_NOT_HELD))
            return
        if self.sending == index and self.withdrawn == index:
            self.withdrawn = None  # asked again after its CANCEL: it goes out after all
        if index in self.queue or self.sending == index:
            return
        if len(self.queue) - (self.sending is None) >= self.limits.max_queued_requests:
            raise F.ProtocolError(f"more than {self.limits.max_queued_requests} requests queued")
        self.queue.append(index)
        self._out.append(Upload())

    def _on_piece_start(self, ev: F.PieceStart) -> None:
        side = self.side
        if not side.accepts_pieces:
            raise F.ProtocolError("unsolicited PIECE: this side does not download")
        if ev.index in self.requested:
            want = side.piece_length(ev.index)
            if want != ev.length:
                raise F.ProtocolError(f"PIECE {ev.index} has {ev.length} bytes, expected {want}")
            self._rx_buf = self._buffer(ev.length)
            self._rx_discard = False
            # a side may take a large piece's parts as they arrive (TaskSide.piece_part)
            part = getattr(side, "piece_part", None)
            self._rx_mark = NO_MARK if part is None else part(self.handle, ev.index, self._rx_buf, 0)
        elif ev.index in self._cancelled:
            self._rx_buf = None
            self._rx_discard = True
        else:
            raise F.ProtocolError(f"unsolicited PIECE {ev.index}")
        self._rx_index = ev.index
        self._rx_len = ev.length
        self._rx_off = 0

    def _on_piece_data(self, ev: F.PieceData) -> None:
        n = len(ev.data)
        self.last_rx = self._now()
        if self._rx_discard:
            return
        buf = self._rx_buf
        assert buf is not None
        buf[self._rx_off:self._rx_off + n] = ev.data
        self._rx_off += n
        if self._rx_off >= self._rx_mark:
            self._rx_part()

    def _dropped(self, index: int, buf: bytearray) -> None:
        """The piece arriving into C{buf} will not be delivered: the side may take its buffer back."""
        dropped = getattr(self.side, "piece_dropped", None)
        if dropped is not None:
            dropped(self.handle, index, buf)

    def _cancelled_arrived(self, index: int) -> None:
        """A piece we cancelled arrived whole all the same: the side may count its bytes (C{cancelled_arrived})."""
        arrived = getattr(self.side, "cancelled_arrived", None)
        if arrived is not None:
            arrived(self.handle, index, self._rx_len)

    def _rx_part(self) -> None:
        """The arriving piece's first C{_rx_off} bytes are in: tell the side, before the piece's last byte."""
        buf = self._rx_buf
        if buf is None or self._rx_discard or self._rx_off >= len(buf):
            self._rx_mark = NO_MARK
            return
        self._rx_mark = self.side.piece_part(self.handle, self._rx_index, buf, self._rx_off)

    def _on_piece_end(self, ev: F.PieceEnd) -> None:
        buf, self._rx_buf = self._rx_buf, None
        self._rx_mark = NO_MARK
        if self._rx_discard:
            self._cancelled.discard(ev.index)
            self._rx_discard = False
            self._cancelled_arrived(ev.index)
            return
        if self.requested.pop(ev.index, None) is None:  # cancelled while arriving
            self._cancelled.discard(ev.index)
            assert buf is not None
            self._dropped(ev.index, buf)
            self._cancelled_arrived(ev.index)
            return
        self._last_active = self._now()
        assert buf is not None
        self.side.on_piece(self.handle, ev.index, buf)

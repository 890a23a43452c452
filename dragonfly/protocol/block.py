"""
The block protocol over TCP: a Twisted adapter of the sans-IO rules.

One connection carries one task between two hosts.  The side that connects
sends HELLO naming the task; the accepting side answers with its own HELLO, or
with ERROR and a close when it does not hold the task.  Both then send a
BITFIELD and HAVE frames as they verify pieces, and either side may REQUEST
pieces the other holds: connections are symmetric, as in BitTorrent.  The seed
(the SuperNode) also sends DIGESTS, the SHA-256 of each piece it publishes.

The parts, each in its module:
 - L{dragonfly.protocol.connection.BlockConnection}: the rules (handshake
   order, one BITFIELD, request bookkeeping, the upload queue, timeouts),
   without I/O: events in, actions out;
 - L{dragonfly.protocol.receive.Receiver}: bytes in, piece bodies read with
   C{recv_into} straight into their buffers, download pacing;
 - L{dragonfly.protocol.upload.Uploader}: pieces out, paced by the transport
   and the upload limit, with C{os.sendfile} when the side offers
   C{piece_file} (falling back to C{read_piece});
 - L{dragonfly.protocol.port.BlockPort}: what a host's connections share
   (limits, accounting, the buffer pool);
 - L{dragonfly.protocol.side.TaskSide}: what a connection needs of its task.

This module wires them to Twisted: L{BlockProtocol} carries out the rules'
actions (bytes to the L{Uploader}, timers on the clock, closes) and keeps the
public surface the task sides use; L{BlockFactory} makes the protocols.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..core.bitmap import Bitmap
from . import frames as F
from .connection import (
    E_BUSY,
    E_NO_TASK,
    E_PROTOCOL,
    E_TASK_FAILED,
    E_TIMEOUT,
    Action,
    BlockConnection,
    CancelTimer,
    Close,
    Send,
    SetTimer,
    Upload,
)
from .port import BLOCK_PORT_OPTIONS, BlockPort, OneShot, block_port_limits
from .receive import Receiver
from .side import Resolver, TaskSide
from .upload import Uploader

__all__ = [
    "BLOCK_PORT_OPTIONS", "block_port_limits", "BlockFactory", "BlockProtocol", "TaskSide", "Resolver",
    "E_BUSY", "E_NO_TASK", "E_PROTOCOL", "E_TASK_FAILED", "E_TIMEOUT",
]

log = Logger()


class BlockFactory(BlockPort["BlockProtocol"]):
    """
    Makes block connections for one host, and sheds what it cannot afford
    (its parameters, limits and counters: L{BlockPort}).
    """

    def buildProtocol(self, addr: Any) -> Protocol:
        host = str(getattr(addr, "host", "?"))
        refuse = self.refusal(host)
        if refuse is not None:
            return refuse
        p = BlockProtocol(self)
        p.factory = self
        p.accepted_from = host
        return p

    #: the remotes that refused our HELLO's version: offered the base version from then on
    older: set[str] | None = None

    def client(self, side: TaskSide, task_id: str, remote_id: str | None = None) -> BlockProtocol:
        """A protocol for an outgoing connection that will say HELLO for C{task_id}."""
        old = self.older is not None and remote_id in self.older
        version = F.PROTOCOL_VERSION if old else F.MAX_PROTOCOL_VERSION
        p = BlockProtocol(self, side=side, task_id=task_id, remote_id=remote_id, version=version)
        p.factory = self
        return p

    def connect(self, endpoint: Any, proto: BlockProtocol) -> Deferred[BlockProtocol]:
        """Open an outgoing connection on C{endpoint} for a L{client} protocol."""
        d: Deferred[BlockProtocol] = endpoint.connect(OneShot(proto))
        return d


def direct_socket(transport: Any) -> socket.socket | None:
    """The socket of a plain TCP transport, which the data path may drive itself; None for any other."""
    handle = getattr(transport, "getHandle", None)
    sock = handle() if handle is not None else None
    if isinstance(sock, socket.socket) and isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False):
        return sock
    return None


@implementer(IPushProducer)
class BlockProtocol(Protocol):
    """One block-protocol connection (see the module docstring)."""

    accepted_from: str | None = None
    transport: Any  # a tcp.Connection in production (see direct_socket), any ITransport in tests

    def __init__(
        self,
        factory: BlockFactory,
        side: TaskSide | None = None,
        task_id: str | None = None,
        remote_id: str | None = None,
        version: int = F.MAX_PROTOCOL_VERSION,
    ) -> None:
        self._factory = factory
        self._conn = BlockConnection(
            self, factory.peer_id, factory.resolve, side=side, task_id=task_id, remote_id=remote_id,
            max_piece=factory.max_piece, buffer=factory.buffer, now=self._now, limits=factory.limits_now(),
            version=version,
        )
        self._timers: dict[str, Any] = {}
        self._rx = Receiver(self._conn, self._do, factory.clock)
        self._tx = Uploader(self._conn, self._do, factory.clock, factory.upload_limit, name=self)

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
    def bytes_out(self) -> int:
        """Piece bytes sent on this connection."""
        return self._tx.bytes_out

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

    def hold_reads(self, on: bool) -> None:
        """Stop reading (the side's piece parts wait for the disk), or read again (L{Receiver.hold})."""
        self._rx.hold(on)

    def send_bitfield(self, bitmap: Bitmap) -> None:
        """Announce the pieces we hold (once, after the handshake)."""
        self._do(self._conn.send_bitfield(bitmap))

    def send_have(self, index: int) -> None:
        """Announce a piece we verified."""
        self._do(self._conn.send_have(index))

    def send_digests(self, first: int, digests: list[bytes]) -> None:
        """Send the SHA-256 of pieces C{first}.. (the seed only)."""
        self._do(self._conn.send_digests(first, digests))

    # -- running the connection's actions ------------------------------------------

    def _now(self) -> float:
        clock = self._factory.clock or getattr(self._conn.side, "clock", None)
        return clock.seconds() if clock is not None else 0.0

    def _do(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                self._tx.write(a.data)
            elif isinstance(a, Upload):
                self._tx.pump()
            elif isinstance(a, SetTimer):
                self._set_timer(a.name, a.delay)
            elif isinstance(a, CancelTimer):
                timer = self._timers.pop(a.name, None)
                if timer is not None and timer.active():
                    timer.cancel()
            else:
                self._close(a)

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
        mid_body = self._tx.mid_body
        self._tx.drop()
        if self.transport is None:
            return
        if a.code is not None and not mid_body:
            self.transport.write(F.encode_error(a.code, a.reason))
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # -- connection life -------------------------------------------------------------

    def connectionMade(self) -> None:
        self._factory.opened(self, self.accepted_from)
        sock = direct_socket(self.transport)
        self._rx.attach(self.transport, sock)
        self._tx.attach(self.transport, sock)
        self.transport.registerProducer(self, True)
        self._do(self._conn.connection_made())

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._factory.lost(self, self.accepted_from)
        if self._conn.version_refused and self._conn.remote_id and isinstance(self._factory, BlockFactory):
            # an older peer: the next connection to it offers what it speaks
            if self._factory.older is None:
                self._factory.older = set()
            self._factory.older.add(self._conn.remote_id)
        self.accepted_from = None
        self._rx.detach()
        self._tx.drop()
        self._do(self._conn.connection_lost(reason.getErrorMessage() if reason is not None else "closed"))
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def dataReceived(self, data: bytes) -> None:
        self._rx.data_received(data)

    # IPushProducer: the transport paces uploads
    def pauseProducing(self) -> None:
        self._tx.pause()

    def resumeProducing(self) -> None:
        self._tx.resume()

    def stopProducing(self) -> None:
        self._tx.drop()

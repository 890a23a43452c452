"""
A block port: what all the block connections of one host share.

L{BlockPort} holds the host's peer id, the resolver of task ids to their
sides, the timers' clock, the upload limit, the per-connection L{Limits},
the receive buffer pool, and the accounting that sheds connections past the
port's limits (in total, per remote address: answered with ERROR 429 by
L{Refuse}).  L{dragonfly.protocol.block.BlockFactory} is the one subclass: it
makes the L{dragonfly.protocol.block.BlockProtocol} for each connection.

Also here: the twistd options of a block port, shared by the dfpeer and the
SuperNode (L{BLOCK_PORT_OPTIONS}, L{block_port_limits}).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from attrs import evolve
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from ..core.ratelimit import TokenBucket
from . import frames as F
from .connection import E_BUSY, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT, MAX_QUEUED_REQUESTS, Limits
from .receive import BufferPool
from .side import Resolver

__all__ = ["BLOCK_PORT_OPTIONS", "block_port_limits", "BlockPort", "OneShot", "Refuse",
           "MAX_CONNECTIONS", "MAX_PER_ADDRESS"]

log = Logger()

#: the protocol class of the port's connections
P = TypeVar("P", bound=Protocol)

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


class BlockPort(Factory, Generic[P]):
    """
    The state one host's block connections share, and the limits it sheds by.

    @param peer_id: our id, sent in HELLO.
    @param resolve: task id (hex) to the L{TaskSide} serving it, or None.
    @param max_piece: the largest piece frame accepted.
    @param clock: runs the timers (none without it) and the upload limit.
    @param upload_limit: paces every piece this host sends, if given.
    @param handshake_timeout: seconds a connection has to complete HELLO.
    @param idle_timeout: seconds of silence after which a connection with
        nothing requested either way is closed (KEEPALIVE every half of it).
    @param max_queued_requests: REQUESTs that may wait on one connection.
    @param max_connections: accepted connections open at once.
    @param max_per_address: accepted connections open at once from one address.

    @ivar connections: the connections open now (both directions).
    @ivar accepted: accepted connections open now, per remote address.
    @ivar refused: connections refused over the limits so far.
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
        self.connections: set[P] = set()
        self.accepted: dict[str, int] = {}
        self.accepted_total = 0  # the sum of L{accepted}, kept in step (read on every accept)
        self.refused = 0
        self._refused_logged = 0  # L{refused} when the last refusal was logged
        self._refusals_logged = float("-inf")  # and when
        self.pool = BufferPool()

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
        return self.pool.take(size)

    def release(self, buf: bytearray) -> None:
        """Give back a buffer from L{buffer} once its piece is stored or dropped."""
        self.pool.give(buf)

    def limits_now(self) -> Limits:
        """
        The limits of a connection opened now: L{limits}, except that while
        the port holds more than half of C{max_connections} a newcomer has a
        quarter of the handshake timeout (at least 1 s) to say HELLO.  A
        healthy peer says it within milliseconds; a flood of silent
        connections is shed four times sooner, so the port's open files come
        back to their baseline within the handshake timeout once it stops.
        """
        hs = self.limits.handshake_timeout
        if not hs or 2 * self.accepted_total <= self.max_connections:
            return self.limits
        return evolve(self.limits, handshake_timeout=min(hs, max(1.0, hs / 4)))

    def refusal(self, host: str) -> Refuse | None:
        """
        Check a connection accepted from C{host} against the limits: None
        when it may go on, else the protocol that answers it with ERROR 429
        (counted in L{refused}).
        """
        total = self.accepted_total
        if total >= self.max_connections:
            why = f"too many block connections ({total})"
        elif self.accepted.get(host, 0) >= self.max_per_address:
            why = f"too many block connections from {host} ({self.accepted[host]})"
        else:
            return None
        self.refused += 1
        now = self.clock.seconds() if self.clock is not None else None
        if now is None or now - self._refusals_logged >= 1.0:
            # at most one line a second however fast a flood comes
            log.info(
                "refusing a block connection from {addr}: {why} ({since} refused since the last such line)",
                addr=host, why=why, since=self.refused - self._refused_logged, refused=self.refused,
            )
            self._refused_logged = self.refused
            if now is not None:
                self._refusals_logged = now
        return Refuse(why)

    def opened(self, proto: P, accepted_from: str | None) -> None:
        """A connection is up (C{accepted_from}: the remote address of an accepted one)."""
        self.connections.add(proto)
        if accepted_from is not None:
            self._count(accepted_from, 1)

    def lost(self, proto: P, accepted_from: str | None) -> None:
        """A connection from L{opened} is gone."""
        self.connections.discard(proto)
        if accepted_from is not None:
            self._count(accepted_from, -1)

    def _count(self, host: str, delta: int) -> None:
        before = self.accepted.get(host, 0)
        n = before + delta
        self.accepted_total += max(n, 0) - before
        if n > 0:
            self.accepted[host] = n
        else:
            self.accepted.pop(host, None)


class OneShot(Factory):
    """Hands one prepared protocol to an endpoint, without a log line."""

    noisy = False

    def __init__(self, proto: Protocol) -> None:
        self._proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._proto


class Refuse(Protocol):
    """Answers a connection over the limits with ERROR 429, then closes."""

    transport: Any

    def __init__(self, why: str) -> None:
        self.why = why

    def connectionMade(self) -> None:
        self.transport.write(F.encode_error(E_BUSY, self.why))
        self.transport.loseConnection()

"""The origin connections' fixed receive buffer (--origin-rcvbuf)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from dragonfly.supernode.originsock import RcvbufReactor, origin_reactor
from dragonfly.supernode.tap import Options


class _Transport:
    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)


class _Connector:
    def __init__(self) -> None:
        self.transport = _Transport()


class _Reactor(MemoryReactorClock):
    """connectTCP makes the socket now and does not connect, as tcp.Client does before the next turn."""

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None) -> Any:  # noqa: N802, N803
        super().connectTCP(host, port, factory, timeout, bindAddress)
        self.connector = _Connector()
        return self.connector


def test_rcvbuf_set_before_connect() -> None:
    reactor = _Reactor()
    default = socket.socket().getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    wrapped = RcvbufReactor(reactor, 32 << 10)
    connector = wrapped.connectTCP("198.18.0.10", 80, ClientFactory())
    sock = connector.transport.socket
    try:
        # Linux doubles what it is given, for its bookkeeping
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert got != default
        assert 32 << 10 <= got <= 2 * (32 << 10)
        assert reactor.tcpClients[0][:2] == ("198.18.0.10", 80)
    finally:
        sock.close()


def test_rest_is_the_reactor() -> None:
    reactor = _Reactor()
    wrapped = RcvbufReactor(reactor, 1 << 20)
    assert IReactorTCP.providedBy(wrapped) and IReactorTime.providedBy(wrapped)
    calls: list[int] = []
    wrapped.callLater(1.0, calls.append, 1)
    reactor.advance(1.0)
    assert calls == [1]


def test_zero_is_the_reactor_itself() -> None:
    reactor = _Reactor()
    assert origin_reactor(reactor, 0) is reactor
    assert isinstance(origin_reactor(reactor, 1), RcvbufReactor)


def test_option_parsed() -> None:
    o = Options()
    o.parseOptions(["--origin-rcvbuf", "256K"])
    assert o["origin-rcvbuf"] == 256 << 10
    o = Options()
    o.parseOptions([])
    assert o["origin-rcvbuf"] == 0
    with pytest.raises(usage.UsageError, match=r"--origin-rcvbuf: size 'lots' .* bytes\)"):
        Options().parseOptions(["--origin-rcvbuf", "lots"])
    with pytest.raises(usage.UsageError, match="--origin-rcvbuf: size '64K/s'"):
        Options().parseOptions(["--origin-rcvbuf", "64K/s"])

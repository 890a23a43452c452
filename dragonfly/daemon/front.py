"""
The first bytes of each dfdaemon connection decide what it is.

  - C{CONNECT host:port}: an HTTPS proxy client.  If the host matches a
    hijack rule, dfdaemon answers 200, terminates TLS with a leaf certificate
    for that host minted from its CA, and serves the decrypted requests like
    any other (L{dragonfly.daemon.proxy}), upstream C{https://host:port}.
    Otherwise the connection becomes a plain tunnel to C{host:port}.
  - Anything else: HTTP for the registry mirror or the HTTP proxy, handed to
    a twisted.web channel with the bytes read so far.

Twisted's web server would answer a CONNECT itself and keep the connection
as HTTP, so it never sees one: this small protocol reads the request line
and headers of a CONNECT (bounded) and takes the connection over.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..core.httpapi import ApiError
from .rules import hijacks

log = Logger()

MAX_HEAD = 16 * 1024
_TARGET = re.compile(rb"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]{1,253}):([0-9]{1,5})$")


def parse_connect(head: bytes) -> tuple[str, int]:
    """C{(host, port)} of a CONNECT request head, or ValueError."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or not parts[2].startswith(b"HTTP/1."):
        raise ValueError("malformed CONNECT request line")
    m = _TARGET.match(parts[1])
    if m is None:
        raise ValueError("CONNECT target must be host:port")
    host, port = m.group(1).decode("ascii"), int(m.group(2))
    if not 0 < port < 65536:
        raise ValueError("CONNECT port out of range")
    return host.strip("[]"), port


class _Pipe(Protocol):
    """The upstream half of a tunnel."""

    #: a TCP connection (ITCPTransport, IConsumer, IPushProducer)
    transport: Any

    def __init__(self, front: FrontProtocol) -> None:
        self.front = front

    def connectionMade(self) -> None:
        self.front.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(self.front.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.front.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            self.front.transport.unregisterProducer()
        except Exception:
            pass
        self.front.transport.loseConnection()


class FrontProtocol(Protocol):
    """One dfdaemon connection: sniffed, then HTTP, a tunnel or an intercepted TLS connection."""

    #: a TCP connection (ITCPTransport, ITLSTransport, IConsumer, IPushProducer)
    transport: Any

    def __init__(self, factory: FrontFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.mode = "sniff"  # sniff | connect | tunnel | http | tls-wait | closed
        self.inner: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.mode in ("http", "tls", "tunnel"):
            if self.inner is not None:
                self.inner.dataReceived(data)
            return
        if self.mode != "sniff":
            return  # waiting for TLS set-up or closed: the client speaks before its turn
        self.buffer += data
        if not self.buffer.startswith(b"CONNECT "[: len(self.buffer)]):
            self._http(self.buffer)
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._refuse(431, "CONNECT request head too long")
            return
        head, rest = self.buffer[: end + 4], self.buffer[end + 4 :]
        self.buffer = b""
        try:
            host, port = parse_connect(head)
        except ValueError as e:
            self._refuse(400, str(e))
            return
        if rest:
            self._refuse(400, "data sent before the tunnel was established")
            return
        if self.factory.minter is not None and hijacks(self.factory.hijack, host):
            self._intercept(host, port)
        else:
            self._tunnel(host, port)

    # -- plain HTTP --------------------------------------------------------------------

    def _http(self, data: bytes, base: str | None = None) -> None:
        self.mode = "http"
        channel = self.factory.site.buildProtocol(self.transport.getPeer())
        channel.dfd_base = base
        self.inner = channel
        channel.makeConnection(self.transport)
        if data:
            channel.dataReceived(data)

    # -- tunnel ------------------------------------------------------------------------

    def _tunnel(self, host: str, port: int) -> None:
        self.mode = "connect"
        self.factory.core.counters.tunnels += 1
        self.transport.pauseProducing()
        endpoint = HostnameEndpoint(self.factory.reactor, host, port, timeout=10)
        d = endpoint.connect(Factory.forProtocol(lambda: _Pipe(self)))

        def connected(pipe: _Pipe) -> None:
            if self.mode == "closed":
                pipe.transport.loseConnection()
                return
            self.mode = "tunnel"
            self.inner = _Forward(pipe)
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.transport.resumeProducing()

        def failed(f: Any) -> None:
            self.transport.resumeProducing()
            self._refuse(502, f"cannot reach {host}:{port}: {f.getErrorMessage()}")

        d.addCallbacks(connected, failed)

    # -- interception ------------------------------------------------------------------

    def _intercept(self, host: str, port: int) -> None:
        self.mode = "tls-wait"
        self.factory.core.counters.intercepted += 1
        self.transport.pauseProducing()
        d = self.factory.minter.context_for(host)

        def ready(options: Any) -> None:
            if self.mode == "closed":
                return
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.transport.startTLS(options)
            netloc = host if ":" not in host else f"[{host}]"
            self._http(b"", f"https://{netloc}" + ("" if port == 443 else f":{port}"))
            self.transport.resumeProducing()

        def failed(f: Any) -> None:
            log.failure("cannot mint a certificate for {host}", f, host=host)
            self.transport.resumeProducing()
            self._refuse(502, f"cannot intercept {host}: {f.getErrorMessage()}")

        d.addCallbacks(ready, failed)

    # -- errors and the end ------------------------------------------------------------

    def _refuse(self, status: int, why: str) -> None:
        log.info("refusing a proxy connection from {peer}: {why}", peer=self.transport.getPeer(), why=why)
        reason = {400: b"Bad Request", 431: b"Request Header Fields Too Large", 502: b"Bad Gateway"}.get(status, b"Error")
        body = json.dumps(ApiError(status, "BAD_CONNECT", why).body()).encode()
        self.mode = "closed"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        mode, self.mode = self.mode, "closed"
        if self.inner is not None and mode in ("http", "tunnel"):
            self.inner.connectionLost(reason)


class _Forward:
    """The client half of a tunnel: bytes from the client to the upstream."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe

    def dataReceived(self, data: bytes) -> None:
        self.pipe.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.pipe.transport.loseConnection()


class FrontFactory(Factory):
    def __init__(self, reactor: Any, site: Any, core: Any, hijack: tuple = (), minter: Any = None) -> None:
        self.reactor = reactor
        self.site = site
        self.core = core
        self.hijack = hijack
        self.minter = minter

    def buildProtocol(self, addr: Any) -> FrontProtocol:
        return FrontProtocol(self)

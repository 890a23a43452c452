"""
A blob's body from the dfpeer to the client without passing through Python:
C{splice(2)} from the dfpeer's socket into a pipe and from the pipe into
the client's socket (both plain TCP, on the same host).

dfdaemon's relay of a blob otherwise reads every byte into a C{bytes}
object and writes it again (about 1 CPU-second per GiB here, as much as the
dfpeer's whole download costs), on the reactor thread.  With this, the bytes
stay in the kernel: dfdaemon only moves page references.

L{fetch_head} asks the dfpeer for C{GET /api/v1/downloads/<id>/content}
on a connection of its own and reads the answer's head; L{SpliceRelay}
then moves the body, paced by both sockets:

 - from the dfpeer into the pipe while the pipe has room and the socket has
   bytes (the reactor says when it is readable again);
 - from the pipe into the client while Twisted's write buffer of the client
   is empty and the socket takes bytes (then it waits for the transport to
   say the socket is writable, as L{dragonfly.peer.stream} does).

A body that ends short of its Content-Length (the dfpeer cut it: the swarm
failed, or the blob did not match its digest) cuts the client's connection
short too, so a client never takes a wrong blob for a complete one.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReadDescriptor
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..peer.stream import plain_socket
from ..protocol.upload import transport_idle, wake_when_writable

log = Logger()

#: the pipe's size (the kernel's default is 64 KiB)
PIPE_SIZE = 1 << 20
#: the largest response head read from the dfpeer
MAX_HEAD = 64 << 10
_MOVE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
#: DRAGONFLY_TRACE=1: log lines with wall-clock times when the relay starts, has taken
#: the whole body from the dfpeer and has sent it ("trace relay ... at <t>")
TRACE = bool(os.environ.get("DRAGONFLY_TRACE"))


def plain_client(request: Any) -> tuple[Any, socket.socket] | None:
    """
    The client's transport and socket when a body may be spliced into it:
    plain TCP (never TLS, which Twisted's C{startTLS} layers over the same
    kind of transport: an intercepted CONNECT is one), neither chunked nor
    a HEAD (L{dragonfly.peer.stream.plain_socket}).
    """
    out = plain_socket(request)
    if out is None or getattr(out[0], "TLS", False) or getattr(request.channel, "dfd_base", None) is not None:
        return None
    return out


class BadHead(Exception):
    """The dfpeer's answer had no head we understand."""


class _Head(Protocol):
    """Sends the request, reads the answer's head, then stops reading (the body is spliced)."""

    transport: Any

    def __init__(self, request: bytes, done: Deferred) -> None:
        self.request = request
        self.done = done
        self.buf = b""
        #: body bytes that came with the head
        self.rest = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            self.rest += data  # (not read once the head is in; kept all the same)
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self.transport.abortConnection()
            return
        head, self.rest = self.buf[:end], self.buf[end + 4:]
        self.buf = b""
        self.transport.stopReading()
        try:
            status, headers = parse_head(head)
        except BadHead as e:
            self.transport.abortConnection()
            self.done.errback(e)
            return
        self.done.callback((status, headers, self))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)


def parse_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    """An HTTP/1.1 response head (without its blank line): its status and headers (lower-case names)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise BadHead(f"status line {lines[0][:100]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise BadHead(f"header line {line[:100]!r}")
        name = name.lower()
        if name in headers:
            raise BadHead(f"header {name!r} twice")
        headers[name] = value.strip()
    return int(parts[1]), headers


def fetch_head(reactor: Any, api: str, path: str) -> Deferred:
    """
    C{GET path} at the dfpeer's local API C{api} (C{http://host:port}) on a
    connection of its own; fires with C{(status, headers, connection)} once
    the head is in, the connection no longer read (its body is the caller's).
    """
    parts = urlsplit(api)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise BadHead(f"not an http://host:port API: {api}")
    protocols: list[_Head] = []

    def cancel(_: Deferred) -> None:
        for p in protocols:
            if p.transport is not None:
                p.transport.abortConnection()

    done: Deferred = Deferred(cancel)
    request = (f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n").encode()
    class Factory(ClientFactory):
        def buildProtocol(self, addr: Any) -> _Head:
            protocols.append(_Head(request, done))
            return protocols[-1]

        def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
            if not done.called:
                done.errback(reason)

    factory = Factory()
    factory.noisy = False
    reactor.connectTCP(parts.hostname, parts.port, factory, timeout=10)
    return done


@implementer(IReadDescriptor)
class _Readable:
    """The dfpeer's socket, watched for reading by the relay instead of by its Twisted transport."""

    def __init__(self, fd: int, relay: SpliceRelay) -> None:
        self.fd = fd
        self.relay = relay

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.relay._fill()

    def connectionLost(self, reason: Failure) -> None:
        self.relay._cut("the dfpeer's connection was lost")

    def logPrefix(self) -> str:
        return "SpliceRelay"


@implementer(IPushProducer)
class SpliceRelay:
    """
    C{length} body bytes from the dfpeer's connection C{head} (a L{_Head}
    whose head is read) to C{request}'s client socket C{out}.  L{start}
    fires with True when every byte was sent, False when the body was cut.
    """

    def __init__(self, reactor: Any, request: Any, out: tuple[Any, socket.socket], head: _Head, length: int) -> None:
        self.reactor = reactor
        self.request = request
        self.transport, self.sock = out
        self.peer = head.transport
        self.rest = head.rest
        head.rest = b""
        self.length = length
        #: body bytes taken from the dfpeer (the head's leftover included), and sent to the client
        self.taken = 0
        self.sent = 0
        self._in_pipe = 0
        self._paused = False
        self._ended = False
        self._reading = False
        self._pipe: tuple[int, int] | None = None
        self._readable = _Readable(self.peer.fileno(), self)
        self._done: Deferred = Deferred()
        #: splices from the dfpeer, and splices into the client that found its socket full
        self.splices_in = 0
        self.client_full = 0

    def start(self) -> Deferred:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe = (r, w)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # (the default size: smaller turns)
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        rest, self.rest = self.rest, b""
        # the status line, the headers and what came with the dfpeer's head, through Twisted
        self.request.write(rest[: self.length])
        self.taken = self.sent = len(rest[: self.length])
        if TRACE:
            log.info("trace relay start at {t:.3f}", t=time.time())
        self._fill()
        return self._done

    # -- the two halves -------------------------------------------------------------

    def _fill(self) -> None:
        """From the dfpeer's socket into the pipe, while both allow; then into the client."""
        if self._ended or self._pipe is None:
            return
        while self.taken < self.length and self._in_pipe < PIPE_SIZE:
            try:
                n = os.splice(self.peer.fileno(), self._pipe[1], min(self.length - self.taken, PIPE_SIZE - self._in_pipe),
                              flags=_MOVE)
            except (BlockingIOError, InterruptedError):
                break  # (the socket has nothing now, or the pipe is full)
            except OSError as e:
                self._cut(f"splice from the dfpeer: {e}")
                return
            if n == 0:
                self._cut(f"the dfpeer's body ended at {self.taken} of {self.length} bytes")
                return
            self.taken += n
            self._in_pipe += n
            self.splices_in += 1
            if TRACE and self.taken >= self.length:
                log.info("trace relay took all at {t:.3f}", t=time.time())
        # (read again once the pipe is empty: a pipe full of partly used pages
        # takes nothing more before its whole size)
        self._watch(self._in_pipe == 0 and self.taken < self.length)
        self._drain()

    def _drain(self) -> None:
        """From the pipe into the client's socket while it takes bytes."""
        if self._ended or self._pipe is None or self._paused:
            return
        if self._in_pipe:
            if not transport_idle(self.transport):
                wake_when_writable(self.transport)
                return
            while self._in_pipe:
                try:
                    n = os.splice(self._pipe[0], self.sock.fileno(), self._in_pipe, flags=_MOVE)
                except (BlockingIOError, InterruptedError):
                    self.client_full += 1
                    wake_when_writable(self.transport)
                    break
                except OSError as e:
                    self._cut(f"splice to the client: {e}")
                    return
                self._in_pipe -= n
                self.sent += n
                self.request.sentLength += n
        if self.sent >= self.length:
            self._finish()
        else:
            self._watch(self._in_pipe == 0 and self.taken < self.length)

    def _watch(self, on: bool) -> None:
        if on and not self._reading:
            self.reactor.addReader(self._readable)
        elif not on and self._reading:
            self.reactor.removeReader(self._readable)
        self._reading = on

    # -- the end --------------------------------------------------------------------

    def _close(self) -> None:
        self._ended = True
        self._watch(False)
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
        try:
            self.request.unregisterProducer()
        except (RuntimeError, AttributeError):
            pass

    def _finish(self) -> None:
        if TRACE:
            log.info("trace relay sent all at {t:.3f} ({splices} splices in, the client's socket full {full} times)",
                     t=time.time(), splices=self.splices_in, full=self.client_full)
        self._close()
        self.peer.loseConnection()
        if not self.request.finished and not getattr(self.request, "_disconnected", False):
            self.request.finish()
        self._done.callback(True)

    def _cut(self, why: str) -> None:
        if self._ended:
            return
        log.warn("spliced body cut at byte {sent} of {length}: {why}", sent=self.sent, length=self.length, why=why)
        self._close()
        self.peer.abortConnection()
        # short of Content-Length: the client must see the body cut, not complete
        self.transport.abortConnection()
        self._done.callback(False)

    # -- IPushProducer (the client's transport) -------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._drain()
        self._fill()

    def stopProducing(self) -> None:
        if not self._ended:
            self._close()
            self.peer.abortConnection()
            self._done.callback(False)

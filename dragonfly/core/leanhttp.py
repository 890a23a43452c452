"""
A lean HTTP/1.1 client for small JSON APIs (a dfpeer's calls to its
SuperNodes): what C{treq} + C{twisted.web.client.Agent} did for
L{dragonfly.peer.client.SupernodeClient}, at a fraction of the CPU per call.

One L{LeanProtocol} per connection, kept alive and reused (a few idle ones
per host, L{LeanClient}); a request goes out in one C{write}; the answer is
parsed by the sans-IO L{ResponseParser} (status line, headers,
C{Content-Length}, chunked or read-to-close bodies, C{Connection: close}).
C{https://} goes through an L{dragonfly.core.tls.HttpsPolicy}, the checks of
the Agent's C{BrowserLikePolicyForHTTPS}.  A cut, malformed or overlong answer fails the call with
L{ResponseFailed}; a connection that hangs is aborted after C{timeout}
seconds of the injected clock (or when the caller cancels).

It offers exactly what the SuperNode client uses: C{request(method, url,
data=, headers=)} firing with a response that has C{.code}, C{.headers} and
C{.content()}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["BadResponse", "LeanClient", "LeanProtocol", "LeanResponse", "ResponseFailed", "ResponseParser"]

log = Logger()

MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024
MAX_CHUNK_LINE = 1024


class BadResponse(ValueError):
    """The bytes are not an HTTP/1.x answer we accept."""


class ResponseFailed(ConnectionError):
    """The answer never came whole: the connection was cut, timed out, or sent something malformed."""


_NO_BODY_STATUS = (204, 304)


class ResponseParser:
    """
    Sans-IO parser of one HTTP/1.x answer: L{feed} it bytes, and L{eof} when
    the connection closes.  When L{done}, C{code}, C{headers} (lower-case
    name -> list of values), C{body}, C{keep_alive} and C{rest} (bytes after
    the answer) are set.  L{BadResponse} for anything malformed.

    @param head_only: the request was C{HEAD} (no body whatever the headers say).
    """

    def __init__(self, head_only: bool = False, max_body: int = MAX_BODY) -> None:
        self.head_only = head_only
        self.max_body = max_body
        self.code = 0
        self.version = b""
        self.headers: dict[str, list[str]] = {}
        self.body = b""
        self.keep_alive = False
        self.done = False
        self.rest = b""
        self.started = False  # any byte received
        self._buf = bytearray()
        self._state = "head"  # head, length, chunk-size, chunk-data, chunk-crlf, trailer, close, done
        self._left = 0
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.started = True
        if self.done:
            self.rest += data
            return
        self._buf += data
        self._run()

    def eof(self) -> None:
        """The connection closed: the answer is complete only if its body was read-to-close."""
        if self.done:
            return
        if self._state == "close":
            self._finish(b"".join(self._parts) + bytes(self._buf))
            self._buf.clear()
            self.keep_alive = False
            return
        raise BadResponse(f"connection closed in the {self._state} of the answer")

    # -- states ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self.done:
            before = (self._state, len(self._buf))
            getattr(self, "_" + self._state.replace("-", "_"))()
            if (self._state, len(self._buf)) == before:
                return  # needs more bytes

    def _head(self) -> None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise BadResponse("header block too long")
            return
        if end > MAX_HEAD:
            raise BadResponse("header block too long")
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or status[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise BadResponse(f"bad status line {lines[0][:80]!r}")
        if len(status[1]) != 3 or not status[1].isdigit():
            raise BadResponse(f"bad status code {status[1][:20]!r}")
        code = int(status[1])
        if code < 100:
            raise BadResponse(f"bad status code {code}")
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or b" " in name or b"\t" in name:
                raise BadResponse(f"bad header line {line[:80]!r}")
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.strip().decode("latin-1"))
        if 100 <= code < 200:
            return  # an interim answer (100 Continue): the real one follows
        self.code = code
        self.version = status[0]
        self.headers = headers
        conn = {t.strip().lower() for v in headers.get("connection", ()) for t in v.split(",")}
        self.keep_alive = "close" not in conn and (status[0] == b"HTTP/1.1" or "keep-alive" in conn)
        te = [t.strip().lower() for v in headers.get("transfer-encoding", ()) for t in v.split(",") if t.strip()]
        lengths = headers.get("content-length")
        if self.head_only or code in _NO_BODY_STATUS:
            self._finish(b"")
        elif te:
            if te != ["chunked"]:
                raise BadResponse(f"unsupported transfer-encoding {te!r}")
            self._state = "chunk-size"
        elif lengths is not None:
            if len(set(lengths)) != 1 or not lengths[0].isdigit() or not lengths[0].isascii():
                raise BadResponse(f"bad content-length {lengths!r}")
            self._left = int(lengths[0])
            if self._left > self.max_body:
                raise BadResponse(f"body of {self._left} bytes is too long")
            self._state = "length"
        else:
            self.keep_alive = False
            self._state = "close"

    def _length(self) -> None:
        if len(self._buf) >= self._left:
            body = bytes(self._buf[: self._left])
            del self._buf[: self._left]
            self._finish(body)

    def _close(self) -> None:
        if len(self._buf) + self._size > self.max_body:
            raise BadResponse("body too long")
        if self._buf:
            self._size += len(self._buf)
            self._parts.append(bytes(self._buf))
            self._buf.clear()

    def _chunk_size(self) -> None:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > MAX_CHUNK_LINE:
                raise BadResponse("chunk size line too long")
            return
        line = bytes(self._buf[:end]).split(b";", 1)[0].strip()
        del self._buf[: end + 2]
        if not line or len(line) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in line):
            raise BadResponse(f"bad chunk size {line[:20]!r}")
        size = int(line, 16)
        if size == 0:
            self._state = "trailer"
            return
        if self._size + size > self.max_body:
            raise BadResponse("body too long")
        self._left = size
        self._state = "chunk-data"

    def _chunk_data(self) -> None:
        n = min(self._left, len(self._buf))
        if n:
            self._parts.append(bytes(self._buf[:n]))
            del self._buf[:n]
            self._left -= n
            self._size += n
        if self._left == 0:
            self._state = "chunk-crlf"

    def _chunk_crlf(self) -> None:
        if len(self._buf) < 2:
            return
        if self._buf[:2] != b"\r\n":
            raise BadResponse("chunk not followed by CRLF")
        del self._buf[:2]
        self._state = "chunk-size"

    def _trailer(self) -> None:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise BadResponse("trailer too long")
            return
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        if not line:
            self._finish(b"".join(self._parts))

    def _finish(self, body: bytes) -> None:
        self.body = body
        self._parts = []
        self.done = True
        self._state = "done"
        self.rest = bytes(self._buf)
        self._buf.clear()


@attrs.define
class LeanResponse:
    """An answer, read whole."""

    code: int
    headers: dict[str, list[str]]
    body: bytes

    def content(self) -> Deferred[bytes]:
        return succeed(self.body)


class LeanProtocol(Protocol):
    """One HTTP/1.1 connection: one request at a time, kept alive when the server allows."""

    def __init__(self) -> None:
        self._parser: ResponseParser | None = None
        self._waiting: Deferred[LeanResponse] | None = None
        self.connected_ = False
        self.on_idle: Callable[[LeanProtocol], None] | None = None
        self.on_lost: Callable[[LeanProtocol], None] | None = None
        self.requests = 0

    def connectionMade(self) -> None:
        self.connected_ = True

    def request(self, raw: bytes, head_only: bool = False) -> Deferred[LeanResponse]:
        """Send C{raw} (a whole request) and fire with its answer."""
        assert self._waiting is None, "one request at a time"
        self._parser = ResponseParser(head_only=head_only)
        d: Deferred[LeanResponse] = Deferred(self._cancel)
        self._waiting = d
        self.requests += 1
        self.transport.write(raw)  # type: ignore[union-attr]
        return d

    def dataReceived(self, data: bytes) -> None:
        p = self._parser
        if p is None or self._waiting is None:
            # unsolicited bytes: the connection cannot be trusted any more
            self._abort()
            return
        try:
            p.feed(data)
        except BadResponse as e:
            self._fail(ResponseFailed(f"malformed answer: {e}"))
            return
        if p.done:
            self._complete(p)

    def _complete(self, p: ResponseParser) -> None:
        d, self._waiting, self._parser = self._waiting, None, None
        reuse = p.keep_alive and not p.rest
        if not reuse:
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif self.on_idle is not None:
            # idle before the caller hears: a request it makes at once takes this connection
            self.on_idle(self)
        assert d is not None
        d.callback(LeanResponse(p.code, p.headers, p.body))

    def _fail(self, why: BaseException) -> None:
        d, self._waiting, self._parser = self._waiting, None, None
        self._abort()
        if d is not None:
            d.errback(Failure(why))

    def _cancel(self, d: Deferred[LeanResponse]) -> None:
        # the caller gave up (a timeout): this connection's answer is lost for good
        if d is self._waiting:
            self._waiting = self._parser = None
        self._abort()

    def _abort(self) -> None:
        if self.connected_ and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_ = False
        if self.on_lost is not None:
            self.on_lost(self)
        p, d = self._parser, self._waiting
        if d is None or p is None:
            return
        self._waiting = self._parser = None
        try:
            p.eof()
        except BadResponse as e:
            err = ResponseFailed(f"connection lost: {e} ({reason.getErrorMessage()})")
            err.started = p.started  # type: ignore[attr-defined]
            d.errback(Failure(err))
            return
        d.callback(LeanResponse(p.code, p.headers, p.body))


def _default_endpoint(reactor: Any, context_factory: Any) -> Callable[[bytes, str, int], Any]:
    from twisted.internet.endpoints import HostnameEndpoint

    from .tls import HttpsPolicy, tls_client_endpoint

    policy = context_factory if context_factory is not None else HttpsPolicy()

    def endpoint(scheme: bytes, host: str, port: int) -> Any:
        ep: Any = HostnameEndpoint(reactor, host, port)
        if scheme == b"https":
            ep = tls_client_endpoint(policy.creatorForNetloc(host.encode("idna"), port), ep)
        return ep

    return endpoint


class LeanClient:
    """
    HTTP/1.1 requests with keep-alive connections, at most C{max_idle} idle
    ones kept per host.

    @param context_factory: for C{https://} URLs, an C{IPolicyForHTTPS}
        (L{dragonfly.core.tls.HttpsPolicy} with the trust root wanted).
    @param timeout: seconds (of C{clock}) a request may take in all before
        its connection is aborted and it fails with L{ResponseFailed}.
    @param endpoint: C{(scheme, host, port) -> IStreamClientEndpoint}, for tests.
    """

    def __init__(
        self, reactor: Any, context_factory: Any = None, clock: Any = None, timeout: float = 30.0,
        max_idle: int = 4, endpoint: Callable[[bytes, str, int], Any] | None = None,
    ) -> None:
        self._clock = clock if clock is not None else reactor
        self._timeout = timeout
        self._max_idle = max_idle
        self._endpoint = endpoint or _default_endpoint(reactor, context_factory)
        self._idle: dict[tuple[bytes, str, int], list[LeanProtocol]] = {}
        self.connections_made = 0

    def request(
        self, method: str, url: str, data: bytes | None = None, headers: dict[str, list[str]] | None = None,
    ) -> Deferred[LeanResponse]:
        parts = urlsplit(url)
        scheme = parts.scheme.encode("ascii")
        if scheme not in (b"http", b"https") or not parts.hostname:
            raise ValueError(f"unsupported URL {url!r}")
        host = parts.hostname
        port = parts.port or (443 if scheme == b"https" else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        netloc = parts.netloc.rpartition("@")[2]
        lines = [f"{method} {path} HTTP/1.1", f"Host: {netloc}"]
        for name, values in (headers or {}).items():
            for v in values:
                lines.append(f"{name}: {v}")
        if data is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(data or b'')}")
        for line in lines:
            if "\r" in line or "\n" in line or "\0" in line:
                raise ValueError("bad characters in the request head")
        head = "\r\n".join(lines) + "\r\n\r\n"
        raw = head.encode("latin-1") + (data or b"")
        key = (scheme, host, port)
        return Deferred.fromCoroutine(self._send(key, raw, method == "HEAD"))

    async def _send(self, key: tuple[bytes, str, int], raw: bytes, head_only: bool) -> LeanResponse:
        timer = None
        current: list[Deferred[Any]] = []

        def expire() -> None:
            for d in current:
                d.cancel()

        timer = self._clock.callLater(self._timeout, expire)
        try:
            for attempt in range(2):
                proto, reused = self._take(key), True
                if proto is None:
                    reused = False
                    cd = self._connect(key)
                    current[:] = [cd]
                    proto = await cd
                d = proto.request(raw, head_only)
                current[:] = [d]
                try:
                    return await d
                except ResponseFailed as e:
                    # a kept-alive connection the server closed as we reused it: once more on a new one
                    if reused and attempt == 0 and not getattr(e, "started", True):
                        continue
                    raise
            raise AssertionError("unreachable")
        except CancelledError:
            raise ResponseFailed("timed out or cancelled") from None
        finally:
            if timer.active():
                timer.cancel()

    def _take(self, key: tuple[bytes, str, int]) -> LeanProtocol | None:
        idle = self._idle.get(key)
        while idle:
            p = idle.pop()
            if p.connected_:
                return p
        return None

    def _connect(self, key: tuple[bytes, str, int]) -> Deferred[LeanProtocol]:
        self.connections_made += 1
        d: Deferred[LeanProtocol] = self._endpoint(*key).connect(Factory.forProtocol(LeanProtocol))

        def made(p: LeanProtocol) -> LeanProtocol:
            p.on_idle = lambda q: self._put(key, q)
            p.on_lost = lambda q: self._drop(key, q)
            return p

        d.addCallback(made)
        return d

    def _put(self, key: tuple[bytes, str, int], p: LeanProtocol) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self._max_idle:
            p.transport.loseConnection()  # type: ignore[union-attr]
        else:
            idle.append(p)

    def _drop(self, key: tuple[bytes, str, int], p: LeanProtocol) -> None:
        idle = self._idle.get(key)
        if idle and p in idle:
            idle.remove(p)

    def close(self) -> None:
        """Close the idle connections."""
        for idle in self._idle.values():
            for p in list(idle):
                p.transport.loseConnection()  # type: ignore[union-attr]
        self._idle.clear()

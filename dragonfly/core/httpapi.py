"""
Shared pieces of our JSON-over-HTTP APIs (SuperNode REST API, dfpeer local API).

Every error is a JSON body C{{"error": {"code": ..., "message": ...}}} with a
4xx/5xx status, never an HTML page or a traceback.

L{guard_site} puts limits on a server's connections before any request
reaches a resource (body size from the Content-Length, header timeout,
concurrent connections); the three daemons' taps apply it to their sites.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from attrs import define
from attrs import field as attrs_field
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from .headers import safe_header_map

if TYPE_CHECKING:
    from klein import Klein

# Klein and werkzeug are imported by install_error_handlers, not here: a
# SuperNode serves its first requests without them (dragonfly.supernode.fastpath)

log = Logger()

MAX_BODY = 1 << 20


class ApiError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The error as the API's JSON envelope."""
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def json_response(request: IRequest, body: Any, status: int = 200) -> bytes:
    """Answer C{request} with C{body} as JSON and C{status}; the bytes to return from a route."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


def require_bearer(request: IRequest, *tokens: str | None, what: str = "this operation") -> None:
    """
    Refuse the request (L{ApiError} 401 C{UNAUTHORIZED}) unless it carries
    C{Authorization: Bearer T} with T one of C{tokens}; the tokens that are
    None are not configured, and when none is, every request passes.
    Compared in constant time.
    """
    configured = [t for t in tokens if t]
    if not configured:
        return
    from .security import bearer, tokens_equal

    given = bearer(request.getHeader(b"authorization"))
    # compare against every token, so the time does not tell which one matched
    ok = False
    for token in configured:
        ok |= tokens_equal(given, token)
    if not ok:
        request.setHeader(b"www-authenticate", b'Bearer realm="dragonfly"')
        reason = "no bearer token" if given is None else "a wrong bearer token"
        raise ApiError(401, "UNAUTHORIZED", f"{what} needs a valid bearer token; the request carried {reason}")


def read_json(request: IRequest, max_body: int = MAX_BODY) -> dict[str, Any]:
    """The request body as a JSON object, or L{ApiError} 400/413."""
    length = request.getHeader(b"content-length")
    if length is not None:
        try:
            if int(length) > max_body:
                raise ApiError(413, "BODY_TOO_LARGE", f"request body over {max_body} bytes")
        except ValueError:
            raise ApiError(400, "BAD_REQUEST", "bad Content-Length") from None
    raw = request.content.read(max_body + 1) if request.content is not None else b""
    if len(raw) > max_body:
        raise ApiError(413, "BODY_TOO_LARGE", f"request body over {max_body} bytes")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "BAD_JSON", f"request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "BAD_JSON", "request body must be a JSON object")
    return body


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = True, default: Any = None) -> Any:
    """A typed field of a JSON object, or L{ApiError} 400 naming it."""
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, "MISSING_FIELD", f"field {name!r} is required")
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(400, "BAD_FIELD", f"field {name!r} must be {_kind_name(kinds)}")
    if not isinstance(value, kinds):
        raise ApiError(400, "BAD_FIELD", f"field {name!r} must be {_kind_name(kinds)}")
    return value


def str_dict(body: dict[str, Any], name: str) -> dict[str, str]:
    """The optional field C{name} of C{body}: a map of header names to strings ({} when absent)."""
    value: dict[str, str] = field(body, name, dict, required=False, default={})
    if not all(isinstance(v, str) for v in value.values()) or not safe_header_map(value):
        raise ApiError(400, "BAD_FIELD", f"field {name!r} must map header names to strings")
    return value


def _kind_name(kinds: Iterable[type]) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object", bool: "a boolean", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def install_error_handlers(app: Klein) -> None:
    """Make every error of C{app} (a class attribute: handlers get the instance) a JSON body."""
    from werkzeug.exceptions import HTTPException

    @app.handle_errors(ApiError)
    def api_error(self: Any, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        return json_response(request, e.body(), e.status)

    @app.handle_errors(HTTPException)
    def http_error(self: Any, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(e.code, "HTTP_ERROR")
        return json_response(request, {"error": {"code": code, "message": e.description or e.name}}, e.code or 500)

    @app.handle_errors(Exception)
    def internal(self: Any, request: IRequest, failure: Failure) -> bytes:
        log.failure("internal error serving {uri}", failure, uri=request.uri)
        return json_response(request, {"error": {"code": "INTERNAL", "message": failure.getErrorMessage()}}, 500)



# -- connection hygiene: limits applied before a request reaches a resource ------------


@define
class HttpLimits:
    """
    What one HTTP server accepts (see L{guard_site}).

    @ivar max_body: the largest request body (None: no limit).
    @ivar header_timeout: seconds a connection has to send a request's
        line and headers, from the connection's start or from the first
        byte of the request.
    @ivar max_connections: connections open at once; more are answered 503.
    """

    max_body: int | None = MAX_BODY
    header_timeout: float = 10.0
    max_connections: int = 256
    open: int = 0  # connections open now
    refused: dict[str, int] = attrs_field(factory=dict)  # error code -> connections refused


def error_response(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response carrying the API's error envelope, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    phrase = RESPONSES.get(status, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n" % (status, phrase, len(body))
    ) + body


class GuardedChannel(HTTPChannel):
    """
    An L{HTTPChannel} that enforces L{HttpLimits} as the bytes arrive: a
    body over the limit is refused from its C{Content-Length} (a chunked one
    as soon as it passes the limit) before it is read; a malformed or
    repeated C{Content-Length} gets the JSON 400; the request line and headers
    must arrive within C{header_timeout}; past C{max_connections} a new
    connection gets a 503.  Every refusal closes the connection.
    """

    limits: HttpLimits = HttpLimits()

    _deadline: Any = None
    _counted = False
    _refused = False
    _body_seen = 0

    def connectionMade(self) -> None:
        """Refuse a connection past C{max_connections}, else count it and start its header timer."""
        super().connectionMade()  # type: ignore[no-untyped-call]
        if self.limits.open >= self.limits.max_connections:
            self._refuse(503, "TOO_MANY_CONNECTIONS", f"more than {self.limits.max_connections} connections open; try again")
            return
        self.limits.open += 1
        self._counted = True
        self._arm()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Stop the header timer and stop counting the connection."""
        self._disarm()
        if self._counted:
            self._counted = False
            self.limits.open -= 1
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _arm(self) -> None:
        if self._deadline is None and not self._refused:
            self._deadline = self.callLater(self.limits.header_timeout, self._headers_too_slow)  # type: ignore[no-untyped-call]

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        self._refuse(408, "REQUEST_TIMEOUT", f"the request's headers did not arrive within {self.limits.header_timeout:g}s")

    def _refuse(self, status: int, code: str, message: str) -> None:
        if self._refused:
            return
        self._refused = True
        self._disarm()
        self.limits.refused[code] = self.limits.refused.get(code, 0) + 1
        log.info("HTTP connection from {peer} refused: {code} {message}", peer=_peer(self), code=code, message=message)
        transport = self.transport
        assert transport is not None  # refusals happen on a connection
        transport.write(error_response(status, code, message))
        self.loseConnection()  # type: ignore[no-untyped-call]
        # a client that does not read its answer is dropped all the same
        self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)  # type: ignore[no-untyped-call]

    def dataReceived(self, data: bytes) -> None:
        """Drop what arrives after a refusal; a new request's first bytes start the header timer."""
        if self._refused:
            return
        if self.line_mode:
            self._arm()  # a new request's first bytes: its headers have header_timeout
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def headerReceived(self, line: bytes) -> bool:
        """Refuse a second framing header, a malformed Content-Length or one over C{max_body}."""
        name, sep, value = line.partition(b":")
        name = name.strip().lower()
        if sep and name in (b"content-length", b"transfer-encoding"):
            value = value.strip(b" \t")
            if self._transferDecoder is not None:
                self._refuse(400, "BAD_REQUEST", "more than one Content-Length or Transfer-Encoding header")
                return False
            if name == b"content-length":
                if not (value.isdigit() and len(value) <= 18):
                    self._refuse(400, "BAD_REQUEST", "malformed Content-Length")
                    return False
                if self.limits.max_body is not None and int(value) > self.limits.max_body:
                    self._refuse(413, "BODY_TOO_LARGE", f"request body over {self.limits.max_body} bytes")
                    return False
        return bool(super().headerReceived(line))  # type: ignore[no-untyped-call]

    def allHeadersReceived(self) -> None:
        """Stop the header timer; count a chunked body as it arrives."""
        self._disarm()
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
        self._body_seen = 0
        decoder = self._transferDecoder
        if self.limits.max_body is not None and self.length is None and decoder is not None:
            # a chunked body: counted as it arrives
            take = decoder.dataCallback

            def counted(data: bytes) -> None:
                self._body_seen += len(data)
                if self.limits.max_body is not None and self._body_seen > self.limits.max_body:
                    self._refuse(413, "BODY_TOO_LARGE", f"request body over {self.limits.max_body} bytes")
                    return
                take(data)

            decoder.dataCallback = counted

    def allContentReceived(self) -> None:
        """Hand the request on, unless the connection was refused."""
        if self._refused:
            return
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def lineReceived(self, line: bytes) -> Any:
        """Parse the line, unless the connection was refused."""
        if self._refused:
            return None
        return super().lineReceived(line)  # type: ignore[no-untyped-call]

    def rawDataReceived(self, data: bytes) -> None:
        """Take body bytes, unless the connection was refused."""
        if self._refused:
            return
        super().rawDataReceived(data)


def guard_site(site: Site, limits: HttpLimits | None = None) -> Site:
    """
    Make C{site} enforce C{limits} (defaults: L{HttpLimits}) on every
    connection; C{site} itself, for one-line use in a tap:
    C{guard_site(QuietSite(resource))}.  Timers run on the site's reactor.
    """
    guarded = type("GuardedChannel", (GuardedChannel,), {"limits": limits if limits is not None else HttpLimits()})
    site.protocol = guarded  # type: ignore[method-assign]  # a class attribute, not a method
    return site


def _peer(channel: HTTPChannel) -> str:
    if channel.transport is None:
        return "?"
    try:
        address = channel.transport.getPeer()
    except Exception:
        return "?"
    if isinstance(address, (IPv4Address, IPv6Address)):
        return f"{address.host}:{address.port}"
    return "?"

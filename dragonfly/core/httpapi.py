"""
Shared pieces of our JSON-over-HTTP APIs (SuperNode REST API, dfpeer local API).

Every error is a JSON body C{{"error": {"code": ..., "message": ...}}} with a
4xx/5xx status, never an HTML page or a traceback.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from .headers import safe_header_map

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
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def json_response(request: IRequest, body: Any, status: int = 200) -> bytes:
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
    value = field(body, name, dict, required=False, default={})
    if not all(isinstance(v, str) for v in value.values()) or not safe_header_map(value):
        raise ApiError(400, "BAD_FIELD", f"field {name!r} must map header names to strings")
    return value


def _kind_name(kinds: Iterable[type]) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object", bool: "a boolean", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def install_error_handlers(app: Klein) -> None:
    """Make every error of C{app} (a class attribute: handlers get the instance) a JSON body."""

    @app.handle_errors(ApiError)
    def api_error(_self: Any, request: IRequest, failure: Any) -> bytes:
        e = failure.value
        return json_response(request, e.body(), e.status)

    @app.handle_errors(HTTPException)
    def http_error(_self: Any, request: IRequest, failure: Any) -> bytes:
        e = failure.value
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(e.code, "HTTP_ERROR")
        return json_response(request, {"error": {"code": code, "message": e.description or e.name}}, e.code or 500)

    @app.handle_errors(Exception)
    def internal(_self: Any, request: IRequest, failure: Any) -> bytes:
        log.failure("internal error serving {uri}", failure, uri=request.uri)
        return json_response(request, {"error": {"code": "INTERNAL", "message": failure.getErrorMessage()}}, 500)


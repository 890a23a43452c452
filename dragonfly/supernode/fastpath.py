"""
The two calls every peer makes all the time, answered ahead of Klein.

A downloading peer syncs about twice a second (C{POST
/api/v1/tasks/{taskId}/sync}) and every peer sends a heartbeat (C{POST
/api/v1/peers/{peerId}/heartbeat}); everything else is rare.  Under load
Klein's routing (werkzeug), its Deferreds around every handler and the
metrics' second route match took more of the SuperNode's CPU than the
handlers did (docs/scale.md).  L{FastPath} is the API's root resource: it
splits the path of a POST, and for these two operations runs the very same
L{Endpoint} Klein runs (authorisation, path ids, body size and schema, the
handler, the facade's refusals: the same code, so the same answers) and
writes the answer synchronously, with a C{Content-Length}.  Every other
request, and every one of these two whose id is not well formed (so that
Klein's decoding and error answers apply as they always did), goes to the
Klein resource unchanged.

What a restarted SuperNode's peers call first is answered here too: C{GET
/healthz}, C{POST /api/v1/peers} (a peer registers) and C{POST
/api/v1/tasks} (it registers its task again: a handler that awaits, whose
answer is written when it is in).  Built with C{early}, the fast path holds
no Klein resource until a request needs one: the SuperNode's tap serves
these calls as soon as its port is bound, and imports Klein, werkzeug and
prometheus_client afterwards (L{load_in_steps}) or for the first request
that needs them (L{SupernodeApi.load}); requests answered before that are
counted in the metrics then.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.reflect import safe_str
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ..core.httpapi import ApiError, json_response
from ..core.ids import is_peer_id, is_task_id

if TYPE_CHECKING:  # api.py builds the FastPath and hands it its endpoints
    from .api import Endpoint, SupernodeApi

log = Logger()

#: the collection segment and the action segment of a fast path -> (operation, path parameter, id check)
ROUTES: dict[tuple[bytes, bytes], tuple[str, str, Any]] = {
    (b"tasks", b"sync"): ("sync", "task_id", is_task_id),
    (b"peers", b"heartbeat"): ("heartbeat", "peer_id", is_peer_id),
}
#: (method, path) of the fast paths without path parameters -> operation
PLAIN: dict[tuple[bytes, bytes], str] = {
    (b"GET", b"/healthz"): "healthz",
    (b"POST", b"/api/v1/peers"): "register_peer",
    (b"POST", b"/api/v1/tasks"): "register_task",
}
#: what the full API imports, heaviest first, one module a reactor turn (L{load_in_steps})
LOAD_STEPS = ("werkzeug.routing", "werkzeug", "klein", "prometheus_client")


class FastPath(Resource):
    """
    The SuperNode API's root: C{POST /api/v1/tasks/ID/sync} and C{POST
    /api/v1/peers/ID/heartbeat} answered here, everything else by
    C{fallback} (the Klein app's resource with its metrics).

    @param api: the API whose facade and metrics are used.
    @param fallback: the resource for every other request (None: made by
        L{fallback} when first needed).
    @param endpoints: the API's operations by name (C{api.ENDPOINTS}).
    @param early: whether C{fallback} may be None (else it must be given).
    """

    isLeaf = True

    def __init__(self, api: SupernodeApi, fallback: Any, endpoints: Mapping[str, Endpoint], early: bool = False) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        assert early or fallback is not None
        self._api = api
        self._fallback = fallback
        self._routes: dict[tuple[bytes, bytes], tuple[Endpoint, str, Any]] = {}
        for key, (name, param, valid) in ROUTES.items():
            endpoint = endpoints[name]
            assert endpoint.method == "POST", name
            self._routes[key] = (endpoint, param, valid)
        self._plain: dict[tuple[bytes, bytes], Endpoint] = {}
        for (method, path), name in PLAIN.items():
            endpoint = endpoints[name]
            assert endpoint.method == method.decode() and endpoint.rule == path.decode(), name
            self._plain[method, path] = endpoint
        # the metrics' children by (operation, status code): labels() looked up once each
        self._counted: dict[tuple[str, int], tuple[Any, Any]] = {}

    def fallback(self) -> Any:
        """The resource of every request not answered here: the API loaded (L{SupernodeApi.load}) and its Klein resource."""
        if self._fallback is None:
            self._fallback = self._api.klein_resource()
        return self._fallback

    def render(self, request: Any) -> Any:
        plain = self._plain.get((request.method, request.path))
        if plain is not None:
            return self._answer(request, plain, {})
        if request.method == b"POST":
            parts = request.path.split(b"/")
            # b"/api/v1/tasks/ID/sync" -> ["", "api", "v1", "tasks", ID, "sync"]
            if len(parts) == 6 and parts[1] == b"api" and parts[2] == b"v1" and not parts[0]:
                route = self._routes.get((parts[3], parts[5]))
                if route is not None:
                    endpoint, param, valid = route
                    try:
                        ident = parts[4].decode("ascii")
                    except UnicodeDecodeError:
                        ident = ""
                    # a well-formed id reads the same percent-decoded: Klein would see it as it is
                    if valid(ident):
                        return self._answer(request, endpoint, {param: ident})
        return self.fallback().render(request)

    def _answer(self, request: Any, endpoint: Endpoint, params: dict[str, Any]) -> Any:
        api = self._api
        start = api.timer()
        try:
            body = endpoint.run(api, request, params)
        except ApiError as e:
            body = _error_body(request, e)
        except Exception as e:
            log.failure("internal error serving {uri}", uri=request.uri)
            body = _error_body(request, e)
        if not isinstance(body, bytes):
            return self._later(request, endpoint, body, start)
        _write(request, body)
        self._count(endpoint.name, request.code, api.timer() - start)
        return NOT_DONE_YET

    def _later(self, request: Any, endpoint: Endpoint, coroutine: Any, start: float) -> Any:
        """
        Answer C{request} when the handler's C{coroutine} is done, as Klein
        does: the handler cancelled when the client goes away, nothing
        written after that, the request counted when it ends (C{aborted}
        when the client went away first).
        """
        d = ensureDeferred(coroutine)
        finished = [False]

        def ended(result: Any, answered: bool) -> None:
            finished[0] = True
            self._count(endpoint.name, request.code if answered else "aborted", self._api.timer() - start)

        request.notifyFinish().addCallbacks(ended, ended, callbackArgs=(True,), errbackArgs=(False,))
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def answered(body: bytes) -> None:
            if not finished[0]:
                _write(request, body)

        def failed(failure: Failure) -> None:
            if finished[0]:
                if not failure.check(CancelledError):
                    log.failure("unhandled error serving {uri}", failure, uri=request.uri)
                return
            if not failure.check(ApiError):
                log.failure("internal error serving {uri}", failure, uri=request.uri)
            _write(request, _error_body(request, failure.value))

        d.addCallbacks(answered, failed)
        return NOT_DONE_YET

    def _count(self, handler: str, code: int | str, seconds: float) -> None:
        """What HttpMetrics.observe does, with the metrics' children looked up once; kept for later before the API is loaded."""
        api = self._api
        if not api.loaded:
            api.early.append((handler, str(code), seconds))
            return
        children = self._counted.get((handler, code))  # type: ignore[arg-type]
        if children is None:
            http = api.http
            children = self._counted[handler, code] = (  # type: ignore[index]
                http.requests.labels(handler, str(code)), http.duration.labels(handler),
            )
        children[0].inc()
        children[1].observe(seconds)


def _error_body(request: Any, e: BaseException) -> bytes:
    """The answer to a handler's exception, as install_error_handlers gives it for Klein: an API error's own, else a 500."""
    if isinstance(e, ApiError):
        return json_response(request, e.body(), e.status)
    return json_response(request, {"error": {"code": "INTERNAL", "message": safe_str(e)}}, 500)


def _write(request: Any, body: bytes) -> None:
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def load_in_steps(reactor: Any, root: FastPath, delay: float, steps: Sequence[str] = LOAD_STEPS, gap: float = 0.01) -> Any:
    """
    Load the full API of C{root} (an early L{FastPath}) C{delay} seconds
    from now, a module of C{steps} at a time with C{gap} seconds between
    them so that the reactor serves what came in between, then the rest
    (L{FastPath.fallback}).  A request that needs it first loads it at
    once.  The first step's delayed call.
    """
    remaining = list(steps)

    def step() -> None:
        if remaining:
            importlib.import_module(remaining.pop(0))
            reactor.callLater(gap, step)
        else:
            root.fallback()

    return reactor.callLater(delay, step)

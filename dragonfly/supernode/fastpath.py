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
"""

from __future__ import annotations

from collections.abc import Mapping
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
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


class FastPath(Resource):
    """
    The SuperNode API's root: C{POST /api/v1/tasks/ID/sync} and C{POST
    /api/v1/peers/ID/heartbeat} answered here, everything else by
    C{fallback} (the Klein app's resource with its metrics).

    @param api: the API whose facade and metrics are used.
    @param fallback: the resource for every other request.
    @param endpoints: the API's operations by name (C{api.ENDPOINTS}).
    """

    isLeaf = True

    def __init__(self, api: SupernodeApi, fallback: Any, endpoints: Mapping[str, Endpoint]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._api = api
        self._fallback = fallback
        self._routes: dict[tuple[bytes, bytes], tuple[Endpoint, str, Any]] = {}
        for key, (name, param, valid) in ROUTES.items():
            endpoint = endpoints[name]
            assert endpoint.method == "POST" and not iscoroutinefunction(endpoint.handler), name
            self._routes[key] = (endpoint, param, valid)
        # the metrics' children by (operation, status code): labels() looked up once each
        self._counted: dict[tuple[str, int], tuple[Any, Any]] = {}

    def render(self, request: Any) -> Any:
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
        return self._fallback.render(request)

    def _answer(self, request: Any, endpoint: Endpoint, params: dict[str, Any]) -> Any:
        http = self._api.http
        start = http.timer()
        try:
            body = endpoint.run(self._api, request, params)
        except ApiError as e:
            # as install_error_handlers answers it for Klein
            body = json_response(request, e.body(), e.status)
        except Exception as e:
            log.failure("internal error serving {uri}", uri=request.uri)
            body = json_response(request, {"error": {"code": "INTERNAL", "message": safe_str(e)}}, 500)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()
        seconds = http.timer() - start
        children = self._counted.get((endpoint.name, request.code))
        if children is None:
            code = str(request.code)
            children = self._counted[endpoint.name, request.code] = (
                http.requests.labels(endpoint.name, code), http.duration.labels(endpoint.name),
            )
        # what HttpMetrics.observe does
        children[0].inc()
        children[1].observe(seconds)
        return NOT_DONE_YET

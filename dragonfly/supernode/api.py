"""
The SuperNode REST API (Klein), described in C{dragonfly/openapi.yaml}.

Peers register themselves and their tasks, then call C{sync} every half
second or so with a batch of results; the answer carries the task's state,
new piece digests, parents and the seed allowance.  See
L{dragonfly.supernode.scheduler} for how those are chosen.

The handlers are thin: each route is declared with L{route}, which
authorises the request (open, cluster token or admin token), checks the
path's ids and the JSON body against the operation's schema in
C{openapi.yaml} (L{dragonfly.core.bodies}), and turns the facade's
L{Refused} into the error envelope (L{Endpoint.run}).  The work is done by
the facade, L{dragonfly.supernode.node.SuperNode}; the handler serialises
its result.  The API's root resource is L{dragonfly.supernode.fastpath}'s:
syncs and heartbeats run their L{Endpoint} there, without Klein.

Importing this module imports neither Klein (with werkzeug) nor
prometheus_client: the Klein app is built from L{ENDPOINTS} on first use
(L{klein_app}), and an API's metrics registry when it is first needed
(L{SupernodeApi.load}), so that a SuperNode started again answers its
peers' registrations and syncs on the fast path first
(L{SupernodeApi.resource}C{(early=True)}) and loads the rest after.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from inspect import iscoroutine
from typing import Any
from weakref import WeakKeyDictionary

from attrs import frozen
from twisted.web.iweb import IRequest

from ..core.bodies import Schemas
from ..core.headers import safe_header_map
from ..core.httpapi import ApiError, install_error_handlers, json_response, read_json, require_bearer
from ..core.ids import BadInput, is_peer_id, is_task_id, parse_filter
from ..core.security import OriginPolicy
from ..protocol.supernode_api import PeerRegistration, SyncReport, TaskRequest
from .cdn import CdnTask
from .dashboard import DEFAULT_TASKS, MAX_TASKS, dashboard_view
from .fastpath import FastPath
from .node import MAX_PEER_BYTES, Refused, SuperNode, SyncResult
from .preheat import Preheater

__all__ = ["MAX_PEER_BYTES", "SupernodeApi", "route"]

#: the dashboard's files (package data under dragonfly/supernode/ui/) and their types
UI_FILES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
#: the page loads nothing from anywhere but this SuperNode
UI_CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
#: the HTTP status of each code the facade refuses with (the rest: 400)
REFUSED_STATUS = {"PEER_UNKNOWN": 404, "TASK_UNKNOWN": 404, "TASK_CHANGED": 409, "ORIGIN_DENIED": 403}


def _load_ui() -> dict[str, bytes]:
    folder = resources.files("dragonfly.supernode") / "ui"
    return {name: (folder / name).read_bytes() for name in UI_FILES}


def _load_spec() -> dict[str, Any]:
    # openapi.yaml as JSON (python -m dragonfly.openapi_doc --write; a unit
    # test keeps the two equal): no yaml module and its parse in the SuperNode
    spec: dict[str, Any] = json.loads((resources.files("dragonfly") / "openapi.json").read_bytes())
    return spec


_SPEC = _load_spec()
#: a wrongly formed id in the body answers as it does in the path
SCHEMAS = Schemas(_SPEC, value_codes={"peerId": "BAD_PEER_ID", "digest": "BAD_INPUT"})


def _spec_path(rule: str) -> str:
    """C{/api/v1/tasks/<task_id>} -> C{/api/v1/tasks/{taskId}}, as the spec names it."""

    def camel(m: re.Match[str]) -> str:
        first, *rest = m.group(1).split("_")
        return "{" + first + "".join(w.title() for w in rest) + "}"

    return re.sub(r"<(?:\w+:)?(\w+)>", camel, rule)


def _body_schema(rule: str, method: str) -> dict[str, Any] | None:
    operation = _SPEC["paths"].get(_spec_path(rule), {}).get(method.lower(), {})
    body = operation.get("requestBody")
    return body["content"]["application/json"]["schema"] if body else None


def _peer_id(value: str) -> str:
    if not is_peer_id(value):
        raise ApiError(400, "BAD_PEER_ID", "peer ids are 1 to 64 of [A-Za-z0-9._:-]")
    return value


def _task_id(value: str) -> str:
    if not is_task_id(value):
        raise ApiError(400, "BAD_TASK_ID", "task ids are 64 lowercase hex digits")
    return value


#: path parameters checked before any handler runs
PATH_CHECKS: dict[str, Callable[[str], str]] = {"peer_id": _peer_id, "task_id": _task_id}


def _refused(e: Refused) -> ApiError:
    return ApiError(REFUSED_STATUS.get(e.code, 400), e.code, e.message)


async def _awaiting(result: Awaitable[Any]) -> Any:
    try:
        return await result
    except Refused as e:
        raise _refused(e) from None


#: who may call a route: anyone, a peer (the cluster token), an admin (the admin token)
OPEN, PEER, ADMIN = "open", "peer", "admin"


@frozen
class Endpoint:
    """
    One operation of the API: its rule, method, who may call it, the schema
    of its body (None: it takes none) and its handler.  L{run} does what
    every request of it goes through, whichever resource routed it: Klein
    (L{route}) or the fast path of the hot operations
    (L{dragonfly.supernode.fastpath}).
    """

    name: str
    rule: str
    method: str
    access: str
    schema: dict[str, Any] | None
    handler: Callable[..., Any]

    def run(self, api: SupernodeApi, request: IRequest, params: dict[str, Any]) -> Any:
        """
        Authorise C{request} for C{access}, check the path's ids in
        C{params} (changed in place) and the JSON body against the schema,
        then call the handler: its result (bytes, or a coroutine's
        Deferred), or L{ApiError} (the facade's L{Refused} turned into one).
        """
        api.authorise(request, self.access)
        for name, value in params.items():
            check = PATH_CHECKS.get(name)
            if check is not None:
                params[name] = check(value)
        if self.schema is not None:
            body = read_json(request)
            SCHEMAS.check(body, self.schema)
            params["body"] = body
        try:
            result = self.handler(api, request, **params)
        except Refused as e:
            raise _refused(e) from None
        return _awaiting(result) if iscoroutine(result) else result


#: every operation by its handler's name (the C{handler} label of the HTTP metrics)
ENDPOINTS: dict[str, Endpoint] = {}


def route(rule: str, method: str, access: str = PEER) -> Callable[[Callable[..., Any]], Any]:
    """
    Declare a handler of C{method rule}: it runs once the request is
    authorised for C{access}, its path ids are valid and its body (when the
    spec declares one) fits the schema; it gets that body as C{body}.
    """
    schema = _body_schema(rule, method)

    def decorate(f: Callable[..., Any]) -> Any:
        ENDPOINTS[f.__name__] = Endpoint(f.__name__, rule, method, access, schema, f)
        return f

    return decorate


def _klein_handler(endpoint: Endpoint) -> Callable[..., Any]:
    """The Klein route function of C{endpoint}: it has the handler's name (the metrics' C{handler} label)."""

    @functools.wraps(endpoint.handler)
    def handler(self: SupernodeApi, request: IRequest, **params: Any) -> Any:
        return endpoint.run(self, request, params)

    return handler


_klein: Any = None


def klein_app() -> Any:
    """
    The API's Klein app (class-level: its handlers get the L{SupernodeApi}),
    built on the first call: the error handlers, C{/metrics}, the open API
    (L{dragonfly.supernode.oapi}) and every L{ENDPOINTS} operation, in
    that order.
    """
    global _klein
    if _klein is None:
        from klein import Klein

        from ..core.metrics import metrics_route
        from . import oapi

        app = Klein()
        install_error_handlers(app)
        metrics_route(app, lambda self: self.registry)
        oapi.mount(app)  # Harbor's preheat: Dragonfly's manager open API (dragonfly/supernode/oapi.py)
        for endpoint in ENDPOINTS.values():
            app.route(endpoint.rule, methods=[endpoint.method])(_klein_handler(endpoint))
        _klein = app
    return _klein


class _KleinApp:
    """C{SupernodeApi.app}: L{klein_app}, bound to the instance as a Klein class attribute is."""

    def __get__(self, instance: Any, owner: Any) -> Any:
        return klein_app().__get__(instance, owner)


class SupernodeApi:
    """
    The Klein app over a L{SuperNode}, with its own metrics registry
    (C{GET /metrics}; see L{dragonfly.supernode.metrics}).

    @param timer: monotonic seconds for request durations (a fake in tests).
    """

    app = _KleinApp()

    def __init__(
        self,
        node: SuperNode,
        preheater: Preheater | None = None,
        timer: Callable[[], float] = time.monotonic,
        process_metrics: bool = True,
        admin_token: str | None = None,
        cluster_token: str | None = None,
        origin_policy: OriginPolicy | None = None,
        resolver_pool: Any = None,
    ) -> None:
        """
        @param preheater: runs preheat jobs (C{POST /api/v1/preheats}).
        @param timer: seconds for the request-duration metrics (a fake in tests).
        @param admin_token: when set, admin operations need it as a bearer token.
        @param cluster_token: when set, every peer call (and every read) needs
            it or the admin token as a bearer token.
        @param origin_policy: which origin hosts tasks may name.
        @param resolver_pool: a worker pool to resolve origin host names in.
        """
        self.node = node
        self.preheater = preheater
        self.timer = timer
        self._process_metrics = process_metrics
        self._metrics: tuple[Any, Any] | None = None  # (registry, HttpMetrics), made by load()
        #: requests answered before load(): (handler, code, seconds), counted by load()
        self.early: list[tuple[str, str, float]] = []
        # a few KiB, read once at start-up rather than on the reactor per request
        self._ui = _load_ui()
        self.admin_token = admin_token
        self.cluster_token = cluster_token
        self.origin_policy = origin_policy
        self._resolver_pool = resolver_pool
        #: every sync answer carries its task's JSON: encoded once per change
        self.task_json = TaskJson()

    @property
    def loaded(self) -> bool:
        """Whether L{load} ran: the metrics registry and the Klein app are in."""
        return self._metrics is not None

    def load(self) -> None:
        """
        Import and build what only the full API needs (prometheus_client,
        Klein, werkzeug; the metrics registry, the Klein app's routes), and
        count the requests answered before it; at once, a second call does
        nothing.
        """
        if self._metrics is not None:
            return
        from ..core.metrics import HttpMetrics, collector, new_registry
        from . import metrics

        registry = new_registry(self._process_metrics)
        http = HttpMetrics(registry, "dragonfly_supernode", self.timer)
        node = self.node
        registry.register(collector(lambda: metrics.collect(node)))
        klein_app()
        self._metrics = (registry, http)
        early, self.early = self.early, []
        for handler, code, seconds in early:
            http.observe(handler, code, seconds)

    @property
    def registry(self) -> Any:
        """The API's metrics registry (C{GET /metrics}), made by L{load}."""
        self.load()
        assert self._metrics is not None
        return self._metrics[0]

    @property
    def http(self) -> Any:
        """The API's request metrics (L{dragonfly.core.metrics.HttpMetrics}), made by L{load}."""
        self.load()
        assert self._metrics is not None
        return self._metrics[1]

    def resource(self, early: bool = False) -> Any:
        """
        The API's root resource: syncs and heartbeats (and, with C{early},
        what a restarted SuperNode's peers call first) answered by the fast
        path (L{dragonfly.supernode.fastpath}), every other request by
        Klein.  With C{early} nothing is loaded (L{load}) until a request
        needs it or L{load} is called; else all of it now.
        """
        if early:
            return FastPath(self, None, ENDPOINTS, early=True)
        return FastPath(self, self.klein_resource(), ENDPOINTS)

    def klein_resource(self) -> Any:
        """The Klein app alone, every request routed by it (with its metrics)."""
        return self.http.wrap(self.app.resource(), self.app)

    def authorise(self, request: IRequest, access: str) -> None:
        """
        401 C{UNAUTHORIZED} unless the request may use a route of C{access}:
        an admin route needs the admin token when C{--admin-token} is set; a
        peer route the cluster token (or the admin token) when
        C{--cluster-token} is set.
        """
        if access == ADMIN:
            require_bearer(request, self.admin_token, what="this admin operation")
        elif access == PEER and self.cluster_token:
            require_bearer(request, self.cluster_token, self.admin_token, what="this cluster operation")

    @route("/healthz", "GET", OPEN)
    def healthz(self, request: IRequest) -> bytes:
        health = self.node.health()
        return json_response(request, {"ok": True, "tasks": health.tasks, "peers": health.peers})

    # -- the dashboard -----------------------------------------------------------

    @route("/", "GET", OPEN)
    def root(self, request: IRequest) -> bytes:
        # relative, so that it also works behind a proxy that adds a prefix
        request.setHeader(b"location", b"ui")
        return json_response(request, {"location": "ui"}, 302)

    @route("/ui", "GET", OPEN)
    def ui_page(self, request: IRequest) -> bytes:
        return self._ui_file(request, "index.html")

    @route("/ui/<name>", "GET", OPEN)
    def ui_file(self, request: IRequest, name: str) -> bytes:
        if name not in UI_FILES or name == "index.html":
            raise ApiError(404, "NOT_FOUND", f"the dashboard has no file {name!r}")
        return self._ui_file(request, name)

    def _ui_file(self, request: IRequest, name: str) -> bytes:
        request.setHeader(b"content-type", UI_FILES[name].encode("ascii"))
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", UI_CSP.encode("ascii"))
        return self._ui[name]

    @route("/api/v1/dashboard", "GET", OPEN)
    def dashboard(self, request: IRequest) -> bytes:
        raw = request.args.get(b"tasks", [str(DEFAULT_TASKS).encode()])[-1]
        try:
            max_tasks = int(raw)
        except ValueError:
            max_tasks = -1
        if not 0 <= max_tasks <= MAX_TASKS:
            raise ApiError(400, "BAD_QUERY", f"query parameter 'tasks' must be an integer in 0..{MAX_TASKS}")
        return json_response(request, dashboard_view(self.node, max_tasks))

    # -- peers -----------------------------------------------------------------

    @route("/api/v1/peers", "POST")
    def register_peer(self, request: IRequest, body: dict[str, Any]) -> bytes:
        return json_response(request, self.node.register_peer(PeerRegistration.from_json(body)).to_json())

    @route("/api/v1/peers", "GET")
    def list_peers(self, request: IRequest) -> bytes:
        peers = [
            {"peerId": p.peer_id, "ip": p.ip, "port": p.port, "hostname": p.hostname, "lastSeen": p.last_seen}
            for p in self.node.peers()
        ]
        return json_response(request, {"peers": peers})

    @route("/api/v1/peers/<peer_id>/heartbeat", "POST")
    def heartbeat(self, request: IRequest, peer_id: str, body: dict[str, Any]) -> bytes:
        self.node.heartbeat(peer_id)
        return json_response(request, {})

    @route("/api/v1/peers/<peer_id>", "DELETE")
    def remove_peer(self, request: IRequest, peer_id: str) -> bytes:
        self.node.remove_peer(peer_id)
        return json_response(request, {})

    # -- tasks -----------------------------------------------------------------

    @route("/api/v1/tasks", "POST")
    async def register_task(self, request: IRequest, body: dict[str, Any]) -> bytes:
        reg = await self.node.register_task(TaskRequest.from_json(body), self.origin_policy, self._resolver_pool)
        return json_response(request, {"taskId": reg.task_id, "task": reg.task.to_json()})

    @route("/api/v1/tasks", "GET")
    def list_tasks(self, request: IRequest) -> bytes:
        return json_response(request, {"tasks": [t.to_json() for t in self.node.tasks()]})

    @route("/api/v1/tasks/<task_id>", "GET")
    def get_task(self, request: IRequest, task_id: str) -> bytes:
        detail = self.node.task_detail(task_id)
        view = detail.task.to_json()
        view["peers"] = detail.peers
        view["availability"] = detail.availability
        return json_response(request, view)

    @route("/api/v1/tasks/<task_id>", "DELETE", ADMIN)
    async def delete_task(self, request: IRequest, task_id: str) -> bytes:
        await self.node.delete_task(task_id)
        return json_response(request, {"taskId": task_id, "removed": True})

    @route("/api/v1/tasks/<task_id>/sync", "POST")
    def sync(self, request: IRequest, task_id: str, body: dict[str, Any]) -> bytes:
        result = self.node.sync(task_id, SyncReport.from_json(body))
        return json_text_response(request, sync_answer(result, self.task_json(result.task)))

    @route("/api/v1/tasks/<task_id>/peers/<peer_id>", "DELETE")
    def leave_task(self, request: IRequest, task_id: str, peer_id: str) -> bytes:
        self.node.leave_task(task_id, peer_id)
        return json_response(request, {})

    # -- preheat ---------------------------------------------------------------

    def _preheater(self) -> Preheater:
        if self.preheater is None:
            raise ApiError(503, "PREHEAT_DISABLED", "this SuperNode runs no preheat jobs")
        return self.preheater

    @route("/api/v1/preheats", "POST", ADMIN)
    def create_preheat(self, request: IRequest, body: dict[str, Any]) -> bytes:
        preheater = self._preheater()
        headers = body.get("headers") or {}
        if not safe_header_map(headers):
            raise ApiError(400, "BAD_FIELD", "field 'headers' must map header names to strings")
        raw_filter = body.get("filter") or []
        keys = parse_filter(raw_filter) if isinstance(raw_filter, str) else list(raw_filter)
        try:
            job, created = preheater.create(body["type"], body["url"], headers, keys, body.get("identifier"))
        except BadInput as e:
            raise ApiError(400, "BAD_INPUT", str(e)) from None
        except OverflowError as e:
            raise ApiError(503, "TOO_MANY_JOBS", str(e)) from None
        return json_response(request, {"ID": job.id}, 201 if created else 200)

    @route("/api/v1/preheats", "GET")
    def list_preheats(self, request: IRequest) -> bytes:
        preheater = self._preheater()
        preheater.prune()
        return json_response(request, {"preheats": [j.to_json() for j in preheater.jobs.values()]})

    @route("/api/v1/preheats/<preheat_id>", "GET")
    def get_preheat(self, request: IRequest, preheat_id: str) -> bytes:
        preheater = self._preheater()
        preheater.prune()
        job = preheater.jobs.get(preheat_id)
        if job is None:
            raise ApiError(
                404, "PREHEAT_UNKNOWN", f"preheat job {preheat_id[:64]} is not known (finished jobs are kept for {preheater.keep_finished:.0f}s)",
            )
        return json_response(request, job.to_json())


def _sync_json(result: SyncResult) -> dict[str, Any]:
    """A sync's answer as a JSON value: what L{sync_answer} encodes (the tests hold it to this)."""
    return {
        "task": result.task.to_json(),
        "digestsFrom": result.digests_from,
        "digests": result.digests,
        "parents": [p.to_json() for p in result.parents],
        "seedPieces": result.seed_pieces,
        "syncInterval": result.sync_interval,
        **_tag_fields(result),
    }


def _tag_fields(result: SyncResult) -> dict[str, Any]:
    """A sync answer's piece tags and tagged origin (a SuperNode with a piece key), else nothing."""
    out: dict[str, Any] = {}
    if result.tags is not None:
        out["tagsFrom"] = result.tags_from
        out["tags"] = result.tags
    if result.origin is not None:
        out["origin"] = result.origin
    return out


def sync_answer(result: SyncResult, task_json: bytes) -> bytes:
    """
    The JSON of L{_sync_json}C{(result)}, byte for byte, with the task's
    part given already encoded (L{TaskJson}).
    """
    rest = json.dumps({
        "digestsFrom": result.digests_from,
        "digests": result.digests,
        "parents": [p.to_json() for p in result.parents],
        "seedPieces": result.seed_pieces,
        "syncInterval": result.sync_interval,
        **_tag_fields(result),
    }).encode("utf-8")
    return b'{"task": ' + task_json + b", " + rest[1:]


def _task_key(task: CdnTask) -> tuple[Any, ...]:
    """Everything C{task.to_json()} shows, as values (never a live object that may change in place)."""
    error = task.error
    return (
        task.task_id, task.url, task.status, task.length, task.piece_size, task.piece_count,
        len(task.available) if task.available is not None else 0, task.sha256, task.content_type,
        task.origin_bytes, task.seed_bytes, tuple(task.validators.items()),
        None if error is None else tuple(error.to_json().items()),
    )


class TaskJson:
    """
    C{task.to_json()} encoded, kept per task and rebuilt only when a value
    it shows changed (its status, pieces ready, byte counters, the origin's
    validators behind its version...): every sync answer carries it.
    """

    def __init__(self) -> None:
        self._cache: WeakKeyDictionary[CdnTask, tuple[tuple[Any, ...], bytes]] = WeakKeyDictionary()

    def __call__(self, task: CdnTask) -> bytes:
        key = _task_key(task)
        hit = self._cache.get(task)
        if hit is not None and hit[0] == key:
            return hit[1]
        text = json.dumps(task.to_json()).encode("utf-8")
        self._cache[task] = (key, text)
        return text


def json_text_response(request: IRequest, text: bytes, status: int = 200) -> bytes:
    """L{json_response} for JSON already encoded: the same status and headers."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return text

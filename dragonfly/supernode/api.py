"""
The SuperNode REST API (Klein), described in C{dragonfly/openapi.yaml}.

Peers register themselves and their tasks, then call C{sync} every half
second or so with a batch of results; the answer carries the task's state,
new piece digests, parents and the seed allowance.  See
L{dragonfly.supernode.scheduler} for how those are chosen.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any, Callable

from klein import Klein
from twisted.logger import Logger, LogLevel
from twisted.web.iweb import IRequest

from ..core.httpapi import (
    ApiError, field, install_error_handlers, int_list, json_response, read_json, require_bearer, str_dict,
)
from ..core.security import OriginDenied, OriginPolicy
from ..core.ids import SEED_ID, BadInput, check_url, is_peer_id, is_task_id, parse_digest, task_id
from ..core.ids import SEED_ID, BadInput, check_url, is_peer_id, is_task_id, parse_digest, parse_filter, task_id
from ..core.logs import safe_url, task_log
from ..core.metrics import HttpMetrics, collector, metrics_route, new_registry
from . import metrics
from .dashboard import DEFAULT_TASKS, MAX_TASKS, dashboard_view
from .node import SuperNode
from .preheat import Preheater
from . import oapi
from .scheduler import PeerInfo, UnknownPeer, UnknownTask

log = Logger()

HEARTBEAT_INTERVAL = 10.0
SYNC_INTERVAL = 0.5
MAX_FAILED = 4096
#: a sync's peerBytes above this is nonsense (and beyond what JavaScript counts exactly)
MAX_PEER_BYTES = 1 << 50

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


def _load_ui() -> dict[str, bytes]:
    folder = resources.files("dragonfly.supernode") / "ui"
    return {name: (folder / name).read_bytes() for name in UI_FILES}


def _peer_id(value: str) -> str:
    if not is_peer_id(value):
        raise ApiError(400, "BAD_PEER_ID", "peer ids are 1 to 64 of [A-Za-z0-9._:-]")
    return value


def _new_peer_id(value: str) -> str:
    if _peer_id(value) == SEED_ID:
        raise ApiError(400, "BAD_PEER_ID", f"peer id {SEED_ID!r} is reserved for the seed")
    return value


def _task_id(value: str) -> str:
    if not is_task_id(value):
        raise ApiError(400, "BAD_TASK_ID", "task ids are 64 lowercase hex digits")
    return value


class SupernodeApi:
    """
    The Klein app over a L{SuperNode}, with its own metrics registry
    (C{GET /metrics}; see L{dragonfly.supernode.metrics}).

    @param timer: monotonic seconds for request durations (a fake in tests).
    """

    app = Klein()
    install_error_handlers(app)
    metrics_route(app, lambda self: self.registry)
    oapi.mount(app)  # Harbor's preheat: Dragonfly's manager open API (dragonfly/supernode/oapi.py)

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
        self.registry = new_registry(process_metrics)
        self.http = HttpMetrics(self.registry, "dragonfly_supernode", timer)
        self.registry.register(collector(lambda: metrics.collect(node)))
        # a few KiB, read once at start-up rather than on the reactor per request
        self._ui = _load_ui()
        self.admin_token = admin_token
        self.cluster_token = cluster_token
        self.origin_policy = origin_policy
        self._resolver_pool = resolver_pool

    def resource(self) -> Any:
        return self.http.wrap(self.app.resource(), self.app)

    # -- access ----------------------------------------------------------------

    def require_admin(self, request: IRequest) -> None:
        """
        One line at the top of every admin route (deleting tasks, preheat, ...):
        401 C{UNAUTHORIZED} unless the request carries the admin token, when
        C{--admin-token} is set.
        """
        require_bearer(request, self.admin_token, what="this admin operation")

    def require_peer(self, request: IRequest) -> None:
        """401 unless the request carries the cluster token (or the admin token), when C{--cluster-token} is set."""
        if self.cluster_token:
            require_bearer(request, self.cluster_token, self.admin_token, what="this cluster operation")

    @property
    def _now(self) -> float:
        return self.node.clock.seconds()

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        return json_response(request, {"ok": True, "tasks": len(self.node.cdn.tasks), "peers": len(self.node.scheduler.peers)})

    # -- the dashboard -----------------------------------------------------------

    @app.route("/", methods=["GET"])
    def root(self, request: IRequest) -> bytes:
        # relative, so that it also works behind a proxy that adds a prefix
        request.setHeader(b"location", b"ui")
        return json_response(request, {"location": "ui"}, 302)

    @app.route("/ui", methods=["GET"])
    def ui_page(self, request: IRequest) -> bytes:
        return self._ui_file(request, "index.html")

    @app.route("/ui/<name>", methods=["GET"])
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

    @app.route("/api/v1/dashboard", methods=["GET"])
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

    @app.route("/api/v1/peers", methods=["POST"])
    def register_peer(self, request: IRequest) -> bytes:
        self.require_peer(request)
        body = read_json(request)
        peer_id = _new_peer_id(field(body, "peerId", str))
        ip = field(body, "ip", str)
        port = field(body, "port", int)
        if not 0 < port < 65536:
            raise ApiError(400, "BAD_FIELD", "field 'port' must be 1..65535")
        if not ip or len(ip) > 64 or any(c.isspace() for c in ip):
            raise ApiError(400, "BAD_FIELD", "field 'ip' must be an address")
        hostname = field(body, "hostname", str, required=False, default="")[:255]
        self.node.scheduler.register_peer(PeerInfo(peer_id, ip, port, hostname), self._now)
        return json_response(request, {"peerId": peer_id, "heartbeatInterval": HEARTBEAT_INTERVAL})

    @app.route("/api/v1/peers", methods=["GET"])
    def list_peers(self, request: IRequest) -> bytes:
        self.require_peer(request)
        peers = [
            {"peerId": p.peer_id, "ip": p.ip, "port": p.port, "hostname": p.hostname, "lastSeen": p.last_seen}
            for p in self.node.scheduler.peers.values()
        ]
        return json_response(request, {"peers": peers})

    @app.route("/api/v1/peers/<peer_id>/heartbeat", methods=["POST"])
    def heartbeat(self, request: IRequest, peer_id: str) -> bytes:
        self.require_peer(request)
        try:
            self.node.scheduler.touch(_peer_id(peer_id), self._now)
        except UnknownPeer:
            raise ApiError(404, "PEER_UNKNOWN", f"peer {peer_id} is not registered") from None
        return json_response(request, {})

    @app.route("/api/v1/peers/<peer_id>", methods=["DELETE"])
    def remove_peer(self, request: IRequest, peer_id: str) -> bytes:
        self.require_peer(request)
        self.node.scheduler.remove_peer(_peer_id(peer_id), "left")
        return json_response(request, {})

    # -- tasks -----------------------------------------------------------------

    @app.route("/api/v1/tasks", methods=["POST"])
    async def register_task(self, request: IRequest) -> bytes:
        self.require_peer(request)
        body = read_json(request)
        peer_id = _peer_id(field(body, "peerId", str))
        url = field(body, "url", str)
        digest = field(body, "digest", str, required=False)
        identifier = field(body, "identifier", str, required=False)
        keys = field(body, "filter", list, required=False, default=[])
        headers = str_dict(body, "headers")
        try:
            check_url(url)
            if digest:
                parse_digest(digest)
        except BadInput as e:
            raise ApiError(400, "BAD_INPUT", str(e)) from None
        if not all(isinstance(k, str) for k in keys):
            raise ApiError(400, "BAD_FIELD", "field 'filter' must be a list of strings")
        if identifier is not None and len(identifier) > 1024:
            raise ApiError(400, "BAD_FIELD", "field 'identifier' is too long")
        tid = task_id(url, digest=digest, identifier=identifier, filter_keys=keys)
        if peer_id not in self.node.scheduler.peers:
            raise ApiError(404, "PEER_UNKNOWN", f"peer {peer_id} is not registered")
        if self.origin_policy is not None and not self.origin_policy.open:
            try:
                await self.origin_policy.check_url(url, self._resolver_pool, self.node.clock)
            except OriginDenied as e:
                raise ApiError(403, "ORIGIN_DENIED", str(e)) from None
            except OSError:
                # not resolvable from here: the fetch reports SOURCE_UNREACHABLE
                # (and checks the address again if it ever connects)
                pass
        # the origin is fetched with the URL as given: filtered keys (signatures,
        # tokens) only leave the task id; a cached file is revalidated first
        fetches = self.node.cdn.origin_fetches
        task = await self.node.cdn.fresh(tid, url, headers, digest)
        if peer_id not in self.node.scheduler.peers:
            raise ApiError(404, "PEER_UNKNOWN", f"peer {peer_id} is not registered")
        task_log(
            log, LogLevel.info, tid, "registered by {peerId} ({cache}, CDN {status})",
            peerId=peer_id, cache="cache miss" if self.node.cdn.origin_fetches > fetches else "cache hit",
            status=task.status, url=safe_url(url),
        )
        # a registration starts the peer's part afresh: what it reported
        # before (pieces of a download that failed and was deleted) is gone;
        # a peer that still holds pieces reports them in its next sync
        self.node.scheduler.leave(tid, peer_id)
        self.node.join(tid, peer_id)
        return json_response(request, {"taskId": tid, "task": task.to_json()})

    @app.route("/api/v1/tasks", methods=["GET"])
    def list_tasks(self, request: IRequest) -> bytes:
        self.require_peer(request)
        return json_response(request, {"tasks": [t.to_json() for t in self.node.cdn.tasks.values()]})

    def _task(self, task_id: str) -> Any:
        task = self.node.cdn.tasks.get(_task_id(task_id))
        if task is None:
            raise ApiError(404, "TASK_UNKNOWN", f"task {task_id} is not known")
        return task

    @app.route("/api/v1/tasks/<task_id>", methods=["GET"])
    def get_task(self, request: IRequest, task_id: str) -> bytes:
        self.require_peer(request)
        task = self._task(task_id)
        swarm = self.node.scheduler.tasks.get(task_id)
        view = task.to_json()
        view["peers"] = sorted(swarm.members) if swarm is not None else []
        view["availability"] = self.node.scheduler.availability(task_id)
        return json_response(request, view)

    @app.route("/api/v1/tasks/<task_id>", methods=["DELETE"])
    def delete_task(self, request: IRequest, task_id: str) -> bytes:
        self.require_admin(request)
        task = self.node.remove_task(_task_id(task_id))
        if task is None:
            raise ApiError(404, "TASK_UNKNOWN", f"task {task_id} is not known")
        return json_response(request, {"taskId": task_id, "removed": True})

    @app.route("/api/v1/tasks/<task_id>/sync", methods=["POST"])
    def sync(self, request: IRequest, task_id: str) -> bytes:
        self.require_peer(request)
        task = self._task(task_id)
        body = read_json(request)
        peer_id = _peer_id(field(body, "peerId", str))
        count = task.piece_count or 0
        have = int_list(body, "have", max(count, 1)) if count else []
        failed_raw = field(body, "failed", list, required=False, default=[])
        if len(failed_raw) > MAX_FAILED:
            raise ApiError(400, "BAD_FIELD", f"at most {MAX_FAILED} failures per sync")
        failed = []
        for item in failed_raw:
            if not isinstance(item, dict):
                raise ApiError(400, "BAD_FIELD", "entries of 'failed' must be objects")
            index = field(item, "index", int)
            parent = field(item, "parent", str)
            # -1: the peer could not connect to that parent at all
            if index < -1 or (count and index >= count):
                raise ApiError(400, "BAD_FIELD", f"failed piece {index} out of range")
            failed.append((index, parent))
        digests_from = field(body, "digestsFrom", int, required=False, default=0)
        starving = field(body, "starving", bool, required=False, default=False)
        banned = field(body, "banned", list, required=False, default=[])
        if len(banned) > 1024 or not all(isinstance(p, str) and is_peer_id(p) for p in banned):
            raise ApiError(400, "BAD_FIELD", "field 'banned' must list at most 1024 peer ids")
        if digests_from < 0:
            raise ApiError(400, "BAD_FIELD", "field 'digestsFrom' must be >= 0")
        want = field(body, "want", int, required=False, default=None)
        if want is not None and not 0 <= want < max(count, 1):
            raise ApiError(400, "BAD_FIELD", f"field 'want' must be a piece index below {count}")
        peer_bytes = field(body, "peerBytes", int, required=False, default=0)
        if not 0 <= peer_bytes <= MAX_PEER_BYTES:
            raise ApiError(400, "BAD_FIELD", f"field 'peerBytes' must be in 0..{MAX_PEER_BYTES}")
        version = field(body, "version", str, required=False)
        if version is not None and task.version is not None and version != task.version:
            raise ApiError(
                409, "TASK_CHANGED", f"the origin content of task {task_id} changed: version {task.version}, not {version}"
            )
        sched = self.node.scheduler
        if peer_id not in sched.peers:
            raise ApiError(404, "PEER_UNKNOWN", f"peer {peer_id} is not registered")
        task.last_access = self._now
        if task_id not in sched.tasks:
            # the swarm was dropped as idle (--task-expire): rebuild it
            self.node.join(task_id, peer_id)
        try:
            decision = self.node.sync(task_id, peer_id, have, failed, banned, starving, want)
        except UnknownTask:
            raise ApiError(404, "TASK_UNKNOWN", f"task {task_id} is not known") from None
        # counted only once the report is taken: a peer told to register
        # again sends these bytes again with its next sync
        self.node.note_peer_bytes(task_id, peer_bytes)
        parents: list[dict[str, Any]] = []
        if task.status != "failed":
            parents.append(self.node.seed_parent())
        parents.extend({"peerId": p.peer_id, "ip": p.ip, "port": p.port, "seed": False} for p in decision.parents)
        return json_response(
            request,
            {
                "task": task.to_json(),
                "digestsFrom": digests_from,
                "digests": task.digests[digests_from:],
                "parents": parents,
                "seedPieces": decision.seed_pieces,
                "syncInterval": SYNC_INTERVAL,
            },
        )

    @app.route("/api/v1/tasks/<task_id>/peers/<peer_id>", methods=["DELETE"])
    def leave_task(self, request: IRequest, task_id: str, peer_id: str) -> bytes:
        self.require_peer(request)
        self.node.scheduler.leave(_task_id(task_id), _peer_id(peer_id))
        return json_response(request, {})

    # -- preheat ---------------------------------------------------------------

    def _preheater(self) -> Preheater:
        if self.preheater is None:
            raise ApiError(503, "PREHEAT_DISABLED", "this SuperNode runs no preheat jobs")
        return self.preheater

    @app.route("/api/v1/preheats", methods=["POST"])
    def create_preheat(self, request: IRequest) -> bytes:
        self.require_admin(request)
        preheater = self._preheater()
        body = read_json(request)
        kind = field(body, "type", str)
        url = field(body, "url", str)
        headers = str_dict(body, "headers")
        raw_filter = field(body, "filter", (str, list), required=False, default=[])
        if isinstance(raw_filter, str):
            keys = parse_filter(raw_filter)
        elif all(isinstance(k, str) for k in raw_filter):
            keys = list(raw_filter)
        else:
            raise ApiError(400, "BAD_FIELD", "field 'filter' must be a string (keys joined by &) or a list of strings")
        identifier = field(body, "identifier", str, required=False)
        if identifier is not None and len(identifier) > 1024:
            raise ApiError(400, "BAD_FIELD", "field 'identifier' is too long")
        if kind not in ("file", "image"):
            raise ApiError(400, "BAD_FIELD", "field 'type' must be 'file' or 'image'")
        try:
            job, created = preheater.create(kind, url, headers, keys, identifier)
        except BadInput as e:
            raise ApiError(400, "BAD_INPUT", str(e)) from None
        except OverflowError as e:
            raise ApiError(503, "TOO_MANY_JOBS", str(e)) from None
        return json_response(request, {"ID": job.id}, 201 if created else 200)

    @app.route("/api/v1/preheats", methods=["GET"])
    def list_preheats(self, request: IRequest) -> bytes:
        self.require_peer(request)
        preheater = self._preheater()
        preheater.prune()
        return json_response(request, {"preheats": [j.to_json() for j in preheater.jobs.values()]})

    @app.route("/api/v1/preheats/<preheat_id>", methods=["GET"])
    def get_preheat(self, request: IRequest, preheat_id: str) -> bytes:
        self.require_peer(request)
        preheater = self._preheater()
        preheater.prune()
        job = preheater.jobs.get(preheat_id)
        if job is None:
            raise ApiError(
                404, "PREHEAT_UNKNOWN", f"preheat job {preheat_id[:64]} is not known (finished jobs are kept for {preheater.keep_finished:.0f}s)",
            )
        return json_response(request, job.to_json())

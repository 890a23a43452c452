"""
The SuperNode REST API (Klein), described in C{dragonfly/openapi.yaml}.

Peers register themselves and their tasks, then call C{sync} every half
second or so with a batch of results; the answer carries the task's state,
new piece digests, parents and the seed allowance.  See
L{dragonfly.supernode.scheduler} for how those are chosen.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from ..core.httpapi import (
    ApiError, field, install_error_handlers, int_list, json_response, read_json, require_bearer, str_dict,
)
from ..core.security import OriginDenied, OriginPolicy
from ..core.ids import SEED_ID, BadInput, check_url, is_peer_id, is_task_id, parse_digest, task_id
from .node import SuperNode
from .scheduler import PeerInfo, UnknownPeer, UnknownTask

HEARTBEAT_INTERVAL = 10.0
SYNC_INTERVAL = 0.5
MAX_FAILED = 4096


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
    """The Klein app over a L{SuperNode}."""

    app = Klein()
    install_error_handlers(app)

    def __init__(
        self,
        node: SuperNode,
        admin_token: str | None = None,
        cluster_token: str | None = None,
        origin_policy: OriginPolicy | None = None,
        resolver_pool: Any = None,
    ) -> None:
        """
        @param admin_token: when set, admin operations need it as a bearer token.
        @param cluster_token: when set, every peer call (and every read) needs
            it or the admin token as a bearer token.
        @param origin_policy: which origin hosts tasks may name.
        @param resolver_pool: a worker pool to resolve origin host names in.
        """
        self.node = node
        self.admin_token = admin_token
        self.cluster_token = cluster_token
        self.origin_policy = origin_policy
        self._resolver_pool = resolver_pool

    def resource(self) -> Any:
        return self.app.resource()

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
        self.node.scheduler.remove_peer(_peer_id(peer_id))
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
        task = await self.node.cdn.fresh(tid, url, headers, digest)
        if peer_id not in self.node.scheduler.peers:
            raise ApiError(404, "PEER_UNKNOWN", f"peer {peer_id} is not registered")
        # a registration starts the peer's part afresh: what it reported
        # before (pieces of a download that failed and was deleted) is gone;
        # a peer that still holds pieces reports them in its next sync
        self.node.scheduler.leave(tid, peer_id)
        self.node.scheduler.join(tid, peer_id, self._now)
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
        version = field(body, "version", str, required=False)
        if version is not None and task.version is not None and version != task.version:
            raise ApiError(
                409, "TASK_CHANGED", f"the origin content of task {task_id} changed: version {task.version}, not {version}"
            )
        sched = self.node.scheduler
        if peer_id not in sched.peers:
            raise ApiError(404, "PEER_UNKNOWN", f"peer {peer_id} is not registered")
        try:
            sched.report(task_id, peer_id, self._now, have=have, failed=failed, banned=banned)
            decision = self.node.decide(task_id, peer_id, starving)
        except UnknownTask:
            raise ApiError(404, "TASK_UNKNOWN", f"task {task_id} is not known") from None
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

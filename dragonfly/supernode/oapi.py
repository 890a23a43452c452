"""
Dragonfly's manager open API on the SuperNode, so Harbor's preheat works
unchanged (Harbor's "Dragonfly" P2P provider, pointed at the SuperNode's
API address).

Harbor's provider makes these calls (the routes are Dragonfly 2's manager's):

  GET  /healthy                 health check: any 2xx is healthy
  POST /oapi/v1/jobs            C{{"type": "preheat", "args": {"type": "image",
                                "url": MANIFEST_URL, "headers": {"Authorization":
                                "Bearer <registry token>"}, "scope": ...,
                                "tag", "filtered_query_params", "concurrent_count",
                                "timeout"}, "scheduler_cluster_ids": [...] | null}}
                                -> 200 with the job: C{{"id": N, "state": "PENDING",
                                "created_at", "updated_at", ...}}
  GET  /oapi/v1/jobs/{id}       the job; Harbor polls C{state}: PENDING (running),
                                SUCCESS (C{result.job_states[].results[]
                                .success_tasks/failure_tasks} listed) or FAILURE
                                (C{result.job_states[].error})

with C{Authorization: Bearer <personal access token>}: here the SuperNode's
C{--admin-token} (when it is set; without one every call passes, as for
every admin route).  C{args.username}/C{args.password} (the open API's other
way to give registry credentials) become a Basic C{Authorization} header
unless C{args.headers} has one.

Dragonfly 1.x's preheat routes, which Harbor's older provider called, are
answered too: C{GET /_ping}, C{POST /preheats} (C{{type, url, headers,
filteredQueryParams}} -> C{{"id"}}) and C{GET /preheats/{id}} (C{{"id",
"status": WAITING|RUNNING|SUCCESS|FAILED, "startTime", "finishTime",
"errorMsg"}}).

Every job runs on L{dragonfly.supernode.preheat.Preheater}, the same as
C{POST /api/v1/preheats}.  The SuperNode is this cluster's one seed peer and
its only scheduler cluster (id 1): every C{scope} (C{single_seed_peer},
C{all_seed_peers}, C{all_peers}) warms the SuperNode's CDN, from which peers
then download; C{platform} is accepted, and every platform of an index is
warmed.  Errors are the API's JSON envelope with 400 naming the field (the
manager answers 422; Harbor only checks for a 2xx).
"""

from __future__ import annotations

import base64
import socket
from typing import Any

from attrs import frozen
from klein import Klein
from twisted.web.iweb import IRequest

from ..core.httpapi import ApiError, json_response, read_json, require_bearer
from ..core.ids import BadInput, parse_filter
from .preheat import FAILED, RUNNING, SUCCESS, WAITING, PreheatJob, _iso

SCOPES = ("single_seed_peer", "all_seed_peers", "all_peers")
#: the one scheduler cluster a SuperNode is
CLUSTER_ID = 1
#: job states of Dragonfly 2's manager, by our job status
STATES = {WAITING: "PENDING", RUNNING: "PENDING", SUCCESS: "SUCCESS", FAILED: "FAILURE"}


@frozen
class PreheatRequest:
    """What a preheat job body asks for, in the L{Preheater}'s terms."""

    type: str
    url: str
    headers: dict[str, str]
    filter: list[str]
    identifier: str | None
    scope: str


def _get(obj: dict[str, Any], name: str, where: str, kinds: tuple[type, ...], required: bool = False) -> Any:
    value = obj.get(name)
    if value is None:
        if required:
            raise ApiError(400, "MISSING_FIELD", f"field '{where}{name}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = {str: "a string", int: "an integer", dict: "an object", list: "a list"}
        raise ApiError(
            400, "BAD_FIELD", f"field '{where}{name}' must be {' or '.join(kind.get(k, k.__name__) for k in kinds)}"
        )
    return value


def _headers(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    for k, v in value.items():
        if not isinstance(v, str) or any(c in k + v for c in "\r\n\x00") or not k:
            raise ApiError(400, "BAD_FIELD", f"field '{where}headers' must map header names to strings")
    return dict(value)


def _basic(headers: dict[str, str], username: str | None, password: str | None) -> dict[str, str]:
    if (username or password) and not any(k.lower() == "authorization" for k in headers):
        token = base64.b64encode(f"{username or ''}:{password or ''}".encode()).decode()
        headers = {**headers, "Authorization": f"Basic {token}"}
    return headers


def parse_job_request(body: dict[str, Any]) -> PreheatRequest:
    """A C{POST /oapi/v1/jobs} body; L{ApiError} 400 naming a missing or bad field."""
    kind = _get(body, "type", "", (str,), required=True)
    if kind != "preheat":
        raise ApiError(400, "BAD_FIELD", f"field 'type' must be 'preheat' (the only job this SuperNode runs), not {kind[:40]!r}")
    args = _get(body, "args", "", (dict,), required=True)
    ids = _get(body, "scheduler_cluster_ids", "", (list,))
    if ids is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ApiError(400, "BAD_FIELD", "field 'scheduler_cluster_ids' must be a list of cluster ids")
    where = "args."
    ptype = _get(args, "type", where, (str,), required=True)
    if ptype not in ("image", "file"):
        raise ApiError(400, "BAD_FIELD", f"field 'args.type' must be 'image' or 'file', not {ptype[:40]!r}")
    url = _get(args, "url", where, (str,), required=True)
    if not url:
        raise ApiError(400, "MISSING_FIELD", "field 'args.url' is required")
    tag = _get(args, "tag", where, (str,)) or None
    filtered = _get(args, "filtered_query_params", where, (str,))
    headers = _headers(_get(args, "headers", where, (dict,)), where)
    headers = _basic(headers, _get(args, "username", where, (str,)), _get(args, "password", where, (str,)))
    _get(args, "platform", where, (str,))
    scope = _get(args, "scope", where, (str,)) or SCOPES[0]
    if scope not in SCOPES:
        raise ApiError(400, "BAD_FIELD", f"field 'args.scope' must be one of {', '.join(SCOPES)}, not {scope[:40]!r}")
    count = _get(args, "concurrent_count", where, (int,))
    if count is not None and not 0 <= count <= 500:
        raise ApiError(400, "BAD_FIELD", "field 'args.concurrent_count' must be 1 to 500 (0: the default)")
    timeout = _get(args, "timeout", where, (int,))
    if timeout is not None and timeout < 0:
        raise ApiError(400, "BAD_FIELD", "field 'args.timeout' must be nanoseconds, 0 or more")
    if tag is not None and len(tag) > 1024:
        raise ApiError(400, "BAD_FIELD", "field 'args.tag' is too long")
    return PreheatRequest(ptype, url, headers, parse_filter(filtered), tag, scope)


def parse_v1_request(body: dict[str, Any]) -> PreheatRequest:
    """A Dragonfly 1.x C{POST /preheats} body."""
    ptype = _get(body, "type", "", (str,), required=True)
    if ptype not in ("image", "file"):
        raise ApiError(400, "BAD_FIELD", f"field 'type' must be 'image' or 'file', not {ptype[:40]!r}")
    url = _get(body, "url", "", (str,), required=True)
    if not url:
        raise ApiError(400, "MISSING_FIELD", "field 'url' is required")
    raw = body.get("headers")
    if isinstance(raw, list):
        # Dragonfly 1.x's clients sent headers as "Name: value" strings
        pairs = {}
        for item in raw:
            if not isinstance(item, str) or ":" not in item:
                raise ApiError(400, "BAD_FIELD", "field 'headers' must map header names to strings")
            k, _, v = item.partition(":")
            pairs[k.strip()] = v.strip()
        raw = pairs
    elif raw is not None and not isinstance(raw, dict):
        raise ApiError(400, "BAD_FIELD", "field 'headers' must map header names to strings")
    headers = _headers(raw, "")
    filtered = _get(body, "filteredQueryParams", "", (str,)) or _get(body, "filter", "", (str,))
    return PreheatRequest(ptype, url, headers, parse_filter(filtered), None, SCOPES[0])


def job_json(job: PreheatJob, request: PreheatRequest | None = None, host: tuple[str, str] = ("", "")) -> dict[str, Any]:
    """A job as Dragonfly 2's manager shows it (what Harbor reads: id, state, created_at, updated_at, result)."""
    created = _iso(job.created)
    updated = _iso(job.finish_time or job.start_time or job.created)
    hostname, ip = host
    state = STATES[job.status]
    result: dict[str, Any] = {}
    if job.finished:
        success = [
            {"url": url, "hostname": hostname, "ip": ip}
            for tid, url, _ in job.tasks if job.cdn_status.get(tid) == "success"
        ]
        failure = [
            {"url": url, "hostname": hostname, "ip": ip, "description": job.cdn_status.get(tid, "not fetched")}
            for tid, url, _ in job.tasks if job.cdn_status.get(tid) != "success"
        ]
        result = {
            "state": state,
            "created_at": created,
            "updated_at": updated,
            "job_states": [
                {
                    "task_name": f"preheat_{job.type}",
                    "task_uuid": job.id,
                    "state": state,
                    "error": job.error or "",
                    "results": [
                        {"success_tasks": success, "failure_tasks": failure, "scheduler_cluster_id": CLUSTER_ID}
                    ],
                }
            ],
        }
    args: dict[str, Any] = {
        "type": job.type,
        "url": job.url,
        "tag": job.identifier or "",
        "filtered_query_params": "&".join(job.filter),
        "scope": request.scope if request is not None else SCOPES[0],
    }
    return {
        "id": job.number,
        "created_at": created,
        "updated_at": updated,
        "task_id": f"group_{job.id}",
        "bio": "",
        "type": "preheat",
        "state": state,
        "args": args,
        "result": result,
        "user_id": 0,
        "scheduler_clusters": [{"id": CLUSTER_ID, "name": "supernode"}],
    }


def v1_json(job: PreheatJob) -> dict[str, Any]:
    out = {
        "id": job.id,
        "status": job.status,
        "startTime": _iso(job.start_time if job.start_time is not None else job.created),
    }
    if job.finish_time is not None:
        out["finishTime"] = _iso(job.finish_time)
    out["errorMsg"] = job.error or ""
    return out


def _create(api: Any, req: PreheatRequest) -> PreheatJob:
    preheater = api._preheater()
    try:
        job, _ = preheater.create(req.type, req.url, req.headers, req.filter, req.identifier)
    except BadInput as e:
        raise ApiError(400, "BAD_INPUT", str(e)) from None
    except OverflowError as e:
        raise ApiError(503, "TOO_MANY_JOBS", str(e)) from None
    return job


def _host(api: Any) -> tuple[str, str]:
    return socket.gethostname(), str(getattr(api.node, "advertise_ip", ""))


def mount(app: Klein) -> None:
    """
    Add the open API's routes to C{app}, the Klein app of
    L{dragonfly.supernode.api.SupernodeApi}: handlers get that API object
    (its preheater, node and admin token).
    """

    @app.route("/healthy", methods=["GET"])
    def healthy(api: Any, request: IRequest) -> bytes:
        return json_response(request, "OK")

    @app.route("/_ping", methods=["GET"])
    def ping(api: Any, request: IRequest) -> bytes:
        return json_response(request, "OK")

    @app.route("/oapi/v1/jobs", methods=["POST"])
    def create_job(api: Any, request: IRequest) -> bytes:
        require_bearer(request, api.admin_token, what="the open API (a personal access token: the SuperNode's admin token)")
        req = parse_job_request(read_json(request))
        job = _create(api, req)
        return json_response(request, job_json(job, req, _host(api)))

    @app.route("/oapi/v1/jobs/<job_id>", methods=["GET"])
    def get_job(api: Any, request: IRequest, job_id: str) -> bytes:
        require_bearer(request, api.admin_token, what="the open API (a personal access token: the SuperNode's admin token)")
        preheater = api._preheater()
        preheater.prune()
        if not (job_id.isascii() and job_id.isdigit()) or len(job_id) > 18:
            raise ApiError(400, "BAD_JOB_ID", "open API job ids are positive integers")
        job = preheater.by_number(int(job_id))
        if job is None:
            raise ApiError(404, "JOB_UNKNOWN", f"job {job_id} is not known (finished jobs are kept for {preheater.keep_finished:.0f}s)")
        return json_response(request, job_json(job, None, _host(api)))

    @app.route("/preheats", methods=["POST"])
    def create_v1(api: Any, request: IRequest) -> bytes:
        require_bearer(request, api.admin_token, what="preheat")
        job = _create(api, parse_v1_request(read_json(request)))
        return json_response(request, {"id": job.id})

    @app.route("/preheats/<preheat_id>", methods=["GET"])
    def get_v1(api: Any, request: IRequest, preheat_id: str) -> bytes:
        require_bearer(request, api.admin_token, what="preheat")
        preheater = api._preheater()
        preheater.prune()
        job = preheater.jobs.get(preheat_id)
        if job is None:
            raise ApiError(404, "PREHEAT_UNKNOWN", f"preheat job {preheat_id[:64]} is not known")
        return json_response(request, v1_json(job))

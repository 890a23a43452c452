"""
The dfpeer local API, for dfget and dfdaemon on the same host (loopback only).

  POST /api/v1/downloads        start or join a download; answers its task id (C{range}: the
                                bytes wanted first, told to the SuperNode when it registers)
  GET  /api/v1/downloads/<id>   its progress; C{?wait=SECONDS} long-polls until it ends
  GET  /api/v1/downloads/<id>/content
                                its bytes in order while they arrive (L{dragonfly.peer.stream});
                                one C{Range: bytes=...} gets a 206 of those bytes
  GET  /api/v1/tasks            every task this peer holds
  GET  /healthz
  GET  /metrics                 Prometheus metrics (L{dragonfly.peer.metrics})
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from ..core.httpapi import ApiError, field, install_error_handlers, json_response, read_json, str_dict
from ..core.ids import BadInput, check_url, is_task_id, parse_digest
from ..core.metrics import HttpMetrics, collector, metrics_route, new_registry
from ..core.ranges import MULTIPLE, BadRange, ByteRange, content_range, parse_range
from ..protocol.supernode_api import range_identifier
from . import metrics
from .daemon import PeerDaemon
from .stream import TaskStream


class LocalApi:
    """
    @param timer: monotonic seconds for request durations (a fake in tests).
    """

    app = Klein()
    install_error_handlers(app)
    metrics_route(app, lambda self: self.registry)

    def __init__(self, daemon: PeerDaemon, timer: Callable[[], float] = time.monotonic, process_metrics: bool = True) -> None:
        self.daemon = daemon
        self.registry = new_registry(process_metrics)
        self.http = HttpMetrics(self.registry, "dragonfly_dfpeer", timer)
        self.registry.register(collector(lambda: metrics.collect(daemon)))

    def resource(self) -> Any:
        return self.http.wrap(self.app.resource(), self.app)

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        d = self.daemon
        return json_response(
            request,
            {"ok": True, "peerId": d.peer_id, "registered": d.registered, "supernode": d.client.current},
        )

    @app.route("/api/v1/downloads", methods=["POST"])
    async def start(self, request: IRequest) -> bytes:
        body = read_json(request)
        url = field(body, "url", str)
        digest = field(body, "digest", str, required=False)
        identifier = field(body, "identifier", str, required=False)
        keys = field(body, "filter", list, required=False, default=[])
        notbs = field(body, "notbs", bool, required=False, default=False)
        limits = {}
        for name in ("localLimit", "totalLimit"):
            rate = field(body, name, int, required=False, default=0)
            if rate < 0:
                raise ApiError(400, "BAD_FIELD", f"field {name!r} must be bytes per second, 0 for none")
            limits[name] = rate
        headers = str_dict(body, "headers")
        wanted = field(body, "range", str, required=False)
        prefetch = field(body, "prefetch", bool, required=False, default=True)
        if not prefetch and (wanted is None or digest):
            raise ApiError(400, "BAD_FIELD", "field 'prefetch' false needs a 'range' (the download is those bytes) and no 'digest'")
        if wanted is not None:
            try:
                spec = parse_range(wanted)
            except BadRange as e:
                raise ApiError(400, "BAD_FIELD", f"field 'range': {e}") from None
            if not isinstance(spec, ByteRange):
                raise ApiError(400, "BAD_FIELD", "field 'range' must be one byte range (bytes=FIRST-LAST, bytes=FIRST-, bytes=-COUNT)")
            wanted = spec.header()
            if not prefetch:
                # the range alone is the download: it is part of the task id
                identifier = range_identifier(identifier, wanted)
        try:
            check_url(url)
            if digest:
                parse_digest(digest)
        except BadInput as e:
            raise ApiError(400, "BAD_INPUT", str(e)) from None
        if identifier is not None and len(identifier) > 1024:
            raise ApiError(400, "BAD_FIELD", "field 'identifier' is longer than 1024 characters")
        if not all(isinstance(k, str) for k in keys):
            raise ApiError(400, "BAD_FIELD", "field 'filter' must be a list of strings")
        task = await self.daemon.download_checked(
            {"url": url, "digest": digest, "identifier": identifier, "filter": keys, "notbs": notbs, "headers": headers,
             **limits, **({"range": wanted} if wanted else {}), **({} if prefetch else {"prefetch": False})}
        )
        return json_response(request, {"taskId": task.task_id, "status": task.status})

    def _task(self, task_id: str) -> Any:
        if not is_task_id(task_id):
            raise ApiError(400, "BAD_TASK_ID", "task ids are 64 lowercase hex digits")
        task = self.daemon.tasks.get(task_id)
        if task is None:
            raise ApiError(404, "TASK_UNKNOWN", f"no download {task_id} here")
        return task

    @app.route("/api/v1/downloads/<task_id>", methods=["GET"])
    async def progress(self, request: IRequest, task_id: str) -> bytes:
        task = self._task(task_id)
        wait = request.args.get(b"wait")
        if wait and task.status in ("waiting", "running"):
            try:
                seconds = float(wait[0])
            except ValueError:
                seconds = -1.0
            if not 0.0 <= seconds <= 60.0:  # also refuses nan
                raise ApiError(400, "BAD_FIELD", "wait must be a number of seconds from 0 to 60")
            d: Deferred = task.wait()
            d.addTimeout(seconds, self.daemon.reactor)
            try:
                await d
            except Exception:
                pass
        return json_response(request, task.to_json())

    @app.route("/api/v1/tasks", methods=["GET"])
    def tasks(self, request: IRequest) -> bytes:
        return json_response(request, {"tasks": [t.to_json() for t in self.daemon.tasks.values()]})

    @app.route("/api/v1/downloads/<task_id>/content", methods=["GET"])
    async def content(self, request: IRequest, task_id: str) -> bytes:
        """
        The task's bytes in order while the swarm downloads them.  Answers
        once the length is known; an error before that is a JSON 502.  If
        the task fails later the connection is cut short of Content-Length.
        """
        task = self._task(task_id)
        try:
            spec = parse_range(request.getHeader(b"range"))
        except BadRange as e:
            raise ApiError(416, "BAD_RANGE", str(e)) from None
        stream = TaskStream(task, request, warm=self.daemon.store.warm)
        await stream.ready(spec if isinstance(spec, ByteRange) else None)
        if task.status == "failed":
            err = task.error
            raise ApiError(502, err.code if err else "FAILED", err.message if err else "the download failed")
        request.setHeader(b"content-type", (task.content_type or "application/octet-stream").encode("latin-1"))
        request.setHeader(b"x-dragonfly-task-id", task.task_id.encode())
        start, end = 0, task.length
        if isinstance(spec, ByteRange):
            span = spec.resolve(task.length)
            if span is None:
                request.setHeader(b"content-range", f"bytes */{task.length}".encode())
                raise ApiError(416, "RANGE_NOT_SATISFIABLE", f"{spec.header()} is outside the {task.length} bytes")
            start, end = span
            request.setResponseCode(206)
            request.setHeader(b"content-range", content_range(start, end, task.length).encode())
        request.setHeader(b"content-length", str(end - start).encode())
        if spec is None or spec is MULTIPLE:
            return await stream.run()
        return await stream.run(start, end)

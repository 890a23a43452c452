"""
A dfpeer's client of the SuperNode REST API, with fail-over across the
SuperNodes it was given (C{--supernode a:8002,b:8002}).

One typed method per endpoint (L{SupernodeClient.register_peer},
L{SupernodeClient.sync}, ...) taking and returning the messages of
L{dragonfly.protocol.supernode_api}; errors are L{SupernodeError} (the
SuperNode answered 4xx/5xx, with its code) or L{SupernodeUnavailable}
(none answered).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..core.nodes import node_host, node_url, parse_nodes
from ..protocol.supernode_api import (
    PeerEntry, PeerRegistered, PeerRegistration, SyncAnswer, SyncReport, TaskDetail, TaskRegistered, TaskRequest,
    TaskView,
)

__all__ = ["SupernodeClient", "SupernodeError", "SupernodeUnavailable", "node_host", "node_url", "parse_nodes"]

log = Logger()


class SupernodeUnavailable(Exception):
    """No SuperNode answered."""


class SupernodeError(Exception):
    """A SuperNode answered with an error."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body or {}


class SupernodeClient:
    """
    @param http: a treq C{HTTPClient} (for C{https://} SuperNodes, one whose
        agent checks their certificates).
    @param nodes: C{host:port} (or C{https://host:port}) of each SuperNode, tried in turn.
    @param token: the cluster token, sent as C{Authorization: Bearer}.
    """

    def __init__(self, http: Any, nodes: list[str], clock: Any, timeout: float = 10.0, token: str | None = None) -> None:
        self._token = token
        self._http = http
        self.nodes = list(nodes)
        self._current = 0
        self._clock = clock
        self._timeout = timeout

    @property
    def current(self) -> str:
        return self.nodes[self._current]

    # -- one method per endpoint ------------------------------------------------------

    async def healthz(self) -> dict[str, Any]:
        """C{GET /healthz}: C{ok}, and how many tasks and peers the SuperNode knows."""
        return await self.call("GET", "/healthz")

    async def register_peer(self, reg: PeerRegistration) -> PeerRegistered:
        """C{POST /api/v1/peers}."""
        return PeerRegistered.from_json(await self.call("POST", "/api/v1/peers", reg.to_json()))

    async def list_peers(self) -> list[PeerEntry]:
        """C{GET /api/v1/peers}."""
        reply = await self.call("GET", "/api/v1/peers")
        return [PeerEntry.from_json(p) for p in reply.get("peers") or ()]

    async def heartbeat(self, peer_id: str) -> None:
        """C{POST /api/v1/peers/{peerId}/heartbeat}: C{PEER_UNKNOWN} says register again."""
        await self.call("POST", f"/api/v1/peers/{_q(peer_id)}/heartbeat", {})

    async def leave(self, peer_id: str) -> None:
        """C{DELETE /api/v1/peers/{peerId}}: the peer leaves every swarm."""
        await self.call("DELETE", f"/api/v1/peers/{_q(peer_id)}")

    async def register_task(self, req: TaskRequest) -> TaskRegistered:
        """C{POST /api/v1/tasks}: join a task's swarm (the SuperNode starts fetching it)."""
        return TaskRegistered.from_json(await self.call("POST", "/api/v1/tasks", req.to_json()))

    async def list_tasks(self) -> list[TaskView]:
        """C{GET /api/v1/tasks}."""
        reply = await self.call("GET", "/api/v1/tasks")
        return [TaskView.from_json(t) for t in reply.get("tasks") or ()]

    async def get_task(self, task_id: str) -> TaskDetail:
        """C{GET /api/v1/tasks/{taskId}}."""
        return TaskDetail.from_json(await self.call("GET", f"/api/v1/tasks/{_q(task_id)}"))

    async def delete_task(self, task_id: str) -> None:
        """C{DELETE /api/v1/tasks/{taskId}} (an admin operation)."""
        await self.call("DELETE", f"/api/v1/tasks/{_q(task_id)}")

    async def sync(self, task_id: str, report: SyncReport) -> SyncAnswer:
        """C{POST /api/v1/tasks/{taskId}/sync}: report, and get digests, parents and the seed allowance."""
        return SyncAnswer.from_json(await self.call("POST", f"/api/v1/tasks/{_q(task_id)}/sync", report.to_json()))

    async def leave_task(self, task_id: str, peer_id: str) -> None:
        """C{DELETE /api/v1/tasks/{taskId}/peers/{peerId}}: the peer no longer holds the task."""
        await self.call("DELETE", f"/api/v1/tasks/{_q(task_id)}/peers/{_q(peer_id)}")

    async def create_preheat(
        self, kind: str, url: str, headers: dict[str, str] | None = None, filter: list[str] | None = None,
        identifier: str | None = None,
    ) -> str:
        """C{POST /api/v1/preheats} (an admin operation): the job's id."""
        body: dict[str, Any] = {"type": kind, "url": url}
        if headers:
            body["headers"] = headers
        if filter:
            body["filter"] = filter
        if identifier is not None:
            body["identifier"] = identifier
        return str((await self.call("POST", "/api/v1/preheats", body))["ID"])

    async def list_preheats(self) -> list[dict[str, Any]]:
        """C{GET /api/v1/preheats}: each job's JSON view."""
        return list((await self.call("GET", "/api/v1/preheats")).get("preheats") or ())

    async def get_preheat(self, preheat_id: str) -> dict[str, Any]:
        """C{GET /api/v1/preheats/{id}}: the job's JSON view."""
        return await self.call("GET", f"/api/v1/preheats/{_q(preheat_id)}")

    # -- the transport -------------------------------------------------------------------

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """
        One API call, failing over to the next SuperNode on connection
        errors.  Prefer the typed methods above; this stays for the callers
        not converted yet.
        """
        last: Exception | None = None
        for attempt in range(len(self.nodes)):
            node = self.nodes[(self._current + attempt) % len(self.nodes)]
            url = node_url(node) + path
            headers = {"Content-Type": ["application/json"]}
            if self._token:
                headers["Authorization"] = [f"Bearer {self._token}"]
            try:
                d: Deferred = self._http.request(
                    method, url,
                    data=json.dumps(body).encode() if body is not None else None,
                    headers=headers,
                )
                d.addTimeout(self._timeout, self._clock)
                response = await d
                cd: Deferred = response.content()
                cd.addTimeout(self._timeout, self._clock)
                raw = await cd
            except Exception as e:  # connection refused, timeout, reset, a refused certificate
                last = e
                log.debug("supernode {node}: {why!r}", node=node, why=e)
                continue
            self._current = (self._current + attempt) % len(self.nodes)
            try:
                data = json.loads(raw or b"{}")
            except ValueError:
                raise SupernodeError(response.code, "BAD_RESPONSE", f"supernode {node} sent no JSON") from None
            if response.code >= 400:
                err = data.get("error", {}) if isinstance(data, dict) else {}
                raise SupernodeError(response.code, err.get("code", "HTTP_ERROR"), err.get("message", ""), data)
            return data
        raise SupernodeUnavailable(f"no supernode answered ({', '.join(self.nodes)}): {last}")


def _q(segment: str) -> str:
    """One path segment, quoted."""
    return quote(segment, safe="")

"""
A dfpeer's client of the SuperNode REST API, across the SuperNodes it was
given (C{--supernode a:8002=2,b:8002,c:8002}).

Each task's calls go to the first live node of that task's weighted
rendezvous ranking (L{dragonfly.core.rendezvous}); a node that stops
answering is marked down and probed (C{GET /healthz}) with exponential
back-off until it answers again (L{NodeHealth}).  Peer-level calls
(register, heartbeat, leave) go to every live node.

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

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from ..core import rendezvous
from ..core.nodes import node_host, node_url, parse_nodes
from ..protocol.supernode_api import (
    PeerEntry,
    PeerRegistered,
    PeerRegistration,
    SyncAnswer,
    SyncReport,
    TaskDetail,
    TaskRegistered,
    TaskRequest,
    TaskView,
)

__all__ = ["NodeHealth", "SupernodeClient", "SupernodeError", "SupernodeUnavailable", "node_host", "node_url", "parse_nodes"]

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


class NodeHealth:
    """
    Which SuperNodes answer, as this dfpeer last saw it (sans-IO: the
    client reports what happened and schedules the probes).

    A node that fails a call is I{down}; its first probe is due after
    C{first} seconds, and each failed probe doubles the wait up to C{cap}.
    A node that answers anything (a call or a probe) is up again.
    """

    def __init__(self, clock: Any, first: float = 1.0, cap: float = 10.0) -> None:
        self._clock = clock
        self.first = first
        self.cap = cap
        self._backoff: dict[str, float] = {}

    def alive(self, node: str) -> bool:
        return node not in self._backoff

    def failed(self, node: str) -> float | None:
        """A call to C{node} failed: the delay of its first probe, or None when it was down already."""
        if node in self._backoff:
            return None
        self._backoff[node] = self.first
        return self.first

    def probe_failed(self, node: str) -> float:
        """A probe failed: the delay of the next (doubled, at most C{cap})."""
        delay = min(self.cap, self._backoff.get(node, self.first / 2) * 2)
        self._backoff[node] = delay
        return delay

    def answered(self, node: str) -> bool:
        """C{node} answered: True when it was down until now."""
        return self._backoff.pop(node, None) is not None


class SupernodeClient:
    """
    @param http: a treq C{HTTPClient} (for C{https://} SuperNodes, one whose
        agent checks their certificates).
    @param nodes: C{host:port[=weight]} (or C{https://host:port[=weight]}) of each SuperNode.
    @param token: the cluster token, sent as C{Authorization: Bearer}.
    @param probe_first: seconds from a node's first failure to its first health probe.
    @param probe_cap: the longest wait between two probes of a node that stays down.
    """

    def __init__(
        self, http: Any, nodes: list[str], clock: Any, timeout: float = 10.0, token: str | None = None,
        probe_first: float = 1.0, probe_cap: float = 10.0,
    ) -> None:
        self._token = token
        self._http = http
        self.ring = rendezvous.parse_nodes(",".join(nodes))
        self.nodes = [n.address for n in self.ring]
        self._clock = clock
        self._timeout = timeout
        self.health = NodeHealth(clock, probe_first, probe_cap)
        self._probes: dict[str, Any] = {}
        #: called with a node's address when it answers again after being down
        self.on_node_back: list[Any] = []

    @property
    def current(self) -> str:
        """The first live node in the order given (for calls about no task)."""
        return self._order(self.nodes)[0]

    def route(self, task_id: str) -> list[str]:
        """The nodes to try for C{task_id}: its rendezvous ranking, live nodes first."""
        return self._order([n.address for n in rendezvous.rank(self.ring, task_id)])

    def owner(self, task_id: str) -> str:
        """The node that owns C{task_id} when all are up."""
        return rendezvous.owner(self.ring, task_id).address

    def alive(self, node: str) -> bool:
        return self.health.alive(node)

    def _order(self, nodes: list[str]) -> list[str]:
        return [n for n in nodes if self.health.alive(n)] + [n for n in nodes if not self.health.alive(n)]

    def stop(self) -> None:
        """Cancel the pending health probes."""
        for call in self._probes.values():
            if call.active():
                call.cancel()
        self._probes.clear()

    # -- liveness ------------------------------------------------------------------------

    def _failed(self, node: str) -> None:
        delay = self.health.failed(node)
        if delay is not None:
            log.info("supernode {node} stopped answering; probing it in {delay:.0f}s", node=node, delay=delay)
            self._schedule_probe(node, delay)

    def _answered(self, node: str) -> None:
        if self.health.answered(node):
            call = self._probes.pop(node, None)
            if call is not None and call.active():
                call.cancel()
            log.info("supernode {node} answers again", node=node)
            for f in list(self.on_node_back):
                f(node)

    def _schedule_probe(self, node: str, delay: float) -> None:
        old = self._probes.get(node)
        if old is not None and old.active():
            old.cancel()
        self._probes[node] = self._clock.callLater(delay, self._probe, node)

    def _probe(self, node: str) -> None:
        self._probes.pop(node, None)
        if self.health.alive(node):
            return

        async def probe() -> None:
            try:
                await self._request(node, "GET", "/healthz", None)
            except SupernodeError:
                pass  # it answers, if only with an error: it is up (marked so by _request)
            except SupernodeUnavailable:
                if not self.health.alive(node):
                    self._schedule_probe(node, self.health.probe_failed(node))
            else:
                self._answered(node)

        Deferred.fromCoroutine(probe())

    # -- one method per endpoint ------------------------------------------------------

    async def healthz(self) -> dict[str, Any]:
        """C{GET /healthz}: C{ok}, and how many tasks and peers the SuperNode knows."""
        return await self.call("GET", "/healthz")

    async def register_peer(self, reg: PeerRegistration, node: str | None = None) -> PeerRegistered:
        """C{POST /api/v1/peers}: with C{node}, or else with every live node."""
        nodes = [node] if node is not None else None
        return PeerRegistered.from_json(await self.call_all("POST", "/api/v1/peers", reg.to_json(), nodes))

    async def list_peers(self) -> list[PeerEntry]:
        """C{GET /api/v1/peers}."""
        reply = await self.call("GET", "/api/v1/peers")
        return [PeerEntry.from_json(p) for p in reply.get("peers") or ()]

    async def heartbeat(self, peer_id: str) -> None:
        """
        C{POST /api/v1/peers/{peerId}/heartbeat} to every live node:
        C{PEER_UNKNOWN} (from any of them) says register again.
        """
        await self.call_all("POST", f"/api/v1/peers/{_q(peer_id)}/heartbeat", {})

    async def leave(self, peer_id: str) -> None:
        """C{DELETE /api/v1/peers/{peerId}} on every live node: the peer leaves every swarm."""
        await self.call_all("DELETE", f"/api/v1/peers/{_q(peer_id)}")

    async def register_task(self, req: TaskRequest, nodes: list[str] | None = None) -> TaskRegistered:
        """C{POST /api/v1/tasks}: join a task's swarm (the SuperNode starts fetching it), trying C{nodes} in turn."""
        return TaskRegistered.from_json(await self.call("POST", "/api/v1/tasks", req.to_json(), nodes))

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

    async def sync(self, task_id: str, report: SyncReport, nodes: list[str] | None = None) -> SyncAnswer:
        """
        C{POST /api/v1/tasks/{taskId}/sync}: report, and get digests, parents
        and the seed allowance.  Tried on C{nodes} in turn, by default the
        task's L{route}.
        """
        path = f"/api/v1/tasks/{_q(task_id)}/sync"
        return SyncAnswer.from_json(await self.call("POST", path, report.to_json(), nodes or self.route(task_id)))

    async def leave_task(self, task_id: str, peer_id: str, nodes: list[str] | None = None) -> None:
        """C{DELETE /api/v1/tasks/{taskId}/peers/{peerId}}: the peer no longer holds the task."""
        path = f"/api/v1/tasks/{_q(task_id)}/peers/{_q(peer_id)}"
        await self.call("DELETE", path, None, nodes or self.route(task_id))

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

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, nodes: list[str] | None = None,
    ) -> dict[str, Any]:
        """
        One API call on the first of C{nodes} (by default every node, live
        ones first) that answers; a node that does not is marked down and
        the next one tried.  Prefer the typed methods above.
        """
        order = nodes if nodes is not None else self._order(self.nodes)
        last: BaseException | None = None
        for node in order:
            try:
                return await self._request(node, method, path, body)
            except SupernodeUnavailable as e:
                last = e.__cause__ or e
                continue
        raise SupernodeUnavailable(f"no supernode answered ({', '.join(order)}): {last}")

    async def call_all(
        self, method: str, path: str, body: dict[str, Any] | None = None, nodes: list[str] | None = None,
    ) -> dict[str, Any]:
        """
        One API call on each of C{nodes} at once (by default every live
        node, or every node when none is live): the first answer of the
        nodes in order.  A refusal (C{PEER_UNKNOWN}, ...) from any node is
        raised; L{SupernodeUnavailable} when none answered.
        """
        if nodes is None:
            nodes = [n for n in self.nodes if self.health.alive(n)] or list(self.nodes)
        results: list[tuple[bool, Any]] = await DeferredList(
            [Deferred.fromCoroutine(self._request(n, method, path, body)) for n in nodes], consumeErrors=True,
        )
        answers = [r for ok, r in results if ok]
        errors: list[BaseException] = [r.value for ok, r in results if not ok]
        refusals = [e for e in errors if isinstance(e, SupernodeError)]
        if refusals:
            raise refusals[0]
        if answers:
            return answers[0]  # type: ignore[no-any-return]
        last = (errors[-1].__cause__ or errors[-1]) if errors else None
        raise SupernodeUnavailable(f"no supernode answered ({', '.join(nodes)}): {last}")

    async def _request(self, node: str, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """One call to one node: L{SupernodeUnavailable} (and the node marked down) when it does not answer."""
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
            log.debug("supernode {node}: {why!r}", node=node, why=e)
            self._failed(node)
            raise SupernodeUnavailable(f"supernode {node}: {e!r}") from e
        self._answered(node)
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise SupernodeError(response.code, "BAD_RESPONSE", f"supernode {node} sent no JSON") from None
        if response.code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise SupernodeError(response.code, err.get("code", "HTTP_ERROR"), err.get("message", ""), data)
        return data


def _q(segment: str) -> str:
    """One path segment, quoted."""
    return quote(segment, safe="")

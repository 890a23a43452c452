"""
One task's calls to the SuperNode: register it, and sync.  The task
(L{dragonfly.peer.task}) decides what to say and what the answers mean; this
only knows which SuperNode to ask and the one retry (a SuperNode that forgot
this dfpeer is told about it again).

Which node: the first live node of the task's rendezvous ranking
(L{SupernodeClient.route}), then I{pinned}: the session keeps the node that
last answered while that node answers, so a download that failed over to
the next node finishes there when the owner comes back (every peer of the
swarm moved with it: none is left on a node the others left).  A new
session (a new download) and an L{unpin}ned one follow the ranking again.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from ..protocol.supernode_api import SyncAnswer, SyncReport, TaskRegistered, TaskRequest
from .client import SupernodeError, SupernodeUnavailable

#: ask the registration's answer to wait for the origin's length (the
#: SuperNode's C{waitLength}) instead of polling for it; DRAGONFLY_WAIT_LENGTH=0: poll (A/B rounds)
WAIT_LENGTH = os.environ.get("DRAGONFLY_WAIT_LENGTH", "1") != "0"


class TaskSession:
    """
    @param client: a L{dragonfly.peer.client.SupernodeClient}.
    @param peer_id: this dfpeer's id (read at each call: it is known once the block port is bound).
    @param register_peer: registers this dfpeer with the SuperNode again.
    """

    def __init__(
        self, client: Any, peer_id: Callable[[], str], register_peer: Callable[[], Awaitable[None]],
        task_id: str, request: dict[str, Any],
    ) -> None:
        self._client = client
        self._peer_id = peer_id
        self._register_peer = register_peer
        self.task_id = task_id
        self.request = request
        #: the node that last answered for this task
        self.pinned: str | None = None

    @property
    def node(self) -> str:
        """The node this task's next call goes to first."""
        return self.route()[0]

    def route(self) -> list[str]:
        """The nodes to try, in turn: the pinned one while it is live, then the task's ranking."""
        route = list(self._client.route(self.task_id))
        if self.pinned is not None and self.pinned in route and self._client.alive(self.pinned):
            route.remove(self.pinned)
            route.insert(0, self.pinned)
        return route

    def unpin(self) -> None:
        """Follow the task's ranking again from the next call."""
        self.pinned = None

    async def _each(self, call: Callable[[list[str]], Awaitable[Any]]) -> Any:
        """C{call} on the nodes of L{route} in turn until one answers; pin it."""
        route = self.route()
        last: Exception | None = None
        for node in route:
            try:
                answer = await call([node])
            except SupernodeUnavailable as e:
                last = e
                continue
            except SupernodeError:
                self.pinned = node
                raise
            self.pinned = node
            return answer
        raise SupernodeUnavailable(f"no supernode answered for task {self.task_id[:12]} ({', '.join(route)}): {last}")

    @property
    def peer_id(self) -> str:
        """This dfpeer's id, as the SuperNode knows it."""
        return self._peer_id()

    async def register(self, takeover: dict[str, Any] | None = None) -> TaskRegistered:
        """
        Register the task (and this dfpeer first, when the SuperNode forgot
        it); C{takeover}: the tagged origin of the pieces held (see L{TaskRequest.takeover}).
        """
        req = TaskRequest(
            self._peer_id(), self.request["url"], dict(self.request.get("headers") or {}),
            self.request.get("digest"), self.request.get("identifier"), self.request.get("filter") or (),
            self.request.get("range"), self.request.get("prefetch") is not False, takeover,
            wait_length=WAIT_LENGTH,
        )
        try:
            return await self._each(lambda nodes: self._client.register_task(req, nodes))
        except SupernodeError as e:
            if e.code != "PEER_UNKNOWN":
                raise
            await self._register_peer()
            return await self._each(lambda nodes: self._client.register_task(req, nodes))

    async def sync(self, report: SyncReport) -> SyncAnswer:
        """One sync of this task."""
        return await self._each(lambda nodes: self._client.sync(self.task_id, report, nodes))

    async def register_peer(self) -> None:
        await self._register_peer()

"""
One task's calls to the SuperNode: register it, and sync.  The task
(L{dragonfly.peer.task}) decides what to say and what the answers mean; this
only knows the paths and the one retry (a SuperNode that forgot this dfpeer
is told about it again).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .client import SupernodeError


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

    @property
    def node(self) -> str:
        return str(self._client.current)

    async def register(self) -> dict[str, Any]:
        body = {
            "peerId": self._peer_id(),
            "url": self.request["url"],
            "headers": self.request.get("headers") or {},
            "digest": self.request.get("digest"),
            "identifier": self.request.get("identifier"),
            "filter": self.request.get("filter") or [],
        }
        try:
            return await self._client.call("POST", "/api/v1/tasks", body)
        except SupernodeError as e:
            if e.code != "PEER_UNKNOWN":
                raise
            await self._register_peer()
            return await self._client.call("POST", "/api/v1/tasks", body)

    async def sync(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._client.call("POST", f"/api/v1/tasks/{self.task_id}/sync", {"peerId": self._peer_id(), **body})

    async def register_peer(self) -> None:
        await self._register_peer()

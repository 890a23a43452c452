"""
One task's calls to the SuperNode: register it, and sync.  The task
(L{dragonfly.peer.task}) decides what to say and what the answers mean; this
only knows the paths and the one retry (a SuperNode that forgot this dfpeer
is told about it again).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..protocol.supernode_api import SyncAnswer, SyncReport, TaskRegistered, TaskRequest
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

    @property
    def peer_id(self) -> str:
        """This dfpeer's id, as the SuperNode knows it."""
        return self._peer_id()

    async def register(self) -> TaskRegistered:
        """Register the task (and this dfpeer first, when the SuperNode forgot it)."""
        req = TaskRequest(
            self._peer_id(), self.request["url"], dict(self.request.get("headers") or {}),
            self.request.get("digest"), self.request.get("identifier"), self.request.get("filter") or (),
        )
        try:
            return await self._client.register_task(req)
        except SupernodeError as e:
            if e.code != "PEER_UNKNOWN":
                raise
            await self._register_peer()
            return await self._client.register_task(req)

    async def sync(self, report: SyncReport) -> SyncAnswer:
        """One sync of this task."""
        return await self._client.sync(self.task_id, report)

    async def register_peer(self) -> None:
        await self._register_peer()

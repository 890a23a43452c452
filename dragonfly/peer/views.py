"""
What the outside sees of a download on a dfpeer: its JSON view (the local
API's C{GET /api/v1/tasks/{id}}, L{task_json}), the meta saved when it
finishes (L{task_meta}), who waits on it (L{Listeners}: the in-order
stream of L{dragonfly.peer.stream} watches every change, dfget's C{?wait}
waits for the end), and the attributes the task shows on behalf of its
parts (L{Via}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from .task import PeerTask

T = TypeVar("T")


class Via(Generic[T]):
    """
    An attribute of a task kept by one of its parts, read and written
    through it (as Twisted's C{proxyForInterface} does, typed):
    C{length = Via[int | None]("pieces")} in the class body makes
    C{task.length} C{task.pieces.length}.  Read-only unless C{writable}.
    """

    def __init__(self, part: str, writable: bool = False) -> None:
        self._part = part
        self._writable = writable
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, task: None, owner: type) -> Via[T]: ...

    @overload
    def __get__(self, task: object, owner: type | None = None) -> T: ...

    def __get__(self, task: object, owner: type | None = None) -> Any:
        if task is None:
            return self
        return getattr(getattr(task, self._part), self._name)

    def __set__(self, task: object, value: T) -> None:
        if not self._writable:
            raise AttributeError(f"{self._name} is {self._part}.{self._name}, read-only here")
        setattr(getattr(task, self._part), self._name, value)


class Listeners:
    """Watchers, called on every change of a task, and waiters, fired once when it ends."""

    def __init__(self) -> None:
        self._watchers: list[Callable[[], None]] = []
        self._waiters: list[Deferred] = []

    def watch(self, callback: Callable[[], None]) -> None:
        """Call C{callback} with no arguments whenever a piece is stored or the task ends."""
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def changed(self) -> None:
        """Tell every watcher (one may unwatch while told)."""
        for callback in list(self._watchers):
            callback()

    def wait(self, result: Any, ended: bool) -> Deferred:
        """A Deferred that fires with C{result} when the task ends, at once when it has (C{ended})."""
        d: Deferred = Deferred()
        if ended:
            d.callback(result)
        else:
            self._waiters.append(d)
        return d

    def ended(self, result: Any) -> None:
        """The task ended: tell the watchers, then fire the waiters with C{result}."""
        self.changed()
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(result)


def task_json(task: PeerTask) -> dict[str, Any]:
    """The task as the local API shows it (docs/api.md)."""
    out: dict[str, Any] = {
        "taskId": task.task_id,
        "url": task.request.get("url"),
        "status": task.status,
        "contentLength": task.length,
        "contentType": task.content_type,
        "completedBytes": task.pieces.completed_bytes,
        "pieceCount": task.count,
        "piecesDone": len(task.have) if task.have is not None else 0,
        "sha256": task.sha256,
        # every piece checked against the SuperNode's SHA-256
        "piecesVerified": task.pieces_verified,
        "dataPath": task.store.data_path(task.task_id),
        "traffic": dict(task.traffic),
        "uploaded": task.uploaded,
        "badPieces": task.bad_pieces,
        "connections": len(task.conns),
        "elapsed": (task.finished_at or task.clock.seconds()) - task.started,
    }
    if task.error is not None:
        out["error"] = {"code": task.error.code, "message": task.error.message}
        if task.error.origin_status is not None:
            out["error"]["originStatus"] = task.error.origin_status
    return out


def task_meta(task: PeerTask) -> dict[str, Any] | None:
    """
    What is saved of a task finished in the swarm, for a restart to serve
    it again (L{PeerTask.restore}); None unless every piece has its digest.
    """
    pieces = task.pieces.meta()
    if pieces is None:
        return None
    return {
        "taskId": task.task_id, "url": task.request.get("url"), **pieces, "sha256": task.sha256,
        "contentType": task.content_type, "version": task.version,
        "request": {k: v for k, v in task.request.items() if k != "headers"},
    }

"""
What a download (L{dragonfly.peer.task.PeerTask}) needs from the dfpeer
around it, as small typed roles: the PeerTask never reaches into the daemon.
L{dragonfly.peer.daemon.PeerDaemon} plays L{TaskHost}; unit tests play it
with fakes (tests/unit/test_peer_task.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from ..core.ratelimit import TokenBucket
    from ..protocol.supernode_api import SyncAnswer, SyncReport, TaskRegistered
    from .task import PeerTask


class Session(Protocol):
    """One task's conversation with the SuperNode (L{dragonfly.peer.session})."""

    @property
    def node(self) -> str:
        """The SuperNode it talks to now (for logs)."""

    @property
    def peer_id(self) -> str:
        """This dfpeer's id."""

    async def register(self, takeover: dict[str, Any] | None = None) -> TaskRegistered:
        """Register the task (the peer first, if the SuperNode forgot it), with the tagged origin held for a takeover; the reply."""

    async def sync(self, report: SyncReport) -> SyncAnswer:
        """One sync: what we did since the last, and what to do next."""

    async def register_peer(self) -> None:
        """Register this dfpeer again (the SuperNode restarted)."""


class Store(Protocol):
    """The task files (L{dragonfly.core.store.TaskStore}): every method runs in the pool."""

    def data_path(self, task_id: str) -> str: ...

    def prepare(self, task_id: str, length: int) -> Deferred: ...

    def write_verified(self, task_id: str, offset: int, data: bytearray, digest: bytes) -> Deferred: ...

    def read(self, task_id: str, offset: int, size: int) -> Deferred: ...

    def sha256(self, task_id: str) -> Deferred: ...

    def finish(self, task_id: str, meta: dict[str, Any] | None) -> Deferred: ...

    def remove(self, task_id: str) -> Deferred: ...

    def serve(self, task_id: str) -> Deferred: ...

    def forget(self, task_id: str) -> Deferred: ...

    def served_fd(self, task_id: str) -> int | None: ...

    def warm(self, fd: int, offset: int, size: int, exact: bool = True) -> Deferred:
        """Read bytes of a served descriptor into the page cache (not in the task's order)."""

    def run(self, task_id: str, f: Any, *args: Any) -> Deferred:
        """C{f(*args)} in the pool, after the task's earlier file work (the running whole-file hash)."""



class PartStore(Protocol):
    """
    A store that writes pieces under a L{dragonfly.core.partwrite.WriteGuard},
    a large one part by part (L{dragonfly.core.store.TaskStore}).
    """

    def write_guarded(self, task_id: str, guard: Any, index: int, offset: int, data: bytearray, digest: bytes) -> Deferred: ...

    def write_part(
        self, task_id: str, guard: Any, index: int, token: int, hasher: Any, buf: Any, start: int, end: int, offset: int,
    ) -> Deferred: ...

    def seal_part(
        self, task_id: str, guard: Any, index: int, token: int, hasher: Any, buf: Any, start: int, offset: int,
        digest: bytes,
    ) -> Deferred: ...

    def write_beside(
        self, task_id: str, guard: Any, index: int, token: int, offset: int, data: bytearray, digest: bytes,
    ) -> Deferred: ...


class Connections(Protocol):
    """The block connections (L{dragonfly.protocol.block.BlockFactory})."""

    def client(self, side: Any, task_id: str, remote_id: str) -> Any: ...

    def connect(self, endpoint: Any, proto: Any) -> Deferred: ...

    def release(self, buf: bytearray) -> None: ...


class Stats(Protocol):
    """The dfpeer's counters (L{dragonfly.peer.metrics.PeerStats})."""

    bans: dict[str, int]
    discarded: dict[str, int]
    traffic: dict[str, int]
    back_to_source: dict[str, int]
    upload_pieces: int
    upload_bytes: int

    def count(self, table: dict[str, int], key: str, n: int = 1) -> None: ...


class TaskHost(Protocol):
    """The dfpeer a task runs in."""

    peer_id: str
    clock: Any
    trace: bool
    #: requests per connection, and bytes in flight for one task (--pipeline, --in-flight)
    per_connection: int
    in_flight_bytes: int
    #: when a SuperNode last answered one of our tasks (None: never)
    supernode_seen: float | None

    @property
    def store(self) -> Store: ...

    @property
    def block_factory(self) -> Connections: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def total_limit(self) -> TokenBucket | None:
        """The host's download rate limit (dfget --totallimit), if any."""

    def session(self, task_id: str, request: dict[str, Any]) -> Session: ...

    def endpoint(self, ip: str, port: int) -> Any:
        """A client endpoint to a neighbour's block port."""

    async def fetch_from_source(self, task: PeerTask) -> tuple[int, str]:
        """The whole file from the origin into the task's data file: (length, sha256)."""

    async def fetch_pieces(self, task: PeerTask, runs: list[tuple[int, int]]) -> tuple[int, str] | None:
        """
        The pieces C{runs} from the origin by Range, each through
        C{task.source_piece}: None, or C{(length, sha256)} when the origin
        sent the whole file instead (as L{fetch_from_source}).
        """

    def task_ended(self, task: PeerTask) -> None: ...

    def note_activity(self) -> None: ...

"""
The SuperNode's domain object: the CDN, the scheduler and the seed, tied together.

The REST API (L{dragonfly.supernode.api}) is a thin layer over L{SuperNode};
the seed's block connections resolve tasks through L{SuperNode.seed_side}.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from ..core.bitmap import Bitmap
from ..core.pieces import piece_span
from ..protocol.block import E_TASK_FAILED, BlockProtocol
from .cdn import Cdn, CdnTask
from .scheduler import SEED_ID, Decision, Scheduler

log = Logger()


class SeedSide:
    """The seed end of one CDN task: serves verified pieces, never downloads."""

    accepts_pieces = False

    def __init__(self, node: "SuperNode", task: CdnTask) -> None:
        self.node = node
        self.task = task
        self.clock = node.clock
        self.conns: set[BlockProtocol] = set()

    # TaskSide
    def local_bitmap(self) -> Bitmap | None:
        return self.task.available

    def piece_length(self, index: int) -> int | None:
        if self.task.length is None:
            return None
        return piece_span(index, self.task.length, self.task.piece_size)[1]

    def read_piece(self, index: int) -> Any:
        return self.node.cdn.read_piece(self.task, index)

    def attached(self, conn: BlockProtocol) -> None:
        self.conns.add(conn)
        if self.task.digests:
            conn.send_digests(0, [bytes.fromhex(d) for d in self.task.digests])

    def detached(self, conn: BlockProtocol, reason: str) -> None:
        self.conns.discard(conn)

    def on_bitfield(self, conn: BlockProtocol) -> None:
        pass

    def on_have(self, conn: BlockProtocol, index: int) -> None:
        pass

    def on_piece(self, conn: BlockProtocol, index: int, data: bytearray) -> None:
        pass

    def on_reject(self, conn: BlockProtocol, index: int, reason: int) -> None:
        pass

    def on_digests(self, conn: BlockProtocol, first: int, digests: list[bytes]) -> None:
        conn.abort("DIGESTS are sent by the seed only")

    def download_limits(self) -> list:
        return []

    def on_uploaded(self, conn: BlockProtocol, nbytes: int) -> None:
        self.task.seed_bytes += nbytes
        self.node.seed_bytes += nbytes

    # CDN listener
    def length_known(self, task: CdnTask) -> None:
        for conn in list(self.conns):
            conn.send_bitfield(task.available)

    def piece_ready(self, task: CdnTask, index: int) -> None:
        digest = bytes.fromhex(task.digests[index])
        for conn in list(self.conns):
            conn.send_digests(index, [digest])
            conn.send_have(index)

    def task_failed(self, task: CdnTask) -> None:
        for conn in list(self.conns):
            conn.abort(f"task failed: {task.error.message if task.error else 'unknown'}", E_TASK_FAILED)

    def task_done(self, task: CdnTask) -> None:
        pass


class _SchedulerFeed:
    """Keeps the scheduler's view of the seed in step with the CDN."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def length_known(self, task: CdnTask) -> None:
        self.scheduler.set_piece_count(task.task_id, task.piece_count or 0)

    def piece_ready(self, task: CdnTask, index: int) -> None:
        self.scheduler.seed_piece_ready(task.task_id, index)

    def task_failed(self, task: CdnTask) -> None:
        if task.error is not None and task.error.code == "SOURCE_CHANGED":
            # the members hold pieces of the old content: a new swarm starts
            self.scheduler.forget_task(task.task_id)
        else:
            self.scheduler.seed_lost(task.task_id)

    def task_done(self, task: CdnTask) -> None:
        pass


class SuperNode:
    """
    @param advertise_ip: the address peers use to reach the seed.
    @param block_port: the seed's block port (set once listening).
    """

    def __init__(self, cdn_factory: Any, scheduler: Scheduler, clock: Any, advertise_ip: str, block_port: int) -> None:
        self.clock = clock
        self.scheduler = scheduler
        self.advertise_ip = advertise_ip
        self.block_port = block_port
        self.seed_bytes = 0
        self._feed = _SchedulerFeed(scheduler)
        self._seeds: dict[str, SeedSide] = {}
        self.cdn: Cdn = cdn_factory(self._track)

    def _track(self, task: CdnTask) -> None:
        """A new CDN task: hook the seed and the scheduler onto it."""
        seed = self._seeds[task.task_id] = SeedSide(self, task)
        task.listeners.extend([self._feed, seed])
        if task.piece_count is not None:
            self.scheduler.set_piece_count(task.task_id, task.piece_count)
            if task.available is not None:
                for i in task.available:
                    self.scheduler.seed_piece_ready(task.task_id, i)

    def seed_side(self, task_id: str) -> SeedSide | None:
        """The seed's L{TaskSide} for block connections, or None."""
        task = self.cdn.tasks.get(task_id)
        if task is None or task.status == "failed":
            return None
        return self._seeds.get(task_id)

    def remove_task(self, task_id: str) -> CdnTask | None:
        """Drop a task from the cache and its swarm (an admin's C{DELETE}); the task, or None if unknown."""
        task = self.cdn.remove(task_id)
        if task is not None:
            self.scheduler.forget_task(task_id)
            self._seeds.pop(task_id, None)
        return task

    def seed_parent(self) -> dict[str, Any]:
        return {"peerId": SEED_ID, "ip": self.advertise_ip, "port": self.block_port, "seed": True}

    def decide(self, task_id: str, peer_id: str, starving: bool = False) -> Decision:
        return self.scheduler.sync(task_id, peer_id, self.clock.seconds(), starving)

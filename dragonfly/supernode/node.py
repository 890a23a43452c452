"""
The SuperNode's domain object: the CDN, the scheduler and the seed, tied together.

The REST API (L{dragonfly.supernode.api}) is a thin layer over L{SuperNode};
the seed's block connections resolve tasks through L{SuperNode.seed_side}.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.application.internet import TimerService
from twisted.logger import Logger, LogLevel

from ..core.bitmap import Bitmap
from ..core.gc import GcEntry
from ..core.logs import task_log
from ..core.metrics import FAST_SECONDS, Distribution
from ..core.pieces import piece_span
from ..protocol.block import E_TASK_FAILED, BlockProtocol
from .cdn import Cdn, CdnTask
from .dashboard import SAMPLE_INTERVAL, TrafficHistory
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
        self._fd: int | None = None  # the data file, read-only, for zero-copy uploads
        self._opening = False
        self._closed = False

    # TaskSide
    def local_bitmap(self) -> Bitmap | None:
        return self.task.available

    def piece_length(self, index: int) -> int | None:
        if self.task.length is None:
            return None
        return piece_span(index, self.task.length, self.task.piece_size)[1]

    def read_piece(self, index: int) -> Any:
        return self.node.cdn.read_piece(self.task, index)

    def piece_file(self, index: int) -> tuple[int, int, int] | None:
        """
        (fd, offset, length) of a verified piece in the CDN's data file, for
        sendfile; None until the file is open (it opens in the pool on the
        first call) or when the piece is not published.
        """
        task = self.task
        if self._fd is None:
            self._open()
            return None
        if task.status == "failed" or task.length is None or task.available is None or index not in task.available:
            return None
        task.last_access = self.clock.seconds()
        offset, size = piece_span(index, task.length, task.piece_size)
        return (self._fd, offset, size)

    def _open(self) -> None:
        if self._opening or self._closed:
            return
        self._opening = True

        def opened(fd: int) -> None:
            self._opening = False
            if self._closed:
                self.node.cdn.close_data(fd)
            else:
                self._fd = fd

        def failed(f: Any) -> None:
            self._opening = False  # not there yet: read_piece serves, the next call tries again

        self.node.cdn.open_data(self.task).addCallbacks(opened, failed)

    def close(self) -> None:
        """The task is gone from the seed: its connections are closed first, then its file."""
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None:
            self.node.cdn.close_data(fd)

    def attached(self, conn: BlockProtocol) -> None:
        self.conns.add(conn)
        if self.task.digests:
            conn.send_digests(0, [bytes.fromhex(d) for d in self.task.digests])

    def detached(self, conn: BlockProtocol, reason: str) -> None:
        self.conns.discard(conn)
        if conn.bytes_out:
            task_log(
                log, LogLevel.info, self.task.task_id, "seed sent {bytes} bytes to {peerId} ({why})",
                peerId=conn.remote_id, bytes=conn.bytes_out, why=reason,
            )

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
        self.node.seed_pieces += 1

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
        self.close()

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
    @param timer: seconds for measuring the scheduler (a fake in tests).
    """

    def __init__(
        self, cdn_factory: Any, scheduler: Scheduler, clock: Any, advertise_ip: str, block_port: int,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.clock = clock
        self.timer = timer
        self.scheduler = scheduler
        self.advertise_ip = advertise_ip
        self.block_port = block_port
        # totals for /metrics (dragonfly.supernode.metrics)
        self.seed_bytes = 0
        self.seed_pieces = 0
        self.schedule_seconds = Distribution(FAST_SECONDS)
        #: piece bytes peers received from other peers, as they report in sync
        self.peer_bytes = 0
        self.task_peer_bytes: dict[str, int] = {}
        self.traffic = TrafficHistory()
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
            seed = self._seeds.pop(task_id, None)
            if seed is not None:
                seed.close()
        return task

    def seed_parent(self) -> dict[str, Any]:
        return {"peerId": SEED_ID, "ip": self.advertise_ip, "port": self.block_port, "seed": True}

    def decide(self, task_id: str, peer_id: str, starving: bool = False, want: int | None = None) -> Decision:
        return self.scheduler.sync(task_id, peer_id, self.clock.seconds(), starving, want)

    def sync(
        self, task_id: str, peer_id: str, have: list[int], failed: list[tuple[int, str]], banned: list[str],
        starving: bool = False, want: int | None = None,
    ) -> Decision:
        """A peer's sync: take its report, then choose its parents and seed allowance (timed)."""
        start = self.timer()
        try:
            self.scheduler.report(task_id, peer_id, self.clock.seconds(), have=have, failed=failed, banned=banned)
            return self.decide(task_id, peer_id, starving, want)
        finally:
            self.schedule_seconds.observe(self.timer() - start)

    def join(self, task_id: str, peer_id: str) -> None:
        """
        Peer C{peer_id} takes part in the CDN task C{task_id}.  A swarm the
        scheduler dropped as idle (C{--task-expire}) is rebuilt from the CDN's
        state, so the seed serves it again.
        """
        task = self.cdn.tasks.get(task_id)
        swarm = self.scheduler.tasks.get(task_id)
        if task is not None:
            task.last_access = self.clock.seconds()
            if task.piece_count is not None and (swarm is None or swarm.seed_has is None):
                self.scheduler.set_piece_count(task_id, task.piece_count)
                if task.available is not None:
                    for i in task.available:
                        self.scheduler.seed_piece_ready(task_id, i)
        self.scheduler.join(task_id, peer_id, self.clock.seconds())

    # -- garbage collection --------------------------------------------------

    def in_use(self, task_id: str) -> bool:
        """
        Being fetched from the origin, sent to a peer, or downloaded by a
        live peer that does not hold it whole yet: never evicted.
        """
        task = self.cdn.tasks.get(task_id)
        if task is None:
            return False
        if task.status in ("waiting", "running"):
            return True
        seed = self._seeds.get(task_id)
        if seed is not None and any(c.uploading for c in seed.conns):
            return True
        swarm = self.scheduler.tasks.get(task_id)
        if swarm is not None:
            for member in swarm.members.values():
                if not member.done and member.peer_id in self.scheduler.peers:
                    return True
        return False

    def gc_entries(self) -> list[GcEntry]:
        """The CDN tasks on disk, for the disk collector."""
        return [
            GcEntry(t.task_id, t.disk_size, t.last_access, self.in_use(t.task_id))
            for t in self.cdn.tasks.values()
            if t.status in ("success", "failed")
        ]

    def evictable(self, task_id: str) -> bool:
        return task_id in self.cdn.tasks and not self.in_use(task_id)

    def evict(self, task_id: str) -> Any:
        """
        Drop a cached task: its seed connections close, the scheduler stops
        handing out its pieces from the seed, its files are deleted in the
        pool.  Peers that hold it keep serving it; the next new peer has the
        CDN fetch it from the origin again.
        """
        log.info("evicting task {task} from the CDN cache", task=task_id)
        seed = self._seeds.pop(task_id, None)
        if seed is not None:
            for conn in list(seed.conns):
                conn.abort("task evicted from the CDN cache", E_TASK_FAILED)
            seed.close()
        self.scheduler.seed_lost(task_id)
        self.task_peer_bytes.pop(task_id, None)  # the dashboard's per-task total goes with it
        return self.cdn.evict(task_id)

    def note_peer_bytes(self, task_id: str, nbytes: int) -> None:
        """A peer received C{nbytes} of C{task_id} from other peers since its last sync."""
        if nbytes > 0:
            self.peer_bytes += nbytes
            self.task_peer_bytes[task_id] = self.task_peer_bytes.get(task_id, 0) + nbytes

    def sample_traffic(self) -> None:
        """Add the traffic counters, as they are now, to the history."""
        self.traffic.add(self.clock.seconds(), self.cdn.origin_bytes, self.seed_bytes, self.peer_bytes)

    def traffic_sampler(self, interval: float = SAMPLE_INTERVAL) -> TimerService:
        """A service that samples the traffic every C{interval} seconds on our clock."""
        service = TimerService(interval, self.sample_traffic)
        service.clock = self.clock
        return service

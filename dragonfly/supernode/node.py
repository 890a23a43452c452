"""
The SuperNode's domain object: the CDN, the scheduler and the seed, tied together.

L{SuperNode} is the facade the REST API (L{dragonfly.supernode.api}) calls:
one method per operation (L{SuperNode.register_peer}, L{SuperNode.register_task},
L{SuperNode.sync}, ...) that takes the request's typed message
(L{dragonfly.protocol.supernode_api}), coordinates the CDN and the scheduler,
and returns an attrs result, or raises L{Refused} with a stable code.  The
handlers only parse, authorise and serialise.  The seed's block connections
resolve tasks through L{SuperNode.seed_side}.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.logger import Logger, LogLevel

from ..core.bitmap import Bitmap
from ..core.bodywriter import CDN_DIRECT_WRITES
from ..core.distribution import FAST_SECONDS, Distribution
from ..core.gc import GcEntry
from ..core.headers import safe_header_map
from ..core.ids import BadInput, check_url, parse_digest
from ..core.ids import task_id as make_task_id
from ..core.logs import safe_url, task_log
from ..core.pieces import piece_span
from ..core.piecetag import Origin, PieceKey, origin_from_json, origin_json
from ..core.ranges import BadRange, ByteRange, parse_range
from ..core.security import OriginDenied
from ..core.traffic import SAMPLE_INTERVAL, TrafficHistory
from ..protocol.block import E_TASK_FAILED, BlockProtocol
from ..protocol.supernode_api import (
    HEARTBEAT_INTERVAL,
    SYNC_INTERVAL,
    Parent,
    PeerRegistered,
    PeerRegistration,
    SyncReport,
    TaskRequest,
    range_identifier,
)
from .cdn import Cdn, CdnTask
from .resume import if_range_value
from .scheduler import SEED_ID, Decision, PeerInfo, Scheduler, UnknownPeer, UnknownTask

if TYPE_CHECKING:
    from twisted.application.internet import TimerService

log = Logger()

#: what a tag that did not check was to vouch for (the takeover counters of /metrics)
TAG_KINDS = ("origin", "piece", "sha256")

#: a sync's peerBytes above this is nonsense (and beyond what JavaScript counts exactly)
MAX_PEER_BYTES = 1 << 50


class Refused(Exception):
    """
    An operation the SuperNode will not do, with a stable code
    (C{PEER_UNKNOWN}, C{TASK_UNKNOWN}, C{TASK_CHANGED}, C{ORIGIN_DENIED},
    C{BAD_FIELD}, ...): the API answers it as its error envelope.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@frozen
class TaskRegistration:
    """L{SuperNode.register_task}'s result: the task id and the CDN task (fetching, or cached)."""

    task_id: str
    task: CdnTask


@frozen
class SyncResult:
    """L{SuperNode.sync}'s result: the task, digests from C{digests_from} on, parents and the seed allowance."""

    task: CdnTask
    digests_from: int
    digests: list[str]
    parents: list[Parent]
    seed_pieces: list[int]
    sync_interval: float = SYNC_INTERVAL
    #: with a piece key: the tags of the pieces from C{tags_from} on, and the tagged origin
    tags_from: int = 0
    tags: list[str] | None = None
    origin: dict[str, Any] | None = None


#: the sync interval of a peer waiting for a piece a side fetch is bringing
SIDE_SYNC_INTERVAL = 0.02
#: a registration with a range or C{waitLength} waits this long for the origin's length
REGISTER_LENGTH_WAIT = 2.0
#: registered ranges kept for the seed's choice (the oldest go first)
MAX_WANTED_PEERS = 10000
#: a task taken over from its swarm waits this long for the peers to
#: re-announce (each within a sync interval or two of its owner's death)
#: before it asks the origin for the pieces none of them holds, and then
#: until no peer has re-announced for TAKEOVER_QUIET seconds (at most
#: TAKEOVER_WAIT seconds in all)
TAKEOVER_GRACE = 2.0
TAKEOVER_QUIET = 0.5
TAKEOVER_WAIT = 5.0
#: and then looks again for pieces nobody holds at most this often
FILL_EVERY = 0.25
#: piece tags in one sync answer at most
MAX_TAGS = 1024


def _wanted_range(value: str | None) -> ByteRange | None:
    """A registration's C{range}: one byte range, or None; anything else is refused."""
    if value is None:
        return None
    try:
        spec = parse_range(value)
    except BadRange as e:
        raise Refused("BAD_FIELD", f"field 'range': {e}") from None
    if not isinstance(spec, ByteRange):
        raise Refused("BAD_FIELD", "field 'range' must be one byte range, as bytes=FIRST-LAST, bytes=FIRST- or bytes=-COUNT")
    return spec


def digest_runs(digests: list[str | None]) -> list[tuple[int, list[str]]]:
    """The runs of known digests in C{digests}: C{(first index, digests)} each."""
    runs: list[tuple[int, list[str]]] = []
    run: list[str] = []
    for i, d in enumerate(digests):
        if d is not None:
            run.append(d)
        elif run:
            runs.append((i - len(run), run))
            run = []
    if run:
        runs.append((len(digests) - len(run), run))
    return runs


def known_from(digests: list[str | None], first: int) -> list[str]:
    """The digests from C{first} on up to the first one not known yet (a sync answer's list has no holes)."""
    out: list[str] = []
    for d in digests[first:]:
        if d is None:
            break
        out.append(d)
    return out


@frozen
class Health:
    """L{SuperNode.health}'s result: how many tasks and peers it knows."""

    tasks: int
    peers: int


@frozen
class TaskDetail:
    """L{SuperNode.task_detail}'s result."""

    task: CdnTask
    peers: list[str]
    availability: list[int]


class SeedSide:
    """The seed end of one CDN task: serves verified pieces, never downloads."""

    accepts_pieces = False

    def __init__(self, node: SuperNode, task: CdnTask) -> None:
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

    def warm_piece(self, index: int) -> Any:
        """
        Read a published piece into the page cache in the pool before a block
        upload sends it (L{dragonfly.protocol.upload}): only when the CDN
        writes with C{O_DIRECT} (DRAGONFLY_CDN_DIRECT_WRITES=1); its pieces
        are in the page cache otherwise.  With readahead, or exactly the piece when the file
        may hold unwritten ranges past it (L{Cdn.warm_piece}).
        """
        if not CDN_DIRECT_WRITES:
            return None
        span = self.piece_file(index)
        if span is None:
            return None
        return self.node.cdn.warm_piece(self.task, *span)

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
        if self._fd is None:
            # open the file now, so the first request is sent from it too (not
            # read into a piece-sized copy in the pool while it opens)
            self._open()
        # each run of known digests (a side fetch stores pieces out of order)
        for first, run in digest_runs(self.task.digests):
            conn.send_digests(first, [bytes.fromhex(d) for d in run])

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
        assert task.available is not None  # known with the length
        for conn in list(self.conns):
            conn.send_bitfield(task.available)

    def piece_ready(self, task: CdnTask, index: int) -> None:
        known = task.digests[index]
        assert known is not None  # recorded before the piece is published
        digest = bytes.fromhex(known)
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
        timer: Callable[[], float] = time.perf_counter, piece_key: PieceKey | None = None,
    ) -> None:
        self.clock = clock
        #: the cluster's piece key (C{--piece-key-file}): tags on the digests handed out, takeovers
        self.piece_key = piece_key
        # task id -> (version, piece size, the tags of the first pieces), and the tagged origin
        self._tags: dict[str, tuple[str | None, int, list[str]]] = {}
        self._origins: dict[str, tuple[Any, dict[str, Any]]] = {}
        # adopted task id -> (when it may ask the origin, when it last looked, when a peer last re-announced)
        self._fill_at: dict[str, list[float]] = {}
        self.adopted_pieces = 0  # digests adopted from peers' tags
        self.refused_tags = 0  # tags that did not check
        #: those by what they were to vouch for: "origin" (a takeover), "piece", "sha256"
        self.refused_tag_kinds: dict[str, int] = dict.fromkeys(TAG_KINDS, 0)
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
        # (task id, peer id) -> the byte range a peer registered with, the
        # seed's first choice for it until the peer says what it streams
        self._wanted: dict[tuple[str, str], ByteRange] = {}
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
        self._forget_tags(task_id)
        if task is not None:
            self.scheduler.forget_task(task_id)
            seed = self._seeds.pop(task_id, None)
            if seed is not None:
                seed.close()
        return task

    def seed_parent(self) -> Parent:
        return Parent(SEED_ID, self.advertise_ip, self.block_port, seed=True)

    def decide(self, task_id: str, peer_id: str, starving: bool = False, want: int | None = None) -> Decision:
        return self.scheduler.sync(task_id, peer_id, self.clock.seconds(), starving, want)

    # -- the facade: one method per API operation ------------------------------------

    def register_peer(self, reg: PeerRegistration) -> PeerRegistered:
        """A dfpeer (re-)registers: where its block port is."""
        if reg.peer_id == SEED_ID:
            raise Refused("BAD_PEER_ID", f"peer id {SEED_ID!r} is reserved for the seed")
        info = PeerInfo(reg.peer_id, reg.ip, reg.port, reg.hostname[:255])
        self.scheduler.register_peer(info, self.clock.seconds())
        return PeerRegistered(reg.peer_id, HEARTBEAT_INTERVAL)

    def heartbeat(self, peer_id: str) -> None:
        try:
            self.scheduler.touch(peer_id, self.clock.seconds())
        except UnknownPeer:
            raise Refused("PEER_UNKNOWN", f"peer {peer_id} is not registered") from None

    def remove_peer(self, peer_id: str) -> None:
        """The peer leaves (or an admin removes it): out of every swarm."""
        self.scheduler.remove_peer(peer_id, "left")

    def peers(self) -> list[PeerInfo]:
        """The registered peers."""
        return list(self.scheduler.peers.values())

    def tasks(self) -> list[CdnTask]:
        """The CDN's tasks, oldest first."""
        return list(self.cdn.tasks.values())

    def health(self) -> Health:
        return Health(len(self.cdn.tasks), len(self.scheduler.peers))

    def _known_peer(self, peer_id: str) -> None:
        if peer_id not in self.scheduler.peers:
            raise Refused("PEER_UNKNOWN", f"peer {peer_id} is not registered")

    def cdn_task(self, task_id: str) -> CdnTask:
        task = self.cdn.tasks.get(task_id)
        if task is None:
            raise Refused("TASK_UNKNOWN", f"task {task_id} is not known")
        return task

    async def register_task(self, req: TaskRequest, origin_policy: Any = None, resolver_pool: Any = None) -> TaskRegistration:
        """
        A peer takes part in a task: the task id is computed, the origin
        checked against C{origin_policy}, the CDN starts (or revalidates)
        its fetch, and the peer joins the swarm afresh.
        """
        if not safe_header_map(req.headers):
            raise Refused("BAD_FIELD", "field 'headers' must map header names to strings")
        try:
            check_url(req.url)
            if req.digest:
                parse_digest(req.digest)
        except BadInput as e:
            raise Refused("BAD_INPUT", str(e)) from None
        tid = make_task_id(req.url, digest=req.digest, identifier=req.identifier, filter_keys=req.filter)
        wanted = _wanted_range(req.range)
        if not req.prefetch and (
            wanted is None or req.digest or not (req.identifier or "").endswith(range_identifier("", wanted.header()))
        ):
            raise Refused(
                "BAD_FIELD",
                "field 'prefetch' false needs a 'range' (the task is those bytes), no 'digest', "
                "and an 'identifier' ending in '#range=' and the range",
            )
        self._known_peer(req.peer_id)
        if origin_policy is not None and not origin_policy.open:
            try:
                await origin_policy.check_url(req.url, resolver_pool, self.clock)
            except OriginDenied as e:
                raise Refused("ORIGIN_DENIED", str(e)) from None
            except OSError:
                # not resolvable from here: the fetch reports SOURCE_UNREACHABLE
                # (and checks the address again if it ever connects)
                pass
        # the origin is fetched with the URL as given: filtered keys (signatures,
        # tokens) only leave the task id; a cached file is revalidated first
        fetches = self.cdn.origin_fetches
        if not req.prefetch:
            # the task is the range alone: the CDN asks the origin for those bytes only
            task = self.cdn.ensure(tid, req.url, req.headers, None, fetch_range=wanted)
            wanted = None
        else:
            task = self._take_over(tid, req) or await self.cdn.fresh(tid, req.url, req.headers, req.digest)
        self._known_peer(req.peer_id)
        if wanted is not None:
            # a Range request: its pieces may come from the origin out of order
            self.cdn.want(task, wanted)
            if len(self._wanted) >= MAX_WANTED_PEERS:
                self._wanted.pop(next(iter(self._wanted)))
            self._wanted[(tid, req.peer_id)] = wanted
        if (wanted is not None or req.wait_length) and task.length is None and task.status in ("waiting", "running"):
            # the peer's first sync then has the length (and a range's pieces
            # in its seed allowance): no sync interval lost; a dfpeer asks for
            # it (waitLength) rather than polling every 20 ms meanwhile
            task = await self.cdn.length_wait(task, REGISTER_LENGTH_WAIT)
            self._known_peer(req.peer_id)
        task_log(
            log, LogLevel.info, tid, "registered by {peerId} ({cache}, CDN {status})",
            peerId=req.peer_id, cache="cache miss" if self.cdn.origin_fetches > fetches else "cache hit",
            status=task.status, url=safe_url(req.url),
        )
        # a registration starts the peer's part afresh: what it reported
        # before (pieces of a download that failed and was deleted) is gone;
        # a peer that still holds pieces reports them in its next sync
        self.scheduler.leave(tid, req.peer_id)
        # named to no other peer as a parent until a sync says its file is made
        self.join(tid, req.peer_id, preparing=True)
        return TaskRegistration(tid, task)

    def task_detail(self, task_id: str) -> TaskDetail:
        task = self.cdn_task(task_id)
        swarm = self.scheduler.tasks.get(task_id)
        return TaskDetail(task, sorted(swarm.members) if swarm is not None else [], self.scheduler.availability(task_id))

    async def delete_task(self, task_id: str) -> CdnTask:
        """An admin's C{DELETE}: the task leaves the cache and its swarm; answered once its files are gone."""
        task = self.remove_task(task_id)
        if task is None:
            raise Refused("TASK_UNKNOWN", f"task {task_id} is not known")
        await self.cdn.settled(task_id)
        return task

    def leave_task(self, task_id: str, peer_id: str) -> None:
        """The peer no longer holds the task (it evicted it)."""
        self.scheduler.leave(task_id, peer_id)
        self._wanted.pop((task_id, peer_id), None)

    def sync(self, task_id: str, report: SyncReport) -> SyncResult:
        """
        A peer's sync: check its report against the task, take it, then
        choose its parents and seed allowance (timed for /metrics).
        """
        task = self.cdn_task(task_id)
        count = task.piece_count or 0
        if count and any(i >= count for i in report.have):
            raise Refused("BAD_FIELD", f"field 'have' must hold integers in 0..{count - 1}")
        # -1: the peer could not connect to that parent at all
        for f in report.failed:
            if count and f.index >= count:
                raise Refused("BAD_FIELD", f"failed piece {f.index} out of range")
        if report.want is not None and not report.want < max(count, 1):
            raise Refused("BAD_FIELD", f"field 'want' must be a piece index below {count}")
        if report.version is not None and task.version is not None and report.version != task.version:
            raise Refused(
                "TASK_CHANGED",
                f"the origin content of task {task_id} changed: version {task.version}, not {report.version}",
            )
        self._known_peer(report.peer_id)
        task.last_access = self.clock.seconds()
        if task_id not in self.scheduler.tasks:
            # the swarm was dropped as idle (--task-expire): rebuild it
            self.join(task_id, report.peer_id)
        if report.proofs and task.adopted:
            self._adopt_proofs(task, report)
        # before the length is known (a restarted SuperNode) the scheduler keeps them for later
        have = list(report.have)
        failed = [(f.index, f.parent) for f in report.failed]
        start = self.timer()
        try:
            self.scheduler.report(
                task_id, report.peer_id, self.clock.seconds(), have=have, failed=failed, banned=list(report.banned),
                preparing=report.preparing,
            )
            want = self._want(task, report)
            decision = self.decide(task_id, report.peer_id, report.starving, want)
        except UnknownTask:
            raise Refused("TASK_UNKNOWN", f"task {task_id} is not known") from None
        finally:
            self.schedule_seconds.observe(self.timer() - start)
        if task.adopted:
            self._fill(task)
        # counted only once the report is taken: a peer told to register
        # again sends these bytes again with its next sync
        self.note_peer_bytes(task_id, report.peer_bytes)
        parents = [self.seed_parent()] if task.status != "failed" else []
        parents.extend(Parent(p.peer_id, p.ip, p.port) for p in decision.parents)
        interval = SYNC_INTERVAL
        if want is not None and task.available is not None and want not in task.available and self.cdn.side_fetching(task, want):
            # the piece its reader waits for is on its way from the origin out of order: ask again soon
            interval = SIDE_SYNC_INTERVAL
        tags, origin = self._tagged(task, report.tags_from)
        return SyncResult(
            task, report.digests_from, known_from(task.digests, report.digests_from), parents, decision.seed_pieces,
            interval, report.tags_from, tags, origin,
        )

    # -- piece tags and takeovers (see dragonfly.core.piecetag) --------------------------

    def _tagged(self, task: CdnTask, first: int) -> tuple[list[str] | None, dict[str, Any] | None]:
        """
        With a piece key: the tags of the pieces from C{first} on (up to the
        first digest not known, at most L{MAX_TAGS}), and the tagged origin
        when the peer has no tag yet or gets new ones; (None, None) without
        a key, or for a task no takeover could pin (no validator, one range).
        """
        key = self.piece_key
        if key is None or task.status == "failed" or task.validators.get("range") or if_range_value(task.validators) is None:
            return None, None
        origin = Origin.from_validators(task.validators, task.piece_size)
        if origin is None:
            return None, None
        tid = task.task_id
        cached = self._tags.get(tid)
        if cached is None or cached[0] != task.version or cached[1] != task.piece_size:
            cached = self._tags[tid] = (task.version, task.piece_size, [])
        tags = cached[2]
        while len(tags) < len(task.digests):
            digest = task.digests[len(tags)]
            if digest is None:
                break
            tags.append(key.piece_tag(tid, origin, len(tags), digest))
        out = tags[first:first + MAX_TAGS]
        if first and not out:
            return out, None
        made = self._origins.get(tid)
        which = (task.version, task.piece_size, task.sha256)
        if made is None or made[0] != which:
            made = self._origins[tid] = (which, origin_json(key, tid, origin, task.sha256))
        return out, made[1]

    def _take_over(self, tid: str, req: TaskRequest) -> CdnTask | None:
        """
        A peer re-registers a task this node does not know with the tagged
        origin of the pieces it holds (its SuperNode died): when the tag
        checks, the task is adopted from its swarm (L{Cdn.adopt}) instead of
        fetched whole; None: the usual registration goes on.
        """
        key, given = self.piece_key, req.takeover
        if key is None or given is None:
            return None
        known = self.cdn.tasks.get(tid)
        if known is not None and known.status != "failed":
            return None
        origin = origin_from_json(given)
        if (
            origin is None
            or not origin.length > 0
            or if_range_value(origin.validators()) is None
            or not key.check_origin(tid, origin, given.get("tag"))
        ):
            self._refused("origin")
            task_log(
                log, LogLevel.warn, tid, "takeover offered by {peerId} not taken: its origin tag does not check",
                peerId=req.peer_id,
            )
            return None
        task = self.cdn.adopt(tid, req.url, req.headers, req.digest, origin.validators(), origin.piece_size)
        sha = given.get("sha256")
        if sha is not None and task.sha256 is None:
            if key.check_sha256(tid, origin, sha, given.get("sha256Tag")):
                task.sha256 = sha
            else:
                self._refused("sha256")
                task_log(log, LogLevel.warn, tid, "the whole-file SHA-256 from {peerId} is not taken: its tag does not check", peerId=req.peer_id)
        now = self.clock.seconds()
        self._fill_at[tid] = [now + TAKEOVER_GRACE, 0.0, now]
        return task

    def _refused(self, kind: str, n: int = 1) -> None:
        """C{n} tags that did not check (forged, for another key or version, or missing), for /metrics."""
        self.refused_tags += n
        self.refused_tag_kinds[kind] = self.refused_tag_kinds.get(kind, 0) + n

    def _adopt_proofs(self, task: CdnTask, report: SyncReport) -> None:
        """Adopt the digests of an adopted task a peer vouches for with tags that check; the rest is ignored."""
        key = self.piece_key
        origin = Origin.from_validators(task.validators, task.piece_size)
        if key is None or origin is None:
            return
        new: list[tuple[int, str]] = []
        bad = 0
        for p in report.proofs:
            if not isinstance(p.index, int) or not 0 <= p.index < len(task.digests) or task.digests[p.index] is not None:
                continue
            if not key.check_piece(task.task_id, origin, p.index, p.digest, p.tag):
                bad += 1
                continue
            if self.cdn.adopt_digest(task, p.index, p.digest):
                new.append((p.index, p.digest))
        self.adopted_pieces += len(new)
        self._refused("piece", bad)
        at = self._fill_at.get(task.task_id)
        if at is not None:
            at[2] = self.clock.seconds()  # a peer re-announced: others may be on their way
        if bad:
            task_log(
                log, LogLevel.warn, task.task_id, "{n} piece tags from {peerId} do not check: those pieces are not adopted",
                n=bad, peerId=report.peer_id,
            )
        seed = self._seeds.get(task.task_id)
        if new and seed is not None:
            # peers learn digests from the seed too (a new peer of the swarm)
            for conn in list(seed.conns):
                for index, digest in new:
                    conn.send_digests(index, [bytes.fromhex(digest)])

    def _fill(self, task: CdnTask) -> None:
        """
        An adopted task, once the peers had their time to re-announce: ask
        the origin for the pieces no member holds with a digest vouched for
        (at most every L{FILL_EVERY} seconds, at a sync).
        """
        tid, now = task.task_id, self.clock.seconds()
        at = self._fill_at.setdefault(tid, [now + TAKEOVER_GRACE, 0.0, now])
        if task.status != "running" or now < at[0] or now - at[1] < FILL_EVERY:
            return
        if now - at[2] < TAKEOVER_QUIET and now < at[0] - TAKEOVER_GRACE + TAKEOVER_WAIT:
            return  # peers are still re-announcing
        at[1] = now
        available = task.available
        if available is None:
            return
        holders = self.scheduler.availability(tid)
        missing = [
            i for i, d in enumerate(task.digests)
            if i not in available and (d is None or i >= len(holders) or holders[i] == 0)
        ]
        if not missing:
            return
        asked = self.cdn.fill(task, missing)
        if asked:
            task_log(
                log, LogLevel.info, tid, "asking the origin for {n} pieces no peer holds ({runs})",
                n=sum(e - f for f, e in asked), runs=", ".join(f"{f}..{e - 1}" for f, e in asked),
            )

    def _want(self, task: CdnTask, report: SyncReport) -> int | None:
        """The piece a peer's reader waits for: as it reports, else the first of the range it registered with."""
        key = (task.task_id, report.peer_id)
        if report.want is not None:
            self._wanted.pop(key, None)
            return report.want
        spec = self._wanted.get(key)
        if spec is None or task.length is None or not task.piece_size:
            return None
        span = spec.resolve(task.length)
        if span is None:
            self._wanted.pop(key, None)
            return None
        return span[0] // task.piece_size

    def join(self, task_id: str, peer_id: str, preparing: bool = False) -> None:
        """
        Peer C{peer_id} takes part in the CDN task C{task_id} (C{preparing}:
        it just registered, see L{Member.preparing}).  A swarm the
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
        self.scheduler.join(task_id, peer_id, self.clock.seconds(), preparing)

    # -- garbage collection --------------------------------------------------

    def in_use(self, task_id: str) -> bool:
        """
        Being fetched from the origin, sent to a peer, or downloaded by a
        live peer that does not hold it whole yet: never evicted.  A task
        taken over whose swarm holds it whole (L{CdnTask.peer_held}) counts
        as finished.
        """
        task = self.cdn.tasks.get(task_id)
        if task is None:
            return False
        if task.status in ("waiting", "running") and not task.peer_held:
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
            if t.status in ("success", "failed") or t.peer_held
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
        self._forget_tags(task_id)
        return self.cdn.evict(task_id)

    def _forget_tags(self, task_id: str) -> None:
        self._tags.pop(task_id, None)
        self._origins.pop(task_id, None)
        self._fill_at.pop(task_id, None)

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
        from twisted.application.internet import TimerService  # not on a restart's way (the SuperNode's tap)

        service = TimerService(interval, self.sample_traffic)
        service.clock = self.clock
        return service

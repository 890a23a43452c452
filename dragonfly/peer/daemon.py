"""
The dfpeer daemon: one per host (per C{--home}).

It listens for block connections from other peers, registers with the
SuperNode and heartbeats, runs downloads for dfget (and dfdaemon) through its
local API, and keeps serving what it has.  Its local API address is written to
C{<home>/peer.json} so that C{dfget --home DIR} finds it.
"""

from __future__ import annotations

import os
import re
import socket
import time
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import Logger

from ..core.bodywriter import BodyError, ChunkedFileWriter, DiscardBody
from ..core.gc import GcEntry
from ..core.ids import task_id as make_task_id
from ..core.partwrite import drop_bank
from ..core.periodic import periodic
from ..core.ratelimit import TokenBucket
from ..core.service import ListeningService
from ..core.threads import WorkerPool
from ..protocol.block import E_NO_TASK, BlockFactory
from ..protocol.receive import BufferPool
from ..protocol.supernode_api import PeerRegistration, SyncReport
from .client import SupernodeClient, SupernodeError, SupernodeUnavailable
from .lifecycle import State
from .metrics import PeerStats, failure_reason
from .neighbours import Neighbours
from .session import TaskSession
from .source import RangeCollector, byte_span, parse_content_range
from .store import PieceStore
from .task import PeerTask, TaskFailed

log = Logger()

#: in the home: the wall-clock time a SuperNode last answered this dfpeer (see L{PeerDaemon.supernode_seen})
SEEN_FILE = "supernode-seen"
#: seconds between two writes of it
SEEN_WRITE_EVERY = 5.0


def make_peer_id(ip: str, port: int) -> str:
    host = re.sub(r"[^A-Za-z0-9.\-]", "-", socket.gethostname())[:24] or "host"
    return f"{host}-{ip}-{port}"[:64]


class PeerDaemon:
    """
    @param nodes: SuperNode addresses (C{host:port}).
    @param ip: the address other peers reach our block port at.
    """

    def __init__(
        self,
        reactor: Any,
        home: str,
        nodes: list[str],
        ip: str,
        pool: WorkerPool,
        http: Any,
        per_connection: int = 1,
        in_flight_bytes: int = 6 << 20,
        upload_limit: int = 0,
        total_limit: int = 0,
        supernode_http: Any = None,
        cluster_token: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.per_connection = per_connection
        self.in_flight_bytes = in_flight_bytes
        #: this host's downlink in bytes/s when known (dfpeer --link-rate): see L{Neighbours.limits}
        self.link_rate: int | None = None
        self.trace = bool(os.environ.get("DRAGONFLY_TRACE"))
        self.clock = reactor
        self.home = home
        self.ip = ip
        self.pool = pool
        self.http = http
        self.store = PieceStore(home, pool, clock=reactor)
        self.client = SupernodeClient(supernode_http or http, nodes, reactor, token=cluster_token)
        self.client.on_node_back.append(self._node_back)
        self.block_port = 0
        self.peer_id = ""
        self.block_factory = BlockFactory(
            "unregistered", self.side_for, clock=reactor,
            upload_limit=TokenBucket(upload_limit, reactor) if upload_limit else None,
        )
        self.total_limit = TokenBucket(total_limit, reactor) if total_limit else None
        self.tasks: dict[str, PeerTask] = {}
        self.stats = PeerStats()
        self.last_activity = reactor.seconds()
        self.registered = False
        self._supernode_seen: float | None = None
        self._seen_written: float | None = None

    @property
    def supernode_seen(self) -> float | None:
        """
        When (reactor seconds) a SuperNode last answered this dfpeer: a new
        download whose SuperNode does not answer waits for a restarting one
        when this is recent (L{PeerTask._register}).  It is kept in the home
        (L{SEEN_FILE}), so a dfpeer restarted while its SuperNode restarts
        waits too rather than sending its first downloads to the origin.
        """
        return self._supernode_seen

    @supernode_seen.setter
    def supernode_seen(self, when: float | None) -> None:
        self._supernode_seen = when
        if when is None or (self._seen_written is not None and when - self._seen_written < SEEN_WRITE_EVERY):
            return
        self._seen_written = when
        wall = time.time() - (self.reactor.seconds() - when)
        d = self.pool.run(_write_seen, os.path.join(self.home, SEEN_FILE), wall)
        d.addErrback(lambda f: log.info("cannot write {file}: {why}", file=SEEN_FILE, why=f.getErrorMessage()))

    def recall_supernode_seen(self) -> Deferred[None]:
        """At start: when a SuperNode last answered an earlier dfpeer on this home (read in the pool)."""

        def recalled(wall: float | None) -> None:
            if wall is None or self._supernode_seen is not None:
                return
            age = time.time() - wall
            if 0 <= age < 3600:
                self._supernode_seen = self.reactor.seconds() - age
                self._seen_written = self._supernode_seen

        return self.pool.run(_read_seen, os.path.join(self.home, SEEN_FILE)).addCallback(recalled)

    def listening(self, block_port: int) -> None:
        """The block port is bound: we know who we are."""
        self.block_port = block_port
        self.peer_id = make_peer_id(self.ip, block_port)
        self.block_factory.peer_id = self.peer_id

    # -- SuperNode -------------------------------------------------------------

    async def register(self) -> None:
        await self.client.register_peer(PeerRegistration(self.peer_id, self.ip, self.block_port, socket.gethostname()))
        self.supernode_seen = self.reactor.seconds()
        if not self.registered:
            log.info("registered as {peer} with supernode {node}", peer=self.peer_id, node=self.client.current)
        self.registered = True

    async def heartbeat(self) -> None:
        try:
            await self.client.heartbeat(self.peer_id)
            self.supernode_seen = self.reactor.seconds()
            await self._converge()
        except SupernodeError as e:
            if e.code == "PEER_UNKNOWN":
                await self.register()
                await self.announce()
        except SupernodeUnavailable:
            self.registered = False

    async def announce(self) -> None:
        """
        Tell the SuperNode about every finished task we serve (after a
        restart of either): one sync per task with all we hold and the
        version we hold, never a registration.  A registration is a
        download's: it revalidates a cached file with the origin and
        fetches what the CDN lacks, so re-announcing with one made a
        restarted SuperNode fetch new versions nobody asked for.  A task
        the SuperNode's cache holds takes us in its swarm; one it does not
        know (C{TASK_UNKNOWN}) is fetched once a download registers it.
        """
        for task in list(self.tasks.values()):
            if task.state is not State.DONE or not task.digests:
                continue
            try:
                await self._announce_pieces(task)
            except SupernodeError as e:
                if e.code == "TASK_CHANGED":
                    # the origin changed since we fetched it: what we hold is not that task any more
                    log.info("task {task}: the origin changed, dropping our copy", task=task.task_id)
                    self.drop(task)
                else:
                    log.info("could not announce {task}: {why}", task=task.task_id, why=str(e))
            except SupernodeUnavailable as e:
                log.info("could not announce {task}: {why}", task=task.task_id, why=str(e))

    def _node_back(self, node: str) -> None:
        """A SuperNode answers again: register with it, and announce there the finished tasks it owns."""

        async def back() -> None:
            if not self.peer_id:
                return
            try:
                await self.client.register_peer(
                    PeerRegistration(self.peer_id, self.ip, self.block_port, socket.gethostname()), node,
                )
            except (SupernodeError, SupernodeUnavailable) as e:
                log.info("could not register with supernode {node}: {why}", node=node, why=str(e))
                return
            await self._converge()

        Deferred.fromCoroutine(back())

    async def _converge(self) -> None:
        """
        Each finished task whose session is pinned to a node other than the
        first live one of its ranking (it failed over, and its owner is back)
        moves there: registered and announced, its copy is a seed of the
        owner's swarm, where new downloads go.
        """
        for task in list(self.tasks.values()):
            session = cast(TaskSession, task.session)  # made by self.session()
            pinned = session.pinned
            if task.state is not State.DONE or not task.digests or pinned is None:
                continue
            if self.client.route(task.task_id)[0] == pinned:
                continue
            session.unpin()
            try:
                await self._announce_pieces(task)
            except (SupernodeError, SupernodeUnavailable) as e:
                # tried again at the next heartbeat
                session.pinned = pinned
                if isinstance(e, SupernodeError) and e.code == "TASK_CHANGED":
                    log.info("task {task}: the origin changed, dropping our copy", task=task.task_id)
                    self.drop(task)
                else:
                    log.info("could not announce {task}: {why}", task=task.task_id, why=str(e))

    async def leave(self) -> None:
        try:
            await self.client.leave(self.peer_id)
        except (SupernodeError, SupernodeUnavailable):
            pass

    # -- tasks -----------------------------------------------------------------

    async def restore(self) -> int:
        """Serve again the tasks finished before a restart (their files are read in the pool)."""
        for meta in await self.store.reload():
            task = PeerTask(self, meta["taskId"], dict(meta.get("request") or {"url": meta.get("url")}))
            task.restore(meta)
            self.tasks[task.task_id] = task
        return len(self.tasks)

    def session(self, task_id: str, request: dict[str, Any]) -> TaskSession:
        """A task's calls to the SuperNode."""
        return TaskSession(self.client, lambda: self.peer_id, self.register, task_id, request)

    def endpoint(self, ip: str, port: int) -> TCP4ClientEndpoint:
        """A client endpoint to a neighbour's block port."""
        return TCP4ClientEndpoint(self.reactor, ip, port, timeout=5)

    async def _announce_pieces(self, task: PeerTask) -> None:
        """
        Tell the SuperNode every piece we hold of a finished task: one sync,
        with the pieces' digests and tags when a SuperNode tagged them (see
        L{dragonfly.core.piecetag}).  A node that does not know the task
        (C{TASK_UNKNOWN}: it took over from a dead owner, or restarted) is
        offered a takeover when we hold a tagged origin: a registration
        carrying it, which a node with the cluster's piece key answers by
        adopting the task from the swarm (no origin fetch for what the
        swarm holds), then the sync again.  Without a tagged origin the
        task waits for a download to register it, as before.
        """
        origin, proofs = task.held_proofs()
        report = SyncReport(
            self.peer_id, have=task.have or (), digests_from=task.count or 0, version=task.version,
            tags_from=task.pieces.tags_from, proofs=proofs,
        )
        try:
            await task.session.sync(report)
        except SupernodeError as e:
            if e.code != "TASK_UNKNOWN" or origin is None:
                raise
            await task.session.register(takeover=origin)
            await task.session.sync(report)

    def drop(self, task: PeerTask) -> None:
        """Forget a finished task and remove its file (its content is no longer the origin's)."""
        if self.tasks.get(task.task_id) is task:
            del self.tasks[task.task_id]
        task.removed()
        task.neighbours.close()
        d = self.store.remove(task.task_id)
        d.addErrback(lambda f: log.failure("cannot remove task {task}", f, task=task.task_id))

    async def download_checked(self, request: dict[str, Any]) -> PeerTask:
        """
        L{download}, but a finished copy of a URL task (not pinned by a
        digest) is first checked with the SuperNode, which revalidates it
        with the origin: a copy of content the origin no longer has is
        dropped and downloaded again.  When the SuperNode cannot be asked,
        the copy we verified is used.
        """
        tid = self._task_id(request)
        task = self.tasks.get(tid)
        if task is not None and task.state is State.DONE and not request.get("digest") and task.version is not None:
            try:
                reply = await task.session.register()
            except (SupernodeError, SupernodeUnavailable) as e:
                log.info("task {task}: cannot check our copy with the supernode ({why}); using it", task=tid, why=str(e))
            else:
                current = reply.task.version
                if current is not None and current != task.version and self.tasks.get(tid) is task:
                    log.info("task {task}: the origin changed since we fetched it; fetching it again", task=tid)
                    self.drop(task)
                else:
                    # the registration reset our part of the swarm: say again what we hold
                    try:
                        await self._announce_pieces(task)
                    except (SupernodeError, SupernodeUnavailable) as e:
                        log.info("could not announce {task}: {why}", task=tid, why=str(e))
        return self.download(request)

    def _task_id(self, request: dict[str, Any]) -> str:
        return make_task_id(
            request["url"], digest=request.get("digest"), identifier=request.get("identifier"),
            filter_keys=request.get("filter") or (),
        )

    def download(self, request: dict[str, Any]) -> PeerTask:
        """Start (or join) the download C{request} describes."""
        if request.get("totalLimit"):
            # dfget --totallimit: the host's download rate, for every task
            self.total_limit = TokenBucket(request["totalLimit"], self.reactor)
        tid = self._task_id(request)
        task = self.tasks.get(tid)
        if task is not None and task.state is not State.FAILED:
            task.last_access = self.reactor.seconds()
            return task
        task = PeerTask(self, tid, request)
        self.tasks[tid] = task
        self.note_activity()
        task.start()
        return task

    # -- garbage collection ----------------------------------------------------

    def gc_entries(self) -> list[GcEntry]:
        """The tasks in the store, for the disk collector."""
        return [
            GcEntry(t.task_id, t.length or 0 if t.state is State.DONE else 0, t.last_access, t.in_use())
            for t in self.tasks.values()
            if t.lifecycle.ended
        ]

    def evictable(self, task_id: str) -> bool:
        task = self.tasks.get(task_id)
        return task is not None and not task.in_use()

    def expire_tasks(self, ttl: float) -> list[str]:
        """The finished tasks nobody asked for or fetched a piece of within C{ttl} seconds."""
        now = self.reactor.seconds()
        return [
            t.task_id for t in self.tasks.values()
            if now - t.last_access > ttl and not t.in_use()
        ]

    async def evict(self, task_id: str) -> None:
        """
        Remove a task from the store: its connections close, its files are
        deleted in the pool, and the SuperNode is told we no longer hold it.
        A dfget that linked or copied the file keeps its copy.
        """
        task = self.tasks.pop(task_id, None)
        if task is None:
            return
        log.info("removing task {task} from the store", task=task_id)
        task.removed()
        task.neighbours.abort("task removed from this peer's store", E_NO_TASK)
        await self.store.remove(task_id)
        if self.registered and task.state is State.DONE:
            try:
                await self.client.leave_task(task_id, self.peer_id, cast(TaskSession, task.session).route())
            except (SupernodeError, SupernodeUnavailable) as e:
                log.info("could not tell the supernode we dropped {task}: {why}", task=task_id, why=str(e))

    def side_for(self, task_id: str) -> Neighbours | None:
        """The side block connections for C{task_id} talk to, while it has pieces to serve."""
        task = self.tasks.get(task_id)
        if task is None or task.have is None or not task.ready_for_io:
            return None
        return task.neighbours

    def task_ended(self, task: PeerTask) -> None:
        self.note_activity()
        if task.state is State.DONE:
            self.stats.count(self.stats.downloads, "success")
            self.stats.durations.observe((task.finished_at or task.started) - task.started)
        elif task.state is State.FAILED:
            self.stats.count(self.stats.downloads, "failed")
            self.stats.count(self.stats.failures, failure_reason(task.error.code if task.error else "INTERNAL"))
        if not any(not t.lifecycle.ended for t in self.tasks.values() if t is not task):
            self.drop_buffers()

    def drop_buffers(self) -> None:
        """
        No download under way: let the free piece buffers go (their pages
        back to the system) instead of keeping them for the next download,
        so an idle dfpeer's memory is its start-up size whatever it fetched;
        and the pages the parts of large pieces kept (L{dragonfly.core.partwrite.drop_bank}).
        Buffers still out (pieces being written) come back to the new pool.
        """
        old = self.block_factory.pool
        new = self.block_factory.pool = BufferPool(old.keep)
        new.lent, new.lent_peak = old.lent, old.lent_peak
        drop_bank()

    def memory_stats(self) -> dict[str, int]:
        """
        The piece buffers, in KiB: lent now, the most lent at once, kept free;
        the parts and their page bank's counts (L{dragonfly.core.memtrace}).
        """
        pool = self.block_factory.pool
        from ..core.partwrite import bank
        from .pieces import PART_COUNTS

        out = {
            "lentKiB": pool.lent >> 10, "lentPeakKiB": pool.lent_peak >> 10, "freeKiB": pool.kept() >> 10,
            "partPieces": PART_COUNTS["pieces"], "parts": PART_COUNTS["parts"],
        }
        b = bank()
        if b is not None:  # parts given pages from the bank, parts that faulted theirs in, pages dropped when full
            out.update(bankGot=b.counts["got"], bankEmpty=b.counts["empty"], bankFull=b.counts["full"])
        return out

    def note_activity(self) -> None:
        self.last_activity = self.reactor.seconds()

    def busy(self) -> bool:
        return any(not t.lifecycle.ended for t in self.tasks.values()) or any(
            c.requested or c._queue for c in self.block_factory.connections
        )

    def _source_headers(self, task: PeerTask) -> dict[str, list[str]]:
        return {k: [v] for k, v in (task.request.get("headers") or {}).items()}

    def _count_source(self, task: PeerTask, n: int) -> None:
        task.traffic["back_to_source"] += n
        self.stats.traffic["back_to_source"] += n
        self.note_activity()

    async def _source_get(self, url: str, headers: dict[str, list[str]]) -> Any:
        try:
            return await self.http.get(url, headers=headers, unbuffered=True)
        except Exception as e:
            raise TaskFailed("SOURCE_UNREACHABLE", f"origin {url} unreachable: {e}") from None

    @staticmethod
    def _source_error(url: str, response: Any) -> TaskFailed:
        response.deliverBody(DiscardBody())
        phrase = response.phrase.decode("latin-1", "replace") if isinstance(response.phrase, bytes) else response.phrase
        return TaskFailed("SOURCE_ERROR", f"origin returned {response.code} {phrase} for {url}", response.code)

    async def fetch_from_source(self, task: PeerTask) -> tuple[int, str]:
        """Download the task's URL straight from the origin into its file."""
        url = task.request["url"]
        response = await self._source_get(url, self._source_headers(task))
        if response.code != 200:
            raise self._source_error(url, response)
        return await self._whole_body(task, response)

    async def _whole_body(self, task: PeerTask, response: Any) -> tuple[int, str]:
        """A 200's body as the task's whole file (a new file), paced by --locallimit/--totallimit."""
        length = response.length if isinstance(response.length, int) else None
        # a new file, in the pool: never truncate a file a user's output may link to
        fd = await self.store.create(task.task_id)
        limit = task.local_limit or self.total_limit
        writer = ChunkedFileWriter(
            self.pool, self.clock, fd, 1 << 20, length, on_bytes=lambda n: self._count_source(task, n), limit=limit,
        )
        response.deliverBody(writer)
        try:
            total, sha = await writer.done
        except BodyError as e:
            raise TaskFailed(e.code, e.message) from None
        return total, sha

    async def fetch_pieces(self, task: PeerTask, runs: list[tuple[int, int]]) -> tuple[int, str] | None:
        """
        Back-to-source by piece (L{dragonfly.peer.source}): one Range request
        per run of missing pieces, each piece verified and written by
        C{task.source_piece}.  An origin that answers 200 (it ignores Range)
        or a Content-Range of another length (the file changed) gets the
        whole file, as L{fetch_from_source}: C{(length, sha256)}.
        """
        url = task.request["url"]
        assert task.length is not None
        for run in runs:
            first, last = byte_span(run, task.length, task.piece_size)
            headers = self._source_headers(task)
            headers["Range"] = [f"bytes={first}-{last}"]
            response = await self._source_get(url, headers)
            if response.code == 200:
                log.info("task {task}: the origin ignores Range; fetching the whole file", task=task.task_id)
                self.store.forget(task.task_id)
                return await self._whole_body(task, response)
            if response.code != 206:
                raise self._source_error(url, response)
            span = parse_content_range((response.headers.getRawHeaders(b"content-range") or [None])[0])
            if span is None or span[:2] != (first, last) or span[2] not in (None, task.length):
                log.info(
                    "task {task}: the origin answered {got} for bytes {first}-{last}/{length}; fetching the whole file",
                    task=task.task_id, got=span, first=first, last=last, length=task.length,
                )
                response.deliverBody(DiscardBody())
                self.store.forget(task.task_id)
                return await self.fetch_from_source(task)
            collector = RangeCollector(
                self.clock, run, task.length, task.piece_size, task.source_piece,
                limits=[task.local_limit, self.total_limit], on_bytes=lambda n: self._count_source(task, n),
            )
            response.deliverBody(collector)
            try:
                await collector.done
            except BodyError as e:
                raise TaskFailed(e.code, e.message) from None
        return None


class PeerService(ListeningService):
    """Binds the ports, writes peer.json, registers and heartbeats."""

    what = "dfpeer"

    def __init__(
        self,
        daemon: PeerDaemon,
        block_endpoint: Any,
        api_endpoint: Any,
        api_site: Any,
        idle_exit: float = 0.0,
        heartbeat: float = 10.0,
    ) -> None:
        super().__init__(daemon.reactor, os.path.join(daemon.home, "peer.json"))
        self.daemon = daemon
        self._block_endpoint = block_endpoint
        self._api_endpoint = api_endpoint
        self._api_site = api_site
        self._idle_exit = idle_exit
        self._heartbeat = heartbeat
        self._loops: list[Any] = []
        self.ready: Deferred = Deferred()

    async def _start(self) -> None:
        daemon = self.daemon
        # the finished tasks are back (read in the pool) before anyone can ask for them
        restored = await daemon.restore()
        await daemon.recall_supernode_seen()
        block = await self.listen(self._block_endpoint, daemon.block_factory)
        daemon.listening(block.getHost().port)
        api = await self.listen(self._api_endpoint, self._api_site)
        host = api.getHost()
        info = {
            "api": f"http://{host.host}:{host.port}",
            "peerId": daemon.peer_id,
            "blockPort": daemon.block_port,
            "ip": daemon.ip,
            "supernodes": daemon.client.nodes,
        }
        self.publish(info)
        log.info(
            "dfpeer {peer} serving blocks on {port}, local API {api}, {n} finished tasks",
            peer=daemon.peer_id, port=daemon.block_port, api=info["api"], n=restored,
        )
        self._loop(self._heartbeat, self._beat, "heartbeat")
        if self._idle_exit > 0:
            self._loop(min(5.0, self._idle_exit), self._check_idle, "idle check")
        self.ready.callback(info)

    def _loop(self, interval: float, f: Any, what: str) -> None:
        service = periodic(interval, f, self.daemon.reactor, what)
        self._loops.append(service)
        service.startService()

    def _beat(self) -> Deferred:
        daemon = self.daemon

        async def beat() -> None:
            if not daemon.registered:
                try:
                    await daemon.register()
                    await daemon.announce()
                except (SupernodeError, SupernodeUnavailable) as e:
                    log.info("supernode not reachable yet: {why}", why=str(e))
            else:
                await daemon.heartbeat()

        return Deferred.fromCoroutine(beat())

    def _check_idle(self) -> None:
        daemon = self.daemon
        if daemon.busy():
            daemon.note_activity()
        elif daemon.reactor.seconds() - daemon.last_activity > self._idle_exit:
            log.info("idle for {t:.0f}s: exiting", t=self._idle_exit)
            daemon.reactor.stop()

    async def _before_stop(self) -> None:
        for service in self._loops:
            if service.running:
                # not awaited: a heartbeat in flight must not hold up the leave
                service.stopService()
        if self.daemon.registered:
            d = Deferred.fromCoroutine(self.daemon.leave())
            d.addTimeout(2.0, self.daemon.reactor)
            try:
                await d
            except Exception:
                pass
        self.daemon.client.stop()  # no more health probes


def _write_seen(path: str, wall: float) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(f"{wall:.3f}\n")
    os.replace(path + ".tmp", path)


def _read_seen(path: str) -> float | None:
    try:
        with open(path) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return None

"""
One download on a dfpeer, and the serving of it afterwards.

The task registers with the SuperNode, then syncs every half second: it
reports the pieces it verified and the failures it saw, and learns the task's
length, the piece digests, its parents and its seed allowance (see
L{dragonfly.supernode.scheduler}).  Pieces move over block connections:

  - to every parent (and the seed) it opens one connection; peers that chose
    it as their parent connect to it; all connections are symmetric;
  - which piece to ask from whom is the picker's answer
    (L{dragonfly.peer.picker}: rarest-first, the stream window, the seed
    allowance, the endgame);
  - each connection has one request out (C{--pipeline}), and the task a
    bounded number (C{--in-flight}, about 6 MiB), so each piece arrives
    quickly and can be passed on;
  - every piece is checked against the SuperNode's SHA-256 before it is
    written (in the pool, L{dragonfly.core.store}), and served to the
    neighbours (HAVE) as soon as it is written;
  - a piece that fails (bad digest, reject, connection lost, no bytes for
    C{stall_timeout}) is asked again at once from another holder, and the
    failure is reported so the scheduler can block a bad parent.

When the SuperNode cannot be reached the task goes back to the origin, unless
told not to (C{notbs}).  Its states are L{dragonfly.peer.lifecycle.State};
what it needs of the dfpeer is L{dragonfly.peer.interfaces.TaskHost}.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from ..core.bitmap import Bitmap
from ..core.ids import BadInput, parse_digest
from ..core.logs import safe_url, task_log
from ..core.pieces import piece_count, piece_span
from ..core.ratelimit import TokenBucket
from ..protocol.supernode_api import FailedPiece, SyncAnswer, SyncReport, TaskView
from .client import SupernodeError, SupernodeUnavailable
from .interfaces import TaskHost
from .lifecycle import Lifecycle, State
from .neighbours import Neighbours
from .picker import Picker
from .source import SourceMismatch, missing_runs

log = Logger()


class TaskFailed(Exception):
    """A download failed; C{code} is stable, C{message} for humans."""

    def __init__(self, code: str, message: str, origin_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.origin_status = origin_status


class _BackToSource(Exception):
    """Leave the swarm for the origin (C{reason}: one of L{metrics.BACK_TO_SOURCE})."""

    def __init__(self, why: str, reason: str) -> None:
        super().__init__(why)
        self.why, self.reason = why, reason


#: the states in which the task syncs with the SuperNode
_SYNCING = (State.SIZING, State.ALLOCATING, State.DOWNLOADING, State.VERIFYING)


class PeerTask:
    """
    @param daemon: the dfpeer (L{TaskHost}: store, connections, stats, clock, session).
    @param request: what dfget asked: url, headers, digest, identifier, filter, notbs.
    """

    #: sync interval while the task is starting
    STARTUP_SYNC = 0.05
    #: endgame: duplicate requests only for the last few pieces, out this long
    ENDGAME_PIECES = 4
    ENDGAME_AFTER = 1.0
    #: pieces ahead of an in-order stream that go before the rarest
    STREAM_WINDOW = 4
    #: without a SuperNode and without progress for this long, go to the origin
    orphan_timeout = 10.0
    #: a SuperNode that answered this recently is waited for (see L{_register})
    supernode_grace = 60.0

    def __init__(self, daemon: TaskHost, task_id: str, request: dict[str, Any], rng: random.Random | None = None) -> None:
        self.daemon = daemon
        self.clock = daemon.clock
        self.store = daemon.store
        self.stats = daemon.stats
        self.task_id = task_id
        self.request = request
        self.session = daemon.session(task_id, request)
        self.lifecycle = Lifecycle()
        self.error: TaskFailed | None = None
        self.length: int | None = None
        self.piece_size = 0
        self.count: int | None = None
        self.digests: list[bytes | None] = []
        self.sha256: str | None = None
        # the SuperNode's name for the origin content we download (see L{_check_version})
        self.version: str | None = None
        self.have: Bitmap | None = None
        self.picker: Picker[Any] | None = None
        #: the block connections (the side the block protocol talks to)
        self.neighbours = Neighbours(self)
        self._report_have: list[int] = []
        self._report_failed: list[FailedPiece] = []
        self._digests_from = 0
        self._wake: Deferred | None = None
        self._kicked = False
        self._removed = False
        self._rng = rng if rng is not None else random.Random()
        self._stream_from: int | None = None
        self._last_progress = self.clock.seconds()
        self.started = self.clock.seconds()
        # when it was last asked for or served a piece (for GC)
        self.last_access = self.started
        self.finished_at: float | None = None
        self.traffic = {"back_to_source": 0, "supernode": 0, "remote_peer": 0}
        self.uploaded = 0
        # traffic["remote_peer"] the SuperNode has been told of (see _sync)
        self._peer_bytes_reported = 0
        self.waiters: list[Deferred] = []
        #: called with no arguments whenever a piece is stored or the task ends
        #: (the local API's in-order stream, L{dragonfly.peer.stream})
        self.watchers: list[Callable[[], None]] = []
        self.content_type: str | None = None
        self._checker = LoopingCall(self.neighbours.check_stalls)
        self._checker.clock = self.clock
        self.bad_pieces = 0
        # the task's file exists (pieces may be in it); the whole file came from the origin unchecked
        self._allocated = False
        self._unverified_source = False
        rate = request.get("localLimit")
        self.local_limit = TokenBucket(rate, self.clock) if rate else None

    def _log(self, level: LogLevel, fmt: str, **fields: Any) -> None:
        """A log event with C{taskId}, C{task} (shown in the text) and our C{peerId}."""
        task_log(log, level, self.task_id, fmt, peerId=self.daemon.peer_id, **fields)

    # -- views -------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def status(self) -> str:
        """waiting, running, success or failed (the JSON view's words)."""
        return self.lifecycle.status

    @property
    def ready_for_io(self) -> bool:
        """The task's file holds verified pieces to serve (and, downloading, takes more)."""
        return not self._removed and (self.lifecycle.transferring or self.state is State.DONE)

    @property
    def downloading(self) -> bool:
        return self.state is State.DOWNLOADING

    @property
    def conns(self) -> set[Any]:
        """The open block connections of this task."""
        return self.neighbours.conns

    @property
    def seed_conn(self) -> Any:
        """The connection to the seed, if open."""
        return self.neighbours.seed_conn

    @seed_conn.setter
    def seed_conn(self, conn: Any) -> None:
        self.neighbours.seed_conn = conn

    @property
    def stream_from(self) -> int | None:
        """Pieces from here on are preferred while a stream reads them in order."""
        return self._stream_from

    @stream_from.setter
    def stream_from(self, index: int | None) -> None:
        self._stream_from = index
        if self.picker is not None:
            self.picker.stream_from = index

    @property
    def completed_bytes(self) -> int:
        if self.have is None or self.length is None:
            return 0
        if self.have.complete:
            return self.length
        return sum(piece_span(i, self.length, self.piece_size)[1] for i in self.have)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "taskId": self.task_id,
            "url": self.request.get("url"),
            "status": self.status,
            "contentLength": self.length,
            "contentType": self.content_type,
            "completedBytes": self.completed_bytes,
            "pieceCount": self.count,
            "piecesDone": len(self.have) if self.have is not None else 0,
            "sha256": self.sha256,
            # every piece checked against the SuperNode's SHA-256
            "piecesVerified": self.state is State.DONE and not self._unverified_source,
            "dataPath": self.store.data_path(self.task_id),
            "traffic": dict(self.traffic),
            "uploaded": self.uploaded,
            "badPieces": self.bad_pieces,
            "connections": len(self.conns),
            "elapsed": (self.finished_at or self.clock.seconds()) - self.started,
        }
        if self.error is not None:
            out["error"] = {"code": self.error.code, "message": self.error.message}
            if self.error.origin_status is not None:
                out["error"]["originStatus"] = self.error.origin_status
        return out

    def watch(self, callback: Callable[[], None]) -> None:
        self.watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        if callback in self.watchers:
            self.watchers.remove(callback)

    def _changed(self) -> None:
        for callback in list(self.watchers):
            callback()

    def wait(self) -> Deferred:
        """Fires with this task when it ends, either way."""
        d: Deferred = Deferred()
        if self.lifecycle.ended:
            d.callback(self)
        else:
            self.waiters.append(d)
        return d

    def read(self, offset: int, size: int) -> Deferred:
        """Bytes of the task's file (the local API's stream)."""
        return self.store.read(self.task_id, offset, size)

    # -- life --------------------------------------------------------------------

    def restore(self, meta: dict[str, Any]) -> None:
        """A task finished before a restart: serve it again."""
        self._set_length(meta["length"], meta["pieceSize"])
        self.digests = [bytes.fromhex(d) for d in meta["digests"]]
        self._have_all()
        self.sha256 = meta.get("sha256")
        self.content_type = meta.get("contentType")
        self.version = meta.get("version")
        self.lifecycle.move(State.DONE)
        self.finished_at = self.started = self.clock.seconds()
        self.last_access = meta.get("lastAccess", self.started)
        self._serve()

    def start(self) -> None:
        self.lifecycle.move(State.REGISTERING)
        if self.daemon.trace:
            log.info("trace {task} start at {t:.3f}", task=self.task_id[:12], t=self.clock.seconds())
        d = Deferred.fromCoroutine(self._run())
        d.addErrback(self._crashed)

    def removed(self) -> None:
        """The task left the store (evicted): stop serving it."""
        self._removed = True

    def _crashed(self, f: Any) -> None:
        if isinstance(f.value, TaskFailed):
            self._fail(f.value)
        else:
            log.failure(
                "task {task} crashed", f, task=self.task_id[:12], taskId=self.task_id, peerId=self.daemon.peer_id,
            )
            self._fail(TaskFailed("INTERNAL", f.getErrorMessage()))

    async def _run(self) -> None:
        try:
            try:
                reply = await self._register()
            except SupernodeError as e:
                raise TaskFailed(e.code, e.message) from None
            if reply.task_id != self.task_id:
                raise TaskFailed("INTERNAL", f"supernode computed task id {reply.task_id}, we {self.task_id}")
            self._check_version(reply.task)
            self._log(
                LogLevel.info, "registered with supernode {node} for {url} (CDN {status})",
                node=self.session.node, url=safe_url(self.request["url"]), status=reply.task.status,
            )
            self.lifecycle.move(State.SIZING)
            self._checker.start(1.0, now=False)
            await self._sync_loop()
        except _BackToSource as b:
            await self._back_to_source(b.why, b.reason)
            return
        # one last report so the scheduler knows we hold everything (and the
        # SuperNode counts the last bytes from peers)
        unreported = self.traffic["remote_peer"] > self._peer_bytes_reported
        if self.state is State.DONE and (self._report_have or unreported):
            try:
                await self._sync()
            except (SupernodeUnavailable, SupernodeError):
                pass

    async def _register(self) -> Any:
        """
        Register the task.  With no SuperNode to answer, go to the origin at
        once, unless one answered this dfpeer within C{supernode_grace}
        seconds (it is restarting, most likely): then ask again every second
        for up to C{orphan_timeout} before leaving the swarm, so a SuperNode
        restart does not send every new download to the origin.
        """
        waiting_since: float | None = None
        while True:
            try:
                reply = await self.session.register()
            except SupernodeUnavailable as e:
                now = self.clock.seconds()
                seen = getattr(self.daemon, "supernode_seen", None)
                waiting_since = now if waiting_since is None else waiting_since
                if seen is None or now - seen > self.supernode_grace or now - waiting_since >= self.orphan_timeout:
                    self._log(LogLevel.warn, "{why}", why=str(e))
                    raise _BackToSource(f"supernode unreachable ({e})", "supernode_unreachable") from None
                await self._sleep(1.0)
                continue
            self._supernode_answered()
            return reply

    def _supernode_answered(self) -> None:
        """A SuperNode answered (see L{_register})."""
        self.daemon.supernode_seen = self.clock.seconds()

    async def _sync_loop(self) -> None:
        unreachable_since: float | None = None
        while self.state in _SYNCING:
            try:
                interval = await self._sync()
                unreachable_since = None
                self._supernode_answered()
            except SupernodeUnavailable as e:
                now = self.clock.seconds()
                unreachable_since = unreachable_since or now
                if now - self._last_progress > self.orphan_timeout and now - unreachable_since > self.orphan_timeout:
                    raise _BackToSource(
                        f"supernode lost and no progress for {self.orphan_timeout:.0f}s ({e})", "supernode_lost",
                    ) from None
                await self._sleep(1.0)
                continue
            if not self.lifecycle.transferring or self.seed_conn is None:
                # starting: the length, the seed and the first parents come
                # in the next few answers; ask again soon
                interval = min(interval, self.STARTUP_SYNC)
            if self.state not in _SYNCING:
                break
            await self._sleep(interval)

    def _check_version(self, task: TaskView) -> None:
        """
        The origin content must stay the one we started with: the SuperNode
        fetches a changed origin file as a new version of the task, and the
        pieces of two versions must never meet in one file.
        """
        version = task.version
        if version is None:
            return
        if self.version is None:
            self.version = version
        elif version != self.version:
            raise TaskFailed(
                "SOURCE_CHANGED", f"the origin file {self.request.get('url')} changed during the download; run it again"
            )

    async def _sync(self) -> float:
        """One sync; the seconds until the next."""
        have, self._report_have = self._report_have, []
        failed, self._report_failed = self._report_failed, []
        peer_bytes = self.traffic["remote_peer"]
        report = SyncReport(
            self.session.peer_id, have=have, failed=failed, digests_from=self._digests_from,
            starving=self._starving(), want=self.stream_from, banned=self.neighbours.banned(),
            # bytes from other peers since the last sync the SuperNode took
            peer_bytes=peer_bytes - self._peer_bytes_reported, version=self.version,
        )
        try:
            reply = await self.session.sync(report)
        except SupernodeError as e:
            if e.code == "TASK_CHANGED":
                raise TaskFailed(
                    "SOURCE_CHANGED", f"the origin file {self.request.get('url')} changed during the download; run it again"
                ) from None
            if e.code in ("PEER_UNKNOWN", "TASK_UNKNOWN"):
                # the SuperNode restarted: register again and re-announce all we hold
                if e.code == "PEER_UNKNOWN":
                    await self.session.register_peer()
                self._check_version((await self.session.register()).task)
                self._report_have = list(self.have) if self.have is not None else []
                self._report_failed = failed
                return 0.1
            self._report_have = have + self._report_have
            raise TaskFailed(e.code, e.message) from None
        except SupernodeUnavailable:
            # it may come back restarted, its swarm rebuilt by other peers
            # (it then takes our next sync as a join): say all we hold again
            self._report_have = list(self.have) if self.have is not None else have + self._report_have
            self._report_failed = failed + self._report_failed
            raise
        self._peer_bytes_reported = peer_bytes
        if self.state in _SYNCING:
            self._apply(reply)
        return reply.sync_interval

    def _apply(self, reply: SyncAnswer) -> None:
        task = reply.task
        self._check_version(task)
        if task.status == "failed":
            err = task.error or {}
            code = err.get("code", "SOURCE_ERROR")
            if code == "SOURCE_UNREACHABLE" and not self.request.get("notbs"):
                raise _BackToSource("supernode cannot reach the origin", "supernode_cannot_reach_origin")
            raise TaskFailed(code, err.get("message", "task failed at the supernode"), err.get("originStatus"))
        if self.state is State.SIZING and task.content_length is not None and task.piece_count is not None:
            assert task.piece_size is not None
            self._set_length(task.content_length, task.piece_size)
            self._log(
                LogLevel.info, "{bytes} bytes in {pieces} pieces of {pieceSize}",
                bytes=self.length, pieces=self.count, pieceSize=self.piece_size,
            )
            self._allocate()
        first = reply.digests_from
        for k, hexd in enumerate(reply.digests):
            self.set_digest(first + k, bytes.fromhex(hexd))
        if task.sha256:
            self.sha256 = task.sha256
        content_type = task.raw.get("contentType")
        if content_type and self.content_type is None:
            self.content_type = content_type
        if self.picker is not None:
            self.picker.seed_allowed = set(reply.seed_pieces)
        if self.lifecycle.transferring:
            for parent in reply.parents:
                self.neighbours.connect(parent)
        self.neighbours.fill()

    def _set_length(self, length: int, piece_size: int) -> None:
        self.length, self.piece_size = length, piece_size
        self.count = piece_count(length, piece_size)
        self.have = Bitmap(self.count)
        self.digests = [None] * self.count
        self.picker = Picker(
            self.count, rng=self._rng, have=self.have, endgame_pieces=self.ENDGAME_PIECES,
            endgame_after=self.ENDGAME_AFTER, stream_window=self.STREAM_WINDOW,
        )
        self.picker.stream_from = self._stream_from

    def _have_all(self) -> None:
        assert self.have is not None and self.count is not None
        for i in range(self.count):
            self.have.set(i)

    def set_digest(self, index: int, digest: bytes) -> None:
        if self.count is None or not 0 <= index < self.count:
            return
        self.digests[index] = digest
        if self.picker is not None:
            self.picker.digest_known(index)
        while self._digests_from < self.count and self.digests[self._digests_from] is not None:
            self._digests_from += 1

    def _allocate(self) -> None:
        assert self.length is not None
        self.lifecycle.move(State.ALLOCATING)
        d = self.store.prepare(self.task_id, self.length)

        def ready(_: Any) -> None:
            if self.state is not State.ALLOCATING:
                return
            self.lifecycle.move(State.DOWNLOADING)
            self._allocated = True
            self._serve()
            self._changed()
            if self.count == 0:
                self._complete()
            else:
                self._kick()

        def failed(f: Any) -> None:
            self._fail(TaskFailed("STORE_FAILED", f"cannot create the task's file: {f.getErrorMessage()}"))

        d.addCallbacks(ready, failed)

    def _serve(self) -> None:
        """Open the descriptor uploads are sent from (see L{piece_file})."""
        d = self.store.serve(self.task_id)
        d.addErrback(lambda f: self._log(LogLevel.warn, "cannot open the task's file: {why}", why=f.getErrorMessage()))

    # -- pieces ----------------------------------------------------------------

    def report_failure(self, index: int, parent: str) -> None:
        """Tell the SuperNode at the next sync (C{index} -1: the connection broke)."""
        self._report_failed.append(FailedPiece(index, parent))

    def in_use(self) -> bool:
        """Downloading, or a piece of it being sent to a peer: never evicted."""
        return not self.lifecycle.ended or self.neighbours.uploading()

    def read_piece(self, index: int) -> Deferred:
        """The bytes of piece C{index} (held: the block protocol checks), read in the pool."""
        assert self.length is not None
        self.last_access = self.clock.seconds()
        offset, size = piece_span(index, self.length, self.piece_size)
        return self.store.read(self.task_id, offset, size)

    def piece_file(self, index: int) -> tuple[int, int, int] | None:
        """(descriptor, offset, length) of verified piece C{index} for C{sendfile}, or None: use L{read_piece}."""
        if self.have is None or index not in self.have or not self.ready_for_io or self.length is None:
            return None
        fd = self.store.served_fd(self.task_id)
        if fd is None:
            return None
        self.last_access = self.clock.seconds()
        offset, size = piece_span(index, self.length, self.piece_size)
        return fd, offset, size

    def on_piece(self, conn: Any, index: int, data: bytearray) -> None:
        """A piece arrived on one of our connections (see L{Neighbours.on_piece})."""
        self.neighbours.on_piece(conn, index, data)

    def on_uploaded(self, conn: Any, nbytes: int) -> None:
        self.neighbours.on_uploaded(conn, nbytes)

    def piece_arrived(self, conn: Any, index: int, data: bytearray, kind: str) -> None:
        """Piece C{index} came from C{conn} (C{kind}: supernode or remote_peer): verify and store it."""
        self.traffic[kind] += len(data)
        self.daemon.note_activity()
        picker = self.picker
        assert picker is not None
        digest = self.digests[index]
        if self.state is not State.DOWNLOADING or digest is None or not picker.verify(index):
            # a duplicate from the endgame, or too late; (a digest is always
            # known: only pieces with one are requested)
            self.stats.count(self.stats.discarded, "duplicate", len(data))
            self.daemon.block_factory.release(data)
            return
        d = self.store.write_verified(self.task_id, index * self.piece_size, data, digest)
        d.addBoth(self._release, data)
        d.addCallbacks(self._stored, self._store_failed, callbackArgs=(index, conn, kind, len(data)), errbackArgs=(index,))

    def _release(self, result: Any, data: bytearray) -> Any:
        self.daemon.block_factory.release(data)
        return result

    def _stored(self, ok: bool, index: int, conn: Any, kind: str, nbytes: int) -> None:
        picker = self.picker
        assert picker is not None and self.have is not None
        stats = self.stats
        if self.state is not State.DOWNLOADING:
            picker.unverified(index)
            stats.count(stats.discarded, "duplicate" if ok else "corrupt", nbytes)
            return
        if not ok:
            self._corrupt(conn, index, nbytes)
            self.neighbours.fill()
            return
        picker.stored(index)
        self._changed()
        stats.count(stats.traffic, kind, nbytes)
        if len(self.have) == 1:
            self._log(
                LogLevel.info, "first piece ({index}) from {remote} after {seconds:.3f}s",
                index=index, remote=conn.remote_id, seconds=self.clock.seconds() - self.started, pieces=1, bytes=nbytes,
            )
        self._last_progress = self.clock.seconds()
        self._report_have.append(index)
        if self.daemon.trace:
            log.info(
                "trace {task} piece {index} from {remote} at {t:.3f}",
                task=self.task_id[:12], index=index, remote=conn.remote_id, t=self.clock.seconds(),
            )
        if conn is self.seed_conn:
            # a seed piece is done: report it and ask for the next one now
            self._kick()
        self.neighbours.stored(conn, index)
        if self.have.complete:
            self._complete()
        else:
            self.neighbours.fill()

    def _corrupt(self, conn: Any, index: int, nbytes: int) -> None:
        """Piece C{index} from C{conn} failed its SHA-256: ask it elsewhere, report it, ban a repeat offender."""
        self.stats.count(self.stats.discarded, "corrupt", nbytes)
        self._log(
            LogLevel.warn, "piece {index} from {remote} failed its SHA-256 check",
            index=index, remote=conn.remote_id, bytes=nbytes,
        )
        self.bad_pieces += 1
        self.report_failure(index, conn.remote_id or "?")
        self.neighbours.bad_piece(conn, index)

    def _store_failed(self, f: Any, index: int) -> None:
        if self.picker is not None:
            self.picker.unverified(index)
        self._fail(TaskFailed("STORE_FAILED", f"cannot write piece {index}: {f.getErrorMessage()}"))

    def want_now(self) -> None:
        """An in-order reader moved on to C{stream_from}: ask for it now."""
        self._kick()
        self.neighbours.fill()

    def _starving(self) -> bool:
        """Nothing to fetch from any neighbour but the seed (the scheduler may then send a second copy)."""
        return self.picker is not None and self.picker.starving()

    def _kick(self) -> None:
        """Sync now instead of at the next interval."""
        if self._wake is not None and not self._wake.called:
            self._wake.callback(None)
        else:
            self._kicked = True

    async def _sleep(self, seconds: float) -> None:
        if self._kicked:
            self._kicked = False
            return
        self._wake = Deferred()
        timer = self.clock.callLater(seconds, self._kick)
        await self._wake
        self._kicked = False
        if timer.active():
            timer.cancel()

    # -- the end -----------------------------------------------------------------

    def _wanted_sha256(self) -> str | None:
        """The whole-file SHA-256 the request names (C{--digest sha256:...}), if any."""
        digest = self.request.get("digest")
        if not digest:
            return None
        try:
            algo, value = parse_digest(digest)
        except BadInput:
            return None
        return value if algo == "sha256" else None

    def _stop_checker(self) -> None:
        if self._checker.running:
            self._checker.stop()

    def _complete(self) -> None:
        """Every piece is verified; with a requested digest, check the whole file too."""
        want = self._wanted_sha256()
        if want is None:
            self._succeed()
            return
        self.lifecycle.move(State.VERIFYING)
        self._stop_checker()

        def checked(sha: str) -> None:
            if self.state is not State.VERIFYING:
                return
            if sha != want:
                self._fail(TaskFailed("DIGEST_MISMATCH", f"content has sha256:{sha}, expected sha256:{want}"))
                return
            self.sha256 = sha
            self._succeed()

        self.store.sha256(self.task_id).addCallbacks(
            checked, lambda f: self._fail(TaskFailed("STORE_FAILED", f.getErrorMessage()))
        )

    def _succeed(self, from_source: bool = False) -> None:
        """
        The one way to DONE, from the swarm or the origin: the file becomes
        read-only (dfget hands it out as a hard link), its meta is saved when
        every piece was verified (so a restart serves it again), and then
        the waiters hear of it.
        """
        self._stop_checker()
        meta = None
        if not from_source and all(d is not None for d in self.digests):
            meta = {
                "taskId": self.task_id, "url": self.request.get("url"), "length": self.length,
                "pieceSize": self.piece_size, "digests": [d.hex() for d in self.digests if d is not None],
                "sha256": self.sha256, "contentType": self.content_type, "version": self.version,
                "request": {k: v for k, v in self.request.items() if k != "headers"},
            }
        before = self.state

        def saved(_: Any) -> None:
            if self.state is not before:
                return
            self.lifecycle.move(State.DONE)
            self.finished_at = self.last_access = self.clock.seconds()
            if from_source:
                self._serve()
                self._log(
                    LogLevel.info, "complete from the origin, {bytes} bytes in {seconds:.2f}s",
                    bytes=self.length, pieces=self.count, seconds=self.finished_at - self.started,
                    src=self.traffic["back_to_source"], sn=self.traffic["supernode"], peers=self.traffic["remote_peer"],
                )
            else:
                self._log(
                    LogLevel.info,
                    "complete, {bytes} bytes in {seconds:.2f}s (source {src}, supernode {sn}, peers {peers})",
                    bytes=self.length, pieces=self.count, seconds=self.finished_at - self.started,
                    src=self.traffic["back_to_source"], sn=self.traffic["supernode"], peers=self.traffic["remote_peer"],
                    uploaded=self.uploaded,
                )
            self._kick()
            self._notify()

        def not_saved(f: Any) -> None:
            # the bytes are verified; only a restart will not serve them again
            self._log(LogLevel.warn, "cannot save the task's meta: {why}", why=f.getErrorMessage())
            saved(None)

        self.store.finish(self.task_id, meta).addCallbacks(saved, not_saved)

    def _fail(self, error: TaskFailed) -> None:
        if self.lifecycle.ended:
            return
        self.lifecycle.move(State.FAILED)
        self.error = error
        self.finished_at = self.clock.seconds()
        self._log(
            LogLevel.warn, "failed after {seconds:.2f}s: {code} {message}",
            code=error.code, message=error.message, seconds=self.finished_at - self.started,
            bytes=self.completed_bytes,
        )
        self._stop_checker()
        self.neighbours.close()
        d = self.store.remove(self.task_id)
        d.addErrback(lambda f: self._log(LogLevel.warn, "cannot remove the task's files: {why}", why=f.getErrorMessage()))
        self._kick()
        self._notify()

    def _notify(self) -> None:
        self._changed()
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(self)
        self.daemon.task_ended(self)

    # -- back to source ---------------------------------------------------------

    #: a cut or silent origin answer is asked again this many times (the pieces stored stay)
    SOURCE_ATTEMPTS = 3

    async def _back_to_source(self, why: str, reason: str) -> None:
        """
        Go to the origin; C{reason} is one of L{metrics.BACK_TO_SOURCE}.  With
        the task's file allocated and a digest for every missing piece, only
        those pieces are asked for (Range), each verified before it is written
        (L{_pieces_from_source}); otherwise, or when the origin ignores Range
        or holds another version, the whole file, as a new file.
        """
        if self.request.get("notbs"):
            raise TaskFailed("P2P_FAILED", f"{why}; not going back to the origin (--notbs)")
        if not self.lifecycle.can(State.BACK_TO_SOURCE):
            return
        by_piece = self._by_piece()
        self.lifecycle.move(State.BACK_TO_SOURCE)
        self.stats.count(self.stats.back_to_source, reason)
        self._log(
            LogLevel.info, "back to source: {why}", why=why, reason=reason, url=safe_url(self.request["url"]),
            pieces=(self.count or 0) - len(self.have or ()) if by_piece else None,
        )
        self.neighbours.close()
        self._stop_checker()
        if by_piece:
            whole = await self._pieces_from_source()
            if whole is None:
                await self._verify_from_source()
                return
            length, sha = whole
        else:
            # the origin's bytes go to a new file: what was served from the old one stops
            self.store.forget(self.task_id)
            length, sha = await self.daemon.fetch_from_source(self)
        self._whole_from_source(length, sha)

    def _by_piece(self) -> bool:
        """The file holds verified pieces and every missing one has a digest to check it against."""
        if not self._allocated or self.have is None or self.count is None or self.length is None:
            return False
        if self.state not in (State.DOWNLOADING, State.VERIFYING):
            return False
        return all(self.digests[i] is not None for i in range(self.count) if i not in self.have)

    async def _pieces_from_source(self) -> tuple[int, str] | None:
        """
        Fetch the missing pieces by Range; None when they are all in, or
        C{(length, sha256)} when the origin sent the whole file instead.
        """
        assert self.have is not None and self.count is not None
        for attempt in range(self.SOURCE_ATTEMPTS):
            runs = missing_runs(self.have, self.count)
            if not runs:
                return None
            try:
                return await self.daemon.fetch_pieces(self, runs)
            except SourceMismatch as e:
                self._log(LogLevel.warn, "{why}: fetching the whole file", why=str(e))
                self.store.forget(self.task_id)
                return await self.daemon.fetch_from_source(self)
            except TaskFailed as e:
                if e.code not in ("SOURCE_TRUNCATED", "SOURCE_TIMEOUT") or attempt + 1 == self.SOURCE_ATTEMPTS:
                    raise
                self._log(LogLevel.info, "origin answer cut ({why}); asking for the rest", why=e.message)
        return None

    def source_piece(self, index: int, data: bytearray) -> Deferred:
        """
        Piece C{index} from the origin: checked against the SuperNode's
        digest and written; fires with True, or False on a mismatch.
        """
        digest = self.digests[index]
        assert digest is not None and self.have is not None
        d = self.store.write_verified(self.task_id, index * self.piece_size, data, digest)

        def stored(ok: bool) -> bool:
            if ok and self.have is not None and index not in self.have:
                self.have.set(index)
                self._report_have.append(index)
                self._last_progress = self.clock.seconds()
                self._changed()
            return ok

        return d.addCallback(stored)

    async def _verify_from_source(self) -> None:
        """
        Every piece is in and verified: check the whole file when its SHA-256
        is known (--digest, else the SuperNode's), then serve it like any
        other (its meta saved, so it is announced again).
        """
        want = self._wanted_sha256() or self.sha256
        if want is not None:
            sha = await self.store.sha256(self.task_id)
            if sha != want:
                raise TaskFailed("DIGEST_MISMATCH", f"content has sha256:{sha}, expected sha256:{want}")
            self.sha256 = sha
        self._succeed()

    def _whole_from_source(self, length: int, sha: str) -> None:
        want = self._wanted_sha256()
        if want is not None and sha != want:
            raise TaskFailed("DIGEST_MISMATCH", f"origin content has sha256:{sha}, expected sha256:{want}")
        self._unverified_source = True
        self._set_length(length, self.piece_size or (4 << 20))
        self._have_all()
        self.sha256 = sha
        self._succeed(from_source=True)

"""
One download on a dfpeer, and the serving of it afterwards: a coordinator
over its parts, each in its own module with a typed interface:

  - L{dragonfly.peer.syncer}: the SuperNode conversation (register, then
    sync every half second: the pieces verified and the failures seen go
    out; the length, the digests, the parents and the seed allowance come
    back, see L{dragonfly.supernode.scheduler});
  - L{dragonfly.peer.neighbours}: the block connections, asking each piece
    of whom the picker says (L{dragonfly.peer.picker});
  - L{dragonfly.peer.pieces}: every piece checked against the SuperNode's
    SHA-256 before it is written, and served on (HAVE) once written; a
    piece that fails is asked again elsewhere and reported;
  - L{dragonfly.peer.source}: back to the origin when the SuperNode cannot
    be reached, unless told not to (C{notbs});
  - L{dragonfly.peer.views}: the JSON view and who waits on the task.

The task's state is its L{dragonfly.peer.lifecycle.Lifecycle} and nothing
else; what it needs of the dfpeer is L{dragonfly.peer.interfaces.TaskHost}.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel

from ..core.bitmap import Bitmap
from ..core.files import KERNEL_READAHEAD
from ..core.logs import safe_url, task_log
from ..core.periodic import periodic
from ..core.ratelimit import TokenBucket
from ..protocol.supernode_api import PieceProof, SyncAnswer
from .interfaces import TaskHost
from .lifecycle import Lifecycle, State
from .neighbours import Neighbours
from .outcome import BackToSource, TaskFailed, wanted_sha256
from .picker import Picker
from .pieces import TaskPieces
from .source import SourceFetch
from .syncer import Progress, Syncer
from .views import Listeners, Via, task_json, task_meta
from .wholehash import WholeHash, update_hash

__all__ = ["PeerTask", "TaskFailed"]

log = Logger()


class PeerTask:
    """
    @param daemon: the dfpeer (L{TaskHost}: store, connections, stats, clock, session).
    @param request: what dfget asked: url, headers, digest, identifier, filter, notbs.
    """

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
        self.sha256: str | None = None
        self.content_type: str | None = None
        self.pieces = TaskPieces(
            task_id, self.store, self.stats, lambda buf: daemon.block_factory.release(buf), self,
            rng if rng is not None else random.Random(),
        )
        #: the whole-file SHA-256 a request names, kept as the pieces are stored (L{WholeHash})
        self.wholehash = WholeHash(self.pieces, self._hash_update, lambda: self.store.sha256(task_id))
        self.wholehash.enabled = wanted_sha256(request) is not None
        self.pieces.on_stored = self.wholehash.offer
        #: the block connections (the side the block protocol talks to)
        self.neighbours = Neighbours(self)
        self.syncer = Syncer(self, task_id, self.session, daemon, request, self._log)
        self.source = SourceFetch(
            self.pieces, lambda: daemon.fetch_from_source(self), lambda runs: daemon.fetch_pieces(self, runs),
            self._forget_file, self.wholehash.finish, self._log,
        )
        self.listeners = Listeners()
        self._checker = periodic(1.0, self.neighbours.check_stalls, self.clock, "stall check")
        self._removed = False
        #: the parents of the last answer before the file was ready: connected once it is
        self._early_parents: list[Any] = []
        self._seed_lost_at: float | None = None
        # when it was last asked for or served a piece (for GC), and last stored one
        self.started = self.last_access = self._last_progress = self.clock.seconds()
        self.finished_at: float | None = None
        self.traffic = {"back_to_source": 0, "supernode": 0, "remote_peer": 0}
        self.uploaded = 0
        self.bad_pieces = 0
        # the whole file came from the origin unchecked
        self._unverified_source = False
        rate = request.get("localLimit")
        self.local_limit = TokenBucket(rate, self.clock) if rate else None

    def _log(self, level: LogLevel, fmt: str, **fields: Any) -> None:
        """A log event with C{taskId}, C{task} (shown in the text) and our C{peerId}."""
        task_log(log, level, self.task_id, fmt, peerId=self.daemon.peer_id, **fields)

    # -- views -------------------------------------------------------------------

    #: the task's place in its lifecycle, and the JSON view's word for it (waiting, running, success, failed)
    state = Via[State]("lifecycle")
    status = Via[str]("lifecycle")
    #: the open block connections, and the one to the seed (L{Neighbours})
    conns = Via[set[Any]]("neighbours")
    seed_conn = Via[Any]("neighbours", writable=True)
    #: the content's length, its pieces, which are verified, their digests, the picker (L{TaskPieces})
    length = Via[int | None]("pieces")
    piece_size = Via[int]("pieces")
    count = Via[int | None]("pieces")
    have = Via[Bitmap | None]("pieces")
    digests = Via[list[bytes | None]]("pieces")
    picker = Via[Picker[Any] | None]("pieces")
    #: pieces from here on are preferred while a stream reads them in order
    stream_from = Via[int | None]("pieces", writable=True)
    #: the SuperNode's name for the origin content we download (see L{Syncer.check_version})
    version = Via[str | None]("syncer")

    @property
    def ready_for_io(self) -> bool:
        """The task's file holds verified pieces to serve (and, downloading, takes more)."""
        return not self._removed and (self.lifecycle.transferring or self.state is State.DONE)

    @property
    def downloading(self) -> bool:
        return self.state is State.DOWNLOADING

    @property
    def pieces_verified(self) -> bool:
        """Done, and every piece was checked against the SuperNode's SHA-256."""
        return self.state is State.DONE and not self._unverified_source

    def to_json(self) -> dict[str, Any]:
        return task_json(self)

    def watch(self, callback: Callable[[], None]) -> None:
        """Call C{callback} whenever a piece is stored or the task ends (L{dragonfly.peer.stream})."""
        self.listeners.watch(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        self.listeners.unwatch(callback)

    def wait(self) -> Deferred:
        """Fires with this task when it ends, either way."""
        return self.listeners.wait(self, self.lifecycle.ended)

    def read(self, offset: int, size: int) -> Deferred:
        """Bytes of the task's file (the local API's stream)."""
        return self.store.read(self.task_id, offset, size)

    # -- life --------------------------------------------------------------------

    def restore(self, meta: dict[str, Any]) -> None:
        """A task finished before a restart: serve it again."""
        self.pieces.restore(meta)
        self.sha256 = meta.get("sha256")
        self.content_type = meta.get("contentType")
        self.syncer.version = meta.get("version")
        self.lifecycle.move(State.DONE)
        self.finished_at = self.started = self.clock.seconds()
        self.last_access = meta.get("lastAccess", self.started)
        self._serve()

    def start(self) -> None:
        self.lifecycle.move(State.REGISTERING)
        if self.daemon.trace:
            log.info("trace {task} start at {t:.3f}", task=self.task_id[:12], t=self.clock.seconds())
        Deferred.fromCoroutine(self._run()).addErrback(self._crashed)

    def removed(self) -> None:
        """The task left the store (evicted): stop serving it."""
        self._removed = True

    def in_use(self) -> bool:
        """Downloading, or a piece of it being sent to a peer: never evicted."""
        return not self.lifecycle.ended or self.neighbours.uploading()

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
            await self.syncer.run()
        except BackToSource as b:
            await self._back_to_source(b.why, b.reason)

    # -- the SuperNode conversation (L{dragonfly.peer.syncer.SyncedTask}) ------------

    def starting(self) -> bool:
        return not self.lifecycle.transferring or self.seed_conn is None

    def progress(self) -> Progress:
        starving = self.picker is not None and self.picker.starving()
        return Progress(
            self.have, self.pieces.digests_from, starving, self.stream_from, self.neighbours.banned(),
            self.traffic["remote_peer"], self._last_progress, self.neighbours.connected(),
            self.pieces.tags_from,
        )

    def held_proofs(self) -> tuple[dict[str, Any] | None, list[PieceProof]]:
        return self.pieces.origin, self.pieces.proofs()

    def registered(self) -> None:
        self.lifecycle.move(State.SIZING)
        self._checker.startService()

    def apply(self, reply: SyncAnswer) -> None:
        task = reply.task
        if self.daemon.trace:
            log.info(
                "trace {task} sync at {t:.3f}: {state}, {parents} parents, seed {seed}, {digests} digests, next {next}",
                task=self.task_id[:12], t=self.clock.seconds(), state=self.state.name, parents=len(reply.parents),
                seed=list(reply.seed_pieces), digests=reply.digests_from + len(reply.digests), next=reply.sync_interval,
            )
        sizing = self.state is State.SIZING
        if sizing and task.content_length is not None and task.piece_count is not None:
            assert task.piece_size is not None
            self._set_length(task.content_length, task.piece_size)
            self._log(
                LogLevel.info, "{bytes} bytes in {pieces} pieces of {pieceSize}",
                bytes=self.length, pieces=self.count, pieceSize=self.piece_size,
            )
            self._allocate()
        self.pieces.learn(reply)
        if task.sha256:
            self.sha256 = task.sha256
            if task.sha256 == wanted_sha256(self.request) and self.wholehash.enabled and self.state is not State.VERIFYING:
                # the file will be checked by its pieces (see L{_complete}): no running
                # hash, and one under way stops (its result would never be used; the
                # SuperNode's SHA-256 comes when its CDN has the whole blob, most often
                # while the peers' downloads have just begun).  Not once the last piece
                # is in: the whole-file check then waits for the hash (VERIFYING)
                self.wholehash.enabled = False
                self.wholehash.reset()
        content_type = task.raw.get("contentType")
        if content_type and self.content_type is None:
            self.content_type = content_type
        if self.lifecycle.transferring:
            for parent in reply.parents:
                self.neighbours.connect(parent)
        else:
            self._early_parents = list(reply.parents)
        self.neighbours.fill()

    def report_failure(self, index: int, parent: str) -> None:
        """Tell the SuperNode at the next sync (C{index} -1: the connection broke)."""
        self.syncer.note_failure(index, parent)

    #: at most one sync a second for lost seed connections (L{seed_lost})
    SEED_LOST_SYNC = 1.0

    def seed_lost(self) -> None:
        """
        The connection to the SuperNode's seed broke: sync now rather than
        at the next interval (up to C{max_sync}, 2 s, for a download that
        rests).  A SuperNode that died refuses that sync, and the download
        then asks again every 0.1 s (L{Syncer.OUTAGE_RETRY}): it is in the
        restarted SuperNode's backlog as soon as it binds its port, and
        back with the first answers; a resting one used to notice the outage
        only at its next sync and come back that much later.  A seed that is
        up is named again by that sync's answer.  At most one such sync
        every L{SEED_LOST_SYNC} seconds.
        """
        now = self.clock.seconds()
        if self._seed_lost_at is not None and now - self._seed_lost_at < self.SEED_LOST_SYNC:
            return
        self._seed_lost_at = now
        self.syncer.kick()

    def want_now(self) -> None:
        """An in-order reader moved on to C{stream_from}: ask for it now (of the SuperNode when only its seed can help)."""
        if self.syncer.want_needs_sync(self.picker, self.stream_from):
            self.syncer.kick()
        self.neighbours.fill()

    # -- the file and its pieces -------------------------------------------------

    def _set_length(self, length: int, piece_size: int) -> None:
        self.wholehash.reset()
        self.pieces.size(length, piece_size)

    def _forget_file(self) -> Deferred:
        """The origin's whole file replaces the task's: stop serving it; what was hashed of it is gone."""
        self.wholehash.reset()
        return self.store.forget(self.task_id)

    def _hash_update(self, hasher: Any, offset: int, size: int, data: bytes | bytearray | None) -> Deferred:
        """One step of the running whole-file hash, in the pool (L{WholeHash})."""
        path = self.store.data_path(self.task_id)
        return self.store.run(self.task_id, update_hash, hasher, path, offset, size, data)

    def set_digest(self, index: int, digest: bytes) -> None:
        self.pieces.set_digest(index, digest)

    def _allocate(self) -> None:
        assert self.length is not None
        self.lifecycle.move(State.ALLOCATING)

        def ready(_: Any) -> None:
            if self.state is not State.ALLOCATING:
                return
            self.lifecycle.move(State.DOWNLOADING)
            self._serve()
            self.listeners.changed()
            if self.count == 0:
                self._complete()
            else:
                # the parents and the seed the SuperNode named while the file was
                # made: connected now, not after the next answer's round trip
                early, self._early_parents = self._early_parents, []
                for parent in early:
                    self.neighbours.connect(parent)
                self.syncer.kick()

        def failed(f: Any) -> None:
            self._fail(TaskFailed("STORE_FAILED", f"cannot create the task's file: {f.getErrorMessage()}"))

        self.store.prepare(self.task_id, self.length).addCallbacks(ready, failed)

    def _serve(self) -> None:
        """Open the descriptor uploads are sent from (see L{piece_file})."""
        d = self.store.serve(self.task_id)
        d.addErrback(lambda f: self._log(LogLevel.warn, "cannot open the task's file: {why}", why=f.getErrorMessage()))

    def read_piece(self, index: int) -> Deferred:
        """The bytes of piece C{index} (held: the block protocol checks), read in the pool."""
        self.last_access = self.clock.seconds()
        return self.pieces.read(index)

    def piece_file(self, index: int) -> tuple[int, int, int] | None:
        """(descriptor, offset, length) of verified piece C{index} for C{sendfile}, or None: use L{read_piece}."""
        found = self.pieces.file(index) if self.ready_for_io else None
        if found is not None:
            self.last_access = self.clock.seconds()
        return found

    def warm_piece(self, index: int) -> Deferred[int] | None:
        """
        Read verified piece C{index} into the page cache in the pool, before
        a block upload sends it from L{piece_file} (pieces written with
        C{O_DIRECT} are not in memory: the reactor's sendfile read them
        itself).  With the kernel's readahead when every piece it may reach
        is held, exactly the piece otherwise (no reads into blocks not
        written yet).  None: nothing to read.
        """
        span = self.piece_file(index)
        warm = getattr(self.store, "warm", None)  # (test stores may have none)
        if span is None or warm is None:
            return None
        fd, offset, length = span
        have, size = self.have, self.piece_size
        end = min(self.length or 0, offset + length + KERNEL_READAHEAD)
        held = self.state is State.DONE or (
            have is not None and all(i in have for i in range((offset + length) // size, (end - 1) // size + 1)))
        d: Deferred[int] = warm(fd, offset, length, not held)
        return d

    def on_piece(self, conn: Any, index: int, data: bytearray) -> None:
        """A piece arrived on one of our connections (see L{Neighbours.on_piece})."""
        self.neighbours.on_piece(conn, index, data)

    def on_uploaded(self, conn: Any, nbytes: int) -> None:
        self.neighbours.on_uploaded(conn, nbytes)

    def piece_arrived(self, conn: Any, index: int, data: bytearray, kind: str) -> None:
        """Piece C{index} came from C{conn} (C{kind}: supernode or remote_peer): verify and store it."""
        self.traffic[kind] += len(data)
        self.daemon.note_activity()
        self.pieces.arrived(conn, index, data, kind)

    def source_piece(self, index: int, data: bytearray) -> Deferred:
        """Piece C{index} from the origin, verified and written: fires with True, or False on a mismatch."""
        return self.pieces.from_source(index, data)

    # -- what became of the pieces (L{dragonfly.peer.pieces.PieceOutcomes}) ------

    def accepting(self) -> bool:
        return self.state is State.DOWNLOADING

    def piece_stored(self, conn: Any, index: int, nbytes: int) -> None:
        assert self.have is not None
        self.listeners.changed()
        now = self._last_progress = self.clock.seconds()
        if len(self.have) == 1:
            self._log(
                LogLevel.info, "first piece ({index}) from {remote} after {seconds:.3f}s",
                index=index, remote=conn.remote_id, seconds=now - self.started, pieces=1, bytes=nbytes,
            )
        self.syncer.note_have(index)
        if self.daemon.trace:
            log.info("trace {task} piece {index} from {remote} at {t:.3f}",
                     task=self.task_id[:12], index=index, remote=conn.remote_id, t=now)
        if conn is self.seed_conn:
            # a seed piece is done: report it and ask for the next one now
            self.syncer.kick()
        self.neighbours.stored(conn, index)
        if self.have.complete:
            self._complete()
        else:
            self.neighbours.fill()

    def piece_corrupt(self, conn: Any, index: int, nbytes: int) -> None:
        """Ask it elsewhere, report it, ban a repeat offender."""
        self._log(
            LogLevel.warn, "piece {index} from {remote} failed its SHA-256 check",
            index=index, remote=conn.remote_id, bytes=nbytes,
        )
        self.bad_pieces += 1
        self.report_failure(index, conn.remote_id or "?")
        self.neighbours.bad_piece(conn, index)
        self.neighbours.fill()

    def store_failed(self, index: int, why: str) -> None:
        self._fail(TaskFailed("STORE_FAILED", f"cannot write piece {index}: {why}"))

    def source_piece_stored(self, index: int) -> None:
        self.syncer.note_have(index)
        self._last_progress = self.clock.seconds()
        self.listeners.changed()

    # -- the end -----------------------------------------------------------------

    def _stop_checker(self) -> None:
        if self._checker.running:
            self._checker.stopService()

    def _complete(self) -> None:
        """
        Every piece is verified; with a requested digest, check the whole
        file too: its running SHA-256 (L{WholeHash}) has hashed the pieces
        in file order as they were stored, only the rest is hashed now.
        """
        want = wanted_sha256(self.request)
        if want is None:
            self._succeed()
            return
        if self.sha256 == want:
            # the SuperNode's SHA-256 of the origin's bytes is the digest asked for, and
            # every piece matched its SHA-256 of those bytes: the file is that content
            # (hashing it again here put 0.3-0.9 s of a 256 MiB blob after its last piece)
            self._log(LogLevel.info, "whole file matches its digest by its pieces (the SuperNode's SHA-256)")
            self._succeed()
            return
        self.lifecycle.move(State.VERIFYING)
        self._stop_checker()
        began = self.clock.seconds()

        def checked(sha: str) -> None:
            if self.state is not State.VERIFYING:
                return
            wh = self.wholehash
            self._log(
                LogLevel.info, "whole file hashed {seconds:.3f}s after its last piece"
                " ({hashedFromBuffers} bytes from buffers, {hashedFromFile} read back)", seconds=self.clock.seconds() - began,
                hashedFromBuffers=wh.from_buffers, hashedFromFile=wh.from_file,
            )
            if sha != want:
                self._fail(TaskFailed("DIGEST_MISMATCH", f"content has sha256:{sha}, expected sha256:{want}"))
                return
            self.sha256 = sha
            self._succeed()

        self.wholehash.finish().addCallbacks(
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
        self.wholehash.reset()
        meta = None if from_source else task_meta(self)
        before = self.state

        def saved(_: Any) -> None:
            if self.state is not before:
                return
            self.lifecycle.move(State.DONE)
            self.finished_at = self.last_access = self.clock.seconds()
            traffic = self.traffic
            fields = dict(
                bytes=self.length, pieces=self.count, seconds=self.finished_at - self.started,
                src=traffic["back_to_source"], sn=traffic["supernode"], peers=traffic["remote_peer"],
            )
            if from_source:
                self._serve()
                self._log(LogLevel.info, "complete from the origin, {bytes} bytes in {seconds:.2f}s", **fields)
            else:
                how = "(source {src}, supernode {sn}, peers {peers})"
                self._log(LogLevel.info, "complete, {bytes} bytes in {seconds:.2f}s " + how, uploaded=self.uploaded, **fields)
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
        self.wholehash.reset()
        self.finished_at = self.clock.seconds()
        self._log(
            LogLevel.warn, "failed after {seconds:.2f}s: {code} {message}",
            code=error.code, message=error.message, seconds=self.finished_at - self.started,
            bytes=self.pieces.completed_bytes,
        )
        self._stop_checker()
        self.neighbours.close()
        d = self.store.remove(self.task_id)
        d.addErrback(lambda f: self._log(LogLevel.warn, "cannot remove the task's files: {why}", why=f.getErrorMessage()))
        self._notify()

    def _notify(self) -> None:
        """The task ended: a last sync now, then the listeners and the dfpeer hear of it."""
        self.syncer.kick()
        self.listeners.ended(self)
        self.daemon.task_ended(self)

    async def _back_to_source(self, why: str, reason: str) -> None:
        """
        Leave the swarm for the origin (L{SourceFetch}: by piece when the
        file holds verified pieces and every missing one has a digest);
        C{reason} is one of L{dragonfly.peer.metrics.BACK_TO_SOURCE}.
        """
        if self.request.get("notbs"):
            raise TaskFailed("P2P_FAILED", f"{why}; not going back to the origin (--notbs)")
        if not self.lifecycle.can(State.BACK_TO_SOURCE):
            return
        # the file exists and holds verified pieces while transferring (never before ALLOCATING is done)
        by_piece = self.lifecycle.transferring and self.pieces.missing_known()
        self.lifecycle.move(State.BACK_TO_SOURCE)
        self.stats.count(self.stats.back_to_source, reason)
        self._log(
            LogLevel.info, "back to source: {why}", why=why, reason=reason, url=safe_url(self.request["url"]),
            pieces=(self.count or 0) - len(self.have or ()) if by_piece else None,
        )
        self.neighbours.close()
        self._stop_checker()
        got = await self.source.fetch(by_piece, wanted_sha256(self.request), self.sha256)
        self.sha256 = got.sha256 or self.sha256
        if not got.verified:
            self._unverified_source = True
            self._set_length(got.length, self.piece_size or (4 << 20))
            self.pieces.have_all()
        self._succeed(from_source=not got.verified)

"""
One download on a dfpeer, and the serving of it afterwards.

The task registers with the SuperNode, then syncs every half second: it
reports the pieces it verified and the failures it saw, and learns the task's
length, the piece digests, its parents and its seed allowance (see
L{dragonfly.supernode.scheduler}).  Pieces move over block connections:

  - to every parent (and the seed) it opens one connection; peers that chose
    it as their parent connect to it; all connections are symmetric;
  - pieces are chosen rarest-first among the neighbours' bitfields, ties at
    random; from the seed only the pieces of the allowance;
  - each connection has one request out (C{--pipeline}), and the task a
    bounded number (C{--in-flight}, about 6 MiB), so each piece arrives
    quickly and can be passed on;
  - for the last few pieces (endgame) a piece out for over a second may be
    asked from a second neighbour, and the loser is cancelled;
  - every piece is checked against the SuperNode's SHA-256 before it is
    written, and served to the neighbours (HAVE) as soon as it is written;
  - a piece that fails (bad digest, reject, connection lost, no bytes for
    C{stall_timeout}) is asked again at once from another holder, and the
    failure is reported so the scheduler can block a bad parent.

When the SuperNode cannot be reached the task goes back to the origin, unless
told not to (C{notbs}).
"""

from __future__ import annotations

import os
import random
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from ..core.bitmap import Bitmap
from ..core.files import file_sha256
from ..core.ids import BadInput, parse_digest
from ..core.pieces import piece_count, piece_span
from ..core.ids import SEED_ID
from ..core.logs import safe_url, task_log
from ..core.ratelimit import TokenBucket
from ..protocol.block import BlockProtocol
from .client import SupernodeError, SupernodeUnavailable

log = Logger()

class TaskFailed(Exception):
    """A download failed; C{code} is stable, C{message} for humans."""

    def __init__(self, code: str, message: str, origin_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.origin_status = origin_status


class PeerTask:
    """
    @param daemon: the L{PeerDaemon} (store, client, block factory, clock).
    @param request: what dfget asked: url, headers, digest, identifier, filter, notbs.
    """

    #: a neighbour whose pieces failed their SHA-256 this often is banned
    BAN_AFTER = 2
    BAN_FOR = 60.0
    #: sync interval while the task is starting
    STARTUP_SYNC = 0.05
    #: pieces in flight for one task at the least (see dfpeer --in-flight)
    MIN_IN_FLIGHT = 4
    #: endgame: duplicate requests only for the last few pieces, out this long
    ENDGAME_PIECES = 4
    ENDGAME_AFTER = 1.0
    #: a connection with requests out and no bytes for this long is abandoned
    stall_timeout = 5.0
    #: without a SuperNode and without progress for this long, go to the origin
    orphan_timeout = 10.0

    accepts_pieces = True

    def __init__(self, daemon: Any, task_id: str, request: dict[str, Any]) -> None:
        self.daemon = daemon
        self.clock = daemon.clock
        self.task_id = task_id
        self.request = request
        self.status = "waiting"
        self.error: TaskFailed | None = None
        self.length: int | None = None
        self.piece_size = 0
        self.count: int | None = None
        self.digests: list[bytes | None] = []
        self.sha256: str | None = None
        # the SuperNode's name for the origin content we download (see L{_check_version})
        self.version: str | None = None
        self.have: Bitmap | None = None
        self.ready_for_io = False
        self.conns: set[BlockProtocol] = set()
        self.seed_conn: BlockProtocol | None = None
        self._seed_proto: BlockProtocol | None = None
        self._connecting: set[str] = set()
        self.avail: list[int] = []
        self.pending: dict[int, list[BlockProtocol]] = {}
        self.verifying: set[int] = set()
        self.seed_allowed: set[int] = set()
        self._report_have: list[int] = []
        self._report_failed: list[dict[str, Any]] = []
        self._digests_from = 0
        self._wake: Deferred | None = None
        self._kicked = False
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
        self.watchers: list[Any] = []
        #: pieces from here on are preferred while a stream reads them in order
        self.stream_from: int | None = None
        self.content_type: str | None = None
        self._checker = LoopingCall(self._check_stalls)
        self._checker.clock = self.clock
        self._rng = random.Random()
        self.bad_pieces = 0
        self._bad_from: dict[str, int] = {}
        self._banned: dict[str, float] = {}
        rate = request.get("localLimit")
        self.local_limit = TokenBucket(rate, self.clock) if rate else None

    def _log(self, level: LogLevel, fmt: str, **fields: Any) -> None:
        """A log event with C{taskId}, C{task} (shown in the text) and our C{peerId}."""
        task_log(log, level, self.task_id, fmt, peerId=self.daemon.peer_id, **fields)

    # -- views -------------------------------------------------------------------

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
            "piecesVerified": self.status == "success" and self.traffic["back_to_source"] == 0,
            "dataPath": self.daemon.store.data_path(self.task_id),
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

    def watch(self, callback: Any) -> None:
        self.watchers.append(callback)

    def unwatch(self, callback: Any) -> None:
        if callback in self.watchers:
            self.watchers.remove(callback)

    def _changed(self) -> None:
        for callback in list(self.watchers):
            callback()

    def wait(self) -> Deferred:
        """Fires with this task when it ends, either way."""
        d: Deferred = Deferred()
        if self.status in ("success", "failed"):
            d.callback(self)
        else:
            self.waiters.append(d)
        return d

    # -- life --------------------------------------------------------------------

    def restore(self, meta: dict[str, Any]) -> None:
        """A task finished before a restart: serve it again."""
        self._set_length(meta["length"], meta["pieceSize"])
        self.digests = [bytes.fromhex(d) for d in meta["digests"]]
        for i in range(self.count or 0):
            self.have.set(i)
        self.sha256 = meta.get("sha256")
        self.content_type = meta.get("contentType")
        self.version = meta.get("version")
        self.ready_for_io = True
        self.status = "success"
        self.finished_at = self.started = self.clock.seconds()
        self.last_access = meta.get("lastAccess", self.started)

    def start(self) -> None:
        self.status = "running"
        if self.daemon.trace:
            log.info("trace {task} start at {t:.3f}", task=self.task_id[:12], t=self.clock.seconds())
        d = Deferred.fromCoroutine(self._run())
        d.addErrback(self._crashed)

    def _crashed(self, f: Any) -> None:
        if isinstance(f.value, TaskFailed):
            self._finish_failed(f.value)
        else:
            log.failure(
                "task {task} crashed", f, task=self.task_id[:12], taskId=self.task_id, peerId=self.daemon.peer_id,
            )
            self._finish_failed(TaskFailed("INTERNAL", f.getErrorMessage()))

    async def _run(self) -> None:
        try:
            reply = await self._register()
        except SupernodeUnavailable as e:
            self._log(LogLevel.warn, "{why}", why=str(e))
            await self._back_to_source(f"supernode unreachable ({e})", "supernode_unreachable")
            return
        except SupernodeError as e:
            raise TaskFailed(e.code, e.message) from None
        if reply["taskId"] != self.task_id:
            raise TaskFailed("INTERNAL", f"supernode computed task id {reply['taskId']}, we {self.task_id}")
        self._check_version(reply["task"])
        self._log(
            LogLevel.info, "registered with supernode {node} for {url} (CDN {status})",
            node=self.daemon.client.current, url=safe_url(self.request["url"]),
            status=(reply.get("task") or {}).get("status"),
        )
        self._checker.start(1.0, now=False)
        unreachable_since: float | None = None
        while self.status == "running":
            try:
                reply = await self._sync()
                unreachable_since = None
            except SupernodeUnavailable as e:
                now = self.clock.seconds()
                unreachable_since = unreachable_since or now
                if now - self._last_progress > self.orphan_timeout and now - unreachable_since > self.orphan_timeout:
                    await self._back_to_source(
                        f"supernode lost and no progress for {self.orphan_timeout:.0f}s ({e})", "supernode_lost",
                    )
                    return
                await self._sleep(1.0)
                continue
            interval = float(reply.get("syncInterval", 0.5))
            if self.have is None or not self.ready_for_io or self.seed_conn is None:
                # starting: the length, the seed and the first parents come
                # in the next few answers; ask again soon
                interval = min(interval, self.STARTUP_SYNC)
            if self.status != "running":
                break
            await self._sleep(interval)
        # one last report so the scheduler knows we hold everything (and the
        # SuperNode counts the last bytes from peers)
        unreported = self.traffic["remote_peer"] > self._peer_bytes_reported
        if self.status == "success" and (self._report_have or unreported):
            try:
                await self._sync()
            except (SupernodeUnavailable, SupernodeError):
                pass

    async def _register(self) -> dict[str, Any]:
        body = {
            "peerId": self.daemon.peer_id,
            "url": self.request["url"],
            "headers": self.request.get("headers") or {},
            "digest": self.request.get("digest"),
            "identifier": self.request.get("identifier"),
            "filter": self.request.get("filter") or [],
        }
        try:
            return await self.daemon.client.call("POST", "/api/v1/tasks", body)
        except SupernodeError as e:
            if e.code != "PEER_UNKNOWN":
                raise
            await self.daemon.register()
            return await self.daemon.client.call("POST", "/api/v1/tasks", body)

    def _check_version(self, task: dict[str, Any]) -> None:
        """
        The origin content must stay the one we started with: the SuperNode
        fetches a changed origin file as a new version of the task, and the
        pieces of two versions must never meet in one file.
        """
        version = task.get("version")
        if version is None:
            return
        if self.version is None:
            self.version = version
        elif version != self.version:
            raise TaskFailed(
                "SOURCE_CHANGED", f"the origin file {self.request.get('url')} changed during the download; run it again"
            )

    async def _sync(self) -> dict[str, Any]:
        have, self._report_have = self._report_have, []
        failed, self._report_failed = self._report_failed, []
        peer_bytes = self.traffic["remote_peer"]
        body = {
            "peerId": self.daemon.peer_id, "have": have, "failed": failed,
            "digestsFrom": self._digests_from, "starving": self._starving(), "want": self.stream_from,
            "banned": [p for p in self._banned if self._is_banned(p)],
            # bytes from other peers since the last sync the SuperNode took
            "peerBytes": peer_bytes - self._peer_bytes_reported,
        }
        if self.version is not None:
            body["version"] = self.version
        try:
            reply = await self.daemon.client.call("POST", f"/api/v1/tasks/{self.task_id}/sync", body)
        except SupernodeError as e:
            if e.code == "TASK_CHANGED":
                raise TaskFailed(
                    "SOURCE_CHANGED", f"the origin file {self.request.get('url')} changed during the download; run it again"
                ) from None
            if e.code in ("PEER_UNKNOWN", "TASK_UNKNOWN"):
                # the SuperNode restarted: register again and re-announce all we hold
                if e.code == "PEER_UNKNOWN":
                    await self.daemon.register()
                self._check_version((await self._register())["task"])
                self._report_have = list(self.have) if self.have is not None else []
                self._report_failed = failed
                return {"syncInterval": 0.1}
            self._report_have = have + self._report_have
            raise TaskFailed(e.code, e.message) from None
        except SupernodeUnavailable:
            self._report_have = have + self._report_have
            self._report_failed = failed + self._report_failed
            raise
        self._peer_bytes_reported = peer_bytes
        self._apply(reply)
        return reply

    def _apply(self, reply: dict[str, Any]) -> None:
        task = reply["task"]
        self._check_version(task)
        if task["status"] == "failed":
            err = task.get("error") or {}
            code = err.get("code", "SOURCE_ERROR")
            if code == "SOURCE_UNREACHABLE" and not self.request.get("notbs"):
                self._start_back_to_source("supernode cannot reach the origin", "supernode_cannot_reach_origin")
                return
            raise TaskFailed(code, err.get("message", "task failed at the supernode"), err.get("originStatus"))
        if self.length is None and task.get("contentLength") is not None and task.get("pieceCount") is not None:
            self._set_length(task["contentLength"], task["pieceSize"])
            self._log(
                LogLevel.info, "{bytes} bytes in {pieces} pieces of {pieceSize}",
                bytes=self.length, pieces=self.count, pieceSize=self.piece_size,
            )
            self._allocate()
        first = reply.get("digestsFrom", 0)
        for k, hexd in enumerate(reply.get("digests", [])):
            self._set_digest(first + k, bytes.fromhex(hexd))
        if task.get("sha256"):
            self.sha256 = task["sha256"]
        if task.get("contentType") and self.content_type is None:
            self.content_type = task["contentType"]
        self.seed_allowed = set(reply.get("seedPieces", []))
        if self.have is not None and self.ready_for_io:
            for parent in reply.get("parents", []):
                self._connect(parent)
        self._fill()

    def _set_length(self, length: int, piece_size: int) -> None:
        self.length, self.piece_size = length, piece_size
        self.count = piece_count(length, piece_size)
        self.have = Bitmap(self.count)
        self.avail = [0] * self.count
        self.digests = [None] * self.count

    def _set_digest(self, index: int, digest: bytes) -> None:
        if self.count is None or not 0 <= index < self.count:
            return
        self.digests[index] = digest
        while self._digests_from < self.count and self.digests[self._digests_from] is not None:
            self._digests_from += 1

    def _allocate(self) -> None:
        d = self.daemon.store.prepare(self.task_id, self.length)

        def ready(_: Any) -> None:
            self.ready_for_io = True
            self._changed()
            if self.count == 0:
                self._complete()
            else:
                self._kick()

        d.addCallbacks(ready, lambda f: self._finish_failed(TaskFailed("STORE_FAILED", f"cannot create the task's file: {f.getErrorMessage()}")))

    # -- connections -------------------------------------------------------------

    def _connect(self, parent: dict[str, Any]) -> None:
        remote = parent["peerId"]
        if remote == self.daemon.peer_id or remote in self._connecting:
            return
        if any(c.remote_id == remote for c in self.conns) or self._is_banned(remote):
            return
        self._connecting.add(remote)
        endpoint = TCP4ClientEndpoint(self.daemon.reactor, parent["ip"], int(parent["port"]), timeout=5)
        proto = self.daemon.block_factory.client(self, self.task_id, remote)
        if parent.get("seed"):
            # only the connection we opened to the seed the SuperNode named
            # may send DIGESTS; a peer calling itself "supernode" may not
            self._seed_proto = proto
        d = self.daemon.block_factory.connect(endpoint, proto)

        def failed(f: Any) -> None:
            self._connecting.discard(remote)
            self._log(LogLevel.info, "cannot reach parent {parent}: {why}", parent=remote, why=f.getErrorMessage())
            if remote != SEED_ID:
                self._report_failed.append({"index": -1, "parent": remote})

        d.addCallbacks(lambda _: self._connecting.discard(remote), failed)

    def local_bitmap(self) -> Bitmap | None:
        return self.have

    def piece_length(self, index: int) -> int | None:
        if self.length is None or not 0 <= index < (self.count or 0):
            return None
        return piece_span(index, self.length, self.piece_size)[1]

    def in_use(self) -> bool:
        """Downloading, or a piece of it being sent to a peer: never evicted."""
        return self.status in ("waiting", "running") or any(c.uploading for c in self.conns)

    def read_piece(self, index: int) -> Deferred:
        self.last_access = self.clock.seconds()
        offset, size = piece_span(index, self.length, self.piece_size)
        return self.daemon.store.read(self.task_id, offset, size)

    def _is_banned(self, remote: str | None) -> bool:
        until = self._banned.get(remote or "")
        return until is not None and until > self.clock.seconds()

    def attached(self, conn: BlockProtocol) -> None:
        if self.have is None or not self.ready_for_io:
            conn.abort("task not ready yet", 503)
            return
        if self._is_banned(conn.remote_id):
            conn.abort("banned: sent pieces that failed their SHA-256", 403)
            return
        self.conns.add(conn)
        if conn is self._seed_proto:
            self.seed_conn = conn

    def detached(self, conn: BlockProtocol, reason: str) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        was_seed = conn is self.seed_conn
        if was_seed:
            self.seed_conn = None
        elif conn.remote_have is not None:
            for i in conn.remote_have:
                self.avail[i] -= 1
        lost = list(conn.requested)
        for i in lost:
            self._drop_pending(i, conn)
        if self.status == "running":
            if lost:
                self._log(
                    LogLevel.info, "lost {remote} ({why}) with {n} pieces in flight",
                    remote=conn.remote_id, why=reason, n=len(lost),
                )
            if conn.remote_id and conn.remote_id != SEED_ID and (lost or conn.initiator):
                # -1: the connection itself broke (see the scheduler's dead_after)
                self._report_failed.append({"index": -1, "parent": conn.remote_id})
            self._fill()

    def on_bitfield(self, conn: BlockProtocol) -> None:
        if conn is not self.seed_conn:
            for i in conn.remote_have:
                self.avail[i] += 1
        self._fill()

    def on_have(self, conn: BlockProtocol, index: int) -> None:
        if conn is self.seed_conn:
            self._fill()
            return
        self.avail[index] += 1
        # HAVEs are the most frequent event: only this connection's choice can
        # change, and a piece just announced is among the rarest anyway
        if not self._wanted(index) or self.status != "running" or not self.ready_for_io:
            return
        per_conn, limit = self._limits()
        if len(conn.requested) >= per_conn or conn.closed:
            return
        if sum(len(c.requested) for c in self.conns if c is not self.seed_conn) >= limit:
            return
        conn.request(index, self.clock.seconds())
        self.pending.setdefault(index, []).append(conn)

    def _starving(self) -> bool:
        """Nothing to fetch from any neighbour but the seed (the scheduler may then send a second copy)."""
        if self.have is None or self.have.complete:
            return False
        peers = [c for c in self.conns if c is not self.seed_conn and c.remote_have is not None]
        if any(c.requested for c in peers):
            return False
        return not any(self._wanted(i) for c in peers for i in c.remote_have)

    def _wanted(self, index: int) -> bool:
        """Missing, not asked for, not being checked, and its digest is known."""
        return (
            index not in self.have and index not in self.pending and index not in self.verifying
            and self.digests[index] is not None
        )

    def on_digests(self, conn: BlockProtocol, first: int, digests: list[bytes]) -> None:
        if conn is not self.seed_conn:
            conn.abort("DIGESTS are accepted from the seed only")
            return
        for k, digest in enumerate(digests):
            self._set_digest(first + k, digest)
        self._fill()

    def on_reject(self, conn: BlockProtocol, index: int, reason: int) -> None:
        self._drop_pending(index, conn)
        if conn.remote_have is not None and index in conn.remote_have and conn is not self.seed_conn:
            # it said it had the piece; believe it less
            conn.remote_have.clear(index)
            self.avail[index] -= 1
        self._fill()

    def download_limits(self) -> list[TokenBucket | None]:
        return [self.local_limit, self.daemon.total_limit]

    def on_uploaded(self, conn: BlockProtocol, nbytes: int) -> None:
        self.uploaded += nbytes
        stats = self.daemon.stats
        stats.upload_pieces += 1
        stats.upload_bytes += nbytes
        self.daemon.note_activity()

    # -- pieces ----------------------------------------------------------------

    def _drop_pending(self, index: int, conn: BlockProtocol) -> None:
        holders = self.pending.get(index)
        if holders is None:
            return
        if conn in holders:
            holders.remove(conn)
        if not holders:
            del self.pending[index]

    def on_piece(self, conn: BlockProtocol, index: int, data: bytearray) -> None:
        kind = "supernode" if conn is self.seed_conn else "remote_peer"
        self.traffic[kind] += len(data)
        self.daemon.note_activity()
        for other in self.pending.pop(index, []):
            if other is not conn:
                other.cancel(index)
        digest = self.digests[index]
        if index in self.have or index in self.verifying or self.status != "running" or digest is None:
            # a duplicate from the endgame, or too late; (a digest is always
            # known: only pieces with one are requested)
            self.daemon.stats.count(self.daemon.stats.discarded, "duplicate", len(data))
            self.daemon.block_factory.release(data)
            self._fill()
            return
        self.verifying.add(index)
        offset = index * self.piece_size
        d = self.daemon.store.write_verified(self.task_id, offset, data, digest)
        d.addBoth(self._release, data)
        d.addCallbacks(self._stored, self._store_failed, callbackArgs=(index, conn, kind, len(data)), errbackArgs=(index,))
        self._fill()

    def _release(self, result: Any, data: bytearray) -> Any:
        self.daemon.block_factory.release(data)
        return result

    def _stored(self, ok: bool, index: int, conn: BlockProtocol, kind: str, nbytes: int) -> None:
        self.verifying.discard(index)
        stats = self.daemon.stats
        if self.status != "running":
            stats.count(stats.discarded, "duplicate" if ok else "corrupt", nbytes)
            return
        if not ok:
            stats.count(stats.discarded, "corrupt", nbytes)
            self._log(
                LogLevel.warn, "piece {index} from {remote} failed its SHA-256 check",
                index=index, remote=conn.remote_id, bytes=nbytes,
            )
            self.bad_pieces += 1
            self._report_failed.append({"index": index, "parent": conn.remote_id or "?"})
            if conn.remote_have is not None and index in conn.remote_have and conn is not self.seed_conn:
                conn.remote_have.clear(index)
                self.avail[index] -= 1
            remote = conn.remote_id or "?"
            self._bad_from[remote] = self._bad_from.get(remote, 0) + 1
            if self._bad_from[remote] >= self.BAN_AFTER and conn is not self.seed_conn:
                # failure is local first: stop talking to it now, whatever
                # the scheduler decides for the others
                self._log(
                    LogLevel.warn, "banning {remote} for {t:.0f}s after {n} bad pieces",
                    remote=remote, t=self.BAN_FOR, n=self._bad_from[remote], reason="corrupt",
                )
                stats.count(stats.bans, "corrupt")
                self._banned[remote] = self.clock.seconds() + self.BAN_FOR
                conn.abort("sent pieces that fail their SHA-256", 403)
                self.detached(conn, "banned")
            self._fill()
            return
        self.have.set(index)
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
        for c in list(self.conns):
            # a neighbour that holds the piece has no use for our HAVE
            if c.remote_have is None or index not in c.remote_have:
                c.send_have(index)
        if self.have.complete:
            self._complete()
        else:
            self._fill()

    def _store_failed(self, f: Any, index: int) -> None:
        self.verifying.discard(index)
        self._finish_failed(TaskFailed("STORE_FAILED", f"cannot write piece {index}: {f.getErrorMessage()}"))

    def _limits(self) -> tuple[int, int]:
        """(requests per connection, pieces in flight for the whole task)."""
        size = self.piece_size or (4 << 20)
        d = self.daemon
        return d.per_connection, max(self.MIN_IN_FLIGHT, d.in_flight_bytes // size)

    def _fill(self) -> None:
        """
        Keep requests going (see the module docstring): a few per connection
        and a bounded number for the task, so that each piece completes fast
        and can be passed on, rather than many pieces crawling in parallel.
        """
        if self.status != "running" or self.have is None or not self.ready_for_io:
            return
        per_conn, limit = self._limits()
        now = self.clock.seconds()
        seed = self.seed_conn
        if seed is not None and not seed.closed and seed.remote_have is not None:
            # the seed allowance goes first and apart from the budget: it is
            # the swarm's only supply of pieces nobody holds yet
            while len(seed.requested) < max(per_conn, len(self.seed_allowed)):
                index = self._choose(seed, now)
                if index is None:
                    break
                seed.request(index, now)
                self.pending.setdefault(index, []).append(seed)
        in_flight = sum(len(c.requested) for c in self.conns if c is not seed)
        conns = [
            c for c in self.conns
            if c is not seed and not c.closed and c.remote_have is not None and len(c.requested) < per_conn
        ]
        self._rng.shuffle(conns)
        progress = True
        while progress and in_flight < limit:
            progress = False
            # one request per connection per round spreads the load
            for conn in conns:
                if in_flight >= limit or len(conn.requested) >= per_conn:
                    continue
                index = self._choose(conn, now)
                if index is None:
                    continue
                conn.request(index, now)
                self.pending.setdefault(index, []).append(conn)
                in_flight += 1
                progress = True

    def _choose(self, conn: BlockProtocol, now: float) -> int | None:
        have, remote = self.have, conn.remote_have
        is_seed = conn is self.seed_conn
        best: int | None = None
        best_key = None
        candidates = self.seed_allowed if is_seed else range(self.count or 0)
        for i in candidates:
            if i not in remote or not self._wanted(i):
                continue
            key = (self._far(i), self.avail[i], self._rng.random())
            if best_key is None or key < best_key:
                best, best_key = i, key
        if best is not None or is_seed:
            return best
        # endgame: only the last few pieces, all already asked for; ask a
        # second holder for one that has been out for a while
        missing = (self.count or 0) - len(have)
        if missing > self.ENDGAME_PIECES or missing > len(self.pending) + len(self.verifying):
            return None
        for i, holders in self.pending.items():
            if (
                len(holders) == 1 and holders[0] is not conn and i in remote and i not in self.verifying
                and now - holders[0].requested.get(i, now) >= self.ENDGAME_AFTER
            ):
                return i
        return None

    #: pieces ahead of an in-order stream that go before the rarest
    STREAM_WINDOW = 4

    def want_now(self) -> None:
        """An in-order reader moved on to C{stream_from}: ask for it now."""
        self._kick()
        self._fill()

    def _far(self, index: int) -> bool:
        """False for pieces an in-order reader needs next (they go first)."""
        s = self.stream_from
        return s is None or not s <= index < s + self.STREAM_WINDOW

    def _check_stalls(self) -> None:
        now = self.clock.seconds()
        for conn in list(self.conns):
            if not conn.requested:
                continue
            since = max(conn.last_rx, min(conn.requested.values()))
            if now - since > self.stall_timeout:
                self._log(
                    LogLevel.info, "{remote} sent nothing for {t:.1f}s with {n} requests out; abandoning it",
                    remote=conn.remote_id, t=now - since, n=len(conn.requested), reason="stalled",
                )
                self.daemon.stats.count(self.daemon.stats.bans, "stalled")
                conn.abort("stalled", 408)
                self.detached(conn, "stalled")
                # useless for now: do not reconnect to it for a while
                self._banned[conn.remote_id or "?"] = now + self.BAN_FOR
        # the endgame waits for requests to age: look again once a second
        self._fill()

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

    def _complete(self) -> None:
        """Every piece is verified; with a requested digest, check the whole file too."""
        want = self._wanted_sha256()
        if want is None:
            self._succeed()
            return
        if self._checker.running:
            self._checker.stop()
        d = self.daemon.pool.run(file_sha256, self.daemon.store.data_path(self.task_id))

        def checked(sha: str) -> None:
            if self.status != "running":
                return
            if sha != want:
                self._finish_failed(
                    TaskFailed("DIGEST_MISMATCH", f"content has sha256:{sha}, expected sha256:{want}")
                )
                return
            self.sha256 = sha
            self._succeed()

        d.addCallbacks(checked, lambda f: self._finish_failed(TaskFailed("STORE_FAILED", f.getErrorMessage())))

    def _succeed(self) -> None:
        self.status = "success"
        self.last_access = self.clock.seconds()
        # read-only from now on: dfget hands it out as a hard link
        try:
            os.chmod(self.daemon.store.data_path(self.task_id), 0o444)
        except OSError:
            pass
        self.finished_at = self.clock.seconds()
        if self._checker.running:
            self._checker.stop()
        self.daemon.store.save_meta(
            self.task_id,
            {
                "taskId": self.task_id, "url": self.request.get("url"), "length": self.length,
                "pieceSize": self.piece_size, "digests": [d.hex() for d in self.digests], "sha256": self.sha256,
                "contentType": self.content_type,
                "version": self.version,
                "request": {k: v for k, v in self.request.items() if k != "headers"},
            },
        )
        self._log(
            LogLevel.info, "complete, {bytes} bytes in {seconds:.2f}s (source {src}, supernode {sn}, peers {peers})",
            bytes=self.length, pieces=self.count, seconds=self.finished_at - self.started,
            src=self.traffic["back_to_source"], sn=self.traffic["supernode"], peers=self.traffic["remote_peer"],
            uploaded=self.uploaded,
        )
        self._kick()
        self._notify()

    def _finish_failed(self, error: TaskFailed) -> None:
        if self.status in ("success", "failed"):
            return
        self.status = "failed"
        self.error = error
        self.finished_at = self.clock.seconds()
        self._log(
            LogLevel.warn, "failed after {seconds:.2f}s: {code} {message}",
            code=error.code, message=error.message, seconds=self.finished_at - self.started,
            bytes=self.completed_bytes,
        )
        if self._checker.running:
            self._checker.stop()
        for conn in list(self.conns):
            conn.transport.loseConnection()
        self.daemon.store.remove(self.task_id)
        self._kick()
        self._notify()

    def _notify(self) -> None:
        self._changed()
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(self)
        self.daemon.task_ended(self)

    # -- back to source ---------------------------------------------------------

    def _start_back_to_source(self, why: str, reason: str) -> None:
        d = Deferred.fromCoroutine(self._back_to_source(why, reason))
        d.addErrback(self._crashed)

    async def _back_to_source(self, why: str, reason: str) -> None:
        """Fetch the whole file from the origin; C{reason} is one of L{metrics.BACK_TO_SOURCE}."""
        if self.request.get("notbs"):
            raise TaskFailed("P2P_FAILED", f"{why}; not going back to the origin (--notbs)")
        if self.status != "running" or getattr(self, "_bts", False):
            return
        self._bts = True
        self.daemon.stats.count(self.daemon.stats.back_to_source, reason)
        self._log(LogLevel.info, "back to source: {why}", why=why, reason=reason, url=safe_url(self.request["url"]))
        for conn in list(self.conns):
            conn.transport.loseConnection()
        if self._checker.running:
            self._checker.stop()
        length, sha = await self.daemon.fetch_from_source(self)
        want = self._wanted_sha256()
        if want is not None and sha != want:
            self.daemon.store.remove(self.task_id)
            raise TaskFailed("DIGEST_MISMATCH", f"origin content has sha256:{sha}, expected sha256:{want}")
        self.have = None
        self._set_length(length, self.piece_size or (4 << 20))
        for i in range(self.count):
            self.have.set(i)
        self.sha256 = sha
        self.ready_for_io = True
        self.status = "success"
        self.finished_at = self.last_access = self.clock.seconds()
        self._log(
            LogLevel.info, "complete from the origin, {bytes} bytes in {seconds:.2f}s",
            bytes=length, pieces=self.count, seconds=self.finished_at - self.started,
            src=self.traffic["back_to_source"], sn=self.traffic["supernode"], peers=self.traffic["remote_peer"],
        )
        self._notify()

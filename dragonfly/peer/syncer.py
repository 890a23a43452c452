"""
One download's conversation with the SuperNode: register the task, then
sync until it ends (every half second, sooner while it starts or when
kicked; see L{dragonfly.supernode.scheduler}).  Once the download is settled
(the seed connected, pieces flowing from parents, nothing asked of the
SuperNode) the wait grows to L{Syncer.max_sync}; anything that needs the
SuperNode (a failure, starving, a reader's want, a seed piece, the end) still
syncs at once.

Each sync reports the pieces verified and the failures seen since the last
one, and hands the answer to the task (L{SyncedTask.apply}).  What the
SuperNode must still hear is kept here: a report that did not get through
is said again, and after an outage (or to a SuperNode that restarted and
forgot us) every piece held is announced again.  The conversation also
keeps the SuperNode's name for the origin content (L{Syncer.version}): the
pieces of two versions of an origin file must never meet in one file.

With no SuperNode to answer, it leaves the swarm (L{BackToSource}), unless
one answered this dfpeer a moment ago (it is restarting, most likely).

Which SuperNode answers is the session's business (L{dragonfly.peer.session});
what the answers mean for the download is the task's (L{dragonfly.peer.task}).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel

from ..core.bitmap import Bitmap
from ..core.logs import safe_url
from ..protocol.supernode_api import FailedPiece, PieceProof, SyncAnswer, SyncReport, TaskRegistered, TaskView
from .client import SupernodeError, SupernodeUnavailable
from .interfaces import Session
from .lifecycle import Lifecycle, State
from .outcome import BackToSource, TaskFailed, TaskLog

#: the states in which a task syncs
SYNCING = frozenset({State.SIZING, State.ALLOCATING, State.DOWNLOADING, State.VERIFYING})
#: the states in which a task refuses block connections (its file is not made yet)
PREPARING = frozenset({State.SIZING, State.ALLOCATING})


@frozen
class Progress:
    """What a sync says of the download besides the pieces and failures (see L{SyncReport})."""

    #: every piece held now (None: the length is not known yet): announced again after an outage
    held: Bitmap | None
    #: every piece before this one has its digest
    digests_from: int
    #: nothing to fetch from any neighbour but the seed
    starving: bool
    #: the piece an in-order reader waits for
    want: int | None
    #: the neighbours banned now
    banned: list[str]
    #: bytes received from other peers so far
    peer_bytes: int
    #: when the last piece was stored
    last_progress: float
    #: the seed and at least one other neighbour are connected (see L{Syncer._settled})
    connected: bool = False
    #: every piece before this one has its tag (see L{dragonfly.core.piecetag})
    tags_from: int = 0


class SyncedTask(Protocol):
    """What the conversation needs of its download (L{dragonfly.peer.task.PeerTask})."""

    #: the task's state: it syncs while in L{SYNCING}
    lifecycle: Lifecycle

    def starting(self) -> bool:
        """The length, the seed or the first parents are still to come: sync again soon."""

    def progress(self) -> Progress:
        """The rest of the next report."""

    def registered(self) -> None:
        """The SuperNode knows the task: syncs begin."""

    def apply(self, reply: SyncAnswer) -> None:
        """Act on a sync answer (its version checked, not a failure)."""

    def held_proofs(self) -> tuple[dict[str, Any] | None, list[PieceProof]]:
        """The tagged origin and the pieces held with their digests and tags, for a node that takes the task over."""


class SupernodeWatch(Protocol):
    """The dfpeer, as far as the conversation needs it (L{dragonfly.peer.interfaces.TaskHost})."""

    clock: Any
    #: when a SuperNode last answered one of our tasks (None: never)
    supernode_seen: float | None


class Syncer:
    """
    @param task: the download.
    @param session: which SuperNode to ask (L{dragonfly.peer.session.TaskSession}).
    @param host: the dfpeer: its clock, and when a SuperNode last answered.
    @param request: what dfget asked (the url, C{notbs}).
    @param log: the task's log.
    """

    #: sync interval while the task is starting
    STARTUP_SYNC = 0.05
    #: sync interval while the SuperNode does not know the length yet (its CDN
    #: waits for the origin's answer): the length and the first seed pieces are
    #: what a cold download waits for, and the CDN has them tens of ms after
    #: the registration, so a 50 ms poll lost 25 ms on average
    SIZING_SYNC = 0.02
    #: without a SuperNode and without progress for this long, go to the origin
    orphan_timeout = 10.0
    #: a SuperNode that answered this recently is waited for (see L{register})
    supernode_grace = 60.0
    #: the waits between calls to a SuperNode that does not answer: a restart
    #: takes about half a second, so the first calls come soon, then once a second
    RETRY_WAITS = (0.25, 0.5, 1.0)
    #: the longest wait between two syncs of a settled download (see L{_settled}); the
    #: wait doubles from the SuperNode's interval each settled sync.  DRAGONFLY_SYNC_MAX overrides it (A/B rounds)
    max_sync = float(os.environ.get("DRAGONFLY_SYNC_MAX", 2.0))
    #: pieces flow: one was stored within this many seconds
    FLOWING = 1.0
    #: a download under way asks again this often for the first L{OUTAGE_FAST}
    #: seconds of an outage: until a restarted SuperNode binds its port the
    #: calls are refused at once (cheap); from then on they wait in its listen
    #: backlog and are answered as soon as it runs, so the peers come back
    #: together with it instead of on their next retry tick
    OUTAGE_RETRY = 0.1
    OUTAGE_FAST = 3.0
    #: the wait before the sync that re-announces all we hold to a SuperNode that
    #: forgot us (restarted): its seed and parents come with that sync's answer
    REJOIN_SYNC = 0.01

    def __init__(
        self, task: SyncedTask, task_id: str, session: Session, host: SupernodeWatch, request: Mapping[str, Any],
        log: TaskLog,
    ) -> None:
        self._task = task
        self._task_id = task_id
        self._session = session
        self._host = host
        self._clock = host.clock
        self._request = request
        self._log = log
        #: the SuperNode's name for the origin content we download
        self.version: str | None = None
        self._have: list[int] = []
        self._failed: list[FailedPiece] = []
        # the bytes from peers the SuperNode has been told of
        self._peer_bytes_reported = 0
        self._wake: Deferred | None = None
        self._kicked = False
        # the wait of a settled download (0: not settled), and the last report's view of it
        self._rest = 0.0
        self._view: Progress | None = None
        self._told_failures = False
        #: sleeping a settled download's longer wait: L{need} cuts it short
        self.resting = False
        # the pieces held with digests and tags, said once to a node that took the task over
        self._proofs: list[PieceProof] = []

    # -- what to say ----------------------------------------------------------------

    def note_have(self, index: int) -> None:
        """Piece C{index} is verified and written: report it at the next sync."""
        self._have.append(index)

    def note_failure(self, index: int, parent: str) -> None:
        """Tell the SuperNode at the next sync (C{index} -1: the connection broke)."""
        self._failed.append(FailedPiece(index, parent))
        self.need()

    def need(self) -> None:
        """Something needs the SuperNode (a failure, starving): sync now if resting, else at the usual time."""
        if self.resting:
            self.kick()

    def _settled(self) -> bool:
        """The last report showed a download that needs nothing of the SuperNode but its pieces' news."""
        p = self._view
        return (
            p is not None and p.connected and not p.starving and p.want is None and not self._failed
            and not self._told_failures
            and self._clock.seconds() - p.last_progress < self.FLOWING
        )

    #: DRAGONFLY_WANT_SYNC=always: every move of an in-order reader syncs at once, as before (A/B rounds)
    want_always = os.environ.get("DRAGONFLY_WANT_SYNC") == "always"

    def want_needs_sync(self, picker: Any, want: int | None) -> bool:
        """
        An in-order reader waits for piece C{want}: is a sync now of use?
        Not when the seed allowed it already, nor when a neighbour other
        than the seed holds it (the scheduler gives no seed piece that a
        neighbour holds; the picker asks that neighbour for it first).  A
        stream reader catching up with the download moved on piece by
        piece, and each move was a sync.
        """
        if self.want_always or picker is None or want is None:
            return True
        if want in picker.seed_allowed:
            return False
        # (avail: how many neighbours other than the seed hold each piece)
        return not (0 <= want < picker.count and picker.avail[want] > 0)

    def kick(self) -> None:
        """Sync now instead of at the next interval."""
        if self._wake is not None and not self._wake.called:
            self._wake.callback(None)
        else:
            self._kicked = True

    async def _sleep(self, seconds: float) -> None:
        """Wait C{seconds}, or less if kicked (a kick while awake cuts the next wait)."""
        if self._kicked:
            self._kicked = False
            return
        self._wake = Deferred()
        timer = self._clock.callLater(seconds, self.kick)
        await self._wake
        self._kicked = False
        if timer.active():
            timer.cancel()

    # -- the conversation -------------------------------------------------------------

    async def run(self) -> None:
        """
        Register, then sync while the task syncs, and once more at the end
        when the SuperNode has not heard everything.

        @raise TaskFailed: the SuperNode refused, or the task failed there.
        @raise BackToSource: leave the swarm for the origin.
        """
        try:
            reply = await self.register()
        except SupernodeError as e:
            raise TaskFailed(e.code, e.message) from None
        if reply.task_id != self._task_id:
            raise TaskFailed("INTERNAL", f"supernode computed task id {reply.task_id}, we {self._task_id}")
        self.check_version(reply.task)
        self._log(
            LogLevel.info, "registered with supernode {node} for {url} (CDN {status})",
            node=self._session.node, url=safe_url(self._request["url"]), status=reply.task.status,
        )
        self._task.registered()
        await self._loop()
        # one last report so the scheduler knows we hold everything (and the
        # SuperNode counts the last bytes from peers)
        unreported = self._task.progress().peer_bytes > self._peer_bytes_reported
        if self._task.lifecycle.state is State.DONE and (self._have or unreported):
            try:
                await self.sync()
            except (SupernodeUnavailable, SupernodeError):
                pass

    async def register(self) -> TaskRegistered:
        """
        Register the task.  With no SuperNode to answer, go to the origin at
        once, unless one answered this dfpeer within C{supernode_grace}
        seconds (it is restarting, most likely): then ask again (soon, then every second, L{RETRY_WAITS})
        for up to C{orphan_timeout} before leaving the swarm, so a SuperNode
        restart does not send every new download to the origin.
        """
        waiting_since: float | None = None
        tries = 0
        while True:
            try:
                reply = await self._session.register()
            except SupernodeUnavailable as e:
                now = self._clock.seconds()
                seen = getattr(self._host, "supernode_seen", None)
                waiting_since = now if waiting_since is None else waiting_since
                if seen is None or now - seen > self.supernode_grace or now - waiting_since >= self.orphan_timeout:
                    self._log(LogLevel.warn, "{why}", why=str(e))
                    raise BackToSource(f"supernode unreachable ({e})", "supernode_unreachable") from None
                await self._sleep(self._retry_wait(tries))
                tries += 1
                continue
            self._answered()
            return reply

    def _retry_wait(self, tries: int) -> float:
        """The wait after C{tries} unanswered calls in a row (L{RETRY_WAITS})."""
        return self.RETRY_WAITS[min(tries, len(self.RETRY_WAITS) - 1)]

    def _syncing(self) -> bool:
        return self._task.lifecycle.state in SYNCING

    def _answered(self) -> None:
        """A SuperNode answered (see L{register})."""
        self._host.supernode_seen = self._clock.seconds()

    async def _loop(self) -> None:
        unreachable_since: float | None = None
        tries = 0
        while self._syncing():
            try:
                interval = await self.sync()
                unreachable_since, tries = None, 0
                self._answered()
            except SupernodeUnavailable as e:
                now = self._clock.seconds()
                unreachable_since = unreachable_since or now
                idle = now - self._task.progress().last_progress
                if idle > self.orphan_timeout and now - unreachable_since > self.orphan_timeout:
                    raise BackToSource(
                        f"supernode lost and no progress for {self.orphan_timeout:.0f}s ({e})", "supernode_lost",
                    ) from None
                fast = now - unreachable_since < self.OUTAGE_FAST
                await self._sleep(self.OUTAGE_RETRY if fast else self._retry_wait(tries))
                tries += 1
                continue
            if self._task.lifecycle.state is State.ALLOCATING:
                # the task's file is being made: nothing to ask until it is,
                # and then the task kicks a sync (it had one every 50 ms)
                self._rest = 0.0
            elif self._task.starting():
                # the length, the seed and the first parents come in the
                # next few answers; ask again soon
                interval = min(interval, self.STARTUP_SYNC)
                self._rest = 0.0
            elif self._settled():
                self._rest = min(max(self.max_sync, interval), 2 * max(interval, self._rest))
                interval = self._rest
            else:
                self._rest = 0.0
            if not self._syncing():
                break
            self.resting = self._rest > 0
            try:
                await self._sleep(interval)
            finally:
                self.resting = False

    async def sync(self) -> float:
        """One sync; the seconds until the next."""
        have, self._have = self._have, []
        failed, self._failed = self._failed, []
        p = self._view = self._task.progress()
        self._told_failures = bool(failed)
        report = SyncReport(
            self._session.peer_id, have=have, failed=failed, digests_from=p.digests_from,
            starving=p.starving, want=p.want, banned=p.banned,
            # bytes from other peers since the last sync the SuperNode took
            peer_bytes=p.peer_bytes - self._peer_bytes_reported, version=self.version,
            tags_from=p.tags_from, proofs=self._proofs,
            # (its file is not made yet: named to no other peer as a parent)
            preparing=self._task.lifecycle.state in PREPARING,
        )
        proofs, self._proofs = self._proofs, []
        before = getattr(self._session, "pinned", None)
        try:
            reply = await self._session.sync(report)
        except SupernodeError as e:
            if e.code == "TASK_CHANGED":
                raise self._changed() from None
            if e.code in ("PEER_UNKNOWN", "TASK_UNKNOWN"):
                # the SuperNode restarted: register again and re-announce all we hold
                if e.code == "PEER_UNKNOWN":
                    await self._session.register_peer()
                # a node that never had the task (its owner died) may take it
                # over from the swarm: the tagged origin with the
                # registration, the pieces' digests and tags with the next sync
                origin, held = self._held_proofs()
                again = await (self._session.register(takeover=origin) if origin else self._session.register())
                self.check_version(again.task)
                self._proofs = held
                self._have = list(p.held) if p.held is not None else []
                self._failed = failed
                return self.REJOIN_SYNC
            self._have = have + self._have
            raise TaskFailed(e.code, e.message) from None
        except SupernodeUnavailable:
            # it may come back restarted, its swarm rebuilt by other peers
            # (it then takes our next sync as a join): say all we hold again
            self._have = list(p.held) if p.held is not None else have + self._have
            self._failed = failed + self._failed
            # the next node of the ranking may take the task over (a node
            # that knows it takes our sync as a join): the digests and tags
            # of all we hold go with that announcement
            self._proofs = self._held_proofs()[1] if p.held is not None else proofs
            raise
        self._peer_bytes_reported = p.peer_bytes
        if self._syncing():
            self._apply(reply)
        after = getattr(self._session, "pinned", None)
        if reply.task.content_length is None and self._task.lifecycle.state is State.SIZING:
            return min(reply.sync_interval, self.SIZING_SYNC)
        if before is not None and after != before and p.held is not None:
            # another node answered (the one we used stopped answering): it
            # heard only this report's news; say all we hold, with the
            # digests' tags for a node that took the task over, at once
            self._have = list(p.held)
            self._proofs = self._held_proofs()[1]
            return min(reply.sync_interval, 0.1)
        return reply.sync_interval

    def _held_proofs(self) -> tuple[dict[str, Any] | None, list[PieceProof]]:
        """The task's tagged origin and held pieces with tags (none from a task that keeps no tags)."""
        held_proofs = getattr(self._task, "held_proofs", None)
        return held_proofs() if held_proofs is not None else (None, [])

    def _apply(self, reply: SyncAnswer) -> None:
        """Check the answer's version and the task's status, then hand it to the task."""
        task = reply.task
        self.check_version(task)
        if task.status == "failed":
            err = task.error or {}
            code = err.get("code", "SOURCE_ERROR")
            if code == "SOURCE_UNREACHABLE" and not self._request.get("notbs"):
                raise BackToSource("supernode cannot reach the origin", "supernode_cannot_reach_origin")
            raise TaskFailed(code, err.get("message", "task failed at the supernode"), err.get("originStatus"))
        self._task.apply(reply)

    def check_version(self, task: TaskView) -> None:
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
            raise self._changed()

    def _changed(self) -> TaskFailed:
        url = self._request.get("url")
        return TaskFailed("SOURCE_CHANGED", f"the origin file {url} changed during the download; run it again")

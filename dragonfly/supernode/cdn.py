"""
The CDN cache: pull each origin file once, cut it into pieces, digest them and
seed them.

A task's origin fetch is single-flight: however many peers register the same
task at the same moment, one HTTP GET goes to the origin.  The body streams
straight to C{<home>/repo/<task id>.data}; each full piece is hashed (SHA-256)
and written at its offset in the worker pool, in order, and published the
moment it is on disk, so peers fetch early pieces while the origin download
is still running.  A whole-file SHA-256 is computed in the same pass when
the task carries a C{sha256:} digest (the CDN checks the body against it;
the peers then skip their own whole-file hash), and only then: no one else
reads it, and it was a second SHA-256 pass over every byte
(C{DRAGONFLY_CDN_FILE_SHA256=always} computes it for every task).

Nothing half-fetched is ever served as complete: a task becomes C{success}
only when the byte count matches the origin's C{Content-Length} (and the
digest the client asked for, if any), and only then is its meta file written.
On start-up completed tasks are reloaded from their meta files.

Pieces a download wants first (a Range request, L{Cdn.want}) that the
in-order fetch would reach only later come by a side fetch: a second origin
request, C{Range} pinned with C{If-Range}, whose pieces are hashed, written
at their offsets and published at once (L{dragonfly.supernode.rangefetch});
the in-order fetch pauses meanwhile, and checks those pieces' digests when
it gets there instead of publishing them again.  Digests are then sparse
until the end.

Fetches resume (see L{dragonfly.supernode.resume}).  Before the body, a
fetch writes its header, C{<task id>.part} (the origin's validators and
length, the piece size); the main body is written in order without holes,
so the data file's size is the count of bytes that reached the disk whole,
unless a side fetch wrote further on: the header's C{holesFrom} then says
where the trusted prefix ends.  With C{retries}, a body cut in flight goes
on in-process from the last byte written the same way, its downloads none
the wiser.
A fetch cut by the origin (a reset, a short body, silence, a 5xx) or by the
process dying leaves data and header; they are parked in C{<home>/resume}
(never in the cache proper) and the next fetch of the task rehashes that
prefix in the pool and asks only for the rest, with C{Range} and
C{If-Range}.  The GC deletes parked prefixes after C{--task-expire}.

Every file operation after start-up runs in the worker pool, one after
another per task (L{Cdn._disk}); the reactor thread only moves bytes.

A cached file is revalidated against the origin when a peer registers the
task again (L{Cdn.fresh}): a conditional GET (C{If-None-Match} with the
stored C{ETag}, C{If-Modified-Since} with the stored C{Last-Modified}).  A
304, or a 200 whose validators and length match the cached ones, keeps the
entry; a changed file (or a 4xx: the origin no longer has it) replaces the
entry under the same task id with a new C{version}, and the response already
in hand becomes the new fetch.  Peers notice the new version and never mix
pieces of two versions.  An origin that does not answer (5xx, unreachable,
timeout) or asks for credentials (401, 403, 407) leaves the cached entry in
use.  Content-addressed tasks (a digest
was given) are never revalidated: the digest pins the bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH

from ..core.bitmap import Bitmap
from ..core.bodywriter import (
    CDN_DIRECT_WRITES,
    AbortBody,
    BodyError,
    ChunkedFileWriter,
    DiscardBody,
    ResumePoint,
    rehash_prefix,
)
from ..core.files import pread_exact, warm_pages, write_json_atomic
from ..core.headers import NOT_TO_ORIGIN
from ..core.ids import parse_digest
from ..core.logs import safe_url, task_log
from ..core.pieces import piece_count, piece_span, swarm_piece_size
from ..core.ranges import ByteRange
from ..core.ratelimit import TokenBucket
from ..core.security import OriginDenied
from ..core.store import TaskStore, commit_files, create_file, move_task_files, remove_files
from ..core.threads import WorkerPool
from .prehash import Plan, Prehash, no_prehash, parked_plans
from .rangefetch import LOOKAHEAD, piece_bytes, side_headers, side_ok, side_plan, wanted_pieces
from .resume import Verdict, judge, parse_content_range, resume_headers

log = Logger()
#: DRAGONFLY_TRACE=1: a log line per piece published ("trace <task> piece <i> stored at <t>"), as the
#: dfpeers log each piece they finish, to see how long the first peer waits for the seed (bench.datapath)
TRACE = bool(os.environ.get("DRAGONFLY_TRACE"))

#: DRAGONFLY_CDN_FILE_SHA256=always: the whole-file SHA-256 of every task, also of those with no sha256
#: digest to check it against (a second SHA-256 pass over every byte, about 0.6 CPU s/GiB; read by no one
#: then but the API's task view); the default computes it only for those (L{wants_file_sha256})
FILE_SHA256_ALWAYS = os.environ.get("DRAGONFLY_CDN_FILE_SHA256", "digest") == "always"


def wants_file_sha256(expected_digest: str | None) -> bool:
    """
    Whether a fetch hashes the whole file: when the task carries a sha256
    digest (the CDN fails the task unless the body has it, and peers asked
    for that digest take the CDN's SHA-256 instead of hashing the file again),
    or with C{DRAGONFLY_CDN_FILE_SHA256=always}.
    """
    if FILE_SHA256_ALWAYS:
        return True
    if not expected_digest:
        return False
    try:
        return parse_digest(expected_digest)[0] == "sha256"
    except ValueError:
        return False


#: a fetch a crash cut that was written to this many seconds before the start, or less, goes on at once
#: (L{Cdn.resume_cut}): its peers wait for a silent SuperNode about C{orphan_timeout} (10 s; 20 s when its
#: port takes connections it does not answer yet) before they go to the origin themselves
RESUME_AT_START = 30.0

#: the wanted ranges a task keeps until its length is known, and the side fetches it runs at once
MAX_WANTED = 8
MAX_SIDE_FETCHES = 4

# Dragonfly 1.x result codes, kept in API errors so scripts carry over.
DF_SOURCE_UNREACHABLE = 607
DF_NEED_AUTH = 608
DF_SOURCE_ERROR = 610


@define
class TaskError:
    """Why a task failed, in the API's terms."""

    code: str
    message: str
    df_code: int = DF_SOURCE_ERROR
    http_status: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message, "dfCode": self.df_code}
        if self.http_status is not None:
            out["originStatus"] = self.http_status
        return out


@define(eq=False)
class _Side:
    """A side fetch: pieces C{[first, end)} asked of the origin out of order (see L{Cdn.want})."""

    first: int
    end: int
    writer: ChunkedFileWriter | None = None
    dropped: bool = False
    holding: ChunkedFileWriter | None = None  # the main fetch's writer, paused for this side fetch


@define(eq=False)
class CdnTask:
    """One origin file in the cache."""

    task_id: str
    url: str
    data_path: str
    meta_path: str
    headers: dict[str, str] = field(factory=dict)
    expected_digest: str | None = None
    status: str = "waiting"  # waiting | running | success | failed
    length: int | None = None
    piece_size: int = 0
    piece_count: int | None = None
    # each piece's SHA-256 hex, by index; None for a piece not stored yet
    # (a side fetch stores pieces out of order, see L{Cdn.want})
    digests: list[str | None] = field(factory=list)
    available: Bitmap | None = None
    sha256: str | None = None
    content_type: str | None = None  # the origin's, passed on (dfdaemon answers with it)
    error: TaskError | None = None
    origin_bytes: int = 0
    seed_bytes: int = 0
    listeners: list[Any] = field(factory=list)
    done: Deferred | None = None  # fires when the fetch ends, either way
    # when a peer last registered, synced or was sent a piece of it (for GC)
    last_access: float = 0.0
    fetch_started: float = 0.0
    fetch_start_bytes: int = 0

    # the origin's validators of the cached bytes: etag, lastModified, length
    validators: dict[str, Any] = field(factory=dict)
    validated_at: float = 0.0
    revalidating: list[Deferred] | None = None
    # what downloads want first (the byte ranges of Range requests), for side fetches
    wanted: list[ByteRange] = field(factory=list)
    # the byte the main (in-order) fetch has reached, and where its stored pieces end
    reach: int = 0
    stored_to: int = 0
    # side fetches wrote below here: the data file may have holes past C{stored_to}
    holes_end: int = 0
    # the side fetches under way: (first piece, end piece, their writer)
    side: list[_Side] = field(factory=list)
    side_bytes: int = 0  # origin bytes the side fetches took
    # the main fetch's body writer (held while a side fetch brings wanted pieces)
    main_writer: ChunkedFileWriter | None = None
    # a task that is one byte range of the origin file alone (a download
    # without prefetch): the origin is asked for those bytes only
    fetch_range: ByteRange | None = None
    retries: int = 0  # in-process retries of this fetch so far
    # taken over from a swarm (L{Cdn.adopt}): no in-order fetch, only the
    # pieces no peer holds are asked of the origin (L{Cdn.fill})
    adopted: bool = False


    @property
    def in_order(self) -> bool:
        """
        Whether the data file holds nothing past the in-order fetch's bytes:
        its size is where they end (no side fetch planned or under way, not
        a task taken over, whose file is sized with holes).  The kernel's
        readahead stops at a file's end, so reading ahead in such a file
        never caches pages a later C{O_DIRECT} write would have to throw
        away (L{Cdn.warm_piece}).
        """
        return not self.adopted and not self.side and self.holes_end == 0

    @property
    def peer_held(self) -> bool:
        """
        A task taken over whose every piece's digest a peer vouched for: its
        swarm holds the whole file, this node's copy is partial (its seed
        has the pieces in C{available}); no fill under way.  Recorded on
        disk (a meta with C{peerHeld}) and evictable like a finished task.
        """
        return (
            self.adopted and self.status == "running" and not self.side and bool(self.digests)
            and all(d is not None for d in self.digests)
        )

    @property
    def disk_size(self) -> int:
        """Bytes of its data file (a failed task has none; a peer-held one its pieces held here)."""
        if self.peer_held:
            if self.available is None or self.length is None:
                return 0
            return sum(piece_span(i, self.length, self.piece_size)[1] for i in self.available)
        return (self.length or 0) if self.status == "success" else 0

    @property
    def version(self) -> str | None:
        """Names the origin content this entry holds (from its validators), once the origin answered."""
        if not self.validators:
            return None
        v = self.validators
        material = f"{v.get('etag') or ''}\0{v.get('lastModified') or ''}\0{v.get('length')}"
        return hashlib.sha256(material.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "taskId": self.task_id,
            "url": self.url,
            "status": self.status,
            "contentLength": self.length,
            "pieceSize": self.piece_size or None,
            "pieceCount": self.piece_count,
            "piecesReady": len(self.available) if self.available is not None else 0,
            "sha256": self.sha256,
            "contentType": self.content_type,
            "originBytes": self.origin_bytes,
            "seedBytes": self.seed_bytes,
            "version": self.version,
        }
        if self.error is not None:
            out["error"] = self.error.to_json()
        if self.peer_held:
            out["peerHeld"] = True  # the swarm holds it whole; this node's copy is partial
        return out

    def notify(self, method: str, *args: Any) -> None:
        for listener in list(self.listeners):
            try:
                getattr(listener, method)(self, *args)
            except Exception:
                log.failure("CDN listener {listener!r} failed in {method}", listener=listener, method=method)


class Cdn:
    """
    The cache of origin files under C{<home>/repo}.

    @param http: a treq-like client with C{get(url, headers=..., unbuffered=True)}.
    @param piece_size: a fixed piece size, or a rule: length (or None) to piece size.
    """

    def __init__(
        self,
        home: str,
        http: Any,
        pool: WorkerPool,
        clock: Any,
        piece_size: int | Callable[[int | None], int] = swarm_piece_size,
        idle_timeout: float = 60.0,
        on_new_task: Callable[[CdnTask], None] | None = None,
        origin_limit: TokenBucket | None = None,
        revalidate_after: float | None = None,
        lookahead: int = LOOKAHEAD,
        retries: int = 0,
    ) -> None:
        """
        @param revalidate_after: seconds a cached file is trusted without
            asking the origin again (C{None}: never revalidate).
        @param lookahead: a wanted range the main fetch reaches within this
            many bytes is left to it; one further off gets a side fetch.
        @param retries: times a fetch whose body is cut (a reset, a close
            before Content-Length, silence) goes on in-process from its last
            stored piece, with C{Range}/C{If-Range}, before it fails.
        """
        self._lookahead = lookahead
        self._retries = retries
        self._origin_limit = origin_limit
        self._revalidate_after = revalidate_after
        self.repo = os.path.join(home, "repo")
        # the stored prefixes of fetches that failed or were cut by a crash
        # (data and header), kept out of the cache proper until resumed
        self.parked = os.path.join(home, "resume")
        # the cache's files: every operation in the pool, in order per task
        self.store = TaskStore(
            self.repo, pool, meta_suffix=".meta", meta_names_task=False, clock=clock, parked=self.parked,
            required=("url", "length", "pieceSize", "digests", "sha256"),
        )
        self._http = http
        self._pool = pool
        self._clock = clock
        self._piece_size = piece_size
        self._idle_timeout = idle_timeout
        self._on_new_task = on_new_task
        self.tasks: dict[str, CdnTask] = {}
        self._prehash = no_prehash()  # the parked prefixes, rehashed ahead (see load)
        self._resume_first: list[tuple[str, str, str | None]] = []  # (task id, url, digest): see resume_cut
        # totals for /metrics (see dragonfly.supernode.metrics)
        self.origin_fetches = 0  # cache misses: registrations that started an origin fetch
        self.cache_hits = 0  # registrations served from the cache or a fetch under way
        self.origin_bytes = 0
        self.fetch_failures: dict[str, int] = {}
        self.resumed_fetches = 0  # fetches that went on from bytes stored before
        self.resumed_bytes = 0  # bytes those did not ask the origin for again
        self.side_fetches = 0  # origin requests for wanted pieces out of order
        self.fetch_retries = 0  # cut bodies taken up again in-process
        self.side_bytes = 0  # the origin bytes those took
        self.adopted_tasks = 0  # tasks taken over from a swarm instead of fetched whole (L{adopt})
        self.fill_bytes = 0  # origin bytes the fills of adopted tasks took (L{fill}; in origin_bytes too)

    # -- cache on disk -----------------------------------------------------

    def _claim(self, task_id: str, url: str) -> tuple[CdnTask, bool]:
        """
        The task known as C{task_id} (a live one is a cache hit, touched),
        or a new one, made known and announced: (task, new).  A failed
        task comes back as it is, for the caller to reset.
        """
        task = self.tasks.get(task_id)
        if task is None:
            data_path, meta_path = self._paths(task_id)
            task = CdnTask(task_id=task_id, url=url, data_path=data_path, meta_path=meta_path)
            self.tasks[task_id] = task
            if self._on_new_task is not None:
                self._on_new_task(task)
            return task, True
        if task.status != "failed":
            task.last_access = self._clock.seconds()
            self.cache_hits += 1
        return task, False

    def _paths(self, task_id: str) -> tuple[str, str]:
        return self.store.data_path(task_id), self.store.meta_path(task_id)

    def _part_path(self, task_id: str) -> str:
        """The header of a fetch under way: what the origin said about the bytes in the data file."""
        return self.store.header_path(task_id)

    def _parked_paths(self, task_id: str) -> tuple[str, str]:
        return self.store.parked_paths(task_id)

    def _all_paths(self, task_id: str) -> tuple[str, ...]:
        return (*self._paths(task_id), self._part_path(task_id), *self._parked_paths(task_id))

    def load(self) -> int:
        """
        Reload completed tasks from their meta files; park the data of fetches
        cut by a crash (data and header, no meta) for a resume; remove leftovers
        (L{dragonfly.core.store.load_complete}, the dfpeer's reload too).
        Runs once at start-up, before the reactor; how many tasks came back.
        """
        loaded = 0
        cut = _cut_fetches(self.repo)  # before the reload parks them
        for meta in self.store.load_now():
            try:
                task = self._restored(meta)
            except (KeyError, TypeError, ValueError) as e:
                log.warn("dropping cache entry {task}: {why}", task=meta["taskId"], why=str(e) or type(e).__name__)
                remove_files(*self._paths(meta["taskId"])[::-1])  # the meta first
                continue
            self.tasks[task.task_id] = task
            loaded += 1
            if self._on_new_task is not None:
                self._on_new_task(task)
            if task.adopted:
                self._take_back_held(task)
        # the prefixes a crash left, rehashed in a thread from now on: a
        # resume finds them hashed (dragonfly/supernode/prehash.py)
        self._prehash = Prehash(parked_plans(self.parked, lambda task_id: _parked_plan(task_id, self.parked)))
        self._resume_first = [found for task_id in cut if (found := _resumes_at_start(task_id, self.parked)) is not None]
        return loaded

    def resume_cut(self) -> list[str]:
        """
        Go on at once with the origin fetches a crash cut just before this
        start (L{RESUME_AT_START}; found by L{load}), without waiting for a
        peer to register them again: their peers are most likely waiting for
        this restart, and the origin sends again as soon as the reactor runs
        instead of a registration later.  Only fetches asked with no request
        headers (they are never written to disk) and not of a range alone.
        The task ids started.
        """
        started = []
        for task_id, url, digest in self._resume_first:
            if task_id in self.tasks:
                continue
            task_log(log, LogLevel.info, task_id, "going on with the origin fetch a restart cut, unasked")
            self.ensure(task_id, url, None, digest)
            started.append(task_id)
        self._resume_first = []
        return started

    def _restored(self, meta: dict[str, Any]) -> CdnTask:
        """The complete task a reloaded meta file describes (or a peer-held one: see L{_record_peer_held})."""
        task_id = meta["taskId"]
        data_path, meta_path = self._paths(task_id)
        count = len(meta["digests"])
        available = Bitmap(count)
        if meta.get("peerHeld"):
            return self._restored_peer_held(meta, data_path, meta_path, available)
        for i in range(count):
            available.set(i)
        task = CdnTask(
            task_id=task_id, url=meta["url"], data_path=data_path, meta_path=meta_path,
            status="success", length=meta["length"], piece_size=meta["pieceSize"],
            piece_count=count, digests=list(meta["digests"]), sha256=meta["sha256"],
            content_type=meta.get("contentType"), available=available,
            validators=dict(meta.get("validators") or {}), expected_digest=meta.get("digest"),
            # least-recently-used order survives a restart, roughly
            last_access=meta["lastAccess"],
        )
        task.done = succeed(task)
        return task

    # -- fetching ----------------------------------------------------------

    def ensure(
        self,
        task_id: str,
        url: str,
        headers: dict[str, str] | None = None,
        digest: str | None = None,
        fetch_range: ByteRange | None = None,
    ) -> CdnTask:
        """
        The task for C{task_id}, starting its origin fetch unless one is running
        or done (single-flight).  A failed task is fetched again.

        @param fetch_range: the task is these bytes of the origin file alone
            (asked with C{Range}; only a 206 for them is taken).
        """
        task, fresh = self._claim(task_id, url)
        if task.status != "failed" and not fresh:
            return task
        clean = _end_to_end(headers)
        if not fresh:
            # a failed task tries again: reset it, keep its listeners
            task.status, task.error, task.sha256 = "waiting", None, None
            task.length, task.piece_count, task.available = None, None, None
            task.digests, task.side, task.wanted = [], [], []
            task.adopted = False
        task.url, task.headers, task.expected_digest = url, clean, digest
        task.fetch_range = fetch_range
        task.last_access = self._clock.seconds()
        task.done = Deferred()
        self.origin_fetches += 1
        pending = self.store.queued(task_id)
        if pending is not None:
            # file work still queued for this id (an evicted copy's removal)
            # ends first; the task waits
            pending.addCallback(lambda _: self._fetch(task) if task.status == "waiting" else None)
        else:
            self._fetch(task)
        return task

    def fresh(
        self,
        task_id: str,
        url: str,
        headers: dict[str, str] | None = None,
        digest: str | None = None,
    ) -> Deferred[CdnTask]:
        """
        Like L{ensure}, but a cached file not checked for C{revalidate_after}
        seconds is first revalidated against the origin (see the module
        docstring).  Registrations arriving while a check runs share it.
        """
        task = self.tasks.get(task_id)
        if (
            task is None
            or task.status != "success"
            or digest
            or task.expected_digest
            or task.validators.get("range")  # one range of a file: asked anew when it is evicted
            or self._revalidate_after is None
            or self._clock.seconds() - task.validated_at < self._revalidate_after
        ):
            return succeed(self.ensure(task_id, url, headers, digest))
        d: Deferred = Deferred()
        if task.revalidating is not None:
            task.revalidating.append(d)
            return d
        task.revalidating = [d]
        # the registering peer's headers (its credentials), else the stored ones
        # (none after a restart: headers are never written to disk)
        clean = _end_to_end(headers)
        self._revalidate(task, clean or task.headers)
        return d

    def _revalidate(self, task: CdnTask, headers: dict[str, str]) -> None:
        conditional = dict(headers)
        if task.validators.get("etag"):
            conditional["If-None-Match"] = task.validators["etag"]
        if task.validators.get("lastModified"):
            conditional["If-Modified-Since"] = task.validators["lastModified"]

        def settle(current: CdnTask) -> None:
            waiters, task.revalidating = task.revalidating or [], None
            for w in waiters:
                w.callback(current)

        def keep(why: str) -> None:
            log.info("task {task}: cached copy kept ({why})", task=task.task_id, why=why)
            task.validated_at = self._clock.seconds()
            # each registration waiting on the check is served from the cache
            self.cache_hits += len(task.revalidating or [])
            settle(task)

        def answered(response: Any) -> None:
            if response.code == 304:
                response.deliverBody(DiscardBody())
                return keep("origin: not modified")
            if response.code >= 500 or response.code in (401, 403, 407):
                # the origin is in trouble, or wants credentials this
                # request lacks: it did not say the file changed
                response.deliverBody(DiscardBody())
                return keep(f"origin answered {response.code}")
            if response.code == 200:
                length = response.length if response.length is not UNKNOWN_LENGTH else None
                now = {**_validators(response), "length": length}
                if _same_content(task.validators, now):
                    response.deliverBody(AbortBody())
                    return keep("origin: same validators")
            log.info(
                "task {task}: origin content changed (status {code}); fetching it as a new entry",
                task=task.task_id, code=response.code,
            )
            settle(self._replace(task, response, headers))

        d = self._http.get(task.url, headers=_to_header_lists(conditional), unbuffered=True)
        d.addTimeout(self._idle_timeout, self._clock)
        d.addCallbacks(answered, lambda f: keep(f"origin unreachable: {f.getErrorMessage()}"))
        def failed(f: Failure) -> None:
            log.failure("revalidating {task}", f, task=task.task_id)
            settle(task)

        d.addErrback(failed)

    def _replace(self, old: CdnTask, response: Any, headers: dict[str, str]) -> CdnTask:
        """The origin changed under C{old}: drop it and fetch the new content from C{response}."""
        old.status = "failed"
        old.error = TaskError("SOURCE_CHANGED", f"the origin content of {old.url} changed")
        self._disk(old.task_id, remove_files, *self._all_paths(old.task_id))
        old.notify("task_failed")
        if old.done is not None and not old.done.called:
            old.done.callback(old)
        new = CdnTask(
            task_id=old.task_id, url=old.url, data_path=old.data_path, meta_path=old.meta_path,
            headers=dict(headers),
        )
        new.done = Deferred()
        self.origin_fetches += 1
        self.tasks[old.task_id] = new
        if self._on_new_task is not None:
            self._on_new_task(new)
        new.status = "running"
        self._got_response(new, response, None)
        return new

    def remove(self, task_id: str) -> CdnTask | None:
        """Drop a task and its files (a running fetch is abandoned); the task, or None."""
        task = self.tasks.pop(task_id, None)
        if task is None:
            return None
        if task.status == "failed":
            return task
        self._fail(task, TaskError("REMOVED", f"task {task_id} was removed from the cache"))
        return task

    def _fail(self, task: CdnTask, error: TaskError) -> None:
        if task.status == "failed":
            return
        task_log(
            log, LogLevel.warn, task.task_id, "origin fetch failed after {seconds:.2f}s and {bytes} bytes: {code} {message}",
            code=error.code, message=error.message, bytes=task.origin_bytes - task.fetch_start_bytes,
            seconds=self._clock.seconds() - task.fetch_started,
        )
        self.fetch_failures[error.code] = self.fetch_failures.get(error.code, 0) + 1
        task.status, task.error = "failed", error
        self._drop_sides(task, "the fetch failed")
        if task.holes_end:
            # the main fetch's pieces are on disk up to here: a resume may trust them
            self._disk(task.task_id, _mark_holes, self._part_path(task.task_id), task.stored_to, True)
        # nothing half-fetched stays in the cache; what reached the disk whole
        # is parked for the next try when the origin may finish it then
        self._disk(task.task_id, _park_or_remove, task.task_id, self.repo, self.parked, _resumable(error))
        task.notify("task_failed")
        if task.done is not None and not task.done.called:
            task.done.callback(task)

    def _fetch(self, task: CdnTask) -> None:
        task.status = "running"
        task.retries = 0
        task.fetch_started = self._clock.seconds()
        task.fetch_start_bytes = task.origin_bytes
        task_log(log, LogLevel.info, task.task_id, "fetching {url} from the origin", url=safe_url(task.url))
        # a prefix stored by an earlier try comes back into the cache, rehashed
        d = self._disk(task.task_id, _take_parked, task.task_id, self.repo, self.parked, self._prehash)
        d.addCallback(lambda found: self._request(task, found))
        d.addErrback(lambda f: self._fail(task, TaskError("INTERNAL", f.getErrorMessage())))

    def _request(self, task: CdnTask, found: tuple[dict[str, Any], ResumePoint] | None) -> None:
        if task.status != "running" or self.tasks.get(task.task_id) is not task:
            # removed while the stored prefix was being read
            self._disk(task.task_id, _park_or_remove, task.task_id, self.repo, self.parked, False)
            return
        headers = dict(task.headers)
        resume = None
        if task.fetch_range is not None:
            headers["Range"] = task.fetch_range.header()
            found = None  # (a range alone is small: fetched whole again)
        if found is not None and wants_file_sha256(task.expected_digest) and not found[1].whole:
            # (cannot be: one task id, one digest) a prefix hashed without the whole-file hash this fetch keeps
            found = None
        if found is not None:
            header, point = found
            extra = resume_headers(header["validators"], point.offset)
            if extra is not None:
                headers.update(extra)
                resume = found
        d = self._http.get(task.url, headers=_to_header_lists(headers), unbuffered=True)
        d.addTimeout(self._idle_timeout, self._clock)
        d.addCallbacks(lambda response: self._got_response(task, response, resume), lambda f: self._unreachable(task, f))
        d.addErrback(lambda f: self._fail(task, TaskError("INTERNAL", f.getErrorMessage())))

    def _unreachable(self, task: CdnTask, f: Any) -> None:
        if f.check(OriginDenied):
            # the host resolved into a denied network when connecting
            self._fail(task, TaskError("ORIGIN_DENIED", str(f.value)))
        else:
            self._fail(
                task,
                TaskError("SOURCE_UNREACHABLE", f"origin {task.url} unreachable: {f.getErrorMessage()}", DF_SOURCE_UNREACHABLE),
            )

    def _got_response(self, task: CdnTask, response: Any, resume: tuple[dict[str, Any], ResumePoint] | None) -> None:
        if task.status != "running":
            response.deliverBody(AbortBody())
            return
        if resume is not None:
            header, point = resume
            verdict = judge(
                point.offset, header["validators"], response.code,
                _first_header(response, b"content-range"), _validators(response),
            )
            if verdict is Verdict.CONTINUE:
                self._continue(task, response, header, point)
                return
            if verdict is Verdict.REFETCH:
                task_log(
                    log, LogLevel.info, task.task_id,
                    "the origin cannot finish the stored {bytes} bytes ({code}); fetching from byte 0",
                    bytes=point.offset, code=response.code,
                )
                response.deliverBody(AbortBody())
                self._disk(task.task_id, remove_files, *self._all_paths(task.task_id))
                self._request(task, None)
                return
            if verdict is Verdict.FROM_ZERO:
                task_log(
                    log, LogLevel.info, task.task_id,
                    "the origin sent the whole file (it ignores ranges, or it changed): {bytes} stored bytes dropped",
                    bytes=point.offset,
                )
        whole: str | None = None
        if task.fetch_range is not None and response.code in (200, 206):
            whole = _range_answer(task.fetch_range, response)
            if whole is None:
                response.deliverBody(AbortBody())
                self._fail(
                    task,
                    TaskError(
                        "SOURCE_IGNORES_RANGE",
                        f"origin answered {response.code} without {task.fetch_range.header()} of {task.url}",
                        DF_SOURCE_ERROR, response.code,
                    ),
                )
                return
        if response.code != 200 and whole is None:
            phrase = response.phrase.decode("latin-1", "replace") if isinstance(response.phrase, bytes) else str(response.phrase)
            df = DF_NEED_AUTH if response.code in (401, 403, 407) else DF_SOURCE_ERROR
            self._fail(
                task,
                TaskError("SOURCE_ERROR", f"origin returned {response.code} {phrase} for {task.url}", df, response.code),
            )
            response.deliverBody(DiscardBody())
            return
        length = response.length if response.length is not UNKNOWN_LENGTH else None
        task.validators = {**_validators(response), "length": length}
        if whole is not None:
            task.validators["range"] = whole  # which bytes of the origin file this task is
        task.length = length
        task.content_type = _content_type(response.headers.getRawHeaders(b"content-type"))
        rule = self._piece_size
        task.piece_size = rule(length) if callable(rule) else rule
        header = {
            "url": task.url, "validators": task.validators, "pieceSize": task.piece_size,
            "contentType": task.content_type, "digest": task.expected_digest,
            # asked with no request headers (never written to disk): a restart may go on with it unasked
            "plain": not task.headers,
        }
        if length is not None:
            self._publish_length(task, length)
        task.reach = task.stored_to = task.holes_end = 0
        writer = self._writer(task, length, None)
        response.deliverBody(writer)
        self._open(task, writer, _open_fresh, task.data_path, self._part_path(task.task_id), header)
        self._plan_side(task)

    def _continue(self, task: CdnTask, response: Any, header: dict[str, Any], point: ResumePoint) -> None:
        """The origin sends the rest of the version on disk: go on from C{point}."""
        validators = header["validators"]
        task.validators = dict(validators)
        task.length = length = validators["length"]
        task.content_type = header.get("contentType")
        task.piece_size = header["pieceSize"]
        self.resumed_fetches += 1
        self.resumed_bytes += point.offset
        task_log(
            log, LogLevel.info, task.task_id, "resuming the origin fetch at byte {offset} of {length}",
            offset=point.offset, length=length, pieces=len(point.digests),
        )
        self._publish_length(task, length)
        for index, digest in enumerate(point.digests):
            self._piece_stored(task, index, digest)
        task.reach = point.offset
        task.stored_to = len(point.digests) * task.piece_size
        task.holes_end = 0
        writer = self._writer(task, length, point)
        response.deliverBody(writer)
        self._open(task, writer, _open_at, task.data_path, point.offset)
        self._plan_side(task)

    def _open(self, task: CdnTask, writer: ChunkedFileWriter, how: Callable[..., int], *args: Any) -> None:
        """Open the data file in the pool (after the task's earlier file work) and give it to C{writer}."""
        d = self._disk(task.task_id, how, *args)
        d.addCallbacks(
            writer.attach,
            lambda f: writer.attach_failed(BodyError("STORE_FAILED", f"cannot open the cache file: {f.getErrorMessage()}")),
        )

    def _writer(self, task: CdnTask, length: int | None, start: ResumePoint | None) -> ChunkedFileWriter:
        def stored(index: int, digest: str) -> None:
            if task.status == "running":
                task.stored_to = (index + 1) * task.piece_size
                if task.holes_end and task.stored_to >= task.holes_end:
                    # the main fetch's own bytes cover every side fetch's: no holes left
                    task.holes_end = 0
                    self._disk(task.task_id, _mark_holes, self._part_path(task.task_id), None)
                self._piece_stored(task, index, digest)

        def counted(n: int) -> None:
            task.origin_bytes += n
            self.origin_bytes += n
            task.reach += n
            if task.side:
                # a side fetch the main fetch has caught up with would only bring bytes twice
                for side in list(task.side):
                    if side.writer is not None and side.writer.total <= task.reach:
                        self._side_dropped(task, side, "the main fetch caught up with it")

        writer = ChunkedFileWriter(
            self._pool, self._clock, None, task.piece_size, length, self._idle_timeout, stored, counted,
            limit=self._origin_limit, start=start, whole_hash=wants_file_sha256(task.expected_digest),
            direct=CDN_DIRECT_WRITES,
        )
        task.main_writer = writer
        writer.done.addCallbacks(
            lambda result: self._finished(task, *result),
            lambda f: self._cut(task, writer, TaskError(f.value.code, f.value.message))
            if f.check(BodyError) else self._fail(task, TaskError("INTERNAL", f.getErrorMessage())),
        )
        return writer

    # -- a cut body, taken up again in-process ---------------------------------------

    def _cut(self, task: CdnTask, writer: ChunkedFileWriter, error: TaskError) -> None:
        """
        The main fetch's body failed.  A cut (a reset, a short body,
        silence) of a version a range can pin goes on from the last byte
        written (the piece cut part-way is rehashed from the file), in this
        process, up to C{retries} times: the pieces published stay
        published, the peers see nothing.  Anything else fails the task.
        """
        # the last byte is always asked again (see _resume_offset)
        offset = max(task.stored_to, min(writer.written, (task.length or 0) - 1))
        if (
            error.code not in ("SOURCE_TRUNCATED", "SOURCE_TIMEOUT")
            or task.status != "running"
            or task.main_writer is not writer
            or task.retries >= self._retries
            or task.length is None
            or task.fetch_range is not None
            or resume_headers(task.validators, offset) is None
        ):
            self._fail(task, error)
            return
        task.retries += 1
        self.fetch_retries += 1
        task_log(
            log, LogLevel.info, task.task_id,
            "origin body cut ({code}: {message}); going on from byte {offset} (retry {n} of {most})",
            code=error.code, message=error.message, offset=offset, n=task.retries, most=self._retries,
        )
        # the stored prefix's whole-file hash, read back in the pool
        d = self._disk(
            task.task_id, rehash_prefix, task.data_path, offset, task.piece_size, 1 << 20,
            wants_file_sha256(task.expected_digest),
        )
        d.addCallbacks(
            lambda point: self._retry(task, error, point),
            lambda f: self._fail(task, TaskError("STORE_FAILED", f"cannot read the stored bytes back: {f.getErrorMessage()}")),
        )

    def _retry(self, task: CdnTask, error: TaskError, point: ResumePoint) -> None:
        if task.status != "running":
            return
        stored = task.digests[: len(point.digests)]
        if point.offset < task.stored_to or len(point.digests) * task.piece_size != task.stored_to or stored != point.digests:
            self._fail(task, TaskError("STORE_FAILED", "the stored pieces read back differ from the ones published"))
            return
        extra = resume_headers(task.validators, point.offset)
        assert extra is not None  # checked in _cut
        headers = {**task.headers, **extra}
        d = self._http.get(task.url, headers=_to_header_lists(headers), unbuffered=True)
        d.addTimeout(self._idle_timeout, self._clock)
        d.addCallbacks(lambda response: self._retried(task, error, point, response), lambda f: self._fail(task, error))
        d.addErrback(lambda f: self._fail(task, TaskError("INTERNAL", f.getErrorMessage())))

    def _retried(self, task: CdnTask, error: TaskError, point: ResumePoint, response: Any) -> None:
        if task.status != "running":
            response.deliverBody(AbortBody())
            return
        verdict = judge(
            point.offset, task.validators, response.code,
            _first_header(response, b"content-range"), _validators(response),
        )
        if verdict is not Verdict.CONTINUE:
            # another version, or no range: the pieces out there cannot be
            # completed; the task fails as it would have (what is stored stays parked)
            response.deliverBody(AbortBody() if response.code in (200, 206) else DiscardBody())
            self._fail(task, error)
            return
        # the length, the pieces published and the seed's BITFIELD stay as they are
        task.reach = point.offset
        writer = self._writer(task, task.length, point)
        response.deliverBody(writer)
        # opened without truncation: pieces a side fetch stored further on stay
        self._open(task, writer, _open_side, task.data_path)

    def _publish_length(self, task: CdnTask, length: int) -> None:
        task.length = length
        task.piece_count = piece_count(length, task.piece_size)
        task.available = Bitmap(task.piece_count)
        task.notify("length_known")

    def _piece_stored(self, task: CdnTask, index: int, digest: str) -> None:
        """
        Piece C{index} is on disk with C{digest}: record and publish it,
        once.  A piece stored already (by a side fetch, or the main fetch
        after one) is not published again; its two reads must agree.
        """
        if index < len(task.digests) and task.digests[index] is not None:
            if task.digests[index] != digest:
                self._fail(
                    task, TaskError("SOURCE_CHANGED", f"piece {index} of {task.url} differs between two reads of the origin"),
                )
                return
            if not task.adopted or task.available is None or index in task.available:
                return
            # an adopted task's piece, its digest vouched for by a peer: now the seed has it too
        if index >= len(task.digests):
            task.digests.extend([None] * (index + 1 - len(task.digests)))
        task.digests[index] = digest
        if task.available is not None and not len(task.available):
            task_log(
                log, LogLevel.info, task.task_id, "first piece ready after {seconds:.3f}s",
                seconds=self._clock.seconds() - task.fetch_started, pieces=1, index=index,
            )
        if task.available is not None:
            task.available.set(index)
            if TRACE:
                log.info("trace {task} piece {index} stored at {t:.3f}", task=task.task_id[:12], index=index,
                         t=self._clock.seconds())
            task.notify("piece_ready", index)

    # -- pieces wanted first (side fetches) -------------------------------------

    def want(self, task: CdnTask, spec: ByteRange) -> None:
        """
        A download wants the bytes C{spec} first (a Range request).  If the
        main fetch will not reach them within the lookahead, a side fetch
        asks the origin for exactly the pieces covering them (see
        L{dragonfly.supernode.rangefetch}); before the length is known the
        wish waits for it.
        """
        if task.status not in ("waiting", "running"):
            return
        if len(task.wanted) < MAX_WANTED:
            task.wanted.append(spec)
        self._plan_side(task)

    def length_wait(self, task: CdnTask, timeout: float) -> Deferred[CdnTask]:
        """Fires with C{task} once its length is known, it ended, or after C{timeout} seconds."""
        d: Deferred[CdnTask] = Deferred()
        if task.length is not None or task.status not in ("waiting", "running"):
            d.callback(task)
            return d
        waiter = _LengthWaiter(task, d)
        task.listeners.append(waiter)
        timer = self._clock.callLater(timeout, waiter.fire)
        d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d

    def side_fetching(self, task: CdnTask, index: int) -> bool:
        """Whether a side fetch under way is bringing piece C{index}."""
        return any(s.first <= index < s.end for s in task.side)

    def _plan_side(self, task: CdnTask) -> None:
        if task.adopted:
            return  # no in-order fetch to overtake: L{fill} asks for what the swarm lacks
        if task.status != "running" or task.length is None or task.available is None or not task.wanted:
            return
        wishes, task.wanted = task.wanted, []
        for spec in wishes:
            pieces = wanted_pieces(spec, task.length, task.piece_size)
            if pieces is None:
                continue
            plan = side_plan(pieces, task.piece_size, task.reach, _Taken(task), self._lookahead)
            if plan is not None and len(task.side) < MAX_SIDE_FETCHES:
                self._side_fetch(task, *plan)

    def _side_fetch(self, task: CdnTask, first: int, end: int) -> None:
        assert task.length is not None
        start, stop = piece_bytes(first, end, task.length, task.piece_size)
        extra = side_headers(task.validators, start, stop)
        if extra is None:
            return  # no validator pins the version: the main fetch serves the range
        side = _Side(first, end)
        task.side.append(side)
        self.side_fetches += 1
        task_log(
            log, LogLevel.info, task.task_id,
            "fetching pieces {first}..{last} (bytes {start}-{stop}) out of order: {why}",
            first=first, last=end - 1, start=start, stop=stop - 1, reach=task.reach,
            why="no peer of the swarm holds them" if task.adopted else "a download wants them first",
        )
        # bytes past the main fetch's stored pieces may now be written before
        # it gets there: a resume after a crash trusts the data file only up to them
        task.holes_end = max(task.holes_end, stop)
        self._disk(task.task_id, _mark_holes, self._part_path(task.task_id), task.stored_to)
        headers = dict(task.headers)
        headers.update(extra)
        d = self._http.get(task.url, headers=_to_header_lists(headers), unbuffered=True)
        d.addTimeout(self._idle_timeout, self._clock)
        d.addCallbacks(
            lambda response: self._side_response(task, side, start, stop, response),
            lambda f: self._side_unreachable(task, side, f),
        )
        d.addErrback(lambda f: self._side_dropped(task, side, f.getErrorMessage()))

    def _side_unreachable(self, task: CdnTask, side: _Side, f: Failure) -> None:
        self._side_dropped(task, side, f"origin unreachable: {f.getErrorMessage()}")
        self._adopted_miss(
            task, TaskError("SOURCE_UNREACHABLE", f"origin {task.url} unreachable: {f.getErrorMessage()}", DF_SOURCE_UNREACHABLE),
        )

    def _side_response(self, task: CdnTask, side: _Side, start: int, stop: int, response: Any) -> None:
        if side.dropped or task.status != "running":
            response.deliverBody(AbortBody())
            self._side_dropped(task, side, "no longer needed")
            return
        if task.adopted and response.code == 200:
            # no range for this version (the origin ignores ranges, or the
            # file changed): the whole body in hand becomes the task's fetch
            self._adopted_refetch(task, side, response)
            return
        if task.adopted and response.code != 206:
            response.deliverBody(DiscardBody())
            self._side_dropped(task, side, f"the origin answered {response.code}")
            self._adopted_miss(task, TaskError("SOURCE_ERROR", f"origin returned {response.code} for {task.url}", DF_SOURCE_ERROR, response.code))
            return
        if not side_ok(start, stop, task.validators, response.code, _first_header(response, b"content-range"), _validators(response)):
            # a 200 (ranges ignored, or a new version) or some other range: the main fetch serves
            response.deliverBody(AbortBody())
            self._side_dropped(task, side, f"the origin answered {response.code}, not those bytes of the same version")
            return

        def stored(index: int, digest: str) -> None:
            if task.status == "running" and not side.dropped:
                self._piece_stored(task, index, digest)

        def counted(n: int) -> None:
            task.origin_bytes += n
            task.side_bytes += n
            self.origin_bytes += n
            self.side_bytes += n
            if task.adopted:
                self.fill_bytes += n

        writer = ChunkedFileWriter(
            self._pool, self._clock, None, task.piece_size, stop, self._idle_timeout, stored, counted,
            limit=self._origin_limit, start=ResumePoint(start), whole_hash=False, direct=CDN_DIRECT_WRITES,
        )
        side.writer = writer
        if task.main_writer is not None:
            # the wanted pieces first: the main fetch waits (the same bytes
            # in all, and the origin's and this process's time go to them)
            # never long enough for the main fetch's idle timer to fire
            side.holding = task.main_writer
            side.holding._hold()
            self._clock.callLater(self._idle_timeout / 2, self._unhold, side)
        writer.done.addCallbacks(
            lambda _: self._side_over(task, side, None),
            lambda f: self._side_over(task, side, f.getErrorMessage()),
        )
        response.deliverBody(writer)
        self._open(task, writer, _open_side, task.data_path)

    def _side_over(self, task: CdnTask, side: _Side, error: str | None) -> None:
        self._unhold(side)
        if side in task.side:
            task.side.remove(side)
        if task.adopted and not task.side and task.available is not None and task.available.complete:
            self._adopted_whole(task)
        elif task.adopted and not task.side:
            self._record_peer_held(task)
        if error is not None and not side.dropped:
            task_log(
                log, LogLevel.info, task.task_id, "side fetch of pieces {first}..{last} cut: {why}",
                first=side.first, last=side.end - 1, why=error,
            )

    def _side_dropped(self, task: CdnTask, side: _Side, why: str) -> None:
        """Stop a side fetch; the main fetch serves its pieces."""
        if side.dropped:
            return
        side.dropped = True
        self._unhold(side)
        if side in task.side:
            task.side.remove(side)
        if side.writer is not None:
            side.writer.abort(BodyError("SIDE_DROPPED", why))
        task_log(
            log, LogLevel.info, task.task_id, "side fetch of pieces {first}..{last} dropped: {why}",
            first=side.first, last=side.end - 1, why=why,
        )

    def _unhold(self, side: _Side) -> None:
        held, side.holding = side.holding, None
        if held is not None:
            held._release()

    def _drop_sides(self, task: CdnTask, why: str) -> None:
        for side in list(task.side):
            self._side_dropped(task, side, why)

    # -- a task taken over from a swarm -------------------------------------------------

    def adopt(
        self, task_id: str, url: str, headers: dict[str, str] | None, digest: str | None,
        validators: dict[str, Any], piece_size: int,
    ) -> CdnTask:
        """
        Take over C{task_id} from a swarm that already holds pieces of it
        (its SuperNode died): the version (C{validators}, with the length)
        and the piece size are the swarm's, vouched for by the caller
        (L{dragonfly.core.piecetag}).  No origin fetch starts: the caller
        adopts the digests peers vouch for (L{adopt_digest}) and asks for the
        pieces no peer holds (L{fill}), pinned to that version.  The seed
        holds only the pieces fetched here; the data file has no header and
        no meta until every piece is here (a crash drops it).  A task known
        and not failed is returned as it is.
        """
        task, fresh = self._claim(task_id, url)
        if task.status != "failed" and not fresh:
            return task
        if not fresh:
            task.error, task.sha256, task.side, task.wanted = None, None, [], []
        task.url, task.headers, task.expected_digest = url, _end_to_end(headers), digest
        task.fetch_range = None
        task.adopted = True
        task.status = "running"
        task.validators = dict(validators)
        task.piece_size = piece_size
        task.content_type = None
        task.reach = task.stored_to = task.holes_end = 0
        task.fetch_started = task.last_access = self._clock.seconds()
        task.fetch_start_bytes = task.origin_bytes
        task.done = Deferred()
        self.adopted_tasks += 1
        length = validators["length"]
        task.digests = [None] * piece_count(length, piece_size)
        self._publish_length(task, length)
        task_log(
            log, LogLevel.info, task.task_id, "taking the task over from its swarm: {bytes} bytes in {pieces} pieces",
            bytes=length, pieces=task.piece_count, url=safe_url(url),
        )
        # a prefix of this version parked by an earlier fetch of this node is
        # taken back (rehashed): the seed holds those pieces, the fill skips them
        d = self._disk(task_id, _adopt_files, task_id, self.repo, self.parked, task.validators, piece_size)
        d.addCallbacks(
            lambda stored: self._adopted_prefix(task, stored),
            lambda f: self._fail(task, TaskError("STORE_FAILED", f"cannot create the cache file: {f.getErrorMessage()}")),
        )
        return task

    def _restored_peer_held(self, meta: dict[str, Any], data_path: str, meta_path: str, available: Bitmap) -> CdnTask:
        """A task taken over and held whole by its swarm before a restart: taken over again, its pieces here taken back."""
        digests: list[str | None] = [str(d) for d in meta["digests"]]
        length, piece_size = int(meta["length"]), int(meta["pieceSize"])
        if piece_count(length, piece_size) != len(digests) or not meta.get("validators"):
            raise ValueError("a peer-held task's meta does not describe its pieces")
        task = CdnTask(
            task_id=meta["taskId"], url=meta["url"], data_path=data_path, meta_path=meta_path,
            status="running", length=length, piece_size=piece_size, piece_count=len(digests),
            digests=digests, sha256=meta.get("sha256"), available=available,
            validators=dict(meta["validators"]), expected_digest=meta.get("digest"),
            last_access=meta["lastAccess"], adopted=True, done=Deferred(),
        )
        task.fetch_started = self._clock.seconds()
        self.adopted_tasks += 1
        return task

    def _take_back_held(self, task: CdnTask) -> None:
        """The pieces of a restored peer-held task whose bytes on disk match their digests: the seed has them again."""
        assert task.length is not None
        d = self._disk(task.task_id, _held_pieces, task.data_path, task.length, task.piece_size, [d or "" for d in task.digests])

        def held(indices: list[int]) -> None:
            if task.adopted and task.status == "running" and self.tasks.get(task.task_id) is task:
                for i in indices:
                    self._piece_stored(task, i, task.digests[i] or "")
                if task.available is not None and task.available.complete:
                    self._adopted_whole(task)

        d.addCallbacks(held, lambda f: log.failure("taking back the pieces of {task}", f, task=task.task_id))

    def _record_peer_held(self, task: CdnTask) -> None:
        """
        Every digest of a taken-over task is vouched for: its metadata is
        written (a meta with C{peerHeld}) so a restart keeps the task; the
        pieces on disk are checked again when it is reloaded.
        """
        if not task.peer_held or (task.available is not None and task.available.complete):
            return
        meta = {
            "url": task.url, "length": task.length, "pieceSize": task.piece_size, "digests": task.digests,
            "sha256": task.sha256, "contentType": task.content_type, "validators": task.validators,
            "digest": task.expected_digest, "peerHeld": True,
        }
        d = self._disk(task.task_id, write_json_atomic, task.meta_path, meta)
        d.addErrback(lambda f: log.failure("recording the peer-held task {task}", f, task=task.task_id))

    def _adopted_prefix(self, task: CdnTask, stored: list[str]) -> None:
        if not task.adopted or task.status != "running" or self.tasks.get(task.task_id) is not task:
            return
        if stored:
            self.resumed_bytes += min(len(stored) * task.piece_size, task.length or 0)
            task_log(
                log, LogLevel.info, task.task_id, "took back {pieces} pieces of this version fetched before",
                pieces=len(stored),
            )
        for index, digest in enumerate(stored):
            self._piece_stored(task, index, digest)
        self._record_peer_held(task)

    def adopt_digest(self, task: CdnTask, index: int, digest: str) -> bool:
        """A digest of an adopted task vouched for by a peer; whether it was new."""
        if not task.adopted or task.status != "running" or not 0 <= index < len(task.digests):
            return False
        if task.digests[index] is not None:
            return False
        task.digests[index] = digest
        self._record_peer_held(task)
        return True

    def fill(self, task: CdnTask, pieces: list[int]) -> list[tuple[int, int]]:
        """
        Ask the origin for C{pieces} of an adopted task (those no peer holds
        with a digest vouched for), one side fetch per run of them, pinned to
        the task's version with C{If-Range} (L{dragonfly.supernode.rangefetch}).
        Pieces stored or being fetched are left out; the runs asked for.
        """
        if not task.adopted or task.status != "running" or task.length is None:
            return []
        taken = _Taken(task)
        runs: list[tuple[int, int]] = []
        for i in sorted(pieces):
            if i in taken or not 0 <= i < (task.piece_count or 0):
                continue
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        asked = []
        for first, end in runs:
            if len(task.side) >= MAX_SIDE_FETCHES:
                break
            before = len(task.side)
            self._side_fetch(task, first, end)
            if len(task.side) > before:
                asked.append((first, end))
        return asked

    def _adopted_miss(self, task: CdnTask, error: TaskError) -> None:
        """A fill of an adopted task failed: after C{retries} such failures the task fails (the next registration fetches it whole)."""
        if not task.adopted or task.status != "running":
            return
        task.retries += 1
        if task.retries > self._retries:
            self._fail(task, error)

    def _adopted_refetch(self, task: CdnTask, side: _Side, response: Any) -> None:
        """An adopted task's fill got a 200: take that whole body as the task's fetch, from byte 0 (as without a takeover)."""
        task_log(
            log, LogLevel.info, task.task_id,
            "the origin sent the whole file to a fill (it ignores ranges, or it changed): fetching the task whole",
        )
        if side in task.side:
            task.side.remove(side)
        if task.available is not None and len(task.available):
            # the seed published pieces of the adopted version already: those cannot be taken back
            response.deliverBody(AbortBody())
            self._fail(task, TaskError("SOURCE_ERROR", f"origin answered 200 without the range of {task.url} a takeover needs"))
            return
        self._drop_sides(task, "the task is fetched whole")
        task.adopted = False
        task.digests, task.available = [], None
        self._got_response(task, response, None)

    def _adopted_whole(self, task: CdnTask) -> None:
        """Every piece of an adopted task is on disk: read it back and commit it as any fetch."""
        assert task.length is not None
        d = self._disk(task.task_id, rehash_prefix, task.data_path, task.length, task.piece_size)

        def hashed(point: ResumePoint) -> None:
            if task.status != "running" or self.tasks.get(task.task_id) is not task:
                return
            digests = list(point.digests)
            if task.length and task.length % task.piece_size:
                digests.append(point.chunk_hash.hexdigest())
            if point.offset != task.length or digests != task.digests:
                self._fail(task, TaskError("STORE_FAILED", "the pieces read back differ from the ones published"))
                return
            if task.sha256 is not None and task.sha256 != point.file_hash.hexdigest():
                self._fail(task, TaskError("SOURCE_CHANGED", f"the whole file of {task.url} is not the one its swarm holds"))
                return
            self._finished(task, task.length or 0, point.file_hash.hexdigest())

        d.addCallbacks(hashed, lambda f: self._fail(task, TaskError("STORE_FAILED", f.getErrorMessage())))

    def _finished(self, task: CdnTask, total: int, file_hash: str) -> None:
        if task.status != "running":
            return
        self._drop_sides(task, "the main fetch is complete")
        if task.length is None:
            self._publish_length(task, total)
            assert task.available is not None  # published with the length
            for i in range(task.piece_count or 0):
                task.available.set(i)
                task.notify("piece_ready", i)
        if task.expected_digest:
            algo, want = parse_digest(task.expected_digest)
            if algo == "sha256" and want != file_hash:
                self._fail(
                    task,
                    TaskError("DIGEST_MISMATCH", f"origin content has sha256:{file_hash}, expected sha256:{want}"),
                )
                return
        if any(d is None for d in task.digests):
            self._fail(task, TaskError("INTERNAL", "the fetch ended with pieces missing"))
            return
        meta = {
            "url": task.url, "length": task.length, "pieceSize": task.piece_size,
            "digests": task.digests, "sha256": file_hash or None, "contentType": task.content_type,
            "validators": task.validators, "digest": task.expected_digest,
        }
        d = self._disk(task.task_id, _commit, task.meta_path, meta, self._part_path(task.task_id))
        d.addCallbacks(
            lambda _: self._committed(task, file_hash),
            lambda f: self._fail(task, TaskError("STORE_FAILED", f"cannot write the meta file: {f.getErrorMessage()}")),
        )

    def _committed(self, task: CdnTask, file_hash: str) -> None:
        if task.status != "running":
            return
        task.sha256 = file_hash or None
        task.status = "success"
        task.adopted = False  # a cached file like any other from now on
        task.validated_at = self._clock.seconds()
        task_log(
            log, LogLevel.info, task.task_id, "origin fetch complete: {bytes} bytes in {pieces} pieces in {seconds:.2f}s",
            bytes=task.length, pieces=task.piece_count, seconds=self._clock.seconds() - task.fetch_started,
        )
        task.notify("task_done")
        if task.done is not None and not task.done.called:
            task.done.callback(task)

    # -- serving -----------------------------------------------------------

    def read_piece(self, task: CdnTask, index: int) -> Deferred[bytes]:
        """Read a verified piece in the worker pool."""
        assert task.length is not None
        task.last_access = self._clock.seconds()
        offset, size = piece_span(index, task.length, task.piece_size)
        return self._pool.run(pread_exact, task.data_path, offset, size)

    def warm_piece(self, task: CdnTask, fd: int, offset: int, size: int) -> Deferred[int]:
        """
        Read a published piece of C{task} (C{fd} from L{open_data}) into the
        page cache, in the pool, before the seed sends it: with the kernel's
        readahead (large folios, up to its window past the piece) unless the
        file may hold unwritten ranges past the piece (L{CdnTask.in_order},
        asked again in the pool), where exactly the piece is read.

        Why: O_DIRECT writes leave nothing in the page cache.  Read exactly
        (4 KiB pages) the seed's pieces cost the SuperNode 0.2-0.35 CPU s/GiB
        more than with readahead, in same-run datapath comparisons
        (docs/benchmarks.md).
        """

        def warm() -> int:
            exact = task.status != "success" and not task.in_order
            return warm_pages(fd, offset, size, exact)

        return self._pool.run(warm)

    def open_data(self, task: CdnTask) -> Deferred[int]:
        """A read-only fd on the task's data file, opened in the pool (for zero-copy uploads)."""
        return self._pool.run(os.open, task.data_path, os.O_RDONLY | os.O_CLOEXEC)

    def close_data(self, fd: int) -> Deferred[None]:
        """Close an fd from L{open_data}, in the pool."""
        return self._pool.run(os.close, fd)

    # -- garbage collection --------------------------------------------------

    def evict(self, task_id: str) -> Deferred[None]:
        """
        Forget a finished (or failed) task and delete its files in the pool.
        The next peer that asks for it has it fetched from the origin again.
        """
        task = self.tasks.get(task_id)
        if task is None:
            return succeed(None)
        if task.status in ("waiting", "running") and not task.peer_held:
            raise ValueError(f"task {task_id} is being fetched; it cannot be evicted")
        del self.tasks[task_id]
        task.listeners.clear()
        d = self.store.remove(task_id)
        d.addErrback(lambda f: log.failure("removing evicted task {task}", f, task=task_id))
        return d

    def expire_parked(self, max_age: float) -> Deferred[int]:
        """Delete the parked prefixes (see L{load}) older than C{max_age} seconds; how many."""
        return self.store.expire_parked(max_age)

    # -- file work, in the pool ----------------------------------------------

    def settled(self, task_id: str) -> Deferred[None]:
        """Fires once the file work queued so far for C{task_id} is over (a removal's unlinks, say)."""
        return self.store.queued(task_id) or succeed(None)

    def _disk(self, task_id: str, f: Callable[..., Any], *args: Any) -> Deferred:
        """
        Run C{f(*args)} in the pool once the file work queued before for
        C{task_id} is over (L{TaskStore.run}); its result.
        """
        return self.store.run(task_id, f, *args)


def _resumable(error: TaskError) -> bool:
    """Whether a failed fetch's stored bytes are worth keeping for the next try."""
    if error.code in ("SOURCE_TRUNCATED", "SOURCE_TIMEOUT", "SOURCE_UNREACHABLE", "INTERNAL"):
        return True
    return error.code == "SOURCE_ERROR" and (error.http_status or 0) >= 500


def _read_header(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            header = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict) or not isinstance(header.get("validators"), dict):
        return None
    if not isinstance(header.get("pieceSize"), int) or header["pieceSize"] <= 0:
        return None
    return header


def _park_or_remove(task_id: str, repo: str, parked: str, keep: bool) -> None:
    """A failed fetch's files: data and header parked (C{keep}, when a resume could use them), else gone."""
    data, part = os.path.join(repo, task_id + ".data"), os.path.join(repo, task_id + ".part")
    parked_data, parked_part = os.path.join(parked, task_id + ".data"), os.path.join(parked, task_id + ".part")
    remove_files(os.path.join(repo, task_id + ".meta"))
    header = _read_header(part) if keep and os.path.exists(data) else None
    if header is not None and resume_headers(header["validators"], _resume_offset(header, os.path.getsize(data))) is not None:
        move_task_files(repo, parked, task_id)
        return
    remove_files(data, part, parked_data, parked_part)


def _cut_fetches(repo: str) -> list[str]:
    """The task ids of the fetches under way in C{repo} (a header, data, no meta): what a crash cut."""
    try:
        names = set(os.listdir(repo))
    except OSError:
        return []
    return sorted(
        name[: -len(".part")] for name in names
        if name.endswith(".part") and name[: -len(".part")] + ".data" in names
        and name[: -len(".part")] + ".meta" not in names
    )


def _resumes_at_start(task_id: str, parked: str, now: float | None = None) -> tuple[str, str, str | None] | None:
    """
    C{(task id, url, digest)} when the fetch a crash cut, parked as
    C{task_id}, may go on at start-up (see L{Cdn.resume_cut}): written to
    within L{RESUME_AT_START} seconds, asked with no request headers, not
    a range alone, and resumable; else None.
    """
    header = _read_header(os.path.join(parked, task_id + ".part"))
    if header is None or header.get("plain") is not True or header["validators"].get("range"):
        return None
    url, digest = header.get("url"), header.get("digest")
    if not isinstance(url, str) or not (digest is None or isinstance(digest, str)):
        return None
    try:
        st = os.stat(os.path.join(parked, task_id + ".data"))
    except OSError:
        return None
    age = (time.time() if now is None else now) - st.st_mtime
    if not 0 <= age <= RESUME_AT_START or resume_headers(header["validators"], _resume_offset(header, st.st_size)) is None:
        return None
    return task_id, url, digest


def _resume_offset(header: dict[str, Any], size: int) -> int:
    """
    Where a resume of C{size} stored bytes starts.  The last byte is always
    asked again: the origin's answer then says whether the stored bytes are
    still its current version.
    """
    length = header["validators"].get("length")
    holes = header.get("holesFrom")
    if isinstance(holes, int) and not isinstance(holes, bool) and holes >= 0:
        size = min(size, holes)  # side fetches wrote past here: maybe holes
    return min(size, length - 1) if isinstance(length, int) and length > 0 else 0


def _parked_plan(task_id: str, parked: str) -> Plan | None:
    """What L{_take_parked} would hash of C{task_id}'s parked prefix, or None."""
    parked_data, parked_part = os.path.join(parked, task_id + ".data"), os.path.join(parked, task_id + ".part")
    header = _read_header(parked_part)
    if header is None:
        return None
    offset = _resume_offset(header, os.path.getsize(parked_data))
    if resume_headers(header["validators"], offset) is None:
        return None
    return Plan(parked_data, offset, header["pieceSize"], wants_file_sha256(header.get("digest")))


def _take_parked(
    task_id: str, repo: str, parked: str, prehash: Prehash | None = None,
) -> tuple[dict[str, Any], ResumePoint] | None:
    """
    A parked prefix of C{task_id}, moved back into the cache and rehashed
    (or hashed ahead by C{prehash}): C{(header, resume point)}; None when
    there is none worth resuming.
    """
    parked_data, parked_part = os.path.join(parked, task_id + ".data"), os.path.join(parked, task_id + ".part")
    if not os.path.exists(parked_part):
        remove_files(parked_data)
        return None
    header = _read_header(parked_part)
    try:
        size = os.path.getsize(parked_data)
    except OSError:
        size = 0
    offset = _resume_offset(header, size) if header is not None else 0
    if header is None or resume_headers(header["validators"], offset) is None:
        remove_files(parked_data, parked_part)
        return None
    whole = wants_file_sha256(header.get("digest"))
    point = prehash.take(task_id, Plan(parked_data, offset, header["pieceSize"], whole)) if prehash is not None else None
    move_task_files(parked, repo, task_id)
    if point is None:
        point = rehash_prefix(os.path.join(repo, task_id + ".data"), offset, header["pieceSize"], whole=whole)
    return header, point


def _open_fresh(data: str, part: str, header: dict[str, Any]) -> int:
    """Write a fetch's header, then open its data file new and empty (never the old one truncated)."""
    write_json_atomic(part, header)
    return create_file(data)


def _adopt_files(task_id: str, repo: str, parked: str, validators: dict[str, Any], piece_size: int) -> list[str]:
    """
    An adopted task's data file, C{length} bytes (holes where nothing is
    stored), without a header (nothing in it to resume): a prefix this node
    parked of the same version and piece size is taken back and rehashed
    (the digests of its whole pieces returned), else the file is new.
    """
    data, part = os.path.join(repo, task_id + ".data"), os.path.join(repo, task_id + ".part")
    length = validators["length"]
    found = _take_parked(task_id, repo, parked)
    stored: list[str] = []
    if found is not None:
        header, point = found
        before = header["validators"]
        if header.get("pieceSize") == piece_size and all(before.get(k) == validators.get(k) for k in ("etag", "lastModified", "length")):
            stored = list(point.digests)
    if stored:
        remove_files(part)
        fd = os.open(data, os.O_WRONLY)
    else:
        fd = create_file(data, part)
    try:
        os.ftruncate(fd, length)
    finally:
        os.close(fd)
    return stored


def _open_side(data: str) -> int:
    """Open the data file of a fetch under way for a side fetch (it writes its pieces at their offsets)."""
    return os.open(data, os.O_WRONLY)


def _mark_holes(part: str, offset: int | None, exact: bool = False) -> None:
    """
    Note in a fetch's header that the data file may have holes from
    C{offset} on (see L{_resume_offset}; the lower mark holds unless
    C{exact}); None: it has none any more.
    """
    header = _read_header(part)
    if header is None:
        return
    holes = header.get("holesFrom")
    if offset is None:
        header.pop("holesFrom", None)
    else:
        header["holesFrom"] = offset if exact or not isinstance(holes, int) else min(holes, offset)
    write_json_atomic(part, header)


class _LengthWaiter:
    """A CDN listener that fires a Deferred at the first sign of a length or an end, then leaves."""

    def __init__(self, task: CdnTask, d: Deferred) -> None:
        self.task, self.d = task, d

    def fire(self, *_: Any) -> None:
        if self in self.task.listeners:
            self.task.listeners.remove(self)
        if not self.d.called:
            self.d.callback(self.task)

    length_known = task_failed = task_done = fire

    def piece_ready(self, task: CdnTask, index: int) -> None:
        pass


class _Taken:
    """The pieces of C{task} stored, or asked for by a side fetch under way."""

    def __init__(self, task: CdnTask) -> None:
        self.task = task

    def __contains__(self, index: object) -> bool:
        t = self.task
        if not isinstance(index, int):
            return False
        if t.available is not None and index in t.available:
            return True
        return any(s.first <= index < s.end for s in t.side)


def _open_at(data: str, offset: int) -> int:
    """Open a resumed fetch's data file, cut at C{offset}."""
    fd = os.open(data, os.O_WRONLY)
    try:
        os.ftruncate(fd, offset)
    except OSError:
        os.close(fd)
        raise
    return fd


def _held_pieces(path: str, length: int, piece_size: int, digests: list[str]) -> list[int]:
    """The pieces of C{path} whose bytes hash to their digests (a peer-held task's, reloaded; blocking)."""
    held = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        for i, want in enumerate(digests):
            offset, size = piece_span(i, length, piece_size)
            data = os.pread(fd, size, offset)
            if len(data) == size and hashlib.sha256(data).hexdigest() == want:
                held.append(i)
    finally:
        os.close(fd)
    return held


def _commit(meta_path: str, meta: dict[str, Any], part: str) -> None:
    """A fetch is complete: its meta file, then its header goes."""
    commit_files(meta_path, meta, None, (part,))


def _range_answer(spec: ByteRange, response: Any) -> str | None:
    """
    The C{Content-Range} of an origin's answer to a range-only fetch when it
    is exactly C{spec} of a known length (a 206 with a body of that size);
    None otherwise.
    """
    if response.code != 206:
        return None
    rng = parse_content_range(_first_header(response, b"content-range"))
    if rng is None or rng.total is None or spec.resolve(rng.total) != (rng.first, rng.last + 1):
        return None
    if response.length is UNKNOWN_LENGTH or response.length != rng.last + 1 - rng.first:
        return None
    return f"bytes {rng.first}-{rng.last}/{rng.total}"


def _first_header(response: Any, name: bytes) -> bytes | None:
    headers = getattr(response, "headers", None)
    values = headers.getRawHeaders(name) if headers is not None else None
    return values[0] if values else None


def _to_header_lists(headers: dict[str, str]) -> dict[str, list[str]]:
    return {k: [v] for k, v in headers.items()}


def _content_type(values: list[bytes] | None) -> str | None:
    """The origin's Content-Type if it is one short printable token, else None."""
    if not values:
        return None
    value = values[0].decode("latin-1").strip()
    if not 0 < len(value) <= 128 or not all(" " <= c <= "~" for c in value):
        return None
    return value


def _validators(response: Any) -> dict[str, str | None]:
    """The C{ETag} and C{Last-Modified} of an origin response (None when absent)."""
    headers = getattr(response, "headers", None)
    out: dict[str, str | None] = {"etag": None, "lastModified": None}
    if headers is None:
        return out
    for key, name in (("etag", b"etag"), ("lastModified", b"last-modified")):
        values = headers.getRawHeaders(name)
        if values:
            out[key] = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
    return out


def _same_content(cached: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether two sets of validators name the same content (each one present on both sides must match)."""
    if cached.get("length") != now.get("length"):
        return False
    for key in ("etag", "lastModified"):
        if cached.get(key) and now.get(key) and cached[key] != now[key]:
            return False
        if bool(cached.get(key)) != bool(now.get(key)):
            return False
    return True


def _end_to_end(headers: dict[str, str] | None) -> dict[str, str]:
    """The headers an origin fetch may carry: the client's, less the hop-by-hop ones and those the fetch sets itself."""
    return {k: v for k, v in (headers or {}).items() if k.lower() not in NOT_TO_ORIGIN}

"""
The CDN cache: pull each origin file once, cut it into pieces, digest them and
seed them.

A task's origin fetch is single-flight: however many peers register the same
task at the same moment, one HTTP GET goes to the origin.  The body streams
straight to C{<home>/repo/<task id>.data}; each full piece is hashed (SHA-256)
and written at its offset in the worker pool, in order, and published the
moment it is on disk, so peers fetch early pieces while the origin download
is still running.  A whole-file SHA-256 is computed in the same pass.

Nothing half-fetched is ever served as complete: a task becomes C{success}
only when the byte count matches the origin's C{Content-Length} (and the
digest the client asked for, if any), and only then is its meta file written.
On start-up completed tasks are reloaded from their meta files; data files
without one are removed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Protocol as TypingProtocol

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.iweb import UNKNOWN_LENGTH

from ..core.bitmap import Bitmap
from ..core.bodywriter import BodyError, ChunkedFileWriter, DiscardBody
from ..core.files import pread_exact, write_json_atomic
from ..core.ids import is_task_id, parse_digest
from ..core.ratelimit import TokenBucket
from ..core.pieces import piece_count, piece_span, swarm_piece_size
from ..core.threads import WorkerPool

log = Logger()

# Dragonfly 1.x result codes, kept in API errors so scripts carry over.
DF_SOURCE_UNREACHABLE = 607
DF_NEED_AUTH = 608
DF_SOURCE_ERROR = 610

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
        "TE", "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
        "Range", "Accept-Encoding",
    )
)


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


class CdnListener(TypingProtocol):
    """Told about a task's progress (seed connections, the scheduler)."""

    def length_known(self, task: "CdnTask") -> None: ...

    def piece_ready(self, task: "CdnTask", index: int) -> None: ...

    def task_failed(self, task: "CdnTask") -> None: ...

    def task_done(self, task: "CdnTask") -> None: ...


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
    digests: list[str] = field(factory=list)
    available: Bitmap | None = None
    sha256: str | None = None
    error: TaskError | None = None
    origin_bytes: int = 0
    seed_bytes: int = 0
    listeners: list[Any] = field(factory=list)
    done: Deferred | None = None  # fires when the fetch ends, either way

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
            "originBytes": self.origin_bytes,
            "seedBytes": self.seed_bytes,
        }
        if self.error is not None:
            out["error"] = self.error.to_json()
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
    ) -> None:
        self._origin_limit = origin_limit
        self.repo = os.path.join(home, "repo")
        os.makedirs(self.repo, exist_ok=True)
        self._http = http
        self._pool = pool
        self._clock = clock
        self._piece_size = piece_size
        self._idle_timeout = idle_timeout
        self._on_new_task = on_new_task
        self.tasks: dict[str, CdnTask] = {}
        self.origin_fetches = 0
        #: bytes received from origins, all tasks together
        self.origin_bytes = 0

    # -- cache on disk -----------------------------------------------------

    def _paths(self, task_id: str) -> tuple[str, str]:
        if not is_task_id(task_id):
            raise ValueError(f"bad task id {task_id!r}")
        return (
            os.path.join(self.repo, task_id + ".data"),
            os.path.join(self.repo, task_id + ".meta"),
        )

    def load(self) -> int:
        """Reload completed tasks from their meta files; remove leftovers."""
        loaded = 0
        for name in os.listdir(self.repo):
            stem, _, ext = name.partition(".")
            path = os.path.join(self.repo, name)
            if not is_task_id(stem) or ext not in ("data", "meta"):
                continue
            data_path, meta_path = self._paths(stem)
            if ext == "data" and not os.path.exists(meta_path):
                os.unlink(path)
                continue
            if ext != "meta":
                continue
            try:
                with open(meta_path) as f:
                    meta = json.load(f)
                if os.path.getsize(data_path) != meta["length"]:
                    raise ValueError("data file has the wrong size")
            except (OSError, ValueError, KeyError) as e:
                log.warn("dropping cache entry {task}: {why}", task=stem, why=str(e))
                for p in (data_path, meta_path):
                    if os.path.exists(p):
                        os.unlink(p)
                continue
            count = len(meta["digests"])
            task = CdnTask(
                task_id=stem, url=meta["url"], data_path=data_path, meta_path=meta_path,
                status="success", length=meta["length"], piece_size=meta["pieceSize"],
                piece_count=count, digests=list(meta["digests"]), sha256=meta["sha256"],
                available=Bitmap(count),
            )
            for i in range(count):
                task.available.set(i)
            task.done = succeed(task)
            self.tasks[stem] = task
            loaded += 1
            if self._on_new_task is not None:
                self._on_new_task(task)
        return loaded

    # -- fetching ----------------------------------------------------------

    def ensure(
        self,
        task_id: str,
        url: str,
        headers: dict[str, str] | None = None,
        digest: str | None = None,
    ) -> CdnTask:
        """
        The task for C{task_id}, starting its origin fetch unless one is running
        or done (single-flight).  A failed task is fetched again.
        """
        task = self.tasks.get(task_id)
        if task is not None and task.status in ("waiting", "running", "success"):
            return task
        data_path, meta_path = self._paths(task_id)
        clean = {k: v for k, v in (headers or {}).items() if k.lower() not in HOP_BY_HOP}
        if task is None:
            task = CdnTask(task_id=task_id, url=url, data_path=data_path, meta_path=meta_path)
            self.tasks[task_id] = task
            if self._on_new_task is not None:
                self._on_new_task(task)
        else:
            # a failed task tries again: reset it, keep its listeners
            task.status, task.error, task.sha256 = "waiting", None, None
            task.length, task.piece_count, task.available = None, None, None
            task.digests = []
        task.url, task.headers, task.expected_digest = url, clean, digest
        task.done = Deferred()
        self.origin_fetches += 1
        self._fetch(task)
        return task

    def _fail(self, task: CdnTask, error: TaskError) -> None:
        if task.status == "failed":
            return
        log.warn("task {task} failed: {message}", task=task.task_id, message=error.message)
        task.status, task.error = "failed", error
        for path in (task.data_path, task.meta_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        task.notify("task_failed")
        if task.done is not None and not task.done.called:
            task.done.callback(task)

    def _fetch(self, task: CdnTask) -> None:
        task.status = "running"
        log.info("task {task}: fetching {url} from the origin", task=task.task_id, url=task.url)
        d = self._http.get(task.url, headers=_to_header_lists(task.headers), unbuffered=True)
        d.addTimeout(self._idle_timeout, self._clock)
        d.addCallbacks(
            lambda response: self._got_response(task, response),
            lambda f: self._fail(
                task,
                TaskError("SOURCE_UNREACHABLE", f"origin {task.url} unreachable: {f.getErrorMessage()}", DF_SOURCE_UNREACHABLE),
            ),
        )
        d.addErrback(lambda f: self._fail(task, TaskError("INTERNAL", f.getErrorMessage())))

    def _got_response(self, task: CdnTask, response: Any) -> None:
        if response.code != 200:
            phrase = response.phrase.decode("latin-1", "replace") if isinstance(response.phrase, bytes) else str(response.phrase)
            df = DF_NEED_AUTH if response.code in (401, 403, 407) else DF_SOURCE_ERROR
            self._fail(
                task,
                TaskError("SOURCE_ERROR", f"origin returned {response.code} {phrase} for {task.url}", df, response.code),
            )
            response.deliverBody(DiscardBody())
            return
        length = response.length if response.length is not UNKNOWN_LENGTH else None
        task.length = length
        rule = self._piece_size
        task.piece_size = rule(length) if callable(rule) else rule
        fd = os.open(task.data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if length is not None:
            self._publish_length(task, length)

        def stored(index: int, digest: str) -> None:
            if task.status == "running":
                self._piece_stored(task, index, digest)

        def counted(n: int) -> None:
            task.origin_bytes += n
            self.origin_bytes += n

        writer = ChunkedFileWriter(
            self._pool, self._clock, fd, task.piece_size, length, self._idle_timeout, stored, counted,
            limit=self._origin_limit,
        )
        response.deliverBody(writer)
        writer.done.addCallbacks(
            lambda result: self._finished(task, *result),
            lambda f: self._fail(task, TaskError(f.value.code, f.value.message))
            if f.check(BodyError) else self._fail(task, TaskError("INTERNAL", f.getErrorMessage())),
        )

    def _publish_length(self, task: CdnTask, length: int) -> None:
        task.length = length
        task.piece_count = piece_count(length, task.piece_size)
        task.available = Bitmap(task.piece_count)
        task.notify("length_known")

    def _piece_stored(self, task: CdnTask, index: int, digest: str) -> None:
        task.digests.append(digest)
        assert len(task.digests) == index + 1
        if task.available is not None:
            task.available.set(index)
            task.notify("piece_ready", index)

    def _finished(self, task: CdnTask, total: int, file_hash: str) -> None:
        if task.status != "running":
            return
        if task.length is None:
            self._publish_length(task, total)
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
        task.sha256 = file_hash
        meta = {
            "url": task.url, "length": task.length, "pieceSize": task.piece_size,
            "digests": task.digests, "sha256": file_hash,
        }
        write_json_atomic(task.meta_path, meta)
        task.status = "success"
        log.info(
            "task {task}: origin fetch complete, {length} bytes in {count} pieces",
            task=task.task_id, length=task.length, count=task.piece_count,
        )
        task.notify("task_done")
        if task.done is not None and not task.done.called:
            task.done.callback(task)

    # -- serving -----------------------------------------------------------

    def read_piece(self, task: CdnTask, index: int) -> "Deferred[bytes]":
        """Read a verified piece in the worker pool."""
        assert task.length is not None
        offset, size = piece_span(index, task.length, task.piece_size)
        return self._pool.run(pread_exact, task.data_path, offset, size)


def _to_header_lists(headers: dict[str, str]) -> dict[str, list[str]]:
    return {k: [v] for k, v in headers.items()}

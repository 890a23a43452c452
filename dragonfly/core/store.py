"""
A directory of tasks, one data file and one JSON meta file per task id, whose
every file operation runs in the worker pool: nothing here blocks the reactor.

Each method returns a Deferred that fires in the reactor thread.  The data
file holds the task's bytes at their offsets; a piece is checked against its
SHA-256 and written in one pool call (L{dragonfly.core.files.write_piece}:
C{O_DIRECT} where the file system allows, else C{pwrite}), so nothing
unverified is ever written.  The meta file is written (atomically) when the task is
complete: a data file without one is a half task, dropped (or parked, see
below) by L{TaskStore.reload}.

For uploads, L{TaskStore.serve} opens one read-only descriptor per task and
keeps it until the task is removed or its file replaced (L{TaskStore.served_fd}
hands it out for C{os.sendfile}); a withdrawn descriptor is closed a little
later, so an upload under way never reads from a reused descriptor number.
Creations, removals, opens and the steps given to L{TaskStore.run} of one
task run in the order they were asked.

The dfpeer's store (L{dragonfly.peer.store}) is one, and so is the CDN's
cache directory (L{dragonfly.supernode.cdn}: a C{.meta} suffix instead of
C{.json}, metas that do not name their task, and a C{.part} header beside a
file being fetched).  A store given a C{parked} directory keeps the data and
header of a file cut part-way there, for a resume; without one, half-written
data is dropped.  L{load_complete} is the one reload routine of both.

The blocking functions below (L{load_complete}, L{remove_files},
L{create_file}, L{commit_files}, L{move_task_files}, L{expire_files}) run in
the pool (or before the reactor runs); the CDN's resume steps call them
through L{TaskStore.run} too, so no file routine is written twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, DeferredLock, gatherResults, succeed
from twisted.logger import Logger

from .files import (
    file_sha256,
    pread_exact,
    preallocate,
    unlink_quietly,
    warm_pages,
    write_json_atomic,
    write_piece,
)
from .ids import is_task_id
from .partwrite import Beside, WriteGuard, hash_beside, seal_part, write_beside, write_guarded, write_part

log = Logger()

T = TypeVar("T")


class Pool(Protocol):
    """What the store needs of a worker pool (L{dragonfly.core.threads.WorkerPool})."""

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run C{f} in the pool; fires with its result in the reactor thread."""


class TaskStore:
    """
    @param root: the directory (created at once, before the reactor runs).
    @param pool: where every file operation runs.
    @param meta_suffix: the meta file's suffix (C{.json}; the CDN's C{.meta}).
    @param meta_names_task: whether a meta must name its task (C{taskId}).
    @param clock: to close a served descriptor L{LINGER} seconds after it is
        withdrawn (at once without one).
    @param parked: where the data and header of a file cut part-way are
        kept for a resume (created at once); None: such data is dropped.
    @param required: the keys a meta must have to be reloaded.
    """

    #: a descriptor no longer handed out stays open this long, for uploads under way
    LINGER = 30.0

    def __init__(
        self,
        root: str,
        pool: Pool,
        meta_suffix: str = ".json",
        meta_names_task: bool = True,
        clock: Any = None,
        parked: str | None = None,
        required: Sequence[str] = ("length",),
    ) -> None:
        self.root = root
        self.parked = parked
        self._clock = clock
        os.makedirs(self.root, exist_ok=True)
        if parked is not None:
            os.makedirs(parked, exist_ok=True)
        self._pool = pool
        self._meta_suffix = meta_suffix
        self._meta_names_task = meta_names_task
        self._required = tuple(required)
        # task id -> the read-only descriptor uploads are served from
        self._served: dict[str, int] = {}
        # task id -> the lock that keeps its creations and removals in order
        self._locks: dict[str, DeferredLock] = {}

    # -- names (no I/O) ----------------------------------------------------------

    def data_path(self, task_id: str) -> str:
        """The data file of C{task_id} (ValueError for a malformed id)."""
        if not is_task_id(task_id):
            raise ValueError(f"bad task id {task_id!r}")
        return os.path.join(self.root, task_id + ".data")

    def meta_path(self, task_id: str) -> str:
        """The meta file of C{task_id}."""
        return self.data_path(task_id)[: -len(".data")] + self._meta_suffix

    def header_path(self, task_id: str) -> str:
        """The header of C{task_id} while its file is being written (the CDN's origin validators)."""
        return self.data_path(task_id)[: -len(".data")] + ".part"

    def parked_paths(self, task_id: str) -> tuple[str, str]:
        """Where the data and header of C{task_id} are parked (ValueError without a parked directory)."""
        if self.parked is None:
            raise ValueError("this store parks nothing")
        self.data_path(task_id)  # a valid task id
        return os.path.join(self.parked, task_id + ".data"), os.path.join(self.parked, task_id + ".part")

    # -- writing -------------------------------------------------------------------

    def _in_order(self, task_id: str, step: Callable[[], Deferred[T]], retire: bool = False) -> Deferred[T]:
        """
        Run C{step} (in the reactor thread; it starts pool work and returns
        its Deferred) after the task's earlier creations, removals and opens;
        with C{retire}, the served descriptor is withdrawn first.
        """
        lock = self._locks.get(task_id)
        if lock is None:
            lock = self._locks[task_id] = DeferredLock()
        if retire:
            inner = step

            def step() -> Deferred[T]:
                self._retire(self._served.pop(task_id, None))
                return inner()

        def done(result: T) -> T:
            if not lock.locked and not lock.waiting and self._locks.get(task_id) is lock:
                del self._locks[task_id]
            return result

        return lock.run(step).addBoth(done)

    def run(self, task_id: str, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        Run C{f(*args)} in the pool after the file work asked before for
        C{task_id} (its creations, removals, opens and earlier L{run}s); fires
        with its result, or its failure (the work asked later runs either way).
        """
        self.data_path(task_id)  # a valid task id
        return self._in_order(task_id, lambda: self._pool.run(f, *args))

    def queued(self, task_id: str) -> Deferred[None] | None:
        """None when no file work is queued for C{task_id}; else a Deferred that fires once the work queued so far is over."""
        if task_id not in self._locks:
            return None
        return self._in_order(task_id, lambda: succeed(None))

    def prepare(self, task_id: str, length: int) -> Deferred[None]:
        """
        A new data file of C{length} bytes, the old one and its meta removed;
        its blocks reserved where the file system can (L{preallocate}), else sparse.
        """
        data, meta = self.data_path(task_id), self.meta_path(task_id)
        return self._in_order(task_id, lambda: self._pool.run(_prepare, data, meta, length), retire=True)

    def create(self, task_id: str) -> Deferred[int]:
        """A new empty data file, the old one and its meta removed; fires with a descriptor open for writing."""
        data, meta = self.data_path(task_id), self.meta_path(task_id)
        return self._in_order(task_id, lambda: self._pool.run(_create, data, meta), retire=True)

    def write_verified(self, task_id: str, offset: int, data: bytearray | bytes, digest: bytes) -> Deferred[bool]:
        """Check C{data} against C{digest} and write it at C{offset}; fires with True, or False on a mismatch."""
        return self._pool.run(_write_verified, self.data_path(task_id), offset, data, digest)

    def write_guarded(
        self, task_id: str, guard: WriteGuard, index: int, offset: int, data: bytearray | bytes, digest: bytes,
    ) -> Deferred[bool]:
        """L{write_verified} of piece C{index} under C{guard} (L{dragonfly.core.partwrite.write_guarded})."""
        return self._pool.run(write_guarded, self.data_path(task_id), guard, index, offset, data, digest)

    def write_part(
        self, task_id: str, guard: WriteGuard, index: int, token: int, hasher: Any, buf: Any,
        start: int, end: int, offset: int,
    ) -> Deferred[None]:
        """Hash and write C{buf[start:end]} of piece C{index} at C{offset} (L{dragonfly.core.partwrite.write_part})."""
        return self._pool.run(write_part, self.data_path(task_id), guard, index, token, hasher, buf, start, end, offset)

    def seal_part(
        self, task_id: str, guard: WriteGuard, index: int, token: int, hasher: Any, buf: Any,
        start: int, offset: int, digest: bytes,
    ) -> Deferred[bool | None]:
        """The last part of piece C{index}: checked and sealed (L{dragonfly.core.partwrite.seal_part})."""
        return self._pool.run(seal_part, self.data_path(task_id), guard, index, token, hasher, buf, start, offset, digest)

    def write_beside(
        self, task_id: str, guard: WriteGuard, index: int, token: int, offset: int, data: bytearray | bytes,
        digest: bytes,
    ) -> Deferred[bool | None]:
        """
        Piece C{index}, whole, hashed in one pool thread while another writes
        it (L{dragonfly.core.partwrite.Beside}): fires with True (matched,
        written and sealed), False (no match) or None (this copy could not
        write it), or the write's failure.
        """
        b = Beside(self.data_path(task_id), guard, index, token, offset, data, digest)
        d = gatherResults([self._pool.run(hash_beside, b), self._pool.run(write_beside, b)], consumeErrors=True)

        def sealed(_: object) -> bool | None:
            if b.error is not None:
                raise b.error
            return b.result

        return d.addCallback(sealed)

    def save_meta(self, task_id: str, meta: dict[str, Any]) -> Deferred[None]:
        """Write the meta file of C{task_id} atomically."""
        return self._pool.run(write_json_atomic, self.meta_path(task_id), meta)

    def finish(self, task_id: str, meta: dict[str, Any] | None) -> Deferred[None]:
        """
        The task is complete: its data file becomes read-only (a user's
        output may be a hard link to it), and C{meta}, if given, is saved.
        """
        paths = self.meta_path(task_id), meta, self.data_path(task_id)
        return self._in_order(task_id, lambda: self._pool.run(commit_files, *paths))

    # -- reading ---------------------------------------------------------------------

    def read(self, task_id: str, offset: int, size: int) -> Deferred[bytes]:
        """Fires with C{size} bytes from C{offset}."""
        return self._pool.run(pread_exact, self.data_path(task_id), offset, size)

    def warm(self, fd: int, offset: int, size: int, exact: bool = True) -> Deferred[int]:
        """
        Bring C{size} bytes at C{offset} of C{fd} (a served descriptor) into
        the page cache, in the pool (L{warm_pages}; C{exact}: no readahead
        past them): fires with the bytes warmed.  Not in the task's order: it only reads.
        """
        return self._pool.run(warm_pages, fd, offset, size, exact)

    def sha256(self, task_id: str) -> Deferred[str]:
        """Fires with the hex SHA-256 of the whole data file."""
        return self._pool.run(file_sha256, self.data_path(task_id))

    def serve(self, task_id: str) -> Deferred[int]:
        """Open the descriptor uploads of C{task_id} are served from (once); fires with it."""
        path = self.data_path(task_id)

        def step() -> Deferred[int]:
            fd = self._served.get(task_id)
            if fd is not None:
                d: Deferred[int] = Deferred()
                d.callback(fd)
                return d
            return self._pool.run(os.open, path, os.O_RDONLY).addCallback(opened)

        def opened(fd: int) -> int:
            self._served[task_id] = fd
            return fd

        return self._in_order(task_id, step)

    def served_fd(self, task_id: str) -> int | None:
        """The descriptor L{serve} opened for C{task_id}, if any (no I/O)."""
        return self._served.get(task_id)

    # -- removing and reloading --------------------------------------------------------

    def remove(self, task_id: str) -> Deferred[None]:
        """
        Close its descriptor and remove its files (the meta first: a crash
        leaves no half task), its header too; parked files stay.
        """
        paths = self.meta_path(task_id), self.data_path(task_id), self.header_path(task_id)
        return self._in_order(task_id, lambda: self._pool.run(_remove, *paths), retire=True)

    def forget(self, task_id: str) -> Deferred[None]:
        """Close the descriptor uploads of C{task_id} were served from (the file is to be replaced)."""
        self.data_path(task_id)  # a valid task id
        return self._in_order(task_id, lambda: self._pool.run(_remove), retire=True)

    def _retire(self, fd: int | None) -> None:
        """
        Close a descriptor no longer handed out, L{LINGER} seconds later: an
        upload under way keeps reading the verified bytes of the (maybe
        unlinked) file, and its number is not reused under it.
        """
        if fd is None:
            return
        if self._clock is None:
            self._pool.run(os.close, fd)
        else:
            self._clock.callLater(self.LINGER, self._pool.run, os.close, fd)

    def reload(self) -> Deferred[list[dict[str, Any]]]:
        """Fires with the metas of the complete tasks (see L{load_complete}), the rest removed or parked."""
        return self._pool.run(load_complete, *self._layout())

    def load_now(self) -> list[dict[str, Any]]:
        """L{reload}, blocking: only before the reactor runs (the CDN's start-up) or in tools and tests."""
        return load_complete(*self._layout())

    def _layout(self) -> tuple[str, str, bool, str | None, tuple[str, ...]]:
        return self.root, self._meta_suffix, self._meta_names_task, self.parked, self._required

    def expire_parked(self, max_age: float) -> Deferred[int]:
        """Delete the parked files older than C{max_age} seconds; fires with how many (0 without a parked directory)."""
        if self.parked is None:
            return succeed(0)
        return self._pool.run(expire_files, self.parked, max_age)


def load_complete(
    root: str,
    meta_suffix: str = ".json",
    meta_names_task: bool = True,
    parked: str | None = None,
    required: Sequence[str] = ("length",),
) -> list[dict[str, Any]]:
    """
    The one reload routine of a task directory (blocking: run it in the
    pool, or before the reactor runs).

    Returns the metas of the tasks under C{root} whose meta is a JSON object
    with the C{required} keys, names its task (C{taskId}; unless
    C{meta_names_task} is false, when C{taskId} is added) and whose data
    file has the meta's C{length}; each with C{lastAccess} (the later of the
    data file's atime and the meta's mtime: least-recently-used order
    survives a restart, roughly).  Inconsistent tasks are removed.

    Half-written data (a data file without a meta) is dropped, unless
    C{parked} is given and a header (C{.part}) lies beside it: then data and
    header move to C{parked}, for a resume.  A header beside a complete task,
    or alone, is removed.
    """
    metas = []
    ext_meta = meta_suffix.lstrip(".")
    for name in sorted(os.listdir(root)):
        stem, _, ext = name.partition(".")
        if not is_task_id(stem) or ext not in ("data", ext_meta, "part"):
            continue
        data_path = os.path.join(root, stem + ".data")
        meta_path = os.path.join(root, stem + meta_suffix)
        header_path = os.path.join(root, stem + ".part")
        if ext == "part":
            # the header of a file being written: parked with its data (which
            # sorts first), or stale
            unlink_quietly(header_path)
            continue
        if ext == "data":
            if os.path.exists(meta_path):
                continue
            if parked is not None and os.path.exists(header_path):
                try:
                    move_task_files(root, parked, stem)
                    log.info(
                        "task {task}: a cut fetch's {bytes} bytes kept for a resume",
                        task=stem, bytes=os.path.getsize(os.path.join(parked, stem + ".data")),
                    )
                    continue
                except OSError as e:
                    log.warn("dropping the cut fetch of {task}: {why}", task=stem, why=str(e))
            remove_files(data_path, header_path)
            continue
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            missing = [key for key in required if key not in meta]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            if meta_names_task and meta.get("taskId") != stem:
                raise ValueError("names another task")
            if os.path.getsize(data_path) != meta["length"]:
                raise ValueError("data file has the wrong size")
            meta["lastAccess"] = max(os.path.getatime(data_path), os.path.getmtime(meta_path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warn("dropping stored task {task}: {why}", task=stem, why=str(e) or type(e).__name__)
            remove_files(meta_path, data_path)
            continue
        meta.setdefault("taskId", stem)
        metas.append(meta)
    return metas


def remove_files(*paths: str) -> None:
    """Remove each of C{paths} that exists, in order."""
    for p in paths:
        unlink_quietly(p)


def create_file(data_path: str, *stale: str) -> int:
    """
    A new empty file at C{data_path}, C{stale} files removed first; returns
    a descriptor open for reading and writing.  Never the old file
    truncated: a finished file may be hard linked to a user's output
    (dfget), or read by an upload under way, which must not change under them.
    """
    remove_files(*stale, data_path)
    return os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)


def commit_files(
    meta_path: str, meta: dict[str, Any] | None, read_only: str | None = None, drop: Sequence[str] = (),
) -> None:
    """
    A file is complete: C{read_only} (its data file, if given) becomes
    read-only, C{meta} (if given) is written atomically, then C{drop} (its
    header) is removed: a crash between leaves a complete task.
    """
    if read_only is not None:
        try:
            os.chmod(read_only, 0o444)
        except OSError:
            pass
    if meta is not None:
        write_json_atomic(meta_path, meta)
    remove_files(*drop)


def move_task_files(src: str, dst: str, task_id: str) -> None:
    """Move the data file and header of C{task_id} from directory C{src} to C{dst} (parking them, or back)."""
    for suffix in (".data", ".part"):
        os.replace(os.path.join(src, task_id + suffix), os.path.join(dst, task_id + suffix))


def expire_files(directory: str, max_age: float) -> int:
    """Delete the files of C{directory} not modified for C{max_age} seconds; how many."""
    cutoff = time.time() - max_age
    removed = 0
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            if os.path.getmtime(path) < cutoff:
                os.unlink(path)
                removed += 1
        except OSError:
            pass
    return removed


# the store's steps, as the pool is asked to run them


def _remove(*paths: str) -> None:
    remove_files(*paths)


def _create(data_path: str, meta_path: str) -> int:
    return create_file(data_path, meta_path)


def _prepare(data_path: str, meta_path: str, length: int) -> None:
    fd = create_file(data_path, meta_path)
    try:
        os.ftruncate(fd, length)
        preallocate(fd, length)
    finally:
        os.close(fd)


def _write_verified(path: str, offset: int, data: bytearray | bytes, digest: bytes) -> bool:
    if hashlib.sha256(data).digest() != digest:
        return False
    write_piece(path, data, offset)
    return True

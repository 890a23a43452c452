"""
A directory of tasks, one data file and one JSON meta file per task id, whose
every file operation runs in the worker pool: nothing here blocks the reactor.

Each method returns a Deferred that fires in the reactor thread.  The data
file holds the task's bytes at their offsets; a piece is checked against its
SHA-256 and written with C{pwrite} in one pool call, so nothing unverified
is ever written.  The meta file is written (atomically) when the task is
complete: a data file without one is a half task, dropped by L{TaskStore.reload}.

For uploads, L{TaskStore.serve} opens one read-only descriptor per task and
keeps it until the task is removed or its file replaced (L{TaskStore.served_fd}
hands it out for C{os.sendfile}); a withdrawn descriptor is closed a little
later, so an upload under way never reads from a reused descriptor number.
Creations, removals and opens of one task run in the order they were asked.

The dfpeer's store (L{dragonfly.peer.store}) is one; the CDN's cache
directory has the same shape (a C{.meta} suffix instead of C{.json}).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from .files import (
    file_sha256,
    pread_exact,
    pwrite_all,
    unlink_quietly,
    write_json_atomic,
)
from .ids import is_task_id

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
    @param clock: to close a served descriptor L{LINGER} seconds after it is
        withdrawn (at once without one).
    """

    #: a descriptor no longer handed out stays open this long, for uploads under way
    LINGER = 30.0

    def __init__(
        self, root: str, pool: Pool, meta_suffix: str = ".json", meta_names_task: bool = True, clock: Any = None,
    ) -> None:
        self.root = root
        self._clock = clock
        os.makedirs(self.root, exist_ok=True)
        self._pool = pool
        self._meta_suffix = meta_suffix
        self._meta_names_task = meta_names_task
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

    def prepare(self, task_id: str, length: int) -> Deferred[None]:
        """A new data file of C{length} bytes (sparse), the old one and its meta removed."""
        data, meta = self.data_path(task_id), self.meta_path(task_id)
        return self._in_order(task_id, lambda: self._pool.run(_prepare, data, meta, length), retire=True)

    def create(self, task_id: str) -> Deferred[int]:
        """A new empty data file, the old one and its meta removed; fires with a descriptor open for writing."""
        data, meta = self.data_path(task_id), self.meta_path(task_id)
        return self._in_order(task_id, lambda: self._pool.run(_create, data, meta), retire=True)

    def write_verified(self, task_id: str, offset: int, data: bytearray | bytes, digest: bytes) -> Deferred[bool]:
        """Check C{data} against C{digest} and write it at C{offset}; fires with True, or False on a mismatch."""
        return self._pool.run(_write_verified, self.data_path(task_id), offset, data, digest)

    def save_meta(self, task_id: str, meta: dict[str, Any]) -> Deferred[None]:
        """Write the meta file of C{task_id} atomically."""
        return self._pool.run(write_json_atomic, self.meta_path(task_id), meta)

    def finish(self, task_id: str, meta: dict[str, Any] | None) -> Deferred[None]:
        """
        The task is complete: its data file becomes read-only (a user's
        output may be a hard link to it), and C{meta}, if given, is saved.
        """
        paths = self.data_path(task_id), self.meta_path(task_id)
        return self._in_order(task_id, lambda: self._pool.run(_finish, *paths, meta))

    # -- reading ---------------------------------------------------------------------

    def read(self, task_id: str, offset: int, size: int) -> Deferred[bytes]:
        """Fires with C{size} bytes from C{offset}."""
        return self._pool.run(pread_exact, self.data_path(task_id), offset, size)

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
        """Close its descriptor and remove its files (the meta first: a crash leaves no half task)."""
        paths = self.meta_path(task_id), self.data_path(task_id)
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
        """Fires with the metas of the complete tasks (see L{load_complete}), the rest removed."""
        return self._pool.run(load_complete, self.root, self._meta_suffix, self._meta_names_task)


def load_complete(root: str, meta_suffix: str = ".json", meta_names_task: bool = True) -> list[dict[str, Any]]:
    """
    The one reload routine (blocking: run it in the pool).  The metas of the
    tasks under C{root} whose meta names its task (C{taskId}, unless
    C{meta_names_task} is false) and whose data file has the
    meta's C{length}, each with C{lastAccess} (the later of the data file's
    atime and the meta's mtime: least-recently-used order survives a
    restart, roughly).  Half tasks and inconsistent ones are removed.
    """
    metas = []
    ext_meta = meta_suffix.lstrip(".")
    for name in sorted(os.listdir(root)):
        stem, _, ext = name.partition(".")
        if not is_task_id(stem) or ext not in ("data", ext_meta):
            continue
        data_path = os.path.join(root, stem + ".data")
        meta_path = os.path.join(root, stem + meta_suffix)
        if ext == "data":
            if not os.path.exists(meta_path):
                unlink_quietly(data_path)
            continue
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("taskId", None if meta_names_task else stem) != stem or os.path.getsize(data_path) != meta["length"]:
                raise ValueError("inconsistent")
            meta["lastAccess"] = max(os.path.getatime(data_path), os.path.getmtime(meta_path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warn("dropping stored task {task}: {why}", task=stem, why=str(e) or type(e).__name__)
            unlink_quietly(meta_path)
            unlink_quietly(data_path)
            continue
        metas.append(meta)
    return metas


def _remove(*paths: str) -> None:
    for p in paths:
        unlink_quietly(p)


def _create(data_path: str, meta_path: str) -> int:
    unlink_quietly(meta_path)
    # a new file, never the old one truncated: a finished file may be hard
    # linked to a user's output (dfget), which must not change under them
    unlink_quietly(data_path)
    return os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)


def _prepare(data_path: str, meta_path: str, length: int) -> None:
    fd = _create(data_path, meta_path)
    try:
        os.ftruncate(fd, length)
    finally:
        os.close(fd)


def _write_verified(path: str, offset: int, data: bytearray | bytes, digest: bytes) -> bool:
    if hashlib.sha256(data).digest() != digest:
        return False
    fd = os.open(path, os.O_WRONLY)
    try:
        pwrite_all(fd, data, offset)
    finally:
        os.close(fd)
    return True


def _finish(data_path: str, meta_path: str, meta: dict[str, Any] | None) -> None:
    try:
        os.chmod(data_path, 0o444)
    except OSError:
        pass
    if meta is not None:
        write_json_atomic(meta_path, meta)

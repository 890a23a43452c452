"""
A dfpeer's piece store: one preallocated file per task under C{<home>/data}.

Pieces are verified against the SuperNode's SHA-256 and written at their
offsets in the worker pool, in one pass; a piece whose bytes do not match is
never written, so nothing unverified is ever served.  A task's meta file is
written when it completes, so a restarted dfpeer keeps serving it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ..core.files import pread_exact, pwrite_all, unlink_quietly, write_json_atomic
from ..core.ids import is_task_id
from ..core.threads import WorkerPool


class PieceStore:
    def __init__(self, home: str, pool: WorkerPool) -> None:
        self.root = os.path.join(home, "data")
        os.makedirs(self.root, exist_ok=True)
        self._pool = pool

    def data_path(self, task_id: str) -> str:
        if not is_task_id(task_id):
            raise ValueError(f"bad task id {task_id!r}")
        return os.path.join(self.root, task_id + ".data")

    def meta_path(self, task_id: str) -> str:
        return self.data_path(task_id)[: -len(".data")] + ".json"

    def prepare(self, task_id: str, length: int) -> Any:
        """Create the task's file at its full length (sparse) in the pool."""
        return self._pool.run(_prepare, self.data_path(task_id), self.meta_path(task_id), length)

    def write_verified(self, task_id: str, offset: int, data: bytearray, digest: bytes) -> Any:
        """Check C{data} against C{digest} and write it; fires with True, or False on a mismatch."""
        return self._pool.run(_write_verified, self.data_path(task_id), offset, data, digest)

    def read(self, task_id: str, offset: int, size: int) -> Any:
        return self._pool.run(pread_exact, self.data_path(task_id), offset, size)

    def save_meta(self, task_id: str, meta: dict[str, Any]) -> None:
        path = self.meta_path(task_id)
        write_json_atomic(path, meta)

    def load_finished(self) -> list[dict[str, Any]]:
        """Metas of completed tasks whose data file is intact; removes the rest."""
        metas = []
        for name in sorted(os.listdir(self.root)):
            stem, _, ext = name.partition(".")
            if not is_task_id(stem) or ext not in ("data", "json"):
                continue
            meta_path, data_path = self.meta_path(stem), self.data_path(stem)
            if ext == "data":
                if not os.path.exists(meta_path):
                    os.unlink(data_path)
                continue
            try:
                with open(meta_path) as f:
                    meta = json.load(f)
                if meta.get("taskId") != stem or os.path.getsize(data_path) != meta["length"]:
                    raise ValueError("inconsistent")
                # least-recently-used order survives a restart, roughly
                meta["lastAccess"] = max(os.path.getatime(data_path), os.path.getmtime(meta_path))
            except (OSError, ValueError, KeyError):
                for p in (meta_path, data_path):
                    if os.path.exists(p):
                        os.unlink(p)
                continue
            metas.append(meta)
        return metas

    def remove(self, task_id: str) -> None:
        for p in (self.data_path(task_id), self.meta_path(task_id)):
            unlink_quietly(p)

    def remove_in_pool(self, task_id: str) -> Any:
        """L{remove} in the worker pool (the meta first: a crash leaves no half task)."""
        return self._pool.run(_remove, self.meta_path(task_id), self.data_path(task_id))


def _remove(*paths: str) -> None:
    for p in paths:
        unlink_quietly(p)

def _prepare(data_path: str, meta_path: str, length: int) -> None:
    if os.path.exists(meta_path):
        os.unlink(meta_path)
    # a new file, never the old one truncated: a finished file may be hard
    # linked to a user's output (dfget), which must not change under them
    unlink_quietly(data_path)
    fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, length)
    finally:
        os.close(fd)


def _write_verified(path: str, offset: int, data: bytearray, digest: bytes) -> bool:
    if hashlib.sha256(data).digest() != digest:
        return False
    fd = os.open(path, os.O_WRONLY)
    try:
        pwrite_all(fd, data, offset)
    finally:
        os.close(fd)
    return True


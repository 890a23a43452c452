"""
The stored prefixes a crash left (parked at start-up, see
L{dragonfly.supernode.cdn}) rehashed in a thread of their own from the
cache reload on, so a restarted SuperNode's resume does not wait for it.

A fetch that resumes rehashes its stored prefix before it asks the origin
for the rest (the digests of the stored pieces are served to peers); at
90 % of a 48 MiB file that took 0.15 to 0.3 s on a loaded machine, all of
it origin time lost.  The SuperNode reloads its cache before its reactor
runs, then imports and starts for a few hundred milliseconds more before
the first peer asks again: hashing in that time (hashlib and C{pread}
release the GIL) leaves the resume only a file rename to do.

A result is used only for the very bytes it hashed: the same offset and
piece size, and the data file's inode, size and modification time
unchanged since; anything else (a prefix collected meanwhile, another
piece size) hashes again as before.  A hash not started yet when its
fetch comes is cancelled and done by the fetch itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

from attrs import frozen
from twisted.logger import Logger

from ..core.bodywriter import ResumePoint, rehash_prefix

log = Logger()


@frozen
class Plan:
    """What to hash: the first C{offset} bytes of C{path}, in pieces of C{piece_size} (and whole, if C{whole})."""

    path: str
    offset: int
    piece_size: int
    whole: bool = True


@frozen
class _Done:
    plan: Plan
    stat: tuple[int, int, int]
    point: ResumePoint


def _stat(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _hash(plan: Plan) -> _Done:
    before = _stat(plan.path)
    point = rehash_prefix(plan.path, plan.offset, plan.piece_size, whole=plan.whole)
    return _Done(plan, before, point)


class Prehash:
    """
    Hashes each task's plan (L{Plan}) in one thread, in order; L{take}
    hands a fetch the result for its bytes.  Thread-safe: L{take} is called
    from the worker pool.
    """

    def __init__(self, plans: Iterable[tuple[str, Plan]], hash_one: Callable[[Plan], _Done] = _hash) -> None:
        self._futures: dict[str, Future[_Done]] = {}
        plans = list(plans)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdn-prehash") if plans else None
        for task_id, plan in plans:
            assert self._executor is not None
            self._futures[task_id] = self._executor.submit(hash_one, plan)
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # the thread ends when the queue is done

    def __len__(self) -> int:
        return len(self._futures)

    def take(self, task_id: str, plan: Plan) -> ResumePoint | None:
        """
        The hash of C{plan}'s bytes if it was done (or is being done) ahead,
        else None (hash them yourself).  At most once per task.
        """
        future = self._futures.pop(task_id, None)
        if future is None or future.cancel():
            return None
        try:
            done = future.result()
        except (CancelledError, OSError) as e:
            log.debug("prehash of {task} failed: {why}", task=task_id, why=str(e))
            return None
        if done.plan != plan:
            return None
        try:
            if _stat(plan.path) != done.stat:
                return None
        except OSError:
            return None
        return done.point


def parked_plans(parked: str, plan_for: Callable[[str], Plan | None]) -> list[tuple[str, Plan]]:
    """The plans of the prefixes parked in the directory C{parked} (C{plan_for(task id)}, skipped when None)."""
    try:
        names = sorted(os.listdir(parked))
    except OSError:
        return []
    plans = []
    for name in names:
        if name.endswith(".part"):
            task_id = name[: -len(".part")]
            try:
                plan = plan_for(task_id)
            except (OSError, KeyError, TypeError, ValueError):
                plan = None
            if plan is not None:
                plans.append((task_id, plan))
    return plans


def no_prehash() -> Prehash:
    """A L{Prehash} with nothing in it."""
    return Prehash(())


__all__ = ["Plan", "Prehash", "no_prehash", "parked_plans"]

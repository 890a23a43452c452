"""
Disk garbage collection shared by the SuperNode's CDN cache and a dfpeer's store.

Watermarks take one of two forms, both sides of a pair the same form:

  - a percentage (C{80%}): of the whole filesystem holding the cache, used as
    C{df} counts it (everything on the disk counts, not only the cache);
  - an absolute size (C{10G}, C{512M}): of the cache directory itself (the
    blocks its files occupy, as C{du} counts them).

When the usage is above the high watermark, least-recently-used tasks are
evicted until it would be at or below the low watermark.  A task in use (being
downloaded, fetched from the origin, or uploaded) is never evicted; when only
tasks in use remain the run stops above the watermark and says so.

Measuring the disk and deleting files block, so both run in the worker pool;
the reactor thread only sorts the candidates.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from attrs import define, frozen
from twisted.logger import Logger

from .ids import BadInput
from .units import human_bytes, parse_size

log = Logger()

_PERCENT = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*%\Z")


@frozen
class Watermark:
    """C{percent} of the filesystem, or C{size} bytes of the cache directory."""

    percent: float | None = None
    size: int | None = None

    @property
    def relative(self) -> bool:
        """Whether the watermark is a percentage of the filesystem (else a byte count)."""
        return self.percent is not None

    def bytes_of(self, total: int) -> int:
        """The watermark in bytes, for a filesystem of C{total} bytes."""
        if self.percent is not None:
            return int(total * self.percent / 100.0)
        assert self.size is not None
        return self.size

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else human_bytes(self.size or 0)


def parse_watermark(text: str) -> Watermark:
    """C{80%} or an absolute size such as C{10G} (see the module docstring)."""
    text = str(text).strip()
    m = _PERCENT.match(text)
    if m is not None:
        value = float(m.group("n"))
        if not 0 < value <= 100:
            raise BadInput(f"watermark {text!r}: a percentage must be in (0, 100]")
        return Watermark(percent=value)
    try:
        size = parse_size(text)
    except BadInput:
        raise BadInput(f"watermark {text!r} is neither a percentage (80%) nor a size (10G)") from None
    return Watermark(size=size)


def check_watermarks(high: Watermark, low: Watermark) -> None:
    """Both of one form, low below high."""
    if high.relative != low.relative:
        raise BadInput("the high and low watermarks must both be percentages or both be sizes")
    if high.relative:
        assert high.percent is not None and low.percent is not None
        if low.percent >= high.percent:
            raise BadInput(f"the low watermark {low} must be below the high watermark {high}")
    else:
        assert high.size is not None and low.size is not None
        if low.size >= high.size:
            raise BadInput(f"the low watermark {low} must be below the high watermark {high}")


@frozen
class Usage:
    """What counts against the watermarks: C{used} of C{total} bytes."""

    used: int
    total: int


def filesystem_usage(path: str) -> Usage:
    """The filesystem holding C{path}, as C{df} counts it (blocking)."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return Usage(used=total - st.f_bfree * st.f_frsize, total=total)


def directory_usage(path: str) -> Usage:
    """The blocks the files under C{path} occupy, as C{du} counts them (blocking)."""
    used = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                used += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return Usage(used=used, total=0)


@define
class GcEntry:
    """A task the collector may evict."""

    task_id: str
    size: int
    last_access: float
    in_use: bool = False


def plan_eviction(entries: Iterable[GcEntry], used: int, low: int) -> tuple[list[GcEntry], int]:
    """
    The least-recently-used entries not in use whose sizes bring C{used} down
    to C{low} or below, oldest first; and the usage that would remain.
    """
    chosen: list[GcEntry] = []
    for entry in sorted(entries, key=lambda e: (e.last_access, e.task_id)):
        if used <= low:
            break
        if entry.in_use:
            continue
        chosen.append(entry)
        used -= entry.size
    return chosen, used


@define
class DiskGc:
    """
    Keeps one cache directory between two watermarks.

    @param candidates: the tasks on disk now (called on the reactor thread).
    @param evict: removes one task; its files are deleted in the pool by the
        callee (it may return a Deferred).  Called only for tasks the collector
        chose, after checking C{in_use} again.
    @param still_evictable: asked just before each eviction (the disk usage
        was measured in the pool, meanwhile a task may have come into use).
    @param usage: a blocking C{path -> Usage}; the default follows the form of
        the watermarks.
    """

    path: str
    pool: Any
    high: Watermark
    low: Watermark
    candidates: Callable[[], list[GcEntry]]
    evict: Callable[[str], Any]
    still_evictable: Callable[[str], bool]
    usage: Callable[[str], Usage] | None = None
    what: str = "cache"
    runs: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    _running: bool = False

    def __attrs_post_init__(self) -> None:
        check_watermarks(self.high, self.low)
        if self.usage is None:
            self.usage = filesystem_usage if self.high.relative else directory_usage

    async def run(self) -> list[str]:
        """One collection: the ids of the tasks evicted (none when below the high watermark)."""
        if self._running:
            return []
        self._running = True
        try:
            return await self._run()
        finally:
            self._running = False

    async def _run(self) -> list[str]:
        self.runs += 1
        usage: Usage = await self.pool.run(self.usage, self.path)
        high, low = self.high.bytes_of(usage.total), self.low.bytes_of(usage.total)
        if usage.used <= high:
            return []
        chosen, left = plan_eviction(self.candidates(), usage.used, low)
        evicted = []
        for entry in chosen:
            if not self.still_evictable(entry.task_id):
                left += entry.size
                continue
            await self.evict(entry.task_id)
            evicted.append(entry.task_id)
            self.evicted += 1
            self.evicted_bytes += entry.size
        log.info(
            "disk GC of {what}: {used} used, above the high watermark {high}: "
            "evicted {n} least-recently-used tasks ({freed}), about {left} left",
            what=self.what, used=human_bytes(usage.used), high=str(self.high), n=len(evicted),
            freed=human_bytes(sum(e.size for e in chosen if e.task_id in evicted)), left=human_bytes(max(left, 0)),
            evicted=evicted,
        )
        if left > low:
            log.warn(
                "disk GC of {what}: still above the low watermark {low}: the rest is in use or not ours",
                what=self.what, low=str(self.low),
            )
        return evicted

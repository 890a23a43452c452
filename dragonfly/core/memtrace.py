"""
An opt-in memory trace of a daemon, for finding where its RSS goes
(docs/benchmarks.md, "Memory"): nothing happens unless
C{DRAGONFLY_MEMTRACE} names a file.

With C{DRAGONFLY_MEMTRACE=PATH} (C{%p} in it becomes the process id) the
daemon appends one JSON line every C{DRAGONFLY_MEMTRACE_EVERY} seconds
(default 0.5) to C{PATH}: the time, C{VmRSS}, C{VmHWM}, C{RssAnon} and
C{RssFile} (KiB, from C{/proc/self/status}) and whatever its C{stats}
callable adds (a dfpeer: the piece buffers lent and their high-water
mark).  With C{DRAGONFLY_TRACEMALLOC=N} too, C{tracemalloc} runs (N frames)
and, each time the peak RSS grew by 1 MiB or more since the last one, the
top allocations by line are written to C{PATH.top}, as at the end.

It samples from a timer in the reactor thread, never from the data path.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

__all__ = ["install", "proc_status"]

ENV = "DRAGONFLY_MEMTRACE"

#: the lines of /proc/self/status kept (KiB)
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def proc_status(text: str | None = None) -> dict[str, int]:
    """C{FIELDS} of C{/proc/self/status} (or of C{text}), in KiB."""
    if text is None:
        try:
            with open("/proc/self/status") as f:
                text = f.read()
        except OSError:
            return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in FIELDS:
            out[name] = int(value.split()[0])
    return out


def install(reactor: Any, name: str, stats: Callable[[], dict[str, Any]] | None = None) -> bool:
    """Start the trace when C{DRAGONFLY_MEMTRACE} is set; True if it started."""
    path = os.environ.get(ENV)
    if not path:
        return False
    path = path.replace("%p", str(os.getpid()))
    frames = int(os.environ.get("DRAGONFLY_TRACEMALLOC", "0") or 0)
    every = float(os.environ.get("DRAGONFLY_MEMTRACE_EVERY", "0.5"))
    import tracemalloc

    from twisted.internet.task import LoopingCall

    if frames > 0:
        tracemalloc.start(frames)
    dumped = [0]

    def top(why: str) -> None:
        if not tracemalloc.is_tracing():
            return
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        current, peak = tracemalloc.get_traced_memory()
        with open(path + ".top", "a") as f:
            f.write(f"== {name} {why} at {time.time():.1f}: traced {current >> 10} KiB (peak {peak >> 10})\n")
            for stat in snap.statistics("lineno")[:25]:
                f.write(f"{stat.size >> 10:8d} KiB {stat.count:7d}  {stat.traceback}\n")

    def sample() -> None:
        row: dict[str, Any] = {"t": round(time.time(), 2), "name": name, **proc_status()}
        if stats is not None:
            row.update(stats())
        if tracemalloc.is_tracing():
            row["traced"] = tracemalloc.get_traced_memory()[0] >> 10
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        hwm = row.get("VmHWM", 0)
        if hwm >= dumped[0] + 1024:
            dumped[0] = hwm
            top(f"peak {hwm} KiB")

    call = LoopingCall(sample)
    call.clock = reactor
    call.start(every)
    reactor.addSystemEventTrigger("before", "shutdown", top, "at shutdown")
    return True

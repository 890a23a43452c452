"""
Profiling the daemons of a benchmark round (C{python -m bench.swarm --profile DIR}).

While a round runs, L{Profiler}:

  - profiles the first processes, one tool each, in the order of C{tools}
    (default one of each): C{py-spy} (C{py-spy record --gil}: 200 Hz, only
    the thread running Python, raw collapsed stacks: DIR/spy-PID.txt, one
    line per distinct stack and its sample count; with C{native}, C frames
    too; C{py-spy-all}: every thread on a CPU, at 800 Hz), C{perf-record} (C{perf record -g}: every CPU sample, kernel
    included: DIR/perf-PID.data and its report by DSO and symbol,
    DIR/perf-PID.txt) and C{perf-trace} (C{perf trace -s}: its system calls
    by name, DIR/syscalls-PID.txt; this one slows the process's system
    calls noticeably), C{strace-seq} (every system call but futex, with times:
    DIR/strace-PID.txt, the sequence of events per wake-up; slows the
    process's calls a lot) and C{cprofile} (a process started under
    L{bench.cprofiled}: cProfile of the reactor thread's CPU time,
    DIR/cprofile-K.pstats for the K-th process, summed up in
    DIR/cprofile.txt);
  - reads C{/proc} of every process before and after: user and system CPU
    seconds, voluntary and involuntary context switches, read and write
    calls (DIR/counters.json); with C{groups} (C{bench.swarm --ab-env}),
    each group's means per process and its CPU seconds per GiB.

Then it folds the samples into DIR/top.txt: the functions with the most
samples on CPU, by their own samples (self) and with their callees
(total), so the CPU seconds per GiB of each can be read off the round's
totals.  The tools themselves take CPU (py-spy stops each sampled process
for a moment per sample); compare profiled runs with profiled runs.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: the tools, one process each
TOOLS = ("py-spy", "py-spy-all", "perf-record", "perf-trace", "cprofile", "strace-seq")


def cprofile_path(out: str, k: int) -> str:
    """Where the k-th process started under L{bench.cprofiled} writes its stats."""
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, f"cprofile-{k}.pstats")


def proc_counters(pid: int) -> dict[str, float]:
    """CPU seconds (user, system), context switches and I/O calls of a live process ({} once gone)."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out["user"] = int(fields[11]) / _CLK_TCK
        out["system"] = int(fields[12]) / _CLK_TCK
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                    out[key] = int(value)
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("syscr", "syscw", "rchar", "wchar"):
                    out[key] = int(value)
    except (OSError, IndexError, ValueError):
        return {}
    return out


def _tool(name: str) -> str | None:
    return shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


class Profiler:
    """See the module docstring; a context manager around the measured part of a round."""

    def __init__(self, out: str, pids: list[int], tools: tuple[str, ...] = TOOLS, rate: int = 200,
                 native: bool = False, groups: dict[str, list[int]] | None = None, gib: float = 1.0) -> None:
        self.out = out
        self.pids = list(pids)
        unknown = set(tools) - set(TOOLS)
        if unknown:
            raise ValueError(f"unknown profiling tools {sorted(unknown)} (known: {', '.join(TOOLS)})")
        self.tools = tuple(tools)
        self.sampled = self.pids[:len(self.tools)]
        self.rate = rate
        self.native = native
        self.groups = groups or {}
        self.gib = gib
        self.before: dict[int, dict[str, float]] = {}
        self.procs: list[subprocess.Popen] = []
        self.started = 0.0

    def __enter__(self) -> Profiler:
        os.makedirs(self.out, exist_ok=True)
        spy, perf = _tool("py-spy"), _tool("perf")
        # one tool per process, so the unsampled ones show what each tool costs
        for pid, tool in zip(self.sampled, self.tools):
            if tool in ("py-spy", "py-spy-all") and spy:
                # --gil: only the thread running Python (py-spy-all: every thread on a CPU, the pool's
                # hashing too, at 4 times the rate); --nonblocking: no stop per sample
                argv = [spy, "record", "-r", str(self.rate * (4 if tool == "py-spy-all" else 1)), "-p", str(pid),
                        "--format", "raw", "--nonblocking", "-o", os.path.join(self.out, f"spy-{pid}.txt")]
                if tool == "py-spy":
                    argv.append("--gil")
                if self.native:
                    argv.append("--native")
            elif tool == "perf-record" and perf:
                argv = [perf, "record", "-q", "-g", "-F", "999", "-p", str(pid),
                        "-o", os.path.join(self.out, f"perf-{pid}.data")]
            elif tool == "cprofile":  # started under bench.cprofiled: profiles while between USR1 and USR2
                os.kill(pid, signal.SIGUSR1)
                continue
            elif tool == "strace-seq" and _tool("strace"):
                # every system call but the pool's futex waits, timed: the order of events per wake-up
                argv = [_tool("strace") or "strace", "-f", "-tt", "-e", "trace=!futex", "-o",
                        os.path.join(self.out, f"strace-{pid}.txt"), "-p", str(pid)]
            elif tool == "perf-trace" and perf:
                argv = [perf, "trace", "-s", "-o", os.path.join(self.out, f"syscalls-{pid}.txt"), "-p", str(pid)]
            else:
                continue
            self.procs.append(self._start(argv, f"{tool}-{pid}.log"))
        time.sleep(0.5 if self.procs else 0)  # let them attach before the round starts
        self.started = time.monotonic()
        self.before = {pid: proc_counters(pid) for pid in self.pids}
        return self

    def _start(self, argv: list[str], log: str) -> subprocess.Popen:
        with open(os.path.join(self.out, log), "wb") as f:
            return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)

    def __exit__(self, *exc: Any) -> None:
        after = {pid: proc_counters(pid) for pid in self.pids}
        seconds = time.monotonic() - self.started
        for pid, tool in zip(self.sampled, self.tools):
            if tool == "cprofile":
                os.kill(pid, signal.SIGUSR2)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # both write their output on SIGINT
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        deltas = {}
        for pid in self.pids:
            a, b = self.before.get(pid, {}), after.get(pid, {})
            deltas[str(pid)] = {k: round(b[k] - a[k], 3) for k in b if k in a}
        totals: dict[str, float] = collections.Counter()
        for d in deltas.values():
            totals.update(d)
        summary = {"seconds": round(seconds, 3), "sampled": self.sampled, "perProcess": deltas,
                   "total": {k: round(v, 3) for k, v in totals.items()}}
        if self.groups:
            summary["groups"] = {name: group_means([deltas[str(p)] for p in pids if str(p) in deltas], self.gib)
                                 for name, pids in self.groups.items()}
        with open(os.path.join(self.out, "counters.json"), "w") as f:
            json.dump(summary, f, indent=1)
        for name, means in summary.get("groups", {}).items():
            if means:
                print(f"bench: profile group {name} ({means['processes']} processes): {means['cpuPerGiB']:.2f} CPU-s/GiB"
                      f" each (user {means['userPerGiB']:.2f}, system {means['systemPerGiB']:.2f}), voluntary context"
                      f" switches {means.get('voluntary_ctxt_switches', 0):.0f}", flush=True)
        stacks = [os.path.join(self.out, f"spy-{pid}.txt") for pid in self.sampled]
        for pid in self.sampled:
            data = os.path.join(self.out, f"perf-{pid}.data")
            if os.path.exists(data):
                with open(os.path.join(self.out, f"perf-{pid}.txt"), "wb") as f:
                    subprocess.run([_tool("perf") or "perf", "report", "-i", data, "--no-children", "--stdio",
                                    "--sort", "dso,symbol", "-g", "none", "--percent-limit", "0.3"],
                                   stdout=f, stderr=subprocess.DEVNULL, timeout=300, check=False)
        with open(os.path.join(self.out, "top.txt"), "w") as f:
            f.write(top([p for p in stacks if os.path.exists(p)]))
        time.sleep(1.0)  # the cprofiled processes write their stats
        pstats_files = [cprofile_path(self.out, k) for k, tool in enumerate(self.tools) if tool == "cprofile"]
        pstats_files = [p for p in pstats_files if os.path.exists(p)]
        if pstats_files:
            import pstats

            with open(os.path.join(self.out, "cprofile.txt"), "w") as f:
                stats = pstats.Stats(*pstats_files, stream=f)
                stats.sort_stats("tottime").print_stats(60)
                stats.sort_stats("cumulative").print_stats(80)


def group_means(deltas: list[dict[str, float]], gib: float) -> dict[str, float]:
    """Per process of a group, on average: its counters, and its CPU seconds per C{gib} GiB downloaded."""
    if not deltas:
        return {}
    means = {k: round(sum(d.get(k, 0.0) for d in deltas) / len(deltas), 3) for k in deltas[0]}
    if gib > 0:
        means["cpuPerGiB"] = round((means.get("user", 0.0) + means.get("system", 0.0)) / gib, 3)
        means["userPerGiB"] = round(means.get("user", 0.0) / gib, 3)
        means["systemPerGiB"] = round(means.get("system", 0.0) / gib, 3)
    means["processes"] = len(deltas)
    return means


def fold(paths: list[str]) -> collections.Counter[str]:
    """py-spy's raw output (C{frame;frame;... count}) of several files, added up."""
    stacks: collections.Counter[str] = collections.Counter()
    for path in paths:
        with open(path) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if stack and count.isdigit():
                    stacks[stack] += int(count)
    return stacks


def _function(frame: str) -> str:
    """C{name (path/to/file.py:123)} -> C{name (file.py)}: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def top(paths: list[str], limit: int = 60) -> str:
    """The functions with most samples, self and total, as a table (shares of all samples)."""
    stacks = fold(paths)
    total = sum(stacks.values())
    if not total:
        return "no samples\n"
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for stack, n in stacks.items():
        frames = [_function(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    lines = [f"{total} samples from {len(paths)} processes", "", f"{'self':>6} {'total':>6}  function"]
    for name, _ in own.most_common(limit):
        lines.append(f"{own[name] / total:6.1%} {inclusive[name] / total:6.1%}  {name}")
    lines += ["", f"{'total':>6}  function (by total)"]
    for name, n in inclusive.most_common(limit):
        lines.append(f"{n / total:6.1%}  {name}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m bench.profile SPY.txt...: the table again
    print(top(sys.argv[1:]), end="")

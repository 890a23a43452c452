"""
What the benchmarks measure about processes, read from C{/proc} (no psutil):
CPU seconds (user + system, all threads), peak RSS (C{VmHWM}), and for a
child that exits, its exact wall time and resource use from C{wait4}.

Every child started through L{Children} gets C{PR_SET_PDEATHSIG}: if the
benchmark dies (even by SIGKILL), the kernel sends it SIGTERM, so nothing
keeps running.  L{Children} also stops every process it started when it is
left, however it is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30
_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

_PR_SET_PDEATHSIG = 1
try:
    _libc: Any = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # not glibc/Linux: children simply get no death signal
    _libc = None


def die_with_parent() -> None:
    """
    preexec_fn: SIGTERM this child when the process that started it dies.
    Safe with threads around: it takes no lock, only calls prctl(2) through
    a ctypes function looked up before the fork.
    """
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# -- the whole machine -------------------------------------------------------------


def cpu_times() -> dict[str, int]:
    """Jiffies of all CPUs since boot, by kind (guest time is inside user)."""
    with open("/proc/stat") as f:
        return dict(zip(_CPU_FIELDS, (int(x) for x in f.readline().split()[1:9])))


def busy_share(a: dict[str, int], b: dict[str, int], kinds: tuple[str, ...] | None = None) -> float:
    """The share of CPU time between C{a} and C{b} spent busy (or in C{kinds})."""
    delta = {k: b[k] - a[k] for k in _CPU_FIELDS}
    total = max(sum(delta.values()), 1)
    if kinds is None:
        return (total - delta["idle"] - delta["iowait"]) / total
    return sum(delta[k] for k in kinds) / total


def load_average() -> float:
    """The 1-minute load average (how busy the machine was around a run)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# -- one process -------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a live process has used (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


def status_kib(pid: int, field: str) -> int | None:
    """A C{kB} field of C{/proc/PID/status} (C{VmHWM}, C{VmRSS}, ...), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mib(pid: int) -> float | None:
    """The peak resident set size (C{VmHWM}) of a live process, MiB."""
    kib = status_kib(pid, "VmHWM")
    return None if kib is None else round(kib / 1024, 1)


def start_time(pid: int) -> int | None:
    """When C{pid} started (clock ticks since boot): with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def kill_recorded(path: str) -> list[int]:
    """
    SIGKILL the processes listed in C{path} (by L{Children}) that still run:
    those a killed run left, which no death signal reached (a child that
    changed its user, as opentracker does, loses it).
    """
    killed: list[int] = []
    try:
        with open(path) as f:
            entries = [line.split() for line in f if line.strip()]
    except OSError:
        return killed
    for entry in entries:
        try:
            pid, started = int(entry[0]), int(entry[1])
        except (IndexError, ValueError):
            continue
        if start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def children_of(pid: int) -> list[int]:
    """The direct children of C{pid} (e.g. nginx's workers)."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        pass
    return found


def cpu_per_gib(seconds: float, nbytes: int) -> float | None:
    return round(seconds / (nbytes / GIB), 3) if nbytes > 0 else None


#: where the VM's memory balloon device says what it offers (virtio feature bits, a string of 0/1)
BALLOON_FEATURES = "/sys/bus/virtio/drivers/virtio_balloon"
#: VIRTIO_BALLOON_F_REPORTING: the guest reports free pages to the host, which takes them back
_F_REPORTING = 5


def free_page_reporting(root: str = BALLOON_FEATURES) -> bool | None:
    """
    Whether this (virtual) machine gives its free pages back to the host
    (virtio-balloon free page reporting): then a page freed a little while
    ago costs the host a fault when it is first touched again, and writing
    through the page cache or touching new memory costs several times what
    it costs on pages in use.  None when the machine has no balloon device.
    """
    try:
        devices = [d for d in os.listdir(root) if d.startswith("virtio")]
    except OSError:
        return None
    for device in devices:
        try:
            with open(os.path.join(root, device, "features")) as f:
                bits = f.read().strip()
        except OSError:
            continue
        return feature_bit(bits, _F_REPORTING)
    return None


def feature_bit(bits: str, bit: int) -> bool:
    """Bit C{bit} of a virtio C{features} string (bit 0 first); False past its end."""
    if any(c not in "01" for c in bits):
        raise ValueError(f"not a virtio feature string: {bits[:40]!r}")
    return bit < len(bits) and bits[bit] == "1"


def page_cache_write_cost(directory: str, size: int = 256 << 20, passes: int = 2) -> list[float]:
    """
    The kernel's CPU seconds per GiB of writing C{size} bytes through the
    page cache into a new file in C{directory}, in C{passes} passes, the file
    removed after each: the first pass shows what pages not touched for a
    while cost on this machine now, the later ones what reused pages cost.
    (This machine's I{dear page cache}: docs/benchmarks.md.)
    """
    block = b"\x5a" * (1 << 20)
    costs = []
    for n in range(passes):
        path = os.path.join(directory, f".page-cache-probe-{os.getpid()}-{n}")
        before = time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for _ in range(max(1, size >> 20)):
                    os.write(fd, block)
            finally:
                os.close(fd)
            costs.append(round((time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID) - before) / (size / GIB), 2))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return costs


def warm_memory(directory: str, size: int) -> float:
    """
    Touch C{size} bytes of memory the machine may have given back to its host,
    and free them again (a file of that size written through the page cache
    into C{directory}, then removed): the CPU seconds per GiB that cost.

    Why: on a VM with free page reporting (L{free_page_reporting}), the
    first process to touch more memory than the machine used a little while
    before pays the host's faults for it: up to about 5 CPU s/GiB here,
    charged to the copies of whoever writes first.  A benchmark round that
    follows another's freed files reuses their pages for 0.4.  So each round
    of a comparison starts after this, and none pays for the one before.
    """
    return page_cache_write_cost(directory, size=size, passes=1)[0]


@dataclass
class Sample:
    """CPU seconds of a set of live processes at one moment."""

    seconds: dict[str, float]

    @classmethod
    def take(cls, pids: Mapping[str, Sequence[int]]) -> Sample:
        return cls({name: sum(process_cpu_seconds(p) for p in ps) for name, ps in pids.items()})

    def until(self, later: Sample) -> dict[str, float]:
        return {name: round(later.seconds.get(name, 0.0) - s, 3) for name, s in self.seconds.items()}


def wait_idle(pids: Sequence[int], quiet: float = 0.05, window: float = 0.5, timeout: float = 20.0) -> None:
    """Wait until C{pids} together used less than C{quiet} CPU seconds in C{window} (start-up done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(process_cpu_seconds(p) for p in pids)
        time.sleep(window)
        if sum(process_cpu_seconds(p) for p in pids) - before < quiet:
            return


# -- children ----------------------------------------------------------------------


@dataclass
class Finished:
    """How a timed child ended: wall time from just before its start to its exit, and its rusage."""

    argv: list[str]
    started: float  # time.monotonic() just before the fork
    seconds: float | None  # None: killed at the timeout
    exit: int | None
    user: float = 0.0
    system: float = 0.0
    max_rss_mib: float = 0.0

    @property
    def cpu(self) -> float:
        return round(self.user + self.system, 3)

    @property
    def ok(self) -> bool:
        return self.exit == 0 and self.seconds is not None


class Children:
    """
    The processes a benchmark starts.  A context manager: on leaving it
    (normally, on an exception or a signal turned into one) every process
    still running is sent SIGTERM, then SIGKILL after a grace period.
    """

    def __init__(self, logdir: str, registry: str | None = None) -> None:
        self.logdir = logdir
        self.registry = registry  # a file listing every child (pid, start time): see kill_recorded
        self._procs: list[subprocess.Popen] = []

    def _record(self, proc: subprocess.Popen) -> None:
        if self.registry is not None:
            with open(self.registry, "a") as f:
                f.write(f"{proc.pid} {start_time(proc.pid)}\n")

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _log(self, tag: str) -> Any:
        return open(os.path.join(self.logdir, f"{tag}.log"), "ab")

    def start(self, tag: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """A long-running program, its output in C{LOGDIR/TAG.log}."""
        with self._log(tag) as out:
            kwargs.setdefault("stdout", out)
            kwargs.setdefault("stderr", subprocess.STDOUT)
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,  # noqa: PLW1509
                                    **kwargs)
        self._procs.append(proc)
        self._record(proc)
        return proc

    def run(self, tag: str, argv: Sequence[str], timeout: float, **kwargs: Any) -> Finished:
        """
        Run C{argv} to its end (killed after C{timeout}).  Its wall time runs
        from just before the fork to the moment C{wait4} returns, which a
        thread blocked in it sees at once.
        """
        with self._log(tag) as out:
            kwargs.setdefault("stdout", out)
            kwargs.setdefault("stderr", subprocess.STDOUT)
            started = time.monotonic()
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,  # noqa: PLW1509
                                    **kwargs)
        self._procs.append(proc)
        self._record(proc)
        done: dict[str, Any] = {}

        def reap() -> None:
            _, status, usage = os.wait4(proc.pid, 0)
            done.update(at=time.monotonic(), status=status, usage=usage)

        waiter = threading.Thread(target=reap, name=f"wait-{tag}", daemon=True)
        waiter.start()
        waiter.join(timeout)
        timed_out = waiter.is_alive()
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            waiter.join(10)
        self._procs.remove(proc)
        if "status" not in done:  # not even SIGKILL ended it: leave it to stop()
            self._procs.append(proc)
            return Finished(list(argv), started, None, None)
        proc.returncode = os.waitstatus_to_exitcode(done["status"])  # reaped here, not by Popen
        usage = done["usage"]
        return Finished(
            list(argv), started, None if timed_out else round(done["at"] - started, 4), proc.returncode,
            usage.ru_utime, usage.ru_stime, round(usage.ru_maxrss / 1024, 1),
        )

    def stop(self, procs: Sequence[subprocess.Popen] | None = None, grace: float = 10.0) -> None:
        """SIGTERM C{procs} (default: all still running), SIGKILL after C{grace}, reap them."""
        procs = list(self._procs if procs is None else procs)
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            with contextlib.suppress(ValueError):
                self._procs.remove(proc)

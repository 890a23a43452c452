"""
The swarm benchmark (C{make bench}, needs root): N emulated hosts fetch the
same file at the same moment, through Dragonfly and, as the baselines,
through BitTorrent and each straight from the origin over plain HTTP.

    python -m bench.swarm [--peers 5,10,20,40] [--file-size 64M] [--peer-rate 80]
                          [--origin-rate 160] [--supernode-rate 160]
                          [--piece-size auto] [--systems dragonfly,bittorrent,http]
                          [--out docs/bench] [--smoke] [--report]

For every N a fresh emulated network (L{bench.netem}): the hosts C{origin}
(the counting origin of L{dragonfly.testing.origin}), C{supernode} and
C{peer1..N}, each in its own namespace with shaped links (rates in Mbit/s).
Then one round per system:

  - dragonfly: a fresh SuperNode and N fresh dfpeers (new homes: nothing is
    cached), then C{dfget} on every peer;
  - bittorrent: C{opentracker} on the SuperNode's host, an C{aria2c} seeding
    the file on the origin's host, then an C{aria2c} on every peer (a host is
    done when aria2c has the whole file verified; it keeps seeding, as a
    dfpeer keeps serving, until the round ends); skipped with a reason when
    aria2c, opentracker or mktorrent is missing (L{bench.bittorrent});
  - http: C{curl -o} (or C{wget -O}) on every peer, straight from the origin.

Before each round, as many bytes as two copies of the file per peer are
written into the workdir and removed again (L{measure.warm_memory};
C{--no-warm-memory}: not): on a VM that gives free pages back to its host,
the first round to need more memory than the machine used just before pays
for every page of it, several CPU seconds per GiB, and the rounds after it
do not.

All downloads of a round are held at a start line (L{bench.gate}) and
released together; a host's time runs from that common start to the exit of
its process.  Every output's SHA-256 is checked.  Per round: mean, p50, p90
and max time, each also as a ratio to the physical limit F/B; bytes the
origin sent (its C{/_stats} counter) and the SuperNode seeded, in copies of
F; the share of the peers' bytes that came from other peers; the CPU use of
the whole machine (from C{/proc/stat}), flagged when above 90%: then the
machine, not the emulated network, was the limit; and the CPU seconds per
peer per GiB (the peers' daemons during the round, dfpeer or aria2c, plus
each download process, dfget or curl, from C{wait4}).

Results are merged per N into OUT/results.json; OUT/swarm.png plots mean time
against N for every system, OUT/swarm-cpu.png the two swarms' x F/B and every
system's CPU per peer per GiB (with matplotlib, the C{bench} extra) and
OUT/results.md holds the tables.  Exit status: 0 all rounds passed, 1 some
Dragonfly download failed or some finished download was corrupt (a baseline
download that never finished, such as plain HTTP's at N = 40 from an
overloaded origin, is shown in the table, not a failure), 75 another run holds the emulated network,
77 this machine cannot run it (not root, no C{ip netns}).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import platform
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from dragonfly.core.units import parse_rate
from dragonfly.testing.swarm import sha256_file, wait_for_file, write_random_file

from . import bittorrent, netem
from .measure import GIB, busy_share, cpu_times, process_cpu_seconds, warm_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
FILE_NAME = "payload.bin"
API_PORT, BLOCK_PORT, ORIGIN_PORT = 8002, 8001, 80
SYSTEMS = ("dragonfly", "bittorrent", "http")
TRACKER_PORT, BT_PORT = 6969, 6881
# A round was limited by the machine's CPUs, not by the emulated network, when
# they were more than CPU_BUSY busy on average or during most of the round.
CPU_BUSY = 0.90
EXIT_FAILED, EXIT_BUSY, EXIT_UNAVAILABLE = 1, 75, 77


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


# -- the scenario ----------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """What one run measures (rates in Mbit/s, sizes in bytes)."""

    peers: tuple[int, ...]
    file_size: int
    peer_mbit: float
    origin_mbit: float
    supernode_mbit: float
    piece_size: str
    systems: tuple[str, ...]
    timeout: float
    supernode_args: str = ""
    peer_args: str = ""
    bt_args: str = ""
    quiet_wait: float = 20.0  # seconds a round may wait for the machine to calm down before it starts

    def params(self) -> dict[str, Any]:
        """What must match for results of two runs to be merged."""
        p = asdict(self)
        for key in ("peers", "systems", "timeout", "quiet_wait"):
            del p[key]
        if not p["bt_args"]:  # results from before the BitTorrent baseline still merge
            del p["bt_args"]
        return p

    @property
    def fb_seconds(self) -> float:
        """F/B: nobody can finish sooner (the physical limit)."""
        return self.file_size * 8 / (self.peer_mbit * 1e6)

    def fluid_bound(self, n: int) -> float:
        """max(F/S, F/B, N*F/(S + N*B)): the bound for any swarm of N peers."""
        f, s, b = self.file_size * 8, self.origin_mbit * 1e6, self.peer_mbit * 1e6
        return max(f / s, f / b, n * f / (s + n * b))

    def http_bound(self, n: int) -> float:
        """max(F/B, N*F/S): the bound when every host fetches from the origin."""
        return max(self.fb_seconds, n * self.file_size * 8 / (self.origin_mbit * 1e6))


def parse_args(argv: list[str] | None) -> tuple[Scenario, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="bench.swarm", description=__doc__.split("\n\n")[1])
    p.add_argument("--peers", help="numbers of peers, comma separated (default 5,10,20,40)")
    p.add_argument("--file-size", help="file size, e.g. 64M (default 64M)")
    p.add_argument("--peer-rate", type=float, help="peer link, up and down, Mbit/s (default 80)")
    p.add_argument("--origin-rate", type=float, help="origin link, Mbit/s (default 160)")
    p.add_argument("--supernode-rate", type=float, help="supernode link, Mbit/s (default 160)")
    p.add_argument("--piece-size", help="the SuperNode's --piece-size: auto or a size such as 1M (default auto)")
    p.add_argument("--systems", help="dragonfly,bittorrent,http (default all three; with --smoke dragonfly,http)")
    p.add_argument("--supernode-args", default="", help="more options for twistd supernode, e.g. '--seed-slots 4'")
    p.add_argument("--peer-args", default="", help="more options for twistd dfpeer, e.g. '--in-flight 16M'")
    p.add_argument("--bt-args", default="", help="more options for every aria2c, e.g. '--bt-max-peers=80'")
    p.add_argument("--out", help="results directory (default docs/bench; with --smoke a new temp dir)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one round may take (default 900)")
    p.add_argument("--workdir", help="homes, downloads and logs (default a temp dir in /dev/shm, removed)")
    p.add_argument("--no-warm-memory", action="store_true",
                   help="do not write and remove 2 copies per peer of the file in the workdir before each round (on a VM"
                        " that gives free pages back to its host, the first round to need more memory pays for it)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (logs) afterwards")
    p.add_argument("--no-plot", action="store_true", help="do not draw OUT/swarm.png")
    p.add_argument("--profile", metavar="DIR",
                   help="profile the dfpeers of every dragonfly round into DIR/nN (see bench.profile): the"
                        " --profile-tools on the first dfpeers, /proc counters of all")
    p.add_argument("--profile-tools", default="py-spy,perf-record,perf-trace",
                   help="with --profile: the tools, one dfpeer each: py-spy, py-spy-all, perf-record, perf-trace, cprofile, strace-seq"
                        " (default py-spy,perf-record,perf-trace; a tool may repeat)")
    p.add_argument("--profile-native", action="store_true", help="with --profile: C frames in py-spy's stacks too")
    p.add_argument("--profile-rate", type=int, default=200, help="with --profile: py-spy's samples per second (default 200)")
    p.add_argument("--ab-env", metavar="NAME=VALUE,...",
                   help="with --profile: every second dfpeer (group b) runs with these environment variables, the"
                        " others (group a) without; DIR/nN/counters.json compares the groups' CPU, measured in the"
                        " same round (the one comparison a shared machine's load does not blur)")
    p.add_argument("--report", action="store_true",
                   help="run nothing: redraw the plots and OUT/results.md from OUT/results.json")
    p.add_argument("--smoke", action="store_true",
                   help="a quick check: 3 peers, a 4 MiB file, 200 Mbit/s links, 1M pieces; no BitTorrent unless"
                        " --systems, no plots")
    args = p.parse_args(argv)
    defaults = dict(peers="5,10,20,40", file_size="64M", peer_rate=80.0, origin_rate=160.0,
                    supernode_rate=160.0, piece_size="auto", systems=",".join(SYSTEMS))
    if args.smoke:
        defaults = dict(peers="3", file_size="4M", peer_rate=200.0, origin_rate=200.0,
                        supernode_rate=200.0, piece_size="1M", systems="dragonfly,http")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None and not args.smoke:  # a smoke run gets a temp dir once it can run
        args.out = os.path.join(REPO, "docs", "bench")
    try:
        peers = tuple(int(x) for x in args.peers.split(","))
        size = parse_rate(args.file_size)
    except ValueError as e:
        p.error(str(e))
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    if not peers or min(peers) < 1:
        p.error("--peers: at least one number, each at least 1")
    if size < 1:
        p.error("--file-size must be at least 1 byte")
    if not systems or set(systems) - set(SYSTEMS):
        p.error(f"--systems: a comma-separated subset of {','.join(SYSTEMS)}")
    for name in ("peer_rate", "origin_rate", "supernode_rate"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    scenario = Scenario(peers, size, args.peer_rate, args.origin_rate, args.supernode_rate,
                        args.piece_size, systems, args.timeout, args.supernode_args, args.peer_args, args.bt_args,
                        quiet_wait=3.0 if args.smoke else 20.0)
    return scenario, args


# -- measuring -------------------------------------------------------------------------


class CpuMeter:
    """
    The busy share of the whole machine while entered, sampled every
    C{interval}, split into user, system and interrupt time; and the CPU
    seconds of the long-running processes in C{watch} (name -> pids), and
    of those C{late()} names when it is left: processes started after the
    meter, whose whole lives count.
    """

    def __init__(self, watch: dict[str, list[int]] | None = None, interval: float = 0.25,
                 late: Callable[[], dict[str, list[int]]] | None = None) -> None:
        self.interval = interval
        self.watch = watch or {}
        self.late = late
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._first = self._last = cpu_times()
        self._proc_first: dict[str, float] = {}
        self._proc_last: dict[str, float] = {}

    def _process_seconds(self) -> dict[str, float]:
        return {name: sum(process_cpu_seconds(pid) for pid in pids) for name, pids in self.watch.items()}

    def _run(self) -> None:
        prev = self._first
        while not self._stop.wait(self.interval):
            now = cpu_times()
            self.samples.append(busy_share(prev, now))
            prev = now

    def __enter__(self) -> CpuMeter:
        self._proc_first = self._process_seconds()
        self._first = cpu_times()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._last = cpu_times()
        self._proc_last = self._process_seconds()
        for name, pids in (self.late() if self.late else {}).items():
            self._proc_first[name] = 0.0
            self._proc_last[name] = sum(process_cpu_seconds(pid) for pid in pids)

    def summary(self) -> dict[str, Any]:
        mean = busy_share(self._first, self._last)
        summary = {
            "cpus": os.cpu_count(),
            "busyMean": round(mean, 3),
            "busyMax": round(max(self.samples, default=mean), 3),
            "samplesOver90": round(sum(s > CPU_BUSY for s in self.samples) / max(len(self.samples), 1), 3),
            "user": round(busy_share(self._first, self._last, ("user", "nice")), 3),
            "system": round(busy_share(self._first, self._last, ("system",)), 3),
            "interrupts": round(busy_share(self._first, self._last, ("irq", "softirq")), 3),
            "processSeconds": {name: round(self._proc_last[name] - self._proc_first[name], 2) for name in self._proc_last},
        }
        summary["cpuBound"] = cpu_bound(summary)
        return summary


def cpu_bound(cpu: dict[str, Any]) -> bool:
    """Was the round limited by the CPUs (see L{CPU_BUSY})?"""
    return cpu["busyMean"] > CPU_BUSY or cpu["samplesOver90"] > 0.5


def wait_for_quiet_cpu(threshold: float = 0.3, timeout: float = 20.0) -> float:
    """Let start-up work (imports, registrations) finish before a round starts."""
    deadline = time.monotonic() + timeout
    while True:
        a = cpu_times()
        time.sleep(0.5)
        share = busy_share(a, cpu_times())
        if share < threshold or time.monotonic() > deadline:
            return share


def percentile(values: list[float], q: float) -> float:
    """The C{q} quantile (0..1) with linear interpolation between ranks."""
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def time_stats(times: list[float], unit: float) -> tuple[dict[str, float], dict[str, float]]:
    """(seconds, ratios to C{unit}) for mean, p50, p90 and max of C{times}."""
    if not times:
        return {}, {}
    seconds = {
        "mean": sum(times) / len(times), "p50": percentile(times, 0.5),
        "p90": percentile(times, 0.9), "max": max(times), "min": min(times),
    }
    return ({k: round(v, 3) for k, v in seconds.items()},
            {k: round(v / unit, 3) for k, v in seconds.items()})


# -- one network ------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one host's download process ended."""

    seconds: float | None
    exit: int | None
    error: str = ""


class Testbed:
    """The hosts of one N on one L{netem.Network}, and the rounds run on them."""

    def __init__(self, net: netem.Network, scenario: Scenario, n: int, www: str, want: str, workdir: str,
                 profile: str | None = None, profile_tools: tuple[str, ...] = (), profile_native: bool = False,
                 ab_env: dict[str, str] | None = None, profile_rate: int = 200) -> None:
        self.net = net
        self.profile = profile
        self.profile_tools = profile_tools
        self.profile_native = profile_native
        self.profile_rate = profile_rate
        self.ab_env = ab_env or {}
        self.sc = scenario
        self.n = n
        self.want = want
        self.workdir = workdir
        self.logdir = os.path.join(workdir, "logs", f"n{n}")
        os.makedirs(self.logdir, exist_ok=True)
        self.origin = net.add_host("origin", scenario.origin_mbit, scenario.origin_mbit)
        self.supernode = net.add_host("supernode", scenario.supernode_mbit, scenario.supernode_mbit)
        self.peers = [net.add_host(f"peer{i}", scenario.peer_mbit, scenario.peer_mbit) for i in range(1, n + 1)]
        self.url = f"http://{self.origin.ip}:{ORIGIN_PORT}/{FILE_NAME}"
        self._www = www
        self.origin_proc: subprocess.Popen | None = None

    # processes

    def spawn(self, host: netem.Host, tag: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start a long-running program in C{host}, its output in the log dir."""
        with open(os.path.join(self.logdir, f"{tag}.log"), "ab") as out:
            return self.net.popen(host, argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, **kwargs)

    def start_origin(self) -> None:
        """The counting origin, serving the payload (for both systems, all rounds of this N)."""
        info = os.path.join(self.workdir, f"origin-n{self.n}.json")
        self.origin_proc = self.spawn(self.origin, "origin", [
            sys.executable, "-m", "dragonfly.testing.origin", "--root", self._www,
            "--port", str(ORIGIN_PORT), "--interface", self.origin.ip, "--info", info,
        ])
        wait_for_file(info, 30, self.origin_proc)

    def origin_bytes(self) -> int:
        (stats,) = self.net.get_json([(self.origin, f"http://{self.origin.ip}:{ORIGIN_PORT}/_stats")])
        if stats is None:
            raise RuntimeError("the origin's /_stats did not answer")
        return int(stats["bytesSent"])

    def race(self, tag: str, commands: dict[netem.Host, list[str]], call: str | None = None,
             watch: dict[str, list[int]] | None = None,
             late: Callable[[], dict[str, list[int]]] | None = None) -> tuple[dict[str, Outcome], dict[str, Any]]:
        """
        Run one command per host, all released at one moment (L{bench.gate});
        each host's time runs from that moment to its process's exit.
        Returns the outcomes by host name, and what was measured meanwhile:
        the CPU use (with the CPU seconds of the processes in C{watch} and
        C{late}, see L{CpuMeter}, and C{clientSeconds}: the user and system
        time of the download processes, from C{wait4}) and each link's counters.
        """
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        procs: dict[str, subprocess.Popen] = {}
        errs: dict[str, str] = {}
        client_cpu: dict[str, float] = {}
        try:
            for host, argv in commands.items():
                gate = [sys.executable, "-m", "bench.gate", str(ready_w), str(go_r)]
                gate += ["--call", call] if call else []
                errs[host.name] = os.path.join(self.logdir, f"{tag}-{host.name}.err")
                with open(errs[host.name], "wb") as err:
                    procs[host.name] = self.net.popen(host, [*gate, "--", *argv], pass_fds=(ready_w, go_r),
                                                      stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
            os.close(ready_w)
            ready_w = -1
            os.close(go_r)
            go_r = -1
            self._wait_ready(ready_r, procs)
            wait_for_quiet_cpu(timeout=self.sc.quiet_wait)
            links_before = self.net.link_counters()
            ends: dict[str, float] = {}
            profiler = self.profiler(tag, watch)
            with CpuMeter(watch, late=late) as cpu, profiler:
                start = time.monotonic()
                os.write(go_w, b"g" * len(procs))
                deadline = start + self.sc.timeout
                while len(ends) < len(procs) and time.monotonic() < deadline:
                    time.sleep(0.01)
                    now = time.monotonic()
                    for name, proc in procs.items():
                        if name in ends:
                            continue
                        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                        if pid:  # reaped here for its rusage: Popen learns the exit code from us
                            proc.returncode = os.waitstatus_to_exitcode(status)
                            ends[name] = now - start
                            client_cpu[name] = usage.ru_utime + usage.ru_stime
            links = link_deltas(links_before, self.net.link_counters())
        finally:
            for fd in (ready_r, ready_w, go_r, go_w):
                if fd >= 0:
                    os.close(fd)
            self.net.stop(list(procs.values()), grace=2.0)
        outcomes = {}
        for name, proc in procs.items():
            if name in ends:
                outcomes[name] = Outcome(round(ends[name], 3), proc.returncode, _tail(errs[name]) if proc.returncode else "")
            else:
                outcomes[name] = Outcome(None, None, f"still running after {self.sc.timeout:.0f}s")
        summary = cpu.summary()
        summary["clientSeconds"] = round(sum(client_cpu.values()), 2)
        return outcomes, {"cpu": summary, "links": links}

    def profiler(self, tag: str, watch: dict[str, list[int]] | None) -> contextlib.AbstractContextManager[Any]:
        """With --profile, what profiles the dfpeers during a dragonfly round (L{bench.profile.Profiler})."""
        pids = (watch or {}).get("dfpeers", [])
        if not self.profile or tag != "dragonfly" or not pids:
            return contextlib.nullcontext()
        from .profile import Profiler

        groups = {"a": pids[0::2], "b": pids[1::2]} if self.ab_env else None
        return Profiler(os.path.join(self.profile, f"n{self.n}"), pids, tools=self.profile_tools,
                        native=self.profile_native, groups=groups, gib=self.sc.file_size / GIB,
                        rate=self.profile_rate)

    @staticmethod
    def _wait_ready(ready_r: int, procs: dict[str, subprocess.Popen], timeout: float = 120.0) -> None:
        got = 0
        deadline = time.monotonic() + timeout
        while got < len(procs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {got} of {len(procs)} downloads got to the start line in {timeout:.0f}s")
            readable, _, _ = select.select([ready_r], [], [], 0.5)
            if readable:
                data = os.read(ready_r, len(procs))
                if not data:
                    dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
                    raise RuntimeError(f"downloads died before the start: exit codes {dead}")
                got += len(data)

    def verify(self, outputs: dict[str, str]) -> dict[str, bool]:
        """SHA-256 of every host's output against the origin file's."""
        return {name: os.path.isfile(path) and sha256_file(path) == self.want for name, path in outputs.items()}

    def round_dir(self, system: str) -> str:
        path = os.path.join(self.workdir, f"n{self.n}-{system}")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(os.path.join(path, "out"))
        return path

    # the rounds

    def run_dragonfly(self) -> dict[str, Any]:
        """Fresh SuperNode and dfpeers, then dfget on every peer at once."""
        rdir = self.round_dir("dragonfly")
        twistd = os.path.join(BIN, "twistd")
        sn_home = os.path.join(rdir, "supernode")
        os.makedirs(sn_home)
        sn_ip = self.supernode.ip
        started: list[subprocess.Popen] = []
        try:
            sn_argv = [twistd, "-n", "--pidfile=", "supernode", "--port", str(API_PORT),
                       "--block-port", str(BLOCK_PORT), "--listen", sn_ip, "--advertise-ip", sn_ip,
                       "--home", sn_home, "--piece-size", self.sc.piece_size, *shlex.split(self.sc.supernode_args)]
            started.append(self.spawn(self.supernode, "dragonfly-supernode", sn_argv))
            wait_for_file(os.path.join(sn_home, "supernode.json"), 60, started[0])
            homes = {p.name: os.path.join(rdir, p.name) for p in self.peers}
            for k, peer in enumerate(self.peers):
                os.makedirs(homes[peer.name])
                run_twistd = [twistd]
                if self.profile and self.profile_tools[k:k + 1] == ("cprofile",):
                    from .profile import cprofile_path

                    run_twistd = [sys.executable, "-m", "bench.cprofiled",
                                  cprofile_path(os.path.join(self.profile, f"n{self.n}"), k)]
                env = {}
                if self.ab_env and k % 2 == 1:
                    env = {"env": {**os.environ, **self.ab_env}}
                started.append(self.spawn(peer, f"dragonfly-{peer.name}", [
                    *run_twistd, "-n", "--pidfile=", "dfpeer", "--supernode", f"{sn_ip}:{API_PORT}",
                    "--home", homes[peer.name], "--ip", peer.ip, "--listen", peer.ip, "--port", str(BLOCK_PORT),
                    *shlex.split(self.sc.peer_args),
                ], **env))
            apis = {}
            for peer, proc in zip(self.peers, started[1:]):
                apis[peer.name] = wait_for_file(os.path.join(homes[peer.name], "peer.json"), 60 + 2 * self.n, proc)["api"]
            outputs = {p.name: os.path.join(rdir, "out", p.name) for p in self.peers}
            before = self.origin_bytes()
            outcomes, measured = self.race("dragonfly", {
                p: ["-u", self.url, "-o", outputs[p.name], "--home", homes[p.name],
                    "--node", f"{sn_ip}:{API_PORT}", "--no-progress"]
                for p in self.peers
            }, call="dragonfly.cli.dfget:main", watch={
                "origin": [self.origin_proc.pid], "supernode": [started[0].pid],
                "dfpeers": [p.pid for p in started[1:]],
            })
            origin = self.origin_bytes() - before
            ok = self.verify(outputs)
            replies = self.net.get_json(
                [(self.supernode, f"http://{sn_ip}:{API_PORT}/api/v1/tasks")]
                + [(p, f"{apis[p.name]}/api/v1/tasks") for p in self.peers]
            )
            seed = sum(t.get("seedBytes", 0) for t in (replies[0] or {}).get("tasks", []))
            traffic = {}
            for peer, reply in zip(self.peers, replies[1:]):
                mine = [t for t in (reply or {}).get("tasks", []) if t.get("url") == self.url]
                traffic[peer.name] = mine[0].get("traffic", {}) if mine else {}
            return self.record("dragonfly", outcomes, ok, measured, origin, seed, traffic)
        finally:
            self.net.stop(started)
            shutil.rmtree(rdir, ignore_errors=True)

    def torrent(self, announce: str) -> tuple[str, bytes]:
        """The .torrent of the payload for C{announce} (made once per run), and its info hash."""
        path = os.path.join(self.workdir, "payload-" + announce.split("/")[2].replace(":", "-") + ".torrent")
        if not os.path.exists(path + ".hash"):
            ih = bittorrent.make_torrent(os.path.join(self._www, FILE_NAME), announce, path)
            with open(path + ".hash", "w") as f:
                f.write(ih.hex())
        with open(path + ".hash") as f:
            return path, bytes.fromhex(f.read())

    def run_bittorrent(self) -> dict[str, Any]:
        """
        opentracker on the SuperNode's host, an aria2c seed on the origin's
        host, then aria2c on every peer at once; a peer is done when its
        aria2c has the file (it seeds on until the round ends).
        """
        assert self.origin_proc is not None
        rdir = self.round_dir("bittorrent")
        sn_ip = self.supernode.ip
        announce = f"http://{sn_ip}:{TRACKER_PORT}/announce"
        torrent, ih = self.torrent(announce)
        extra = shlex.split(self.sc.bt_args)
        started: list[subprocess.Popen] = []
        pidfiles = {p.name: os.path.join(rdir, f"{p.name}.aria2c.pid") for p in self.peers}
        try:
            tracker = self.spawn(self.supernode, "bittorrent-tracker", bittorrent.tracker_argv(
                sn_ip, TRACKER_PORT, TRACKER_PORT, os.path.join(rdir, "tracker"), [ih]))
            started.append(tracker)
            seed = self.spawn(self.origin, "bittorrent-seed", bittorrent.aria2_argv(
                torrent, self._www, self.origin.ip, BT_PORT, seed=True, stop_with=os.getpid(), extra=extra))
            started.append(seed)
            deadline = time.monotonic() + 60
            while True:
                (reply,) = self.net.get([(self.supernode, bittorrent.scrape_url(announce, ih))], timeout=5)
                try:
                    if reply is not None and bittorrent.seeders(reply, ih) >= 1:
                        break
                except ValueError:
                    pass
                for proc, what in ((tracker, "opentracker"), (seed, "the aria2c seed")):
                    if proc.poll() is not None:
                        raise RuntimeError(f"{what} exited with {proc.returncode} (see {self.logdir})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the aria2c seed did not announce itself to opentracker (see {self.logdir})")
                time.sleep(0.3)
            outputs = {p.name: os.path.join(rdir, "out", p.name, FILE_NAME) for p in self.peers}
            commands = {}
            for p in self.peers:
                os.makedirs(os.path.dirname(outputs[p.name]))
                commands[p] = [
                    "--done", os.path.join(rdir, f"{p.name}.done"), "--pidfile", pidfiles[p.name],
                    "--log", os.path.join(self.logdir, f"bittorrent-{p.name}.log"), "--",
                    *bittorrent.aria2_argv(torrent, os.path.dirname(outputs[p.name]), p.ip, BT_PORT,
                                           stop_with=os.getpid(), extra=extra),
                ]
            outcomes, measured = self.race(
                "bittorrent", commands, call="bench.bittorrent:leech",
                watch={"origin": [self.origin_proc.pid], "seed": [seed.pid], "tracker": [tracker.pid]},
                late=lambda: {"aria2c": self._pids(pidfiles.values())},
            )
            measured["cpu"]["clientSeconds"] = 0.0  # the leech wrapper is the bench's, not BitTorrent's: not counted
            ok = self.verify(outputs)
            links = measured["links"]
            seed_wire = links.get("origin", {}).get("upBytes", 0)
            down = sum(links.get(p.name, {}).get("downBytes", 0) for p in self.peers)
            p2p = round(max(down - seed_wire, 0) / down, 3) if down else 0.0
            return self.record("bittorrent", outcomes, ok, measured, seed_wire, 0, {}, p2p=p2p)
        finally:
            self._kill(self._pids(pidfiles.values()))
            self.net.stop(started)
            shutil.rmtree(rdir, ignore_errors=True)

    @staticmethod
    def _pids(pidfiles: Any) -> list[int]:
        pids = []
        for path in pidfiles:
            try:
                with open(path) as f:
                    pids.append(int(f.read().strip()))
            except (OSError, ValueError):
                pass
        return pids

    @staticmethod
    def _kill(pids: list[int], grace: float = 5.0) -> None:
        """Stop processes that are not our children (the leechers' aria2c): TERM, then KILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in pids):
                time.sleep(0.05)

    def run_http(self) -> dict[str, Any]:
        """Every peer fetches the file from the origin itself, all at once."""
        rdir = self.round_dir("http")
        outputs = {p.name: os.path.join(rdir, "out", p.name) for p in self.peers}
        try:
            before = self.origin_bytes()
            outcomes, measured = self.race("http", {p: http_client(self.url, outputs[p.name]) for p in self.peers},
                                           watch={"origin": [self.origin_proc.pid]})
            origin = self.origin_bytes() - before
            ok = self.verify(outputs)
            return self.record("http", outcomes, ok, measured, origin, 0, {})
        finally:
            shutil.rmtree(rdir, ignore_errors=True)

    def record(self, system: str, outcomes: dict[str, Outcome], ok: dict[str, bool], measured: dict[str, Any],
               origin: int, seed: int, traffic: dict[str, dict[str, int]], p2p: float | None = None) -> dict[str, Any]:
        """
        The JSON record of one round.  C{p2p}: the share of the peers' bytes
        from other peers, when C{traffic} cannot tell.
        """
        links = measured["links"]
        f = self.sc.file_size
        hosts = {}
        for name, outcome in outcomes.items():
            hosts[name] = {"seconds": outcome.seconds, "exit": outcome.exit, "sha256Ok": ok[name]}
            if outcome.error:
                hosts[name]["error"] = outcome.error
            if traffic.get(name):
                hosts[name]["traffic"] = traffic[name]
            hosts[name]["link"] = links.get(name, {})
        passed = {n for n, o in outcomes.items() if o.exit == 0 and ok[n] and o.seconds is not None}
        good = [outcomes[n].seconds for n in passed]
        seconds, ratios = time_stats(good, self.sc.fb_seconds)
        totals: dict[str, int] = {}
        for t in traffic.values():
            for kind, n in t.items():
                totals[kind] = totals.get(kind, 0) + int(n)
        received = sum(totals.values())
        if p2p is None:
            p2p = round(totals.get("remote_peer", 0) / received, 3) if received else 0.0
        cpu = measured["cpu"]
        return {
            "system": system,
            "n": self.n,
            "ok": len(passed) == self.n,
            "failed": sorted(set(outcomes) - passed),
            "seconds": seconds,
            "xFB": ratios,
            "originBytes": origin,
            "originCopies": round(origin / f, 3),
            "supernodeBytes": seed,
            "supernodeCopies": round(seed / f, 3),
            "p2pShare": p2p,
            "traffic": totals,
            "cpu": cpu,
            # CPU seconds per peer per GiB: its daemon (dfpeer, aria2c) during the round and its download process
            **cpu_per_peer(system, self.n, f, cpu),
            "link": {
                "drops": sum(c["drops"] for c in links.values()),
                "originUpBytes": links.get("origin", {}).get("upBytes", 0),
                "supernodeUpBytes": links.get("supernode", {}).get("upBytes", 0),
                "peersUpBytes": sum(links[p.name]["upBytes"] for p in self.peers if p.name in links),
                "peersDownBytes": sum(links[p.name]["downBytes"] for p in self.peers if p.name in links),
            },
            # what the peers' links carried, per peer, in copies of F (headers included: ~1.05 is ideal)
            "wireCopiesPerPeer": round(sum(links[p.name]["downBytes"] for p in self.peers if p.name in links)
                                       / (self.n * f), 3),
            "hosts": hosts,
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }


# the name in a round's cpu.processSeconds of the peers' long-running processes
DAEMONS = {"dragonfly": "dfpeers", "bittorrent": "aria2c"}


def cpu_per_peer(system: str, n: int, file_size: int, cpu: dict[str, Any]) -> dict[str, Any]:
    """
    CPU seconds per peer per GiB: the peers' daemons during the round plus
    the download processes (C{clientSeconds}), split too; nothing for a
    record from before C{clientSeconds} was measured.
    """
    if "clientSeconds" not in cpu:
        return {}
    gib = n * file_size / GIB
    daemon = cpu["processSeconds"].get(DAEMONS.get(system, ""), 0.0)
    return {
        "cpuPerPeerPerGiB": round((daemon + cpu["clientSeconds"]) / gib, 3),
        "cpuPerPeerPerGiBSplit": {"daemon": round(daemon / gib, 3), "client": round(cpu["clientSeconds"] / gib, 3)},
    }


def link_deltas(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Per host and counter, C{after - before}."""
    return {host: {k: v - before.get(host, {}).get(k, 0) for k, v in counters.items()} for host, counters in after.items()}


def http_client(url: str, output: str) -> list[str]:
    """The plain-HTTP download command: curl, else wget."""
    if shutil.which("curl"):
        return ["curl", "-sS", "--fail", "-o", output, url]
    if shutil.which("wget"):
        return ["wget", "-q", "-O", output, url]
    raise RuntimeError("the http baseline needs curl or wget (apt-get install curl)")


def _tail(path: str, limit: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-limit:].decode(errors="replace").strip()
    except OSError:
        return ""


# -- results -----------------------------------------------------------------------------


def git_version() -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_results(path: str, scenario: Scenario) -> dict[str, Any]:
    """The results file to merge into: the old one if it measured the same scenario."""
    fresh = {
        "benchmark": "bench.swarm", "params": scenario.params(), "fbSeconds": round(scenario.fb_seconds, 3),
        "runs": {},
    }
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return fresh
    if old.get("params") != fresh["params"]:
        say(f"{path} holds another scenario ({old.get('params')}); starting it afresh")
        return fresh
    old.setdefault("runs", {})
    return old


def save_results(path: str, results: dict[str, Any], scenario: Scenario) -> None:
    results["machine"] = {
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "dragonfly": git_version(),
    }
    results["bounds"] = {
        str(n): {"fbSeconds": round(scenario.fb_seconds, 3), "fluidSeconds": round(scenario.fluid_bound(n), 3),
                 "httpSeconds": round(scenario.http_bound(n), 3)}
        for n in sorted(int(k) for k in results["runs"])
    }
    results["updated"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    write_json(path, results)


def write_json(path: str, data: Any) -> None:
    """Write C{path} whole or not at all."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


def rows(results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for n in sorted(results["runs"], key=int):
        for system in SYSTEMS:
            if system in results["runs"][n]:
                yield results["runs"][n][system]


def table(results: dict[str, Any]) -> str:
    """The results as a fixed-width table (times in seconds and x F/B)."""
    p = results["params"]
    head = (f"F = {p['file_size'] / (1 << 20):g} MiB, B = {p['peer_mbit']:g} Mbit/s, "
            f"S = {p['origin_mbit']:g} Mbit/s, supernode {p['supernode_mbit']:g} Mbit/s, "
            f"pieces {p['piece_size']}; F/B = {results['fbSeconds']:.2f} s")
    cols = f"{'N':>3} {'system':<10} " + " ".join(f"{c:>13}" for c in ("mean", "p50", "p90", "max")) + \
        f" {'origin':>7} {'seed':>6} {'p2p':>5} {'wire':>5} {'cpu':>9} {'cpu/GiB':>7}  ok"
    lines = [head, "", cols, "-" * len(cols)]
    for r in rows(results):
        times = " ".join(
            f"{r['seconds'][k]:6.2f}s {r['xFB'][k]:5.2f}x" if r["seconds"] else f"{'-':>13}"
            for k in ("mean", "p50", "p90", "max")
        )
        cpu = f"{r['cpu']['busyMean'] * 100:3.0f}%" + (" CPU!" if r["cpu"]["cpuBound"] else "     ")
        seed = f"{r['supernodeCopies']:6.2f}" if r["system"] == "dragonfly" else f"{'-':>6}"
        ok = "yes" if r["ok"] else f"NO: {', '.join(r['failed'])}"
        per_gib = f"{r['cpuPerPeerPerGiB']:7.2f}" if "cpuPerPeerPerGiB" in r else f"{'-':>7}"
        lines.append(f"{r['n']:>3} {r['system']:<10} {times} {r['originCopies']:7.2f} {seed} "
                     f"{r['p2pShare']:5.2f} {r.get('wireCopiesPerPeer', math.nan):5.2f} {cpu:>9} {per_gib}  {ok}")
    cpus = results.get("machine", {}).get("cpus", os.cpu_count())
    lines += [
        "",
        "times: seconds from the common start, and x F/B",
        "origin, seed: bytes sent by the origin and by the SuperNode, in copies of F; for bittorrent,",
        "     origin is what the seed's link (on the origin's host) carried up, headers included",
        "p2p: share of the peers' bytes that came from other peers",
        "wire: bytes each peer's link carried down, in copies of F (TCP/IP headers make 1.05 the ideal)",
        f"cpu: mean busy share of the machine's {cpus} CPUs during the round; CPU! when above {CPU_BUSY:.0%}",
        "     on average or during more than half of it: then the machine, not the network, was the limit",
        "cpu/GiB: CPU seconds per peer per GiB: its daemon (dfpeer, aria2c) during the round plus its",
        "     download process (dfget, curl; start-up included)",
    ]
    summary = comparison(results)
    if summary:
        lines += ["", summary]
    return "\n".join(lines)


def comparison(results: dict[str, Any]) -> str:
    """Mean x F/B and CPU per peer per GiB side by side, one line per N."""
    runs = results["runs"]
    present = [s for s in SYSTEMS if any(s in runs[n] for n in runs)]
    if len(present) < 2:
        return ""
    head = f"{'N':>3}" + "".join(f" {s + ' mean':>16}" for s in present) + \
        "".join(f" {s + ' cpu/GiB':>25}" for s in present if s != "http")
    lines = ["mean x F/B, and CPU seconds per peer per GiB = daemon + download process, side by side:", "",
             head, "-" * len(head)]
    for n in sorted(runs, key=int):
        row = f"{n:>3}"
        for s in present:
            r = runs[n].get(s)
            row += f" {r['xFB']['mean']:15.2f}x" if r and r["seconds"] else f" {'-':>16}"
        for s in present:
            if s == "http":
                continue
            r = runs[n].get(s)
            if r and "cpuPerPeerPerGiBSplit" in r:
                split = r["cpuPerPeerPerGiBSplit"]
                cell = f"{r['cpuPerPeerPerGiB']:.2f} = {split['daemon']:.2f} + {split['client']:.2f}"
                row += f" {cell:>25}"
            else:
                row += f" {'-':>25}"
        lines.append(row)
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> bool:
    """Mean time against N for every system, with F/B and the HTTP limit N*F/S."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    fb = results["fbSeconds"]
    p = results["params"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns_all: list[int] = []
    for system, color in zip(SYSTEMS, ("tab:blue", "tab:green", "tab:red")):
        data = [r for r in rows(results) if r["system"] == system and r["seconds"]]
        if not data:
            continue
        ns = [r["n"] for r in data]
        ns_all += ns
        mean = [r["seconds"]["mean"] for r in data]
        err = [[m - r["seconds"]["min"] for m, r in zip(mean, data)], [r["seconds"]["max"] - m for m, r in zip(mean, data)]]
        ax.errorbar(ns, mean, yerr=err, marker="o", capsize=4, color=color,
                    label=f"{system}: mean (bars: min to max)")
        for r in data:
            if r["cpu"]["cpuBound"]:
                ax.annotate("CPU-bound", (r["n"], r["seconds"]["mean"]), textcoords="offset points",
                            xytext=(-8, 8), ha="right", fontsize=8, color=color)
    if not ns_all:
        plt.close(fig)
        return False
    ax.axhline(fb, color="black", linestyle=":", label=f"F/B = {fb:.1f} s (physical limit)")
    xs = sorted(set(ns_all))
    ax.plot(xs, [max(fb, n * p["file_size"] * 8 / (p["origin_mbit"] * 1e6)) for n in xs], color="tab:red",
            linestyle="--", linewidth=1, label="HTTP: the last host cannot finish before max(F/B, N*F/S)")
    ax.set_xlabel("N (peers downloading at once)")
    ax.set_ylabel("completion time (s)")
    ax.set_xticks(sorted(set(ns_all)))
    ax.set_ylim(bottom=0)
    secondary = ax.secondary_yaxis("right", functions=(lambda s: s / fb, lambda x: x * fb))
    secondary.set_ylabel("x F/B")
    ax.set_title(f"{p['file_size'] / (1 << 20):g} MiB to N peers: B = {p['peer_mbit']:g} Mbit/s, "
                 f"S = {p['origin_mbit']:g} Mbit/s", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_swarms(results: dict[str, Any], path: str) -> bool:
    """
    The two swarms up close: mean x F/B of Dragonfly and BitTorrent against
    N (left), and the CPU seconds per peer per GiB of every system (right).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = dict(zip(SYSTEMS, ("tab:blue", "tab:green", "tab:red")))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    drawn = False
    for system in SYSTEMS:
        data = [r for r in rows(results) if r["system"] == system and r["seconds"]]
        if not data:
            continue
        ns = [r["n"] for r in data]
        if system != "http":
            left.plot(ns, [r["xFB"]["mean"] for r in data], marker="o", color=colors[system], label=f"{system}: mean")
            left.plot(ns, [r["xFB"]["max"] for r in data], marker="v", linestyle=":", color=colors[system],
                      label=f"{system}: max")
            drawn = True
        cpu = [(r["n"], r["cpuPerPeerPerGiB"]) for r in data if "cpuPerPeerPerGiB" in r]
        if cpu:
            right.plot(*zip(*cpu), marker="o", color=colors[system], label=system)
    if not drawn:
        plt.close(fig)
        return False
    left.axhline(1.0, color="black", linestyle=":", linewidth=1, label="F/B")
    left.axhline(1.25, color="grey", linestyle="--", linewidth=1, label="1.25 x F/B (issue 11's target)")
    left.set_xlabel("N (peers downloading at once)")
    left.set_ylabel("completion time, x F/B")
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    right.set_xlabel("N")
    right.set_ylabel("CPU seconds per peer per GiB")
    right.set_ylim(bottom=0)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    ns = sorted({r["n"] for r in rows(results)})
    left.set_xticks(ns)
    right.set_xticks(ns)
    p = results["params"]
    fig.suptitle(f"{p['file_size'] / (1 << 20):g} MiB to N peers, B = {p['peer_mbit']:g} Mbit/s: "
                 "Dragonfly and BitTorrent in the same run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(out: str, results: dict[str, Any], scenario: Scenario, draw: bool) -> None:
    save_results(os.path.join(out, "results.json"), results, scenario)
    write_report(out, results, draw)


def write_report(out: str, results: dict[str, Any], draw: bool) -> None:
    """OUT/results.md (the tables) and, if asked, OUT/swarm.png and OUT/swarm-cpu.png."""
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("<!-- written by python -m bench.swarm -->\n```\n" + table(results) + "\n```\n")
    if draw:
        plot(results, os.path.join(out, "swarm.png"))
        plot_swarms(results, os.path.join(out, "swarm-cpu.png"))


# -- main ----------------------------------------------------------------------------------


#: the file's copies per peer bench.swarm writes and removes before each round (L{warm_memory})
WARM_COPIES = 2


def round_line(r: dict[str, Any]) -> str:
    if not r["seconds"]:
        return f"N={r['n']} {r['system']}: every download failed: {r['failed']}"
    s, x = r["seconds"], r["xFB"]
    extra = f", seed {r['supernodeCopies']:.2f} copies, p2p {r['p2pShare']:.2f}" if r["system"] == "dragonfly" else ""
    if r["system"] == "bittorrent":
        extra = f" (the seed's wire bytes), p2p {r['p2pShare']:.2f}"
    cpu = r["cpu"]
    return (f"N={r['n']} {r['system']}: mean {s['mean']:.2f}s ({x['mean']:.2f}x F/B), p50 {x['p50']:.2f}x, "
            f"p90 {x['p90']:.2f}x, max {x['max']:.2f}x; origin {r['originCopies']:.2f} copies{extra}; "
            f"{r.get('cpuPerPeerPerGiB', math.nan):.2f} CPU s per peer per GiB; "
            f"CPU {cpu['busyMean']:.0%} busy{' (CPU-bound)' if cpu['cpuBound'] else ''}"
            f"{'' if r['ok'] else '; FAILED: ' + ', '.join(r['failed'])}")


def run(scenario: Scenario, args: argparse.Namespace, workdir: str) -> bool:
    """Every N, every system; results written after each round.  True if all passed."""
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    results = load_results(os.path.join(out, "results.json"), scenario)
    www = os.path.join(workdir, "www")
    os.makedirs(www, exist_ok=True)
    want = write_random_file(os.path.join(www, FILE_NAME), scenario.file_size)
    rounds: dict[str, Callable[[Testbed], dict[str, Any]]] = {
        "dragonfly": Testbed.run_dragonfly, "bittorrent": Testbed.run_bittorrent, "http": Testbed.run_http,
    }
    systems = list(scenario.systems)
    if "bittorrent" in systems and bittorrent.unavailable():
        say(f"no BitTorrent baseline: {bittorrent.unavailable()}")
        systems.remove("bittorrent")
    passed = True
    made = compile_bytecode()
    if made:
        say(f"compiled {made} modules to bytecode, as an installed package has them")
    for n in scenario.peers:
        say(f"N={n}: building {n + 2} hosts")
        with netem.Network() as net:
            tools = tuple(t.strip() for t in args.profile_tools.split(",") if t.strip())
            ab_env = dict(kv.split("=", 1) for kv in args.ab_env.split(",") if kv) if args.ab_env else None
            bed = Testbed(net, scenario, n, www, want, workdir, profile=args.profile and os.path.abspath(args.profile),
                          profile_tools=tools, profile_native=args.profile_native, ab_env=ab_env,
                          profile_rate=args.profile_rate)
            bed.start_origin()
            for system in systems:
                warm = None
                if not args.no_warm_memory:
                    # every round starts on memory the machine has just used (measure.warm_memory):
                    # its downloads' files, about one copy per peer, and as much again
                    warm = warm_memory(workdir, WARM_COPIES * n * scenario.file_size)
                say(f"N={n}: {system} round" + (f" (memory warmed first: {warm:.2f} CPU s/GiB)" if warm is not None else ""))
                record = rounds[system](bed)
                record["memoryWarmCpuPerGiB"] = warm
                results["runs"].setdefault(str(n), {})[system] = record
                if fails_run(record):
                    passed = False
                elif not record["ok"]:
                    say(f"N={n} {system}: {', '.join(record['failed'])} did not finish (a baseline's result, not a fault)")
                write_outputs(out, results, scenario, draw=False)
                say(round_line(record))
    write_outputs(out, results, scenario, draw=not (args.no_plot or args.smoke))  # a smoke run is quick: no plots
    print()
    print(table(results))
    print()
    say(f"results in {out}")
    return passed


def fails_run(record: dict[str, Any]) -> bool:
    """
    Whether a round's failed downloads make the run fail: any of
    Dragonfly's; a baseline's only when a download its client called done
    does not match the file (a fault of the harness).  A baseline download
    that never finishes is what the baseline measured (plain HTTP at N = 40
    overloads the origin): shown in the table's ok column, not a failure.
    """
    if record["ok"]:
        return False
    if record["system"] == "dragonfly":
        return True
    return any(h["exit"] == 0 and not h["sha256Ok"] for h in record["hosts"].values())


def compile_bytecode() -> int:
    """
    Compile the C{dragonfly} and C{bench} packages this run imports to
    bytecode (their C{__pycache__}, ignored by git), as installing the package
    does (pip compiles every module it installs).  Where nothing writes it
    (C{PYTHONDONTWRITEBYTECODE}, a checkout never imported with writes on),
    every dfget would otherwise compile its modules again, on the clock: 20 ms
    of a dfget's 70-90 ms of CPU, 0.3 CPU-s per peer per GiB of a 64 MiB
    round, which no installed dfget pays.  The modules compiled now.
    """
    import compileall
    import py_compile

    import dragonfly

    made = 0
    for package in (os.path.dirname(dragonfly.__file__), os.path.dirname(os.path.abspath(__file__))):
        before = len(glob.glob(os.path.join(package, "**", "__pycache__", "*.pyc"), recursive=True))
        compileall.compile_dir(package, quiet=2, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
        made += len(glob.glob(os.path.join(package, "**", "__pycache__", "*.pyc"), recursive=True)) - before
    return made


def make_workdir(args: argparse.Namespace) -> tuple[str, bool]:
    """C{--workdir}, or a new temp dir in /dev/shm (no disk writeback in the timings); (path, is it temporary)."""
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        return os.path.abspath(args.workdir), False
    return tempfile.mkdtemp(prefix="dfb-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None), True


def sweep_workdirs() -> None:
    """
    Free what runs that were killed left in /dev/shm (payloads, homes, downloads:
    RAM), keeping their logs.  Called under the lock, so none of them is live.
    """
    for stale in glob.glob("/dev/shm/dfb-bench-*/"):
        for entry in os.listdir(stale):
            if entry != "logs":
                shutil.rmtree(os.path.join(stale, entry), ignore_errors=True)


def finish_workdir(workdir: str, temporary: bool, keep: bool) -> None:
    """Keep the logs (not the payload) when asked or after a failure; else remove a temp workdir."""
    if keep:
        shutil.rmtree(os.path.join(workdir, "www"), ignore_errors=True)
        say(f"logs kept in {workdir}")
    elif temporary:
        shutil.rmtree(workdir, ignore_errors=True)


def report(out: str, draw: bool) -> int:
    """C{--report}: the table and plot again from the results file."""
    path = os.path.join(out, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        say(f"cannot read {path}: {e}")
        return EXIT_FAILED
    for record in rows(results):
        record["cpu"]["cpuBound"] = cpu_bound(record["cpu"])  # the rule may have changed since the run
        record.update(cpu_per_peer(record["system"], record["n"], results["params"]["file_size"], record["cpu"]))
    write_json(path, results)
    write_report(out, results, draw)
    print(table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    scenario, args = parse_args(argv)
    if args.report:
        return report(os.path.abspath(args.out or os.path.join(REPO, "docs", "bench")), draw=not args.no_plot)
    reason = netem.unavailable()
    if reason:
        say(f"cannot run here: {reason}")
        return EXIT_UNAVAILABLE
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="dfb-smoke-")
    passed = False
    try:
        with netem.SignalGuard(), netem.bench_lock():
            sweep_workdirs()
            workdir, temporary = make_workdir(args)
            try:
                passed = run(scenario, args, workdir)
            finally:
                finish_workdir(workdir, temporary, keep=args.keep or not passed)
    except netem.Busy as e:
        say(str(e))
        return EXIT_BUSY
    except KeyboardInterrupt:
        say("interrupted; everything is torn down")
        return 130
    except SystemExit as e:
        say(f"terminated ({e.code}); everything is torn down")
        raise
    return 0 if passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

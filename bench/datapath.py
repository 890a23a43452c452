"""
The data-path benchmark (C{make bench}): one large random file on loopback,
nginx as the origin, and in one run, side by side:

  - curl from nginx to /dev/null and to a file (what the origin and the disk allow);
  - Dragonfly, started the documented way (C{twistd -n supernode},
    C{twistd -n dfpeer}, C{dfget}): origin -> SuperNode -> peer A, then
    peer A -> peer B (B downloads while only A and the SuperNode's seed hold
    the file; where B's bytes came from is reported);
  - BitTorrent: one aria2c seeding the same file to one aria2c, through opentracker.

    python -m bench.datapath [--size 1G] [--json] [--parts curl,dragonfly,bittorrent]
                             [--out docs/bench] [--workdir DIR] [--keep]

For every transfer: the wall time and rate, and for every process taking part
its CPU seconds per GiB (user + system, from C{/proc/PID/stat} before and
after, or C{wait4} for a process that exits) and its peak RSS (C{VmHWM}, or
C{ru_maxrss}).  For C{dfget}: the time from its process start to its first
request to its dfpeer and to its request for the file (C{POST
/api/v1/downloads}), seen from outside: dfget is pointed at a relay in front
of the dfpeer's local API that notes when request bytes arrive; and the
C{python -X importtime} totals of a dfget run.

Results are merged per size into OUT/datapath.json; OUT/datapath.md holds the
tables.  C{--size 4G} is the peak-RSS run.  Exit status: 0 every transfer
succeeded and was verified, 1 some failed, 75 another datapath run is going
on, 77 this machine cannot run it (no nginx).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import glob
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from dragonfly.core.units import parse_rate
from dragonfly.testing.swarm import sha256_file, wait_for_file, write_random_file

from . import bittorrent, measure
from .measure import GIB, Children, Sample, cpu_per_gib, peak_rss_mib
from .netem import SignalGuard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
FILE_NAME = "payload.bin"
PARTS = ("curl", "dragonfly", "bittorrent")
LOCK_PATH = "/run/lock/dfb-datapath.lock"
WORK_PREFIX = "dfb-datapath-"
EXIT_FAILED, EXIT_BUSY, EXIT_UNAVAILABLE = 1, 75, 77
MIB = 1 << 20

# the targets of issue 11 (Target 1 and 2)
TARGETS = {
    "peerToPeerGBps": 1.0,
    "originToPeerGBps": 0.6,
    "receivingPeerCpuPerGiB": 1.5,
    "uploadingPeerCpuPerGiB": 0.3,
    "supernodeCpuPerGiB": 2.0,
    "peakRssMiB4G": 64,
    "dfgetFirstRequestSeconds": 0.15,
}


#: the file's copies written and removed before each transfer (L{DataPath.timed}), at most WARM_MAX bytes
WARM_COPIES = 2
WARM_MAX = 8 << 30


def say(message: str) -> None:
    print(f"datapath: {message}", file=sys.stderr, flush=True)


class Busy(RuntimeError):
    """Another datapath run holds the lock."""


def size_label(size: int) -> str:
    """The key of a run in datapath.json: 1G, 64M, or bytes."""
    if size % GIB == 0:
        return f"{size // GIB}G"
    if size % MIB == 0:
        return f"{size // MIB}M"
    return str(size)


def human_size(size: int) -> str:
    label = size_label(size)
    return label[:-1] + (" GiB" if label.endswith("G") else " MiB") if label[-1] in "GM" else f"{size} bytes"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.datapath", description=__doc__.split("\n\n")[1])
    p.add_argument("--size", default="1G", help="the file size, e.g. 1G, 4G (the peak-RSS run), 64M (default 1G)")
    p.add_argument("--json", action="store_true", help="print this run's results as JSON on stdout")
    p.add_argument("--parts", default=",".join(PARTS), help="curl,dragonfly,bittorrent (default all)")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "bench"),
                   help="where datapath.json and datapath.md go (default docs/bench)")
    p.add_argument("--no-save", action="store_true", help="write no results files")
    p.add_argument("--workdir", help="file, homes and downloads (default a new dir in /var/tmp, on disk; removed)")
    p.add_argument("--keep", action="store_true", help="keep the workdir's logs afterwards")
    p.add_argument("--no-warm-memory", action="store_true",
                   help="do not write and remove twice the file's size in the workdir before each transfer (on a VM"
                        " that gives free pages back to its host, the first transfer to need more memory pays for it)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one transfer may take (default 600)")
    p.add_argument("--piece-size", default="auto", help="the SuperNode's --piece-size (default auto)")
    p.add_argument("--supernode-args", default="", help="more options for twistd supernode")
    p.add_argument("--peer-args", default="", help="more options for both twistd dfpeer")
    p.add_argument("--bt-piece-size", help="the torrent's piece length, e.g. 1M (default: about 1500 pieces)")
    p.add_argument("--ab-env", default="",
                   help="NAME=VALUE[,NAME=VALUE]: a third dfpeer C with these variables downloads from A too, after B "
                        "(B stopped first), for a same-run comparison of the receiving dfpeer")
    p.add_argument("--ab-first", action="store_true", help="with --ab-env: C (the variables) downloads before B")
    p.add_argument("--sn-ab-env", default="",
                   help="NAME=VALUE[,NAME=VALUE]: a second SuperNode with these variables, and its own peer A2, "
                        "fetch the file from the origin too, after A, for a same-run comparison of the SuperNode")
    p.add_argument("--sn-ab-first", action="store_true", help="with --sn-ab-env: the second SuperNode's fetch goes first")
    p.add_argument("--profile", help="a directory: py-spy (--nonblocking, all threads) of each receiving dfpeer "
                                     "during its peer -> peer download and of the uploading dfpeer A meanwhile, and of the SuperNode during its origin -> "
                                     "peer download; their folded top tables")
    p.add_argument("--profile-native", action="store_true",
                   help="with --profile: the SuperNode's profile with C frames (py-spy --native, which stops it per sample)")
    p.add_argument("--sn-cprofile", help="a .pstats path: cProfile of the SuperNode's reactor thread (its CPU time, "
                                         "bench.cprofiled) during the origin -> peer A download")
    p.add_argument("--startup-runs", type=int, default=3, help="extra dfget runs of the finished file to time start-up (default 3)")
    args = p.parse_args(argv)
    try:
        args.size_bytes = parse_rate(args.size)
        args.bt_exponent = None
        if args.bt_piece_size:
            n = parse_rate(args.bt_piece_size)
            if n < 16384 or n & (n - 1):
                p.error("--bt-piece-size must be a power of two, at least 16K")
            args.bt_exponent = n.bit_length() - 1
    except ValueError as e:
        p.error(str(e))
    if args.size_bytes < 1:
        p.error("--size must be at least 1 byte")
    for option in ("ab_env", "sn_ab_env"):
        found: dict[str, str] = {}
        for item in filter(None, (x.strip() for x in getattr(args, option).split(","))):
            name, eq, value = item.partition("=")
            if not eq or not name:
                p.error(f"--{option.replace('_', '-')}: NAME=VALUE[,NAME=VALUE]")
            found[name] = value
        setattr(args, option.replace("_env", "_vars"), found)
    args.part_set = {s.strip() for s in args.parts.split(",") if s.strip()}
    if not args.part_set or args.part_set - set(PARTS):
        p.error(f"--parts: a comma-separated subset of {','.join(PARTS)}")
    return args


# -- helpers -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def git_version() -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def run_lock(path: str = LOCK_PATH) -> Iterator[None]:
    """One datapath run at a time (two would measure each other); dies with its holder."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # /run/lock not writable (not root)
        fd = os.open(os.path.join(tempfile.gettempdir(), "dfb-datapath.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise Busy(f"another datapath run (pid {holder}) is going on") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def sweep_workdirs(base: str) -> None:
    """
    Remove what killed runs left: processes no death signal reached (see
    L{measure.kill_recorded}) and large files.  Called under the lock, so
    none of these runs is live.
    """
    for stale in glob.glob(os.path.join(base, WORK_PREFIX + "*")):
        killed = measure.kill_recorded(os.path.join(stale, "logs", "pids"))
        if killed:
            say(f"stopped {len(killed)} process(es) a killed run left: {killed}")
        shutil.rmtree(stale, ignore_errors=True)


def evict_files(root: str) -> None:
    """Drop the page-cache pages of every file under C{root} (C{POSIX_FADV_DONTNEED}; written back first)."""
    for path, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(path, name), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def thread_times(pid: int) -> dict[str, float]:
    """
    The CPU seconds (user, system) and voluntary context switches of a
    process's main thread (the reactor's) and of its other threads together.
    """
    out = dict.fromkeys(("reactorUser", "reactorSystem", "reactorWakeups", "otherUser", "otherSystem"), 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else ():
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user, system = int(fields[11]) / tick, int(fields[12]) / tick
            wakeups = 0
            with open(f"{base}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        wakeups = int(line.split(":")[1])
        except (OSError, IndexError, ValueError):
            continue
        who = "reactor" if int(tid) == pid else "other"
        out[who + "User"] += user
        out[who + "System"] += system
        if who == "reactor":
            out["reactorWakeups"] = wakeups
    return out


def thread_delta(before: dict[str, float], after: dict[str, float], size: int) -> dict[str, float]:
    """L{thread_times} between two moments, CPU seconds per GiB of C{size} bytes (wake-ups as counted)."""
    gib = size / GIB
    return {k: after[k] - before[k] if k.endswith("Wakeups") else round((after[k] - before[k]) / gib, 3)
            for k in before}


ASK = re.compile(rb"(?:^|\r\n)POST /api/v1/downloads[ ?]")


class FirstRequestRelay:
    """
    A TCP relay in front of a dfpeer's local API that notes when the first
    request bytes arrive (C{first}) and when the first request for a file
    does (C{ask}: C{POST /api/v1/downloads}).  dfget finds the relay's
    address in a copy of the dfpeer's home (L{shadow_home}), so the time from
    dfget's process start to its requests is seen from outside dfget.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.first: float | None = None
        self.ask: float | None = None
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.first = self.ask = None

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            self._saw(data)
            try:
                up = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                return
            with up:
                up.settimeout(None)
                back = threading.Thread(target=self._pump, args=(up, conn), daemon=True)
                back.start()
                with contextlib.suppress(OSError):
                    up.sendall(data)
                    self._pump(conn, up, self._saw)
                back.join(5)

    def _saw(self, data: bytes) -> None:
        """Request bytes arrived from dfget (a keep-alive connection may carry several requests)."""
        now = time.monotonic()
        with self._lock:
            if self.first is None:
                self.first = now
            if self.ask is None and ASK.search(data):
                self.ask = now

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, seen: Any = None) -> None:
        try:
            while data := src.recv(65536):
                if seen is not None:
                    seen(data)
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def shadow_home(real: str, api: str, path: str) -> str:
    """A home for dfget: the dfpeer's C{peer.json} with the relay as its API, links to all else."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    for entry in os.listdir(real):
        if entry == "peer.json":
            with open(os.path.join(real, entry)) as f:
                info = json.load(f)
            info["api"] = api
            with open(os.path.join(path, entry), "w") as f:
                json.dump(info, f)
        else:
            os.symlink(os.path.join(real, entry), os.path.join(path, entry))
    return path


def parse_importtime(text: str) -> dict[str, Any]:
    """
    The totals of C{python -X importtime} output: the whole import time (the
    sum of the self times), the number of modules, and the slowest top-level
    imports by cumulative time.
    """
    total_us = 0
    modules = 0
    top: list[tuple[str, int]] = []
    second: list[tuple[str, int]] = []
    ours_us = 0
    for line in text.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header
        self_us, cum_us = int(parts[0]), int(parts[1])
        name = parts[2].rstrip()
        modules += 1
        total_us += self_us
        if name.strip().startswith("dragonfly"):
            ours_us += self_us
        depth = (len(name) - len(name.lstrip()) - 1) // 2  # "| name": one space, then two more per level
        if depth == 0:
            top.append((name.strip(), cum_us))
        elif depth == 1:
            second.append((name.strip(), cum_us))
    top.sort(key=lambda x: -x[1])
    second.sort(key=lambda x: -x[1])
    return {
        "totalSeconds": round(total_us / 1e6, 4),
        "dragonflySelfSeconds": round(ours_us / 1e6, 4),
        "modules": modules,
        "slowestTopLevel": [[n, round(us / 1e6, 4)] for n, us in top[:10]],
        "slowestSecondLevel": [[n, round(us / 1e6, 4)] for n, us in second[:10]],
    }


# -- the bench ---------------------------------------------------------------------


class DataPath:
    """One run: the file, nginx, and the transfers."""

    def __init__(self, args: argparse.Namespace, workdir: str, children: Children) -> None:
        self.args = args
        self.size = args.size_bytes
        self.work = workdir
        self.children = children
        self.www = os.path.join(workdir, "www")
        self.payload = os.path.join(self.www, FILE_NAME)
        self.want = ""
        self.nginx: subprocess.Popen | None = None
        self.url = ""
        self.transfers: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}
        self.dfget: dict[str, Any] = {}
        #: the CPU s/GiB each transfer's memory warm-up cost (L{timed}), by its tag
        self.warmed: dict[str, float] = {}

    # setting up

    def make_file(self) -> None:
        os.makedirs(self.www)
        say(f"writing {human_size(self.size)} of random bytes")
        self.want = write_random_file(self.payload, self.size)
        os.sync()

    def start_nginx(self) -> None:
        conf_dir = os.path.join(self.work, "nginx")
        os.makedirs(conf_dir)
        port = free_port()
        # the workers run as the benchmark's user (as root, nginx would pick nobody, who may not
        # reach the workdir); it listens on loopback only
        user = "user root root;\n" if os.geteuid() == 0 else ""
        temp = "".join(f"  {kind}_temp_path {conf_dir}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        with open(os.path.join(conf_dir, "nginx.conf"), "w") as f:
            f.write(
                f"{user}worker_processes 1;\ndaemon off;\nmaster_process on;\npid {conf_dir}/nginx.pid;\n"
                f"error_log {conf_dir}/error.log warn;\nevents {{ worker_connections 256; }}\n"
                f"http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_timeout 65;\n"
                f"  default_type application/octet-stream;\n{temp}"
                f"  server {{\n    listen 127.0.0.1:{port};\n    root {self.www};\n  }}\n}}\n"
            )
        self.nginx = self.children.start("nginx", [
            "nginx", "-p", conf_dir, "-c", os.path.join(conf_dir, "nginx.conf"), "-e", os.path.join(conf_dir, "error.log"),
        ])
        wait_port(port, self.nginx)
        self.url = f"http://127.0.0.1:{port}/{FILE_NAME}"
        req = urllib.request.Request(self.url, method="HEAD")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                length = int(resp.headers["Content-Length"])
        except OSError as e:
            raise RuntimeError(f"nginx does not serve {self.payload} ({e})") from e
        if length != self.size:
            raise RuntimeError(f"nginx serves {length} bytes, not {self.size}")

    @property
    def nginx_pid(self) -> int:
        assert self.nginx is not None
        return self.nginx.pid

    def nginx_pids(self) -> list[int]:
        return [self.nginx_pid, *measure.children_of(self.nginx_pid)]

    def nginx_peak(self) -> float | None:
        """The largest peak RSS among nginx's master and worker."""
        peaks = [p for p in map(peak_rss_mib, self.nginx_pids()) if p is not None]
        return max(peaks) if peaks else None

    # recording

    def role(self, role: str, cpu: float, rss: float | None, **extra: Any) -> dict[str, Any]:
        return {"role": role, "cpuSeconds": round(cpu, 3), "cpuPerGiB": cpu_per_gib(cpu, self.size),
                "peakRssMiB": rss, **extra}

    def add(self, key: str, label: str, fin: measure.Finished, ok: bool, busy: float,
            processes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        seconds = fin.seconds
        record = {
            "key": key, "label": label, "bytes": self.size, "seconds": seconds,
            "MBps": round(self.size / seconds / 1e6, 1) if seconds else None,
            "exit": fin.exit, "ok": bool(ok and fin.ok), "machineBusy": round(busy, 3),
            "processes": processes, **extra,
        }
        self.transfers.append(record)
        rate = f"{record['MBps']} MB/s" if seconds else "no rate"
        say(f"{label}: {seconds} s, {rate}" + ("" if record["ok"] else f" FAILED (exit {fin.exit})"))
        return record

    def timed(self, tag: str, argv: list[str], watch: dict[str, list[int]], **kwargs: Any
              ) -> tuple[measure.Finished, dict[str, float], float]:
        """
        Run C{argv}; the CPU seconds the C{watch} processes used meanwhile; the
        machine's busy share.  First, unless C{--no-warm-memory}, twice the
        file's size written into the workdir and removed: every transfer
        starts on memory the machine has just used (L{measure.warm_memory}).
        """
        if not self.args.no_warm_memory:
            self.warmed[tag] = measure.warm_memory(self.work, min(WARM_COPIES * self.size, WARM_MAX))
        before, m0 = Sample.take(watch), measure.cpu_times()
        fin = self.children.run(tag, argv, self.args.timeout, **kwargs)
        used, m1 = before.until(Sample.take(watch)), measure.cpu_times()
        return fin, used, measure.busy_share(m0, m1)

    # the transfers

    def run_curl(self) -> None:
        if shutil.which("curl") is None:
            self.skipped["curl"] = "curl is not installed (apt-get install curl)"
            return
        for key, label, target in (("curl-devnull", "curl: nginx -> /dev/null", os.devnull),
                                   ("curl-file", "curl: nginx -> file", os.path.join(self.work, "curl.out"))):
            os.sync()
            fin, used, busy = self.timed(key, ["curl", "-sS", "--fail", "-o", target, self.url],
                                         {"nginx": self.nginx_pids()})
            ok = True
            if target != os.devnull:
                ok = os.path.getsize(target) == self.size and sha256_file(target) == self.want
                os.unlink(target)
            self.add(key, label, fin, ok, busy, [
                self.role("curl", fin.cpu, fin.max_rss_mib),
                self.role("nginx", used["nginx"], self.nginx_peak()),
            ], sha256Ok=ok if target != os.devnull else None)

    def run_dragonfly(self) -> None:
        twistd = os.path.join(BIN, "twistd")
        dfget = os.path.join(BIN, "dfget")
        if not os.path.exists(dfget):
            dfget = shutil.which("dfget") or dfget
        rdir = os.path.join(self.work, "dragonfly")
        sn_home = os.path.join(rdir, "supernode")
        os.makedirs(sn_home)
        # --sn-cprofile: the SuperNode under bench.cprofiled, its reactor thread profiled during the first fetch
        head = [sys.executable, "-m", "bench.cprofiled", self.args.sn_cprofile] if self.args.sn_cprofile else [twistd]
        sn = self.children.start("supernode", [
            *head, "-n", "--pidfile=", "supernode", "--port", "0", "--block-port", "0", "--listen", "127.0.0.1",
            "--advertise-ip", "127.0.0.1", "--home", sn_home, "--piece-size", self.args.piece_size,
            *shlex.split(self.args.supernode_args),
        ], cwd=rdir)
        sn_port = wait_for_file(os.path.join(sn_home, "supernode.json"), 60, sn)["port"]
        sn_ab = self.args.sn_ab_vars
        sns = {"A": sn}
        ports = {"A": sn_port}
        if sn_ab:  # a second SuperNode with the variables, for its own peer A2
            os.makedirs(sn_home + "2")
            sns["A2"] = self.children.start("supernode2", [
                twistd, "-n", "--pidfile=", "supernode", "--port", "0", "--block-port", "0", "--listen", "127.0.0.1",
                "--advertise-ip", "127.0.0.1", "--home", sn_home + "2", "--piece-size", self.args.piece_size,
                *shlex.split(self.args.supernode_args),
            ], cwd=rdir, env={**os.environ, **sn_ab})
            ports["A2"] = wait_for_file(os.path.join(sn_home + "2", "supernode.json"), 60, sns["A2"])["port"]
        peers: dict[str, subprocess.Popen] = {}
        apis: dict[str, str] = {}
        ab = self.args.ab_vars
        homes = {name: os.path.join(rdir, f"peer{name}")
                 for name in ("A", "B", *(["C"] if ab else []), *(["A2"] if sn_ab else []))}
        for name, home in homes.items():
            os.makedirs(home)
            peers[name] = self.children.start(f"dfpeer{name}", [
                twistd, "-n", "--pidfile=", "dfpeer", "--supernode", f"127.0.0.1:{ports.get(name, sn_port)}",
                "--home", home, "--ip", "127.0.0.1", "--listen", "127.0.0.1", "--port", "0",
                *shlex.split(self.args.peer_args),
            ], cwd=rdir, env={**os.environ, **ab} if name == "C" else None)
        for name, home in homes.items():
            apis[name] = wait_for_file(os.path.join(home, "peer.json"), 60, peers[name])["api"]
        relays = {name: FirstRequestRelay(("127.0.0.1", int(api.rsplit(":", 1)[1]))) for name, api in apis.items()}
        try:
            shadows = {name: shadow_home(homes[name], relays[name].url, os.path.join(rdir, f"dfget{name}"))
                       for name in homes}
            measure.wait_idle([*(s.pid for s in sns.values()), *(p.pid for p in peers.values())])
            out = os.path.join(rdir, "out")
            os.makedirs(out)
            watch = {"supernode": [sn.pid], **{name: [p.pid] for name, p in peers.items()}, "nginx": self.nginx_pids()}
            if sn_ab:
                watch["supernode2"] = [sns["A2"].pid]

            def dfget_argv(name: str, output: str) -> list[str]:
                return [dfget, "-u", self.url, "-o", output, "--home", shadows[name],
                        "--node", f"127.0.0.1:{ports.get(name, sn_port)}", "--no-progress",
                        "--timeout", f"{self.args.timeout:.0f}s"]

            def transfer(name: str) -> tuple[measure.Finished, dict[str, float], float, bool, dict[str, Any]]:
                os.sync()
                if name not in ("A", "A2"):
                    # A's pieces as after its own download (written with O_DIRECT, not in memory), for B
                    # and C alike: the one that went second found them in the page cache (--ab-env)
                    evict_files(homes["A"])
                relays[name].reset()
                output = os.path.join(out, f"peer{name}.bin")
                pid = peers[name].pid
                threads0 = thread_times(pid)
                uploader = peers["A"].pid if name not in ("A", "A2") else None
                up0 = thread_times(uploader) if uploader is not None else None
                supernode = sns.get(name)
                sn_threads0 = thread_times(supernode.pid) if supernode is not None else None
                if supernode is not None:
                    spy = self.spy(supernode.pid, f"supernode-{name}", native=self.args.profile_native)
                else:
                    spy = self.spy(pid, f"peer{name}")
                up_spy = self.spy(uploader, f"uploader-{name}") if uploader is not None else None
                profiled = self.args.sn_cprofile and name == "A"
                if profiled:
                    os.kill(sn.pid, signal.SIGUSR1)
                fin, used, busy = self.timed(f"dfget{name}", dfget_argv(name, output), watch)
                if profiled:
                    os.kill(sn.pid, signal.SIGUSR2)
                threads = thread_delta(threads0, thread_times(pid), self.size)
                up = thread_delta(up0, thread_times(uploader), self.size) if uploader is not None and up0 else None
                self.unspy(spy)
                self.unspy(up_spy)
                ok = fin.ok and os.path.isfile(output) and sha256_file(output) == self.want
                task = self.peer_task(apis[name])
                started = self.first_request(relays[name], fin)
                extra = {"sha256Ok": ok, "firstRequestSeconds": started["any"], "askSeconds": started["ask"],
                         "dfgetCpuSeconds": fin.cpu, "sources": task.get("traffic", {}), "receiverThreads": threads}
                if up is not None:
                    extra["uploaderThreads"] = up
                if supernode is not None and sn_threads0 is not None:
                    extra["supernodeThreads"] = thread_delta(sn_threads0, thread_times(supernode.pid), self.size)
                if task.get("elapsed"):
                    extra["peerSeconds"] = round(task["elapsed"], 3)
                    extra["peerMBps"] = round(self.size / task["elapsed"] / 1e6, 1)
                return fin, used, busy, ok, extra

            firsts = ["A", "A2"] if sn_ab else ["A"]
            if self.args.sn_ab_first:
                firsts.reverse()
            for name in firsts:
                say(f"origin -> SuperNode -> peer {name}")
                fin, used, busy, ok_name, extra = transfer(name)
                sn_key = "supernode" if name == "A" else "supernode2"
                seed_a = self.seed_bytes(ports[name])
                env = "" if name == "A" else " (" + ", ".join(f"{k}={v}" for k, v in sn_ab.items()) + ")"
                self.add("origin-supernode-peer" if name == "A" else "origin-supernode-peer-ab",
                         f"Dragonfly: nginx -> SuperNode{env} -> peer {name}", fin, ok_name, busy, [
                    self.role("SuperNode (fetch, hash, write, seed)", used[sn_key], peak_rss_mib(sns[name].pid)),
                    self.role(f"receiving dfpeer ({name})", used[name], peak_rss_mib(peers[name].pid)),
                    self.role(f"dfget ({name})", fin.cpu, fin.max_rss_mib),
                    self.role("nginx", used["nginx"], self.nginx_peak()),
                ], supernodeSeedBytes=seed_a, **extra)
                if name == "A":
                    ok = ok_name
            if sn_ab:  # A2 and its SuperNode are done: the peer -> peer part is as without them
                self.children.stop([peers.pop("A2"), sns.pop("A2")])
            if not ok:
                self.skipped["peer-peer"] = "the first download failed"
                return

            order = ["B", "C"] if ab else ["B"]
            if self.args.ab_first:
                order.reverse()
            for k, name in enumerate(order):
                if k:  # the next one downloads from A (and the seed) only
                    self.children.stop([peers[order[k - 1]]])
                say(f"peer A -> peer {name}")
                seed_before = self.seed_bytes(sn_port)
                fin, used, busy, ok, extra = transfer(name)
                seed_now = self.seed_bytes(sn_port)
                seed_b = None if seed_now is None or seed_before is None else seed_now - seed_before
                env = "" if name != "C" else " (" + ", ".join(f"{k}={v}" for k, v in ab.items()) + ")"
                self.add("peer-peer" if name == "B" else "peer-peer-ab", f"Dragonfly: peer A (+ seed) -> peer {name}{env}",
                         fin, ok, busy, [
                    self.role(f"receiving dfpeer ({name})", used[name], peak_rss_mib(peers[name].pid)),
                    self.role("uploading dfpeer (A)", used["A"], peak_rss_mib(peers["A"].pid)),
                    self.role("SuperNode (seed)", used["supernode"], peak_rss_mib(sn.pid)),
                    self.role(f"dfget ({name})", fin.cpu, fin.max_rss_mib),
                ], supernodeSeedBytes=seed_b, **extra)
            last = order[-1]
            self.dfget_startup(dfget_argv(last, os.path.join(out, "again.bin")), relays[last])
        finally:
            for relay in relays.values():
                relay.close()
            for name in homes:  # a dfpeer dfget may have started itself, had the relay failed
                with contextlib.suppress(OSError, ValueError), \
                        open(os.path.join(rdir, f"dfget{name}", "dfpeer.pid")) as f:
                    os.kill(int(f.read().strip()), signal.SIGTERM)
            self.children.stop([*sns.values(), *peers.values()])
            shutil.rmtree(rdir, ignore_errors=True)  # three copies of the file: free the disk for what follows

    def spy(self, pid: int, name: str, native: bool = False) -> subprocess.Popen | None:
        """
        With --profile: py-spy on C{pid} (all threads; --nonblocking: no stop
        per sample, or C{native}: C frames too, stopping it per sample) until L{unspy}.
        """
        spy = shutil.which("py-spy", path=BIN + os.pathsep + os.environ.get("PATH", ""))
        if not self.args.profile or spy is None:
            return None
        os.makedirs(self.args.profile, exist_ok=True)
        out = os.path.join(self.args.profile, f"spy-{name}.txt")
        proc = self.children.start(f"py-spy-{name}", [spy, "record", "-r", "200", "-p", str(pid), "--format", "raw",
                                                      "--native" if native else "--nonblocking", "-o", out])
        time.sleep(0.5)
        return proc

    def unspy(self, proc: subprocess.Popen | None) -> None:
        if proc is None:
            return
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        self.children.stop([proc])
        from .profile import top

        spies = sorted(p for p in glob.glob(os.path.join(self.args.profile, "spy-*.txt")) if not p.endswith("-top.txt"))
        for path in spies:
            with open(path[:-4] + "-top.txt", "w") as f:
                f.write(top([path]))

    @staticmethod
    def first_request(relay: FirstRequestRelay, fin: measure.Finished) -> dict[str, float | None]:
        """Seconds from dfget's start to its first request (C{any}) and to its request for the file (C{ask})."""
        if relay.first is None:
            say("the relay saw no request: dfget did not use the local API address of peer.json; start-up not measured")
        return {key: None if at is None else round(at - fin.started, 4)
                for key, at in (("any", relay.first), ("ask", relay.ask))}

    def dfget_startup(self, argv: list[str], relay: FirstRequestRelay) -> None:
        """dfget of the finished file a few times: start to first request; then once under -X importtime."""
        firsts: list[float] = []
        asks: list[float] = []
        walls: list[float] = []
        for i in range(self.args.startup_runs):
            relay.reset()
            fin = self.children.run(f"dfget-startup{i}", argv, 60)
            if not fin.ok:
                continue
            got = self.first_request(relay, fin)
            if got["any"] is not None and fin.seconds is not None:
                firsts.append(got["any"])
                walls.append(fin.seconds)
            if got["ask"] is not None:
                asks.append(got["ask"])
            with contextlib.suppress(OSError):
                os.unlink(argv[argv.index("-o") + 1])
        log = os.path.join(self.work, "logs", "dfget-importtime.log")
        if os.path.exists(log):
            os.unlink(log)
        relay.reset()
        fin = self.children.run("dfget-importtime", argv, 60, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
        with open(log, errors="replace") as f:
            imports = parse_importtime(f.read())
        imports["askSeconds"] = self.first_request(relay, fin)["ask"] if fin.ok else None
        with contextlib.suppress(OSError):
            os.unlink(argv[argv.index("-o") + 1])
        python = []
        for i in range(3):
            python.append(self.children.run(f"python-startup{i}", [sys.executable, "-I", "-c", "pass"], 30).seconds)
        self.dfget = {
            "firstRequestSeconds": firsts,
            "firstRequestMedian": round(statistics.median(firsts), 4) if firsts else None,
            "askSeconds": asks,
            "askMedian": round(statistics.median(asks), 4) if asks else None,
            "wallSeconds": walls,
            "importtime": imports,
            "pythonStartSeconds": round(min(s for s in python if s is not None), 4) if any(python) else None,
        }
        say(f"dfget start-up: asks for the file after {self.dfget['askMedian']} s (median of {len(asks)}), "
            f"imports {imports['totalSeconds']} s in {imports['modules']} modules")

    def peer_task(self, api: str) -> dict[str, Any]:
        """The dfpeer's view of the payload's task (its traffic by source, its own elapsed time)."""
        try:
            tasks = get_json(f"{api}/api/v1/tasks").get("tasks", [])
        except (OSError, ValueError) as e:
            say(f"cannot read {api}/api/v1/tasks: {e}")
            return {}
        mine = [t for t in tasks if t.get("url") == self.url]
        return mine[-1] if mine else {}

    @staticmethod
    def seed_bytes(port: int) -> int | None:
        try:
            tasks = get_json(f"http://127.0.0.1:{port}/api/v1/tasks").get("tasks", [])
        except (OSError, ValueError):
            return None
        return sum(int(t.get("seedBytes", 0)) for t in tasks)

    def run_bittorrent(self) -> None:
        reason = bittorrent.unavailable()
        if reason:
            self.skipped["bittorrent"] = reason
            say(f"BitTorrent skipped: {reason}")
            return
        rdir = os.path.join(self.work, "bittorrent")
        out = os.path.join(rdir, "out")
        os.makedirs(out)
        port, udp = free_port(), free_port()
        announce = f"http://127.0.0.1:{port}/announce"
        torrent = os.path.join(rdir, "payload.torrent")
        ih = bittorrent.make_torrent(self.payload, announce, torrent, self.args.bt_exponent)
        tracker = self.children.start("opentracker", bittorrent.tracker_argv(
            "127.0.0.1", port, udp, os.path.join(rdir, "tracker"), [ih]))
        seed = None
        try:
            wait_port(port, tracker)
            seed = self.children.start("aria2c-seed", bittorrent.aria2_argv(
                torrent, self.www, "127.0.0.1", free_port(), seed=True, stop_with=os.getpid()))
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(OSError, ValueError), \
                        urllib.request.urlopen(bittorrent.scrape_url(announce, ih), timeout=5) as resp:
                    if bittorrent.seeders(resp.read(), ih) >= 1:
                        break
                if seed.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the aria2c seed did not announce itself to opentracker (see its log)")
                time.sleep(0.2)
            measure.wait_idle([seed.pid, tracker.pid])
            os.sync()
            fin, used, busy = self.timed("aria2c-leech", bittorrent.aria2_argv(
                torrent, out, "127.0.0.1", free_port(), exit_when_done=True, stop_with=os.getpid()),
                {"seed": [seed.pid], "tracker": [tracker.pid]})
            got = os.path.join(out, FILE_NAME)
            ok = fin.ok and os.path.isfile(got) and sha256_file(got) == self.want
            self.add("bittorrent", "BitTorrent: aria2c seed -> aria2c", fin, ok, busy, [
                self.role("aria2c leecher", fin.cpu, fin.max_rss_mib),
                self.role("aria2c seed", used["seed"], peak_rss_mib(seed.pid)),
                self.role("opentracker", used["tracker"], peak_rss_mib(tracker.pid)),
            ], sha256Ok=ok, pieceBytes=1 << (self.args.bt_exponent or bittorrent.piece_exponent(self.size)))
        finally:
            self.children.stop([p for p in (seed, tracker) if p is not None])
            shutil.rmtree(out, ignore_errors=True)

    def run(self) -> dict[str, Any]:
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        load = measure.load_average()
        self.make_file()
        self.start_nginx()
        parts = self.args.part_set
        if "curl" in parts:
            self.run_curl()
        if "dragonfly" in parts:
            self.run_dragonfly()
        if "bittorrent" in parts:
            self.run_bittorrent()
        # after the transfers (before, its pages, freed, would have been the SuperNode's cheap
        # ones): what new page-cache pages cost this machine (the SuperNode's fetch writes through
        # the page cache, and on a VM that gives free pages back to its host that cost varies
        # tenfold from hour to hour)
        page_cache = measure.page_cache_write_cost(self.work, size=min(self.size, measure.GIB))
        record = {
            "size": self.size, "label": size_label(self.size), "at": started,
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                        "dragonfly": git_version(), "loadBefore": round(load, 2),
                        "loadAfter": round(measure.load_average(), 2),
                        "pageCacheWriteCpuPerGiB": page_cache, "freePageReporting": measure.free_page_reporting(),
                        "memoryWarmCpuPerGiB": self.warmed},
            "workdir": "tmpfs" if self.work.startswith("/dev/shm") else "disk",
            "transfers": self.transfers, "dfget": self.dfget, "skipped": self.skipped,
        }
        record["ok"] = all(t["ok"] for t in self.transfers) and bool(self.transfers)
        record["targets"] = check_targets(record)
        return record


# -- targets and tables ------------------------------------------------------------


def _transfer(record: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((t for t in record["transfers"] if t["key"] == key), None)


def _process(transfer: dict[str, Any] | None, prefix: str) -> dict[str, Any] | None:
    if transfer is None:
        return None
    return next((p for p in transfer["processes"] if p["role"].startswith(prefix)), None)


def check_targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 11's Targets 1 and 2 against this run (None: not measured in it)."""
    p2p, first = _transfer(record, "peer-peer"), _transfer(record, "origin-supernode-peer")
    rows = []

    def row(name: str, target: str, value: Any, met: bool | None) -> None:
        rows.append({"target": name, "goal": target, "measured": value, "met": met})

    for name, t, goal in (("peer -> peer", p2p, TARGETS["peerToPeerGBps"]),
                          ("origin -> SuperNode -> first peer", first, TARGETS["originToPeerGBps"])):
        rate = round(t["MBps"] / 1000, 3) if t and t["MBps"] else None
        row(name, f">= {goal} GB/s (dfget wall time)", rate, None if rate is None else rate >= goal)
    for name, proc, goal in (
        ("receiving dfpeer CPU s/GiB", _process(p2p, "receiving"), TARGETS["receivingPeerCpuPerGiB"]),
        ("uploading dfpeer CPU s/GiB", _process(p2p, "uploading"), TARGETS["uploadingPeerCpuPerGiB"]),
        ("SuperNode CPU s/GiB", _process(first, "SuperNode"), TARGETS["supernodeCpuPerGiB"]),
    ):
        value = proc["cpuPerGiB"] if proc else None
        row(name, f"<= {goal}", value, None if value is None else value <= goal)
    peaks = [p["peakRssMiB"] for t in (first, p2p) if t for p in t["processes"]
             if ("dfpeer" in p["role"] or "SuperNode" in p["role"]) and p["peakRssMiB"] is not None]
    peak = max(peaks) if peaks else None
    goal = TARGETS["peakRssMiB4G"]
    row("peak RSS of dfpeers and SuperNode", f"<= {goal} MiB with a 4 GiB file", peak,
        None if peak is None or record["size"] < 4 * GIB else peak <= goal)
    fr = (record.get("dfget") or {}).get("askMedian")
    goal = TARGETS["dfgetFirstRequestSeconds"]
    row("dfget asks its dfpeer for the file", f"within {goal} s of process start", fr, None if fr is None else fr <= goal)
    return rows


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def _thread_lines(transfers: list[dict[str, Any]], key: str, intro: str, other: str) -> list[str]:
    """The markdown lines of one process's thread clocks (C{key}) over the transfers that have them."""
    rows = [t for t in transfers if t.get(key)]
    if not rows:
        return []
    out = ["", intro, ""]
    for t in rows:
        th = t[key]
        out.append(f"- {t['label']}: reactor {th['reactorUser']:.2f} + {th['reactorSystem']:.2f}, "
                   f"{th['reactorWakeups']:.0f} wake-ups; {other} {th['otherUser']:.2f} + {th['otherSystem']:.2f}")
    return out


def _page_cache_line(machine: dict[str, Any]) -> str:
    """What writing through the page cache cost before each transfer and after the run (older runs: nothing)."""
    out = ""
    warmed = machine.get("memoryWarmCpuPerGiB")
    if warmed:
        out += (" Before each transfer twice the file's size was written into the workdir and removed, so that none"
                " paid for memory the machine had given back (CPU s/GiB: "
                + ", ".join(f"{tag} {cost:.2f}" for tag, cost in warmed.items()) + ").")
    costs = machine.get("pageCacheWriteCpuPerGiB")
    if costs:
        reporting = {True: "on", False: "off", None: "no balloon device"}[machine.get("freePageReporting")]
        out += (f" Writing up to 1 GiB through the page cache after the run cost {' then '.join(f'{c:.2f}' for c in costs)}"
                f" CPU s/GiB (free page reporting to the VM's host: {reporting}).")
    return out


def markdown(results: dict[str, Any]) -> str:
    """All runs of OUT/datapath.json as markdown tables."""
    out = ["<!-- written by python -m bench.datapath; raw data in datapath.json -->", "# Data-path benchmark", ""]
    # the 1 GiB run (issue 11's) first, then the others by size
    for label in sorted(results["runs"], key=lambda k: (results["runs"][k]["size"] != GIB, results["runs"][k]["size"])):
        r = results["runs"][label]
        m = r["machine"]
        out += [
            f"## {human_size(r['size'])} file (code {m['dragonfly']}, {r['at']})", "",
            f"Loopback, nginx origin, files on {r['workdir']}; {m['cpus']} CPUs, load average "
            f"{m['loadBefore']} before and {m['loadAfter']} after the run.{_page_cache_line(m)}", "",
            "| transfer | time (s) | MB/s | in the dfpeer (s) | machine busy | verified |",
            "|---|---|---|---|---|---|",
        ]
        for t in r["transfers"]:
            verified = {True: "yes", False: "**NO**", None: "-"}[t.get("sha256Ok")]
            if not t["ok"]:
                verified = f"**FAILED** (exit {t['exit']})"
            out.append(f"| {t['label']} | {_fmt(t['seconds'], '.3f')} | {_fmt(t['MBps'], '.0f')} | "
                       f"{_fmt(t.get('peerSeconds'), '.3f')} | {t['machineBusy']:.0%} | {verified} |")
        out += ["", "| transfer | process | CPU s | CPU s/GiB | peak RSS (MiB) |", "|---|---|---|---|---|"]
        for t in r["transfers"]:
            for p in t["processes"]:
                out.append(f"| {t['key']} | {p['role']} | {p['cpuSeconds']:.2f} | {_fmt(p['cpuPerGiB'], '.2f')} | "
                           f"{_fmt(p['peakRssMiB'])} |")
        sources = [t for t in r["transfers"] if t.get("sources")]
        if sources:
            out += ["", "Where the bytes came from (the receiving dfpeer's counters, MiB):", ""]
            for t in sources:
                s = t["sources"]
                seed = t.get("supernodeSeedBytes")
                out.append(f"- {t['label']}: " + ", ".join(f"{k} {v / MIB:.1f}" for k, v in sorted(s.items()))
                           + (f"; the SuperNode's seed sent {seed / MIB:.1f}" if seed is not None else ""))
        out += _thread_lines(
            r["transfers"], "receiverThreads",
            "The receiving dfpeer's threads, CPU s/GiB (user + system) and the reactor thread's "
            "voluntary context switches (its sleeps, so its wake-ups):", "other threads (hashing, writing)")
        out += _thread_lines(
            r["transfers"], "uploaderThreads",
            "The uploading dfpeer's (A's) threads during each peer -> peer download, the same way "
            "(the other threads: the pool's reads ahead):", "other threads")
        out += _thread_lines(
            r["transfers"], "supernodeThreads",
            "The SuperNode's threads during its fetch, the same way (the other threads: the pool, "
            "hashing and writing; threads gone by the end are not counted):", "pool")
        d = r.get("dfget") or {}
        if d:
            imp = d.get("importtime", {})
            downloads = [f"{_fmt(t.get('firstRequestSeconds'), '.3f')} / {_fmt(t.get('askSeconds'), '.3f')}"
                         for t in r["transfers"] if "firstRequestSeconds" in t]
            out += [
                "", "dfget start-up, seconds from its process start to its first request to the dfpeer / to its "
                "request for the file (`POST /api/v1/downloads`), seen by a relay in front of the local API:", "",
                f"- the downloads above: {', '.join(downloads)}",
                f"- dfget of the finished file, {len(d.get('askSeconds', []))} runs: first request "
                f"{', '.join(format(x, '.3f') for x in d.get('firstRequestSeconds', []))}; asks "
                f"{', '.join(format(x, '.3f') for x in d.get('askSeconds', []))} (median "
                f"{_fmt(d.get('askMedian'), '.3f')}); `python -I -c pass` alone: {_fmt(d.get('pythonStartSeconds'), '.3f')}",
                f"- `python -X importtime`: {_fmt(imp.get('totalSeconds'), '.3f')} s in {imp.get('modules', 0)} modules "
                f"(dragonfly's own modules {_fmt(imp.get('dragonflySelfSeconds'), '.3f')} s); slowest top-level: "
                + ", ".join(f"{n} {s:.3f}" for n, s in imp.get("slowestTopLevel", [])[:4])
                + "; slowest one level down: "
                + ", ".join(f"{n} {s:.3f}" for n, s in imp.get("slowestSecondLevel", [])[:8]),
            ]
        if r.get("skipped"):
            out += [""] + [f"Skipped {k}: {v}." for k, v in r["skipped"].items()]
        out += ["", "| target (issue 11) | goal | measured | met |", "|---|---|---|---|"]
        for t in r["targets"]:
            met = {True: "yes", False: "no", None: "-"}[t["met"]]
            out.append(f"| {t['target']} | {t['goal']} | {_fmt(t['measured'])} | {met} |")
        out.append("")
    return "\n".join(out)


def save(out: str, record: dict[str, Any]) -> None:
    path = os.path.join(out, "datapath.json")
    try:
        with open(path) as f:
            results = json.load(f)
        results.setdefault("runs", {})
    except (OSError, ValueError):
        results = {"benchmark": "bench.datapath", "runs": {}}
    results["runs"][record["label"]] = record
    results["updated"] = record["at"]
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)
    with open(os.path.join(out, "datapath.md"), "w") as f:
        f.write(markdown(results))


def unavailable() -> str | None:
    if shutil.which("nginx") is None:
        return "nginx is not installed (apt-get install nginx)"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = unavailable()
    if reason:
        say(f"cannot run here: {reason}")
        return EXIT_UNAVAILABLE
    base = os.path.abspath(args.workdir) if args.workdir else "/var/tmp"
    record: dict[str, Any] | None = None
    try:
        with SignalGuard(), run_lock():  # SIGTERM/SIGHUP become SystemExit: every finally runs
            sweep_workdirs(base)
            os.makedirs(base, exist_ok=True)
            work = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=base)
            logs = os.path.join(work, "logs")
            os.makedirs(logs)
            try:
                with Children(logs, registry=os.path.join(logs, "pids")) as children:
                    record = DataPath(args, work, children).run()
            finally:
                if args.keep or record is None or not record["ok"]:
                    for entry in os.listdir(work):
                        if entry != "logs":
                            shutil.rmtree(os.path.join(work, entry), ignore_errors=True)
                    say(f"logs kept in {logs}")
                else:
                    shutil.rmtree(work, ignore_errors=True)
    except Busy as e:
        say(str(e))
        return EXIT_BUSY
    except KeyboardInterrupt:
        say("interrupted; every process is stopped")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        say(f"failed: {e}")
        return EXIT_FAILED
    if not args.no_save:
        save(os.path.abspath(args.out), record)
        say(f"results in {os.path.join(os.path.abspath(args.out), 'datapath.md')}")
    if args.json:
        json.dump(record, sys.stdout, indent=1, sort_keys=True)
        print()
    else:
        print(markdown({"runs": {record["label"]: record}}))
    return 0 if record["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

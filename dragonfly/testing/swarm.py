"""
Run a local swarm of real processes on loopback: an origin, a SuperNode and
dfpeers, started the documented way (C{twistd -n ...}, C{dfget}).

Used by the integration tests and C{make demo}.  Blocking code on purpose:
it drives processes, it is not one of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BIN = os.path.dirname(sys.executable)


def _bin(name: str) -> str:
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else name


def wait_for_file(path: str, timeout: float, proc: subprocess.Popen | None = None) -> dict[str, Any]:
    """Wait for a JSON file a process writes once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before writing {path}")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear within {timeout}s")


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_random_file(path: str, size: int) -> str:
    """A file of C{size} random bytes; returns its SHA-256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


@dataclass
class RateMeasurement:
    """
    A transfer's rate over its steady part: the least-squares slope of the
    byte counter against time, between C{skip_start} seconds after the
    first byte and C{skip_end} seconds before the last.
    """

    rate: float  # bytes per second
    seconds: float  # length of the steady window
    nbytes: int  # bytes moved in the window
    total_seconds: float  # first byte to last
    samples: list[tuple[float, int]] = field(repr=False, default_factory=list)

    def within(self, target: float, tolerance: float = 0.10) -> bool:
        return abs(self.rate - target) <= tolerance * target

    def __str__(self) -> str:
        mib = 1 << 20
        return (f"{self.rate / mib:.2f} MiB/s over the steady {self.seconds:.2f} s "
                f"({self.nbytes / mib:.1f} MiB; whole transfer {self.total_seconds:.2f} s)")


def measure_rate(
    read: Callable[[], int],
    total: int,
    timeout: float = 60.0,
    interval: float = 0.1,
    skip_start: float = 1.0,
    skip_end: float = 0.5,
) -> RateMeasurement:
    """
    Sample the byte counter C{read()} (0 while the transfer has not begun)
    until it reaches C{total}, and measure the steady rate.  Each sample is
    stamped at the middle of its read, so a slow read does not skew it.
    """
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    while True:
        before = time.monotonic()
        n = read()
        now = (before + time.monotonic()) / 2
        samples.append((now, n))
        if n >= total:
            break
        if now > deadline:
            raise TimeoutError(f"counter at {n} of {total} bytes after {timeout}s")
        time.sleep(interval)
    moving = [i for i, (_, n) in enumerate(samples) if n > 0]
    # the transfer began between the last zero sample and the first non-zero one
    first = moving[0]
    start = (samples[first - 1][0] + samples[first][0]) / 2 if first > 0 else samples[first][0]
    end = next(t for t, n in samples if n >= total)
    window = [(t, n) for t, n in samples if start + skip_start <= t <= end - skip_end]
    if len(window) < 10:
        raise ValueError(f"a transfer of {end - start:.2f}s leaves too few samples to measure; make it longer")
    mt = sum(t for t, _ in window) / len(window)
    mn = sum(n for _, n in window) / len(window)
    slope = sum((t - mt) * (n - mn) for t, n in window) / sum((t - mt) ** 2 for t, _ in window)
    return RateMeasurement(
        rate=slope, seconds=window[-1][0] - window[0][0], nbytes=window[-1][1] - window[0][1],
        total_seconds=end - start, samples=samples,
    )


class Swarm:
    """A directory with the homes and logs of one local swarm."""

    def __init__(self, workdir: str, twistd_args: tuple[str, ...] = ()) -> None:
        """
        @param twistd_args: options for twistd itself, before the program's
            name (e.g. C{--logger=dragonfly.core.logs.json_stdout}).
        """
        self.twistd_args = tuple(twistd_args)
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.origin_url = ""
        self.supernode_api = ""
        self.supernode_addr = ""
        self.peers: dict[str, dict[str, Any]] = {}

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir)
        log.close()
        self.procs.append((name, proc))
        return proc

    def start_origin(self, root: str) -> str:
        info = os.path.join(self.workdir, "origin.json")
        proc = self._spawn("origin", [sys.executable, "-m", "dragonfly.testing.origin", "--root", root, "--info", info])
        port = wait_for_file(info, 20, proc)["port"]
        self.origin_url = f"http://127.0.0.1:{port}"
        return self.origin_url

    def start_supernode(self, *extra: str) -> str:
        home = os.path.join(self.workdir, "supernode")
        os.makedirs(home, exist_ok=True)
        info_path = os.path.join(home, "supernode.json")
        if os.path.exists(info_path):
            os.unlink(info_path)
        proc = self._spawn(
            "supernode",
            [_bin("twistd"), "-n", "--pidfile=", *self.twistd_args, "supernode", "--port", "0", "--block-port", "0",
             "--listen", "127.0.0.1", "--home", home, *extra],
        )
        info = wait_for_file(info_path, 30, proc)
        self.supernode_addr = f"127.0.0.1:{info['port']}"
        self.supernode_api = f"http://{self.supernode_addr}"
        return self.supernode_addr

    def start_peer(
        self, name: str, *extra: str, liar: bool = False, silent: bool = False, home: str | None = None
    ) -> dict[str, Any]:
        """
        A dfpeer; with C{liar}, one that corrupts every piece it serves, with
        C{silent} one that never answers a request (L{dragonfly.testing.liar}).
        """
        home = home or os.path.join(self.workdir, name)
        os.makedirs(home, exist_ok=True)
        if liar or silent:
            program = [sys.executable, "-m", "dragonfly.testing.liar", *(["--silent"] if silent else [])]
        else:
            program = [_bin("twistd"), "-n", "--pidfile=", *self.twistd_args, "dfpeer"]
        proc = self._spawn(
            name,
            [*program, "--supernode", self.supernode_addr,
             "--home", home, "--listen", "127.0.0.1", "--ip", "127.0.0.1", *extra],
        )
        info = wait_for_file(os.path.join(home, "peer.json"), 30, proc)
        info["home"] = home
        info["proc"] = proc
        self.peers[name] = info
        return info

    def start_dfdaemon(self, name: str, home: str, *extra: str) -> str:
        """A C{twistd dfdaemon} on a free loopback port for C{home}; its base URL."""
        info_path = os.path.join(home, "dfdaemon.json")
        if os.path.exists(info_path):
            os.unlink(info_path)
        proc = self._spawn(
            name,
            [_bin("twistd"), "-n", "--pidfile=", "dfdaemon", "--port", "0", "--home", home,
             "--supernode", self.supernode_addr, *extra],
        )
        info = wait_for_file(info_path, 30, proc)
        return f"http://127.0.0.1:{info['port']}"

    def start_all(self, root: str, peers: int, *supernode_args: str) -> list[str]:
        """An origin serving C{root}, a SuperNode and C{peers} dfpeers named p0, p1, ...; their names."""
        self.start_origin(root)
        self.start_supernode(*supernode_args)
        names = [f"p{i}" for i in range(peers)]
        for name in names:
            self.start_peer(name)
        return names

    def dfget(self, url: str, output: str, peer: str | None = None, *extra: str) -> subprocess.Popen:
        """Start dfget (using C{peer}'s home when given)."""
        home = self.peers[peer]["home"] if peer else os.path.join(self.workdir, "dfget-home")
        cmd = [_bin("dfget"), "-u", url, "-o", output, "--home", home, "--no-progress", *extra]
        if self.supernode_addr and "--node" not in extra:
            cmd += ["--node", self.supernode_addr]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)

    def origin_stats(self) -> dict[str, Any]:
        return get_json(self.origin_url + "/_stats")

    def supernode_task(self, task_id: str) -> dict[str, Any]:
        return get_json(f"{self.supernode_api}/api/v1/tasks/{task_id}")

    def metrics(self, peer: str | None = None) -> dict[tuple[str, frozenset], float]:
        """The Prometheus samples of a peer's local API (or the SuperNode's): (name, labels) to value."""
        from prometheus_client.parser import text_string_to_metric_families

        base = self.peers[peer]["api"] if peer else self.supernode_api
        with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def peer_tasks(self, peer: str) -> list[dict[str, Any]]:
        return get_json(self.peers[peer]["api"] + "/api/v1/tasks")["tasks"]

    def peer_task(self, peer: str, url: str) -> dict[str, Any] | None:
        """The peer's newest task for C{url}, or None."""
        tasks = [t for t in self.peer_tasks(peer) if t["url"] == url]
        return tasks[-1] if tasks else None

    def supernode_tasks(self) -> list[dict[str, Any]]:
        return get_json(f"{self.supernode_api}/api/v1/tasks")["tasks"]

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

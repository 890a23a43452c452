"""
Emulated hosts for the benchmark: one network namespace per host, all on one
Linux bridge, every link shaped with tc.

    with Network() as net:
        origin = net.add_host("origin", up_mbit=160, down_mbit=160)
        proc = net.popen(origin, ["python", "-m", "..."])

Layout: the bridge C{br0} lives in a namespace of its own, C{dfb-core}.  Host
C{X} is the namespace C{dfb-X}; a veth pair joins its C{eth0} to the bridge
port C{v-X}.  Upload is shaped on the egress of C{eth0}, download on the
egress of C{v-X} (an HTB class at the link rate over a byte FIFO that
holds 50 ms of traffic; the kernels here have no fq_codel, netem or sfq).
Every address comes from 198.18.0.0/15 (RFC 2544, for benchmarks) and exists
only inside these namespaces: the root namespace gets no interface, address
or route, so no packet of the benchmark can leave the bridge.  IPv6 is off in
every namespace, so not even link-local chatter appears.

Teardown is the point of this module.  Every process started in a namespace
is stopped, anything else still inside one is killed, and every namespace is
deleted (which destroys its veths, and the bridge with C{dfb-core}): on a
normal exit, on an exception, on SIGINT, SIGTERM or SIGHUP, which are turned
into exceptions while a L{Network} is open and held back while it tears down.
A run that died anyway (SIGKILL, a crash of the machine) leaves C{dfb-*}
namespaces behind: the next run sweeps them before it builds anything (the
processes it started directly got SIGTERM from the kernel when it died).  A
lock file keeps two runs from sweeping each other's namespaces.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .measure import die_with_parent

PREFIX = "dfb-"
CORE_NS = PREFIX + "core"
BRIDGE = "br0"
HOST_DEV = "eth0"
SUBNET = ipaddress.ip_network("198.18.0.0/15")
FIRST_HOST = 10  # hosts get 198.18.0.10, .11, ...
LOCK_PATH = "/run/lock/dfb-bench.lock"
_HOST_NAME = re.compile(r"[a-z][a-z0-9]{0,12}\Z")  # "v-" + name must fit IFNAMSIZ (15)
# veth with GSO hands the qdisc packets of up to 64 KiB: the HTB bucket must
# hold a couple of them or the class stalls below its rate.
_MIN_BURST = 2 * 65536
_BURST_TIME = 0.004  # seconds of traffic at the link rate
# The queue behind the shaper: long enough that many TCP flows with a near-zero
# base RTT (their windows all sit in this queue) do not lose packets and stall
# on retransmit timeouts, short enough to stay far from bufferbloat.
_QUEUE_TIME = 0.05
_MIN_QUEUE = 256 * 1024


class NetemError(RuntimeError):
    """A command that builds or tears down the emulated network failed."""


class Busy(NetemError):
    """Another benchmark run holds the lock (and its C{dfb-*} namespaces)."""


def log(message: str) -> None:
    print(f"netem: {message}", file=sys.stderr, flush=True)


def sh(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run a short command; raise L{NetemError} with its stderr when it fails."""
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise NetemError(f"{' '.join(argv)}: {result.stderr.strip() or f'exit {result.returncode}'}")
    return result


def unavailable() -> str | None:
    """Why this machine cannot run the emulation, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    try:
        sh("ip", "netns", "list")
    except (NetemError, OSError, subprocess.SubprocessError) as e:
        return f"ip netns does not work here: {e}"
    return None


# -- signals -----------------------------------------------------------------------


class SignalGuard:
    """
    While entered (in the main thread), SIGINT raises KeyboardInterrupt and
    SIGTERM/SIGHUP raise SystemExit, so that every C{finally} runs.  Inside
    L{deferred} a signal is only remembered, and raised when the outermost
    deferred block ends: teardown is never cut short half way.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._old: dict[int, Any] = {}
        self._deferring = 0
        self._pending: int | None = None

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self._deferring:
            self._pending = self._pending or signum
            return
        self._raise(signum)

    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            if not self._deferring and self._pending is not None:
                signum, self._pending = self._pending, None
                log(f"got signal {signum} during teardown; stopping now that it is done")
                self._raise(signum)


# -- the lock ------------------------------------------------------------------------

_lock_fd: int | None = None
_lock_depth = 0


@contextlib.contextmanager
def bench_lock(path: str = LOCK_PATH) -> Iterator[None]:
    """
    Exclusive use of the C{dfb-*} namespaces for this process (re-entrant).
    Raises L{Busy} when another live process holds it; the lock dies with its
    holder, so a crashed run never blocks the next one.
    """
    global _lock_fd, _lock_depth
    if _lock_depth == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Busy(f"another benchmark run (pid {holder}) is using the {PREFIX}* namespaces") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _lock_fd = fd
    _lock_depth += 1
    try:
        yield
    finally:
        _lock_depth -= 1
        if _lock_depth == 0 and _lock_fd is not None:
            os.close(_lock_fd)  # releases the flock
            _lock_fd = None


# -- namespaces ----------------------------------------------------------------------


def namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of the existing network namespaces that start with C{prefix}."""
    out = sh("ip", "netns", "list").stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def _pids(netns: str) -> list[int]:
    out = sh("ip", "netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_empty(netns: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _pids(netns)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def delete_namespace(netns: str, grace: float = 5.0) -> None:
    """Kill whatever still runs in C{netns} (TERM, then KILL), then delete it."""
    if not netns.startswith(PREFIX):
        raise ValueError(f"refusing to touch namespace {netns!r}: not one of ours ({PREFIX}*)")
    pids = _pids(netns)
    if pids:
        _signal_all(pids, signal.SIGTERM)
        pids = _wait_empty(netns, grace)
        if pids:
            _signal_all(pids, signal.SIGKILL)
            pids = _wait_empty(netns, 5.0)
            if pids:
                log(f"processes {pids} in {netns} survived SIGKILL")
    sh("ip", "netns", "del", netns, check=False)


def sweep(prefix: str = PREFIX) -> list[str]:
    """Delete every C{prefix}* namespace (left by a run that crashed); their names."""
    stale = namespaces(prefix)
    for netns in stale:
        delete_namespace(netns)
    if stale:
        log(f"removed {len(stale)} stale namespace(s) of an earlier run: {', '.join(stale)}")
    return stale


# -- shaping -------------------------------------------------------------------------


def shape(netns: str, dev: str, mbit: float) -> None:
    """
    Cap the egress of C{dev} in C{netns} at C{mbit} Mbit/s (10^6 bit/s, tc's
    C{mbit}): one HTB class, a byte FIFO of L{_QUEUE_TIME} under it.
    """
    byte_rate = mbit * 1e6 / 8
    burst = max(_MIN_BURST, int(byte_rate * _BURST_TIME))
    queue = max(_MIN_QUEUE, int(byte_rate * _QUEUE_TIME))
    quantum = 60000  # only one class: it just must exceed the MTU and stay below HTB's 200000 warning
    tc = ("tc", "-n", netns)
    sh(*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
    sh(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
       "rate", f"{mbit}mbit", "ceil", f"{mbit}mbit", "burst", str(burst), "cburst", str(burst),
       "quantum", str(quantum))
    sh(*tc, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "bfifo", "limit", str(queue))


# -- the network ---------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One emulated host: its namespace, address and link rates (Mbit/s)."""

    name: str
    netns: str
    ip: str
    up_mbit: float
    down_mbit: float

    @property
    def bridge_port(self) -> str:
        return "v-" + self.name


class Network:
    """
    The bridge and the hosts on it, and every process started inside them.
    A context manager: leaving it (in any way) tears everything down.
    """

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._guard = SignalGuard()
        self._lock: contextlib.ExitStack | None = None

    def __enter__(self) -> Network:
        self._guard.__enter__()
        self._lock = contextlib.ExitStack()
        try:
            self._lock.enter_context(bench_lock())
            sweep()
            self._add_namespace(CORE_NS)
            sh("ip", "-n", CORE_NS, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0")
            sh("ip", "-n", CORE_NS, "link", "set", BRIDGE, "up")
            # bridged frames need not pass the (empty) iptables of dfb-core
            sh("ip", "netns", "exec", CORE_NS, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0",
               "net.bridge.bridge-nf-call-ip6tables=0", "net.bridge.bridge-nf-call-arptables=0", check=False)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # building

    def _add_namespace(self, netns: str) -> None:
        sh("ip", "netns", "add", netns)
        self._namespaces.append(netns)  # from here on teardown knows it
        # no IPv6 at all (no link-local addresses, no router solicitations)
        sh("ip", "netns", "exec", netns, "sysctl", "-q", "-w",
           "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1", check=False)
        sh("ip", "-n", netns, "link", "set", "lo", "up")

    def _next_address(self) -> str:
        ip = SUBNET[FIRST_HOST + len(self.hosts)]
        if ip not in SUBNET or ip == SUBNET.broadcast_address:
            raise NetemError("out of addresses in 198.18.0.0/15")
        return str(ip)

    def add_host(self, name: str, up_mbit: float, down_mbit: float) -> Host:
        """A new namespace C{dfb-NAME} on the bridge, its links shaped."""
        if not _HOST_NAME.match(name) or name == CORE_NS[len(PREFIX):]:
            raise ValueError(f"bad host name {name!r}: lower-case letters and digits, at most 13")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists already")
        host = Host(name, PREFIX + name, self._next_address(), float(up_mbit), float(down_mbit))
        self._add_namespace(host.netns)
        sh("ip", "link", "add", HOST_DEV, "netns", host.netns, "type", "veth",
           "peer", "name", host.bridge_port, "netns", CORE_NS)
        sh("ip", "-n", CORE_NS, "link", "set", host.bridge_port, "master", BRIDGE, "up")
        sh("ip", "-n", host.netns, "addr", "add", f"{host.ip}/{SUBNET.prefixlen}", "dev", HOST_DEV)
        sh("ip", "-n", host.netns, "link", "set", HOST_DEV, "up")
        shape(host.netns, HOST_DEV, host.up_mbit)
        shape(CORE_NS, host.bridge_port, host.down_mbit)
        self.hosts[name] = host
        return host

    # processes

    def popen(self, host: Host, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """
        Start C{argv} inside C{host}; it is stopped at teardown if still
        running, and gets SIGTERM if the benchmark dies (C{ip netns exec}
        execs it in place, so the death signal set here reaches it).
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("preexec_fn", die_with_parent)
        proc = subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, procs: Sequence[subprocess.Popen] | None = None, grace: float = 10.0) -> None:
        """SIGTERM C{procs} (default: all started here), SIGKILL after C{grace}, reap them."""
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
                proc.kill()
                proc.wait()
            with contextlib.suppress(ValueError):
                self._procs.remove(proc)

    def get(self, requests: Sequence[tuple[Host, str]], timeout: float = 15.0) -> list[bytes | None]:
        """
        GET each URL from inside its host (all at once); the bodies, C{None}
        for a request that failed.
        """
        code = ("import sys, urllib.request;"
                f"sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout={timeout!r}).read())")
        procs = [
            subprocess.Popen(["ip", "netns", "exec", host.netns, sys.executable, "-I", "-c", code, url],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for host, url in requests
        ]
        results: list[bytes | None] = []
        for proc, (host, url) in zip(procs, requests):
            try:
                out, err = proc.communicate(timeout=timeout + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            results.append(out if proc.returncode == 0 else None)
            if results[-1] is None:
                log(f"GET {url} in {host.netns} failed: {err.decode(errors='replace').strip()[-300:]}")
        return results

    def get_json(self, requests: Sequence[tuple[Host, str]], timeout: float = 15.0) -> list[Any]:
        """
        GET each URL from inside its host (all at once) and parse the JSON;
        C{None} for a request that failed.
        """
        results: list[Any] = []
        for body, (host, url) in zip(self.get(requests, timeout), requests):
            try:
                results.append(None if body is None else json.loads(body))
            except ValueError:
                log(f"GET {url} in {host.netns}: not JSON")
                results.append(None)
        return results

    def link_counters(self) -> dict[str, dict[str, int]]:
        """
        What the shapers have seen so far, per host: bytes sent up and down
        (on the wire, headers included) and packets their queues dropped.
        """
        def qdiscs(netns: str, *dev: str) -> list[dict[str, Any]]:
            return json.loads(sh("tc", "-s", "-j", "-n", netns, "qdisc", "show", *dev).stdout or "[]")

        def count(entries: list[dict[str, Any]]) -> tuple[int, int]:
            sent = sum(q.get("bytes", 0) for q in entries if q.get("root"))
            dropped = sum(q.get("drops", 0) for q in entries if q.get("kind") == "bfifo")
            return sent, dropped

        core: dict[str, list[dict[str, Any]]] = {}
        for q in qdiscs(CORE_NS):
            core.setdefault(q.get("dev", ""), []).append(q)
        counters = {}
        for name, host in self.hosts.items():
            up, up_drops = count(qdiscs(host.netns, "dev", HOST_DEV))
            down, down_drops = count(core.get(host.bridge_port, []))
            counters[name] = {"upBytes": up, "downBytes": down, "drops": up_drops + down_drops}
        return counters

    # teardown

    def close(self) -> None:
        """Stop every process, delete every namespace; safe to call twice."""
        try:
            with self._guard.deferred():
                try:
                    try:
                        self.stop()
                    except Exception as e:  # the namespaces must go all the same
                        log(f"could not stop every process: {e}")
                    for netns in reversed(self._namespaces):
                        try:
                            delete_namespace(netns)
                        except Exception as e:  # keep going: the others must go too
                            log(f"could not delete {netns}: {e}")
                    self._namespaces.clear()
                    self.hosts.clear()
                    left = namespaces()
                    if left:
                        log(f"namespaces still present after teardown: {', '.join(left)}")
                finally:
                    if self._lock is not None:
                        self._lock.close()
                        self._lock = None
        finally:
            self._guard.__exit__()

"""
The SuperNode killed and restarted mid-fetch, on emulated hosts.

    sudo python -m bench.restart [--peers 6] [--size-mib 48] [--kills 0.3,0.6,0.9] [--no-kill] [--json F] [--doc F]
                                 [--timeline] [--dfpeer-args ARGS] [--supernode-args ARGS] [--fast-watchers]

On the benchmark's namespaces (L{bench.netem}: root, 198.18.0.0/15 only,
everything torn down on any exit) a counting origin, a SuperNode and N
dfpeers (issue 14's setting: 6 peers at 80 Mbit/s, the origin and the
SuperNode at 160 Mbit/s, 48 MiB).  Two runs, each with fresh homes and its
own URL, every dfget started at once:

  - undisturbed;
  - the SuperNode killed with SIGKILL when the origin has sent 30 %, 60 %
    and 90 % of the file's bytes (cumulative, as its C{/_stats} counts them),
    and started again at once on the same home (left out with C{--no-kill}:
    the undisturbed run alone, to look at the swarm's own pace).

Small watcher processes inside the namespaces poll the origin's C{/_stats},
the SuperNode's API port (a bare connect) and C{/healthz}, and each
dfpeer's task list, each sample stamped with the machine's monotonic clock.
Per restart: the downtime from the kill to the new process binding its API
port, to the API answering again, to the first peer and the task
registered again, and to the origin sending again; and the bytes the peers
exchanged among themselves while the SuperNode was down.  Per run: each
dfget's time as x F/B (F/B: the file over a peer's link), the slowest, the
origin's copies (the bytes it handed to its sockets, and the bytes on its
link against the undisturbed run's), and every output's SHA-256; per kill,
where the origin's bytes the resume asked for again were at the kill: in
the origin's socket (sent and not acknowledged, or not sent: read from
C{/proc/PID/net/tcp}), in the SuperNode's (received, not read), and in the
SuperNode's process (read and not on its file: the rest).  The modules are
compiled to bytecode first, as an install does (L{bench.swarm.compile_bytecode}:
without it every restarted SuperNode compiled its imports again, 0.4-0.5 s
at a load average of 6).  With
C{--timeline} the daemons and dfget run with DRAGONFLY_TRACE=1 and each
peer's phases are printed (L{timeline}).  Exit 0 when every output is right, 1 when not,
2 when this machine cannot run it, 75 when another run holds the network.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from dragonfly.core.pieces import swarm_piece_size
from dragonfly.testing.swarm import sha256_file, wait_for_file, write_random_file

from . import netem
from .docblock import write_block
from .measure import load_average
from .swarm import BIN, REPO, compile_bytecode

MiB = 1 << 20
API_PORT, BLOCK_PORT, ORIGIN_PORT = 8002, 8001, 80
EXIT_WRONG, EXIT_UNAVAILABLE, EXIT_BUSY = 1, 2, 75

#: polls C{URL} every C{SECONDS}; prints "MONOTONIC JSON" (JSON null when it does not answer), stamped
#: when the answer came (a request may wait in a listen backlog)
WATCH = """
import json, sys, time, urllib.request
url, every = sys.argv[1], float(sys.argv[2])
while True:
    t = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=2.0) as r:
            line = json.dumps(json.loads(r.read()), separators=(",", ":"))
    except Exception:
        line = "null"
    print(f"{time.monotonic():.4f} {line}", flush=True)  # stamped when the answer came
    time.sleep(max(0.0, every - (time.monotonic() - t)))
"""

#: tries to connect to C{HOST} C{PORT} every C{SECONDS}; prints "MONOTONIC 1" when it could, "MONOTONIC 0" when not
WATCH_PORT = """
import socket, sys, time
host, port, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
while True:
    t = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        up = 1
    except OSError:
        up = 0
    print(f"{t:.4f} {up}", flush=True)
    time.sleep(max(0.0, every - (time.monotonic() - t)))
"""


def data_size(home: str) -> int:
    """The size of the SuperNode's data files under C{home}/repo (the bytes its fetch put on its file)."""
    repo = os.path.join(home, "repo")
    try:
        return sum(os.path.getsize(os.path.join(repo, n)) for n in os.listdir(repo) if n.endswith(".data"))
    except OSError:
        return 0


def say(message: str) -> None:
    print(f"restart: {message}", file=sys.stderr, flush=True)


# -- the pure parts ------------------------------------------------------------------


Samples = list[tuple[float, Any]]


def first_after(samples: Samples, after: float, test: Any) -> float | None:
    """The time of the first sample after C{after} whose value passes C{test}, or None."""
    for t, value in samples:
        if t > after and test(value):
            return t
    return None


def downtime(kill: float, supernode: Samples, origin: Samples, port: Samples | None = None) -> dict[str, float | None]:
    """
    Seconds from the kill at C{kill} to: the API port taking connections
    (C{bound}: the new process has bound it), the API answering (C{api}), a peer
    and a task known to it again (C{peer}, C{task}), the origin sending
    again once the new process had bound its port (C{origin}: it may
    resume its origin fetch before its API answers; with no port samples,
    after the API answered).  Samples: (monotonic time, C{/healthz} or
    C{/_stats} JSON, None when it did not answer).
    """
    bound = first_after(port or [], kill, lambda v: v == 1)
    api = first_after(supernode, kill, lambda v: v is not None)
    peer = first_after(supernode, kill, lambda v: bool(v and v.get("peers")))
    task = first_after(supernode, kill, lambda v: bool(v and v.get("tasks")))
    resumed = None
    back = bound if bound is not None else api
    if back is not None:
        # the killed fetch's last bytes are out by then: the new process asks after its bind
        before = [v["bytesOut"] for t, v in origin if t <= back and v is not None]
        if before:
            resumed = first_after(origin, back, lambda v: v is not None and v["bytesOut"] > before[-1])

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - kill, 3)

    return {"bound": since(bound), "api": since(api), "peer": since(peer), "task": since(task), "origin": since(resumed)}


def tcp_queues(table_text: str, port: int) -> tuple[int, int]:
    """
    The bytes queued on the established TCP connections of a C{/proc/PID/net/tcp}
    table with C{port} at either end: (sent and not acknowledged or not sent
    yet, received and not read yet), summed.
    """
    tx = rx = 0
    for line in table_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5 or fields[3] != "01":  # ESTABLISHED
            continue
        ports = {int(addr.rpartition(":")[2], 16) for addr in fields[1:3]}
        if port in ports:
            queued_tx, _, queued_rx = fields[4].partition(":")
            tx += int(queued_tx, 16)
            rx += int(queued_rx, 16)
    return tx, rx


def read_tcp_queues(pid: int, port: int) -> tuple[int, int] | None:
    """L{tcp_queues} of the network namespace process C{pid} is in (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            return tcp_queues(f.read(), port)
    except OSError:
        return None


def lost_at_kills(kills: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """
    Where the origin's bytes of each kill went that the next fetch asked for
    again.  Each kill: C{handed}, the origin's bytes out for the file from
    the fetch's start to the kill (after it, once its connection was gone),
    C{stored}, the data file's size at the kill, C{originQueued} and
    C{supernodeQueued}, the bytes in the origin's socket (not acknowledged,
    or not sent) and in the SuperNode's (not read) at the kill.  In MiB:
    C{lost} (handed, not on the file), and of it the origin's socket, the
    SuperNode's socket and the rest (in the SuperNode's process, read and
    not written, or handed by the origin after the snapshot).
    """
    out = []
    resumed_from = 0
    for k in kills:
        lost = k["handed"] - (k["stored"] - resumed_from)
        origin_q, sn_q = k.get("originQueued") or 0, k.get("supernodeQueued") or 0
        out.append({
            "lostMiB": round(lost / MiB, 2), "originSocketMiB": round(origin_q / MiB, 2),
            "supernodeSocketMiB": round(sn_q / MiB, 2),
            "restMiB": round((lost - origin_q - sn_q) / MiB, 2),
        })
        resumed_from = k["stored"]
    return out


def value_at(samples: Samples, t: float, key: Any) -> int:
    """C{key(value)} of the last sample at or before C{t} that answered (0 when none)."""
    found = 0
    for when, value in samples:
        if when > t:
            break
        if value is not None:
            found = key(value)
    return found


def peer_bytes(view: Any, url: str) -> int:
    """Bytes the dfpeer's task for C{url} received from other peers (its C{/api/v1/tasks} view)."""
    for task in (view or {}).get("tasks", []):
        if task.get("url") == url:
            return int((task.get("traffic") or {}).get("remote_peer", 0))
    return 0


TRACE_EVENT = re.compile(
    r"(?:dfget trace (?P<dfget>\w+)|trace \w+ (?:(?P<start>start)|piece (?P<index>\d+) (?:from (?P<remote>\S+)|"
    r"(?P<stored>stored))|(?P<sync>sync)\b)[^\n]*?) at (?P<t>\d+\.\d+)"
)


def timeline(supernode_log: str, peers: Sequence[tuple[str, str]], pieces: int, t0: float | None = None) -> dict[str, Any]:
    """
    The phases of one run from its DRAGONFLY_TRACE lines (wall clock), in
    seconds after C{t0} (wall clock; default: the first dfget started): the SuperNode's first and last
    piece stored; per peer (its dfget's log, its dfpeer's log) the dfget
    started, the task started, its first sync answer, its first piece,
    the piece a quarter, half and three quarters in, its last piece, dfget
    done, the pieces from the seed and the mean rate in Mbit/s from the
    first piece to the last.
    """
    stored = [float(m["t"]) for m in TRACE_EVENT.finditer(supernode_log) if m["stored"]]
    rows = []
    for dfget_log, peer_log in peers:
        row: dict[str, Any] = {}
        for m in TRACE_EVENT.finditer(dfget_log):
            row.setdefault(f"dfget_{m['dfget']}", float(m["t"]))
        arrivals: list[float] = []
        seed = 0
        for m in TRACE_EVENT.finditer(peer_log):
            t = float(m["t"])
            if m["start"]:
                row.setdefault("task", t)
            elif m["sync"]:
                row.setdefault("sync", t)
            elif m["remote"]:
                arrivals.append(t)
                seed += m["remote"] == "supernode"
        arrivals.sort()
        if arrivals:
            for name, k in (("first", 1), ("q1", pieces // 4), ("half", pieces // 2), ("q3", 3 * pieces // 4),
                            ("last", len(arrivals))):
                row[name] = arrivals[max(0, min(k, len(arrivals)) - 1)]
        row["seedPieces"] = seed
        rows.append(row)
    if t0 is None:
        starts = [r["dfget_start"] for r in rows if "dfget_start" in r] or stored or [0.0]
        t0 = min(starts)
    out: dict[str, Any] = {"snFirst": None, "snLast": None, "peers": []}
    if stored:
        out["snFirst"], out["snLast"] = round(min(stored) - t0, 3), round(max(stored) - t0, 3)
    for row in rows:
        out["peers"].append({k: round(v - t0, 3) if isinstance(v, float) else v for k, v in row.items()})
    return out


def timeline_table(tl: dict[str, Any], size: int) -> str:
    """The timeline as Markdown: one row per peer (C{exit}: the benchmark saw the dfget exit)."""
    pieces = -(-size // swarm_piece_size(size))
    cols = ["dfget_start", "task", "sync", "first", "q1", "half", "q3", "last", "dfget_done", "exit"]
    lines = [
        f"Seconds after the dfgets were started. SuperNode: first piece stored at {tl['snFirst']} s, last at "
        f"{tl['snLast']} s.",
        "",
        "| peer | " + " | ".join(cols) + " | seed pieces | Mbit/s first to last |",
        "|---" * (len(cols) + 3) + "|",
    ]
    for i, p in enumerate(tl["peers"]):
        span = p.get("last", 0) - p.get("first", 0)
        rate = f"{(pieces - 1) * size / pieces * 8 / span / 1e6:.0f}" if span > 0 and pieces > 1 else "-"
        cells = ["-" if p.get(c) is None else f"{p[c]:.2f}" for c in cols]
        lines.append(f"| {i} | " + " | ".join(cells) + f" | {p.get('seedPieces', 0)} | {rate} |")
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    """The runs side by side, in Markdown."""
    calm, hurt = result["undisturbed"], result["restarts"]
    fb = result["fbSeconds"]

    def times(run: dict[str, Any]) -> str:
        return ", ".join(f"{t:.2f}" for t in sorted(run["xFB"]))

    if hurt is None:  # --no-kill
        return "\n".join([
            (f"`python -m bench.restart --no-kill`: {result['peers']} peers at {result['peerMbit']:g} Mbit/s, origin "
             f"{result['originMbit']:g} Mbit/s, SuperNode {result['supernodeMbit']:g} Mbit/s, {result['sizeMiB']} MiB "
             f"(F/B {fb:.2f} s); load average {result['load'][0]:.1f} before, {result['load'][1]:.1f} after, on "
             f"{os.cpu_count()} cores."),
            "",
            "| | undisturbed |",
            "|---|---|",
            f"| every dfget (x F/B) | {times(calm)} |",
            f"| slowest (x F/B) | {max(calm['xFB']):.2f} |",
            f"| origin copies (bytes it handed to its sockets) | {calm['originCopies']:.3f} |",
            f"| outputs right | {calm['right']}/{calm['peers']} |",
        ])

    downs = hurt.get("kills", [])
    lines = [
        (f"`python -m bench.restart`: {result['peers']} peers at {result['peerMbit']:g} Mbit/s, origin "
         f"{result['originMbit']:g} Mbit/s, SuperNode {result['supernodeMbit']:g} Mbit/s, {result['sizeMiB']} MiB "
         f"(F/B {fb:.2f} s); load average {result['load'][0]:.1f} before, {result['load'][1]:.1f} after, on "
         f"{os.cpu_count()} cores."),
        "",
        "| | undisturbed | SuperNode killed at " + ", ".join(f"{k['at']:.0%}" for k in downs) + " | target |",
        "|---|---|---|---|",
        f"| every dfget (x F/B) | {times(calm)} | {times(hurt)} | |",
        f"| slowest (x F/B) | {max(calm['xFB']):.2f} | {max(hurt['xFB']):.2f} | <= 1.5 |",
        f"| origin copies (bytes it handed to its sockets) | {calm['originCopies']:.3f} | {hurt['originCopies']:.3f} "
        "| <= 1.05 |",
        f"| origin copies on its link (against the undisturbed run) | 1 | {hurt['originWireCopies']:.3f} | <= 1.05 |",
        f"| outputs right | {calm['right']}/{calm['peers']} | {hurt['right']}/{hurt['peers']} | all |",
    ]
    if downs:
        def col(key: str) -> str:
            return ", ".join("-" if k[key] is None else f"{k[key]:.2f}" for k in downs)

        lines += [
            f"| kill to the API port taking connections (s) | | {col('bound')} | |",
            f"| kill to API answering (s) | | {col('api')} | |",
            f"| kill to a peer registered again (s) | | {col('peer')} | |",
            f"| kill to the task registered again (s) | | {col('task')} | |",
            f"| kill to the origin sending again (s) | | {col('origin')} | |",
            "| MiB peers exchanged while it was down (kill to task back) | | "
            + ", ".join(f"{k['peerMiBWhileDown']:.1f}" for k in downs) + " | > 0 |",
        ]
        if all("lostMiB" in k for k in downs):
            lines.append(
                "| MiB the origin handed out and the resume asked for again: in all (in the origin's socket, the "
                "SuperNode's socket, the SuperNode) | | "
                + ", ".join(f"{k['lostMiB']:.1f} ({k['originSocketMiB']:.1f}, {k['supernodeSocketMiB']:.1f}, "
                            f"{k['restMiB']:.1f})" for k in downs) + " | |"
            )
    return "\n".join(lines)


# -- the hosts -----------------------------------------------------------------------


class Watcher:
    """A watcher process in a namespace and the samples it printed (read in a thread)."""

    def __init__(self, net: netem.Network, host: netem.Host, url: str, every: float, script: str = WATCH) -> None:
        self.samples: Samples = []
        args = [url, str(every)] if script is WATCH else [*url.split(":"), str(every)]
        self.proc = net.popen(host, [sys.executable, "-I", "-c", script, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            t, _, body = raw.decode().partition(" ")
            try:
                self.samples.append((float(t), json.loads(body)))
            except ValueError:
                continue

    def last(self) -> Any:
        return self.samples[-1][1] if self.samples else None


class Bench:
    def __init__(self, net: netem.Network, args: argparse.Namespace, workdir: str) -> None:
        self.net, self.args, self.workdir = net, args, workdir
        self.size = args.size_mib * MiB
        self.fb = self.size * 8 / (args.peer_mbit * 1e6)
        self.www = os.path.join(workdir, "www")
        self.logs = os.path.join(workdir, "logs")
        for d in (self.www, self.logs):
            os.makedirs(d)
        self.digest = write_random_file(os.path.join(self.www, "f.bin"), self.size)
        self.origin = net.add_host("origin", args.origin_mbit, args.origin_mbit)
        self.sn = net.add_host("supernode", args.supernode_mbit, args.supernode_mbit)
        self.peers = [net.add_host(f"peer{i}", args.peer_mbit, args.peer_mbit) for i in range(args.peers)]
        self.origin_url = f"http://{self.origin.ip}:{ORIGIN_PORT}"

    def spawn(self, host: netem.Host, tag: str, argv: list[str]) -> subprocess.Popen:
        env = {**os.environ, "DRAGONFLY_TRACE": "1"} if self.args.timeline else None
        with open(os.path.join(self.logs, f"{tag}.log"), "ab") as log:
            return self.net.popen(host, argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def start_origin(self) -> None:
        info = os.path.join(self.workdir, "origin.json")
        proc = self.spawn(self.origin, "origin", [
            sys.executable, "-m", "dragonfly.testing.origin", "--root", self.www,
            "--port", str(ORIGIN_PORT), "--interface", self.origin.ip, "--info", info,
        ])
        wait_for_file(info, 30, proc)
        self.origin_proc = proc

    def supernode(self, home: str, tag: str) -> subprocess.Popen:
        return self.spawn(self.sn, tag, [
            os.path.join(BIN, "twistd"), "-n", "--pidfile=", "supernode", "--port", str(API_PORT),
            "--block-port", str(BLOCK_PORT), "--listen", self.sn.ip, "--advertise-ip", self.sn.ip,
            "--home", home, *self.args.supernode_args.split(),
        ])

    def run(self, name: str, kills: Sequence[float]) -> dict[str, Any]:
        """One run on fresh homes: the dfgets at once, the SuperNode killed at each share of C{kills}."""
        say(f"run {name}" + (f": kills at {', '.join(f'{k:.0%}' for k in kills)}" if kills else ""))
        rdir = os.path.join(self.workdir, name)
        sn_home = os.path.join(rdir, "supernode")
        homes = [os.path.join(rdir, p.name) for p in self.peers]
        for d in (sn_home, *homes):
            os.makedirs(d)
        started: list[subprocess.Popen] = []
        try:
            sn = self.supernode(sn_home, f"{name}-supernode")
            started.append(sn)
            wait_for_file(os.path.join(sn_home, "supernode.json"), 60, sn)
            for peer, home in zip(self.peers, homes):
                started.append(self.spawn(peer, f"{name}-{peer.name}", [
                    os.path.join(BIN, "twistd"), "-n", "--pidfile=", "dfpeer", "--supernode", f"{self.sn.ip}:{API_PORT}",
                    "--home", home, "--ip", peer.ip, "--listen", peer.ip, "--port", str(BLOCK_PORT),
                    *self.args.dfpeer_args.split(),
                ]))
            apis = [wait_for_file(os.path.join(home, "peer.json"), 60, proc)["api"]
                    for home, proc in zip(homes, started[1:])]
            # a run without kills needs no fine samples: polling the SuperNode every 10 ms and
            # the origin every 20 ms took CPU from the swarm it measures (--fast-watchers: as with kills)
            slow = 1 if kills or self.args.fast_watchers else 25
            watchers = [
                Watcher(self.net, self.origin, f"{self.origin_url}/_stats", 0.02 * slow),
                Watcher(self.net, self.sn, f"http://{self.sn.ip}:{API_PORT}/healthz", 0.02 * slow),
                Watcher(self.net, self.sn, f"{self.sn.ip}:{API_PORT}", 0.01 * slow, WATCH_PORT),
                *(Watcher(self.net, p, f"{api}/api/v1/tasks", 0.1 * slow) for p, api in zip(self.peers, apis)),
            ]
            started += [w.proc for w in watchers]
            origin_w, sn_w, port_w, peer_ws = watchers[0], watchers[1], watchers[2], watchers[3:]
            deadline = time.monotonic() + 10
            while any(w.last() is None for w in watchers) and time.monotonic() < deadline:
                time.sleep(0.05)
            before = int((origin_w.last() or {}).get("bytesOut", 0))
            wire_before = self.net.link_counters()["origin"]["upBytes"]
            url = f"{self.origin_url}/f.bin?run={name}"
            outputs = [os.path.join(rdir, f"{p.name}.out") for p in self.peers]
            t0, self.wall0 = time.monotonic(), time.time()
            dfgets = [
                self.spawn(p, f"{name}-dfget-{p.name}", [
                    os.path.join(BIN, "dfget"), "-u", url, "-o", out, "--home", home,
                    "--node", f"{self.sn.ip}:{API_PORT}", "--no-progress", "--timeout", f"{self.args.timeout}s",
                ])
                for p, out, home in zip(self.peers, outputs, homes)
            ]
            started += dfgets
            kill_times: list[tuple[float, float]] = []
            stored: list[dict[str, Any]] = []
            for share in kills:
                while int((origin_w.last() or {}).get("bytesOut", 0)) - before < share * self.size:
                    if all(d.poll() is not None for d in dfgets) or time.monotonic() - t0 > self.args.timeout:
                        raise RuntimeError(f"the origin never reached {share:.0%} of the file")
                    time.sleep(0.005)
                # where the bytes on their way are at the kill: the origin's socket, the SuperNode's
                origin_q = read_tcp_queues(self.origin_proc.pid, ORIGIN_PORT)
                sn_q = read_tcp_queues(sn.pid, ORIGIN_PORT)
                sn.send_signal(signal.SIGKILL)
                sn.wait()
                killed = time.monotonic()
                sent = int((origin_w.last() or {}).get("bytesOut", 0)) - before
                kill_times.append((killed, sent / self.size))
                stored.append({"originQueued": origin_q and origin_q[0], "supernodeQueued": sn_q and sn_q[1],
                               "stored": data_size(sn_home)})
                say(f"killed the SuperNode at {sent / self.size:.1%} of the origin's bytes; starting it again")
                sn = self.supernode(sn_home, f"{name}-supernode")
                started.append(sn)
            # each dfget's own end (polled: waiting for them in turn stamped an early one with a later one's end)
            ends: list[float | None] = [None] * len(dfgets)
            while any(e is None for e in ends):
                for k, d in enumerate(dfgets):
                    if ends[k] is None and d.poll() is not None:
                        ends[k] = time.monotonic() - t0
                if time.monotonic() - t0 > self.args.timeout + 30:
                    for k, d in enumerate(dfgets):
                        if ends[k] is None:
                            d.kill()
                            d.wait()
                            ends[k] = time.monotonic() - t0
                time.sleep(0.005)
            time.sleep(0.3)  # the watchers' last samples
            origin_bytes = int((origin_w.last() or {}).get("bytesOut", 0)) - before
            wire = self.net.link_counters()["origin"]["upBytes"] - wire_before
            right = [d.returncode == 0 and os.path.exists(o) and sha256_file(o) == self.digest
                     for d, o in zip(dfgets, outputs)]
            result: dict[str, Any] = {
                "name": name,
                "peers": len(self.peers),
                "seconds": [round(e, 3) for e in ends],
                "xFB": [round(e / self.fb, 3) for e in ends],
                "exits": [d.returncode for d in dfgets],
                "right": sum(right),
                "originCopies": round(origin_bytes / self.size, 4),
                "originWireBytes": wire,
                "wall0": round(self.wall0, 3),  # the wall clock at the dfgets' start (the trace lines' clock)
                "kills": [],
            }
            fetch_start = before
            for (killed, at), there in zip(kill_times, stored):
                down = downtime(killed, sn_w.samples, origin_w.samples, port_w.samples)
                back = killed + (down["task"] if down["task"] is not None else 0.0)
                exchanged = sum(
                    value_at(w.samples, back, lambda v: peer_bytes(v, url))
                    - value_at(w.samples, killed, lambda v: peer_bytes(v, url))
                    for w in peer_ws
                )
                # the origin's bytes out once the killed fetch's connection was gone: the last
                # sample before the new process bound its port (the next fetch starts after it)
                settled = value_at(origin_w.samples, killed + (down["bound"] or down["api"] or 0.0), lambda v: int(v["bytesOut"]))
                there["handed"], fetch_start = settled - fetch_start, settled
                result["kills"].append({"at": round(at, 3), "t": round(killed - t0, 3), **down,
                                        "peerMiBWhileDown": round(exchanged / MiB, 2), **there})
            for kill, lost in zip(result["kills"], lost_at_kills(result["kills"])):
                kill.update(lost)
            if self.args.timeline:
                self.net.stop(started)  # the logs complete
                result["timeline"] = tl = self.timeline(name)
                for peer, end in zip(tl["peers"], ends):
                    peer["exit"] = round(end or 0.0, 3)
            say(f"run {name}: slowest {max(result['xFB']):.2f} x F/B, origin {result['originCopies']:.3f} copies, "
                f"{result['right']}/{len(self.peers)} right; downtimes {result['kills']}")
            return result
        finally:
            self.net.stop(started)
            shutil.rmtree(rdir, ignore_errors=True)

    def timeline(self, name: str) -> dict[str, Any]:
        """The run's phases from its trace lines (see L{timeline})."""
        def text(tag: str) -> str:
            try:
                with open(os.path.join(self.logs, f"{tag}.log"), errors="replace") as f:
                    return f.read()
            except OSError:
                return ""

        pieces = -(-self.size // swarm_piece_size(self.size))
        return timeline(text(f"{name}-supernode"),
                        [(text(f"{name}-dfget-{p.name}"), text(f"{name}-{p.name}")) for p in self.peers], pieces,
                        self.wall0)

    def main(self) -> dict[str, Any]:
        load0 = load_average()
        self.start_origin()
        calm = self.run("calm", [])
        hurt = None if self.args.no_kill else self.run("restarts", self.args.kills)
        for run in (calm, hurt):
            if run is not None:
                # on the origin's link (headers included) against the undisturbed fetch of one copy
                run["originWireCopies"] = round(run["originWireBytes"] / calm["originWireBytes"], 4)
        return {
            "peers": len(self.peers), "peerMbit": self.args.peer_mbit, "originMbit": self.args.origin_mbit,
            "supernodeMbit": self.args.supernode_mbit, "sizeMiB": self.args.size_mib, "fbSeconds": round(self.fb, 3),
            "load": [load0, load_average()], "undisturbed": calm, "restarts": hurt,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--peers", type=int, default=6)
    p.add_argument("--size-mib", type=int, default=48)
    p.add_argument("--peer-mbit", type=float, default=80)
    p.add_argument("--origin-mbit", type=float, default=160)
    p.add_argument("--supernode-mbit", type=float, default=160)
    p.add_argument("--kills", default="0.3,0.6,0.9", help="shares of the origin's bytes at which to kill the SuperNode")
    p.add_argument("--no-kill", action="store_true", help="the undisturbed run only")
    p.add_argument("--timeout", type=int, default=120, help="seconds a dfget may take")
    p.add_argument("--json", default="", help="write the numbers here")
    p.add_argument("--doc", default="", help="put the table in this Markdown file (between the restart markers)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--timeline", action="store_true",
                   help="run the daemons and dfget with DRAGONFLY_TRACE=1 and print each peer's phases")
    p.add_argument("--fast-watchers", action="store_true",
                   help="poll as often in a run without kills as in one with them (every 10 to 100 ms; else 25 times less)")
    p.add_argument("--supernode-args", default="", help="more SuperNode options, such as '--seed-window 2' (A/B rounds)")
    p.add_argument("--dfpeer-args", default="", help="more dfpeer options, such as '--pipeline 2' (A/B rounds)")
    args = p.parse_args(argv)
    try:
        args.kills = sorted(float(k) for k in args.kills.split(",") if k.strip())
    except ValueError:
        p.error("--kills: comma-separated shares such as 0.3,0.6,0.9")
    if not all(0 < k < 1 for k in args.kills):
        p.error("--kills: each share between 0 and 1")
    if not 1 <= args.peers <= 200 or args.size_mib < 1:
        p.error("--peers must be 1..200 and --size-mib at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = netem.unavailable()
    if why:
        say(f"cannot run: {why}")
        return EXIT_UNAVAILABLE
    made = compile_bytecode()
    if made:
        say(f"compiled {made} modules to bytecode, as an installed package has them")
    workdir = tempfile.mkdtemp(prefix="dfb-restart-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        with netem.Network() as net:
            result = Bench(net, args, workdir).main()
    except netem.Busy as e:
        say(str(e))
        args.keep = False  # nothing ran: nothing to keep
        return EXIT_BUSY
    finally:
        if args.keep:
            shutil.rmtree(os.path.join(workdir, "www"), ignore_errors=True)
            say(f"logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    text = table(result)
    print(json.dumps(result, indent=2))
    print(text)
    for run in (result["undisturbed"], result["restarts"]):
        if run is not None and "timeline" in run:
            print(f"\n{run['name']}: " + timeline_table(run["timeline"], args.size_mib * MiB))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.doc and not args.no_kill:
        write_block(args.doc, "restart", text, "SuperNode restarts on emulated hosts")
    ok = all(r["right"] == r["peers"] for r in (result["undisturbed"], result["restarts"]) if r is not None)
    return 0 if ok else EXIT_WRONG


if __name__ == "__main__":
    sys.exit(main())

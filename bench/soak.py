"""
A soak: a stream of downloads on emulated hosts while things break.

    sudo python -m bench.soak --minutes 10 --seed 1 [--peers 10] [--doc docs/reliability.md]

On the benchmark's namespaces (L{bench.netem}: root, 198.18.0.0/15 only,
everything torn down on any exit) it starts a counting origin with several
files, a SuperNode and N dfpeers (100 Mbit/s each).  Every C{--round}
seconds each idle peer downloads one of the files, picked at random, under a
URL new to that round (C{?r=phase-round}: every round is a new task).

First an undisturbed phase (C{--baseline-minutes}), then the soak proper,
in which, at times drawn from C{--seed}:

  - a dfpeer is killed (SIGKILL) and started again on its home 1-3 s later;
  - the SuperNode is killed (SIGKILL) and started again on its home 1-3 s later;
  - the origin fails: a 500, a body cut after half the bytes, or a file
    replaced by new content (a new version).

Counted per phase: downloads started, done (exit 0 and the bytes of a
version the file had), failed (exit non-zero: allowed, a fault may cause it),
wrong (exit 0 with other bytes), partial (a file left at the output path of
a failed download), the origin's copies per file version (its bytes over the
sizes of the distinct (URL, content) pairs downloaded), and the p50/p99 of
the completion times.  The table goes to C{--doc} between the soak markers
and the numbers to C{--json}.  Targets over 10 minutes: 0 wrong, 0 partial,
<= 1.1 origin copies per version, p99 <= 2 x the undisturbed p99.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from dragonfly.core.ids import task_id
from dragonfly.testing.swarm import wait_for_file

from . import netem
from .docblock import write_block
from .swarm import BIN, REPO, percentile

MiB = 1 << 20
API_PORT, BLOCK_PORT, ORIGIN_PORT = 8002, 8001, 80
FILES = ("a.bin", "b.bin", "c.bin")


def say(message: str) -> None:
    print(f"soak: {message}", file=sys.stderr, flush=True)


class Soak:
    def __init__(self, net: netem.Network, args: argparse.Namespace, workdir: str) -> None:
        self.net, self.args, self.workdir = net, args, workdir
        self.rng = random.Random(args.seed)
        self.www = os.path.join(workdir, "www")
        self.logs = os.path.join(workdir, "logs")
        self.out = os.path.join(workdir, "out")
        for d in (self.www, self.logs, self.out):
            os.makedirs(d, exist_ok=True)
        self.origin = net.add_host("origin", args.origin_mbit, args.origin_mbit)
        self.sn = net.add_host("supernode", args.supernode_mbit, args.supernode_mbit)
        self.peers = [net.add_host(f"peer{i}", args.peer_mbit, args.peer_mbit) for i in range(args.peers)]
        self.homes = [os.path.join(workdir, h.name) for h in self.peers]
        self.sn_home = os.path.join(workdir, "supernode")
        #: file name -> the SHA-256 of every version it had, and its size
        self.versions: dict[str, dict[str, int]] = {f: {} for f in FILES}
        self.peer_procs: list[subprocess.Popen | None] = [None] * len(self.peers)
        self.sn_proc: subprocess.Popen | None = None
        self.origin_proc: subprocess.Popen | None = None
        #: (seconds into the soak phase, kind) of each fault fired
        self.faults: list[tuple[float, str]] = []
        self.phase_start = 0.0
        self.sn_killed_at: float | None = None
        #: seconds each SuperNode kill left the cluster without one
        self.sn_downtimes: list[float] = []
        self.fault_log: dict[str, int] = {}

    # -- the hosts ---------------------------------------------------------------------

    def spawn(self, host: netem.Host, tag: str, argv: list[str]) -> subprocess.Popen:
        with open(os.path.join(self.logs, f"{tag}.log"), "ab") as log:
            return self.net.popen(host, argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def write_file(self, name: str) -> None:
        """A new version of C{name}: new random bytes, renamed into place."""
        data = self.rng.randbytes(self.args.size_mib * MiB)
        path = os.path.join(self.www, name)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
        self.versions[name][hashlib.sha256(data).hexdigest()] = len(data)

    def start_origin(self) -> None:
        info = os.path.join(self.workdir, "origin.json")
        self.origin_proc = self.spawn(self.origin, "origin", [
            sys.executable, "-m", "dragonfly.testing.origin", "--root", self.www,
            "--port", str(ORIGIN_PORT), "--interface", self.origin.ip, "--info", info,
        ])
        wait_for_file(info, 30, self.origin_proc)

    def start_supernode(self) -> None:
        os.makedirs(self.sn_home, exist_ok=True)
        info = os.path.join(self.sn_home, "supernode.json")
        if os.path.exists(info):
            os.unlink(info)
        self.sn_proc = self.spawn(self.sn, "supernode", [
            os.path.join(BIN, "twistd"), "-n", "--pidfile=", "supernode", "--port", str(API_PORT),
            "--block-port", str(BLOCK_PORT), "--listen", self.sn.ip, "--advertise-ip", self.sn.ip,
            "--home", self.sn_home,
        ])
        wait_for_file(info, 60, self.sn_proc)

    def serving(self, i: int) -> bool:
        """A dfpeer runs on peer C{i}'s host (one its dfget started while ours was down)."""
        for pid in netem._pids(self.peers[i].netns):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"dfpeer" in argv:
                return True
        try:
            with open(os.path.join(self.homes[i], "peer.json")) as f:
                api = json.load(f)["api"]
        except (OSError, ValueError, KeyError):
            return False
        (reply,) = self.net.get_json([(self.peers[i], f"{api}/api/v1/tasks")], timeout=3.0)
        return reply is not None

    def start_peer(self, i: int) -> None:
        home = self.homes[i]
        os.makedirs(home, exist_ok=True)
        info = os.path.join(home, "peer.json")
        if self.peer_procs[i] is not None and self.serving(i):
            # never two dfpeers on one home
            say(f"{self.peers[i].name}: a dfpeer started by dfget serves the home; not restarting ours")
            self.peer_procs[i] = None
            return
        if os.path.exists(info):
            os.unlink(info)
        peer = self.peers[i]
        self.peer_procs[i] = self.spawn(peer, peer.name, [
            os.path.join(BIN, "twistd"), "-n", "--pidfile=", "dfpeer", "--supernode", f"{self.sn.ip}:{API_PORT}",
            "--home", home, "--ip", peer.ip, "--listen", peer.ip,
        ])
        wait_for_file(info, 60, self.peer_procs[i])

    @staticmethod
    def kill(proc: subprocess.Popen | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def origin_get(self, path: str) -> Any:
        (reply,) = self.net.get_json([(self.origin, f"http://{self.origin.ip}:{ORIGIN_PORT}{path}")])
        return reply

    def origin_fault(self, spec: dict[str, Any]) -> None:
        code = (
            "import sys, urllib.request;"
            "urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=sys.argv[2].encode()), timeout=10).read()"
        )
        subprocess.run(
            ["ip", "netns", "exec", self.origin.netns, sys.executable, "-I", "-c", code,
             f"http://{self.origin.ip}:{ORIGIN_PORT}/_fault", json.dumps(spec)],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=True,
        )

    def origin_bytes(self) -> tuple[int, dict[str, int]]:
        """The origin's bytes sent so far, in all and by request target (path and query)."""
        stats = self.origin_get("/_stats") or {}
        return int(stats.get("bytesOut", stats.get("bytesSent", 0))), dict(stats.get("bytesByUri") or {})

    # -- the faults ----------------------------------------------------------------------

    def schedule(self, seconds: float) -> list[tuple[float, str]]:
        """Fault times in the phase: one of each kind at least, then about one every few seconds."""
        kinds = {"peer": 15.0, "supernode": 45.0, "origin500": 40.0, "origincut": 40.0, "originchange": 60.0}
        events = [(self.rng.uniform(0.1, 0.8) * seconds, k) for k in kinds]
        for kind, mean in kinds.items():
            t = self.rng.expovariate(1 / mean)
            while t < seconds * 0.9:
                events.append((t, kind))
                t += self.rng.expovariate(1 / mean)
        return sorted(events)

    def fire(self, kind: str, now: float, later: list[tuple[float, str, int]]) -> None:
        self.fault_log[kind] = self.fault_log.get(kind, 0) + 1
        self.faults.append((round(now - self.phase_start, 1), kind))
        if kind == "peer":
            i = self.rng.randrange(len(self.peers))
            if self.peer_procs[i] is None or self.peer_procs[i].poll() is not None:
                self.fault_log[kind] -= 1
                return  # a dfpeer started by dfget serves this home: not ours to kill
            say(f"killing {self.peers[i].name}")
            self.faults[-1] = (self.faults[-1][0], f"peer{i}")
            self.kill(self.peer_procs[i])
            later.append((now + self.rng.uniform(1, 3), "restart-peer", i))
        elif kind == "supernode":
            if self.sn_proc is not None and self.sn_proc.poll() is None:
                say("killing the supernode")
                self.kill(self.sn_proc)
                self.sn_killed_at = time.monotonic()
                later.append((now + self.rng.uniform(1, 3), "restart-supernode", 0))
        elif kind == "origin500":
            self.origin_fault({"path": "/" + self.rng.choice(FILES), "mode": "status", "status": 500, "times": 1})
        elif kind == "origincut":
            self.origin_fault({"path": "/" + self.rng.choice(FILES), "mode": "short", "times": 1})
        elif kind == "originchange":
            name = self.rng.choice(FILES)
            say(f"changing {name}")
            self.write_file(name)

    def restart(self, what: str, i: int) -> None:
        try:
            if what == "restart-peer":
                self.start_peer(i)
            else:
                self.start_supernode()
                if self.sn_killed_at is not None:
                    # from the kill until its API listens again (the restart delay included)
                    self.sn_downtimes.append(round(time.monotonic() - self.sn_killed_at, 1))
                    self.sn_killed_at = None
        except Exception as e:  # noqa: BLE001 -- a restart that failed is a finding, not a crash of the soak
            say(f"{what} {i} failed: {e}")
            self.fault_log["restartFailed"] = self.fault_log.get("restartFailed", 0) + 1

    # -- a phase -------------------------------------------------------------------------

    def dfget(self, i: int, url: str, output: str) -> subprocess.Popen:
        return self.spawn(self.peers[i], f"dfget-{self.peers[i].name}", [
            os.path.join(BIN, "dfget"), "-u", url, "-o", output, "--home", self.homes[i],
            "--node", f"{self.sn.ip}:{API_PORT}", "--no-progress", "--timeout", f"{self.args.download_timeout}s",
        ])

    def phase(self, name: str, seconds: float, faults: bool) -> dict[str, Any]:
        say(f"phase {name}: {seconds:.0f}s{' with faults' if faults else ''}")
        events = self.schedule(seconds) if faults else []
        later: list[tuple[float, str, int]] = []
        running: dict[int, dict[str, Any]] = {}
        records: list[dict[str, Any]] = []
        origin_before = self.origin_bytes()
        start = self.phase_start = time.monotonic()
        next_round, rnd = start, 0
        drain_until = start + seconds + self.args.download_timeout + 30
        while True:
            now = time.monotonic()
            for i, rec in list(running.items()):
                rc = rec["proc"].poll()
                if rc is not None:
                    rec.update(end=now, rc=rc)
                    self.judge(rec)
                    records.append(rec)
                    del running[i]
            if now - start < seconds:
                if now >= next_round:
                    rnd += 1
                    next_round = now + self.args.round
                    for i in range(len(self.peers)):
                        if i in running:
                            continue
                        f = self.rng.choice(FILES)
                        url = f"http://{self.origin.ip}:{ORIGIN_PORT}/{f}?r={name}-{rnd}"
                        output = os.path.join(self.out, f"{name}-{rnd}-{i}-{f}")
                        running[i] = {"file": f, "url": url, "output": output, "start": now, "peer": i,
                                      "at": round(now - start, 1),
                                      "proc": self.dfget(i, url, output)}
                while events and now - start >= events[0][0]:
                    self.fire(events.pop(0)[1], now, later)
            elif not running or now > drain_until:
                break
            for item in sorted(later):
                if item[0] <= now:
                    later.remove(item)
                    self.restart(item[1], item[2])
            time.sleep(0.05)
        for _t, what, i in later:  # the soak ends with everything up again
            self.restart(what, i)
        for rec in running.values():  # past the drain: counted as failed
            self.kill(rec["proc"])
            rec.update(end=time.monotonic(), rc=-9)
            self.judge(rec)
            records.append(rec)
        origin_after = self.origin_bytes()
        by_uri = {u: n - origin_before[1].get(u, 0) for u, n in origin_after[1].items()}
        summary = self.summary(name, records, origin_after[0] - origin_before[0])
        summary["originAccount"] = self.account(name, records, {u: n for u, n in by_uri.items() if n > 0})
        return summary

    def supernode_events(self) -> dict[str, dict[str, int]]:
        """What the SuperNode's log says it did with the origin, by task id (prefix of 12)."""
        kinds = {
            "cache miss": "fetch",
            "fetching it as a new entry": "newVersionAfterRevalidation",
            "resuming the origin fetch": "resume",
            "kept for a resume": "parked",
        }
        events: dict[str, dict[str, int]] = {}

        def scan(name: str, kinds: dict[str, str]) -> None:
            try:
                with open(os.path.join(self.logs, name), errors="replace") as f:
                    for line in f:
                        if "task " not in line:
                            continue
                        for needle, kind in kinds.items():
                            if needle in line:
                                tid = line.split("task ", 1)[1][:12]
                                per = events.setdefault(tid, {})
                                per[kind] = per.get(kind, 0) + 1
            except OSError:
                pass

        scan("supernode.log", kinds)
        # a dfpeer that left the swarm for the origin (its own copy)
        for name in sorted(os.listdir(self.logs)):
            if name.startswith(("peer", "dfget-")):
                scan(name, {"back to source": "peerBackToSource"})
        return events

    def account(self, name: str, records: list[dict[str, Any]], by_uri: dict[str, int]) -> dict[str, Any]:
        """
        The origin's bytes of the phase, URL by URL, against the versions of
        it downloaded right: the extra bytes and, from the SuperNode's log,
        what it did with the origin for that URL (so a cause can be named).
        """
        base = f"http://{self.origin.ip}:{ORIGIN_PORT}"
        needed: dict[str, dict[str, int]] = {}
        for r in records:
            if r["rc"] == 0 and r["right"]:
                needed.setdefault(r["url"][len(base):], {})[r["sha"]] = self.versions[r["file"]][r["sha"]]
        events = self.supernode_events()
        causes: dict[str, int] = {}
        lines = []
        for uri, sent in sorted(by_uri.items()):
            need = sum(needed.get(uri, {}).values())
            extra = sent - need
            if extra <= 0:
                continue
            ev = events.get(task_id(base + uri)[:12], {})
            if not need:
                cause = "noRightDownload"
            elif ev.get("peerBackToSource"):
                cause = "peerBackToSource"
            elif ev.get("newVersionAfterRevalidation"):
                cause = "newVersionAfterRevalidation"
            elif ev.get("fetch", 0) > 1:
                cause = "fetchedAgain"
            else:
                cause = "other"
            causes[cause] = causes.get(cause, 0) + extra
            lines.append(f"{uri}: {sent / need if need else float('inf'):.2f} copies ({sent} bytes, "
                         f"{len(needed.get(uri, {}))} versions right), supernode {ev or '-'}: {cause}")
        for line in lines:
            say(f"{name} origin: {line}")
        return {"extraBytesByCause": causes, "urls": len(by_uri), "urlsOver": len(lines)}

    def judge(self, rec: dict[str, Any]) -> None:
        rec.pop("proc", None)
        rec["seconds"] = rec["end"] - rec["start"]
        out = rec["output"]
        exists = os.path.exists(out)
        if rec["rc"] == 0:
            sha = _sha256(out) if exists else None
            rec["sha"] = sha
            rec["right"] = sha in self.versions[rec["file"]]
            rec["partial"] = False
        else:
            rec["right"] = False
            rec["partial"] = exists
        if exists:
            os.unlink(out)

    def summary(self, name: str, records: list[dict[str, Any]], origin_bytes: int) -> dict[str, Any]:
        done = [r for r in records if r["rc"] == 0 and r["right"]]
        # one task version per (URL, content) downloaded right
        versions = {(r["url"], r["sha"]): self.versions[r["file"]][r["sha"]] for r in done}
        sizes = sum(versions.values())
        times = [r["seconds"] for r in done]
        return {
            "phase": name,
            "started": len(records),
            "done": len(done),
            "failed": sum(1 for r in records if r["rc"] != 0),
            "wrong": sum(1 for r in records if r["rc"] == 0 and not r["right"]),
            "partial": sum(1 for r in records if r["partial"]),
            "originBytes": origin_bytes,
            "copiesPerVersion": round(origin_bytes / sizes, 3) if sizes else None,
            "p50": round(percentile(times, 0.5), 3) if times else None,
            "p99": round(percentile(times, 0.99), 3) if times else None,
            "failedExits": sorted({r["rc"] for r in records if r["rc"] != 0}),
            # the slowest downloads done, to set beside the faults' times
            "slowest": [
                {"seconds": round(r["seconds"], 2), "at": r["at"], "peer": r["peer"], "url": r["url"].rsplit("/", 1)[-1]}
                for r in sorted(done, key=lambda r: -r["seconds"])[:5]
            ],
        }

    def run(self) -> dict[str, Any]:
        for f in FILES:
            self.write_file(f)
        self.start_origin()
        self.start_supernode()
        for i in range(len(self.peers)):
            self.start_peer(i)
        base = self.phase("calm", self.args.baseline_minutes * 60, faults=False)
        soak = self.phase("soak", self.args.minutes * 60, faults=True)
        for slow in soak["slowest"]:
            # the faults that could have held it up: any in the 15 s before it started or while it ran
            # (a peer kill only on its own host)
            slow["faults"] = [
                f"{kind}@{t:g}" for t, kind in self.faults
                if slow["at"] - 15 <= t <= slow["at"] + slow["seconds"]
                and (not kind.startswith("peer") or kind == f"peer{slow['peer']}")
            ]
        ratio = round(soak["p99"] / base["p99"], 2) if soak["p99"] and base["p99"] else None
        return {"seed": self.args.seed, "minutes": self.args.minutes, "peers": len(self.peers),
                "sizeMiB": self.args.size_mib, "calm": base, "soak": soak, "p99Ratio": ratio,
                "faults": dict(self.fault_log), "faultTimes": self.faults, "supernodeDowntimes": self.sn_downtimes}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def table(result: dict[str, Any]) -> str:
    calm, soak = result["calm"], result["soak"]
    faults = ", ".join(f"{k} {v}" for k, v in sorted(result["faults"].items())) or "none"
    rows = [
        ("downloads started", calm["started"], soak["started"], ""),
        ("downloads done (right bytes)", calm["done"], soak["done"], ""),
        ("failed (exit non-zero)", calm["failed"], soak["failed"], ""),
        ("wrong outputs", calm["wrong"], soak["wrong"], "0"),
        ("partial files left", calm["partial"], soak["partial"], "0"),
        ("origin copies per version", calm["copiesPerVersion"], soak["copiesPerVersion"], "<= 1.1"),
        ("p50 completion (s)", calm["p50"], soak["p50"], ""),
        ("p99 completion (s)", calm["p99"], soak["p99"], f"<= 2 x calm (here {result['p99Ratio']} x)"),
    ]
    down = result.get("supernodeDowntimes") or []
    lines = [
        (f"`python -m bench.soak --minutes {result['minutes']:g} --seed {result['seed']}`: "
         f"{result['peers']} peers, {len(FILES)} files of {result['sizeMiB']} MiB; faults: {faults}"
         + (f"; the SuperNode was down {', '.join(f'{d:g}' for d in down)} s (kill to API up again)" if down else "")
         + "."),
        "",
        "| | undisturbed | soak | target |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    account = soak.get("originAccount") or {}
    causes = account.get("extraBytesByCause") or {}
    if causes:
        lines += ["", "Origin bytes of the soak over one copy per version, by cause (MiB): " + ", ".join(
            f"{k} {v / MiB:.1f}" for k, v in sorted(causes.items())
        ) + f" ({account.get('urlsOver')} of {account.get('urls')} URLs)."]
    return "\n".join(lines)


def write_doc(path: str, text: str) -> None:
    write_block(path, "soak", text, "Soak")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--minutes", type=float, default=10.0, help="length of the disturbed phase")
    p.add_argument("--baseline-minutes", type=float, default=None, help="the undisturbed phase (default: minutes/5, at least 0.5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--peers", type=int, default=10)
    p.add_argument("--size-mib", type=int, default=4, help="size of each file")
    p.add_argument("--round", type=float, default=6.0, help="seconds between rounds of downloads")
    p.add_argument("--download-timeout", type=int, default=120)
    p.add_argument("--peer-mbit", type=float, default=100)
    p.add_argument("--origin-mbit", type=float, default=200)
    p.add_argument("--supernode-mbit", type=float, default=400)
    p.add_argument("--doc", default=os.path.join(REPO, "docs", "reliability.md"), help="where the table goes ('' for nowhere)")
    p.add_argument("--json", default="", help="write the numbers here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args(argv)
    if args.baseline_minutes is None:
        args.baseline_minutes = max(0.5, args.minutes / 5)
    if args.peers < 1 or args.peers > 200:
        p.error("--peers must be 1..200")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = netem.unavailable()
    if why:
        say(f"cannot run: {why}")
        return 2
    workdir = tempfile.mkdtemp(prefix="dfsoak-")
    try:
        with netem.Network() as net:
            result = Soak(net, args, workdir).run()
    finally:
        if args.keep:
            say(f"logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.doc:
        write_doc(args.doc, table(result))
    soak = result["soak"]
    return 0 if soak["wrong"] == 0 and soak["partial"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

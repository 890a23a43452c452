"""
The control plane under load: requests/s and p99 latency of one SuperNode.

    python -m bench.control [--peers 1000] [--duration 10] [--connections 32]
                            [--mix 0.9] [--pieces 128] [--profile FILE]

Starts a real C{twistd -n supernode} on loopback and a local origin, has the
origin's file cached as one task, registers C{--peers} peers and has each
join the task's swarm with a random half of the pieces, then drives the API
with C{wrk} (the Debian package) for C{--duration} seconds over
C{--connections} keep-alive connections: a fraction C{--mix} of the requests
are syncs of a random peer (reporting a random piece now and then, as
downloading peers do), the rest heartbeats.  It prints one line per run:
requests/s, syncs/s, mean and p99 latency, non-2xx answers, the
SuperNodes' CPU per request (from /proc, the number that holds on a shared
machine) and the 1-minute load average.  It runs the mix
given and then syncs only (the form of the 593 syncs/s measured before).

With C{--procs K} it starts K SuperNodes on K ports, peer n registering
with node n % K (as rendezvous hashing would spread tasks over nodes; each
node has its own swarm of the file), and runs one wrk per node at once with
the connections split between them: the rate of one host.

With C{--profile FILE} it runs the mixed load a second time under py-spy
(C{pip install py-spy}) attached to the SuperNode and writes the collapsed
stacks to FILE (see docs/scale.md for reading them).

wrk runs in one thread and is not the bottleneck: it answers C{/healthz}
several times faster than the SuperNode answers a sync.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from dragonfly.testing.swarm import _bin, wait_for_file

WRK_SCRIPT = r"""
local peers = {PEERS}
local procs = {PROCS}
local proc = {PROC}
local pieces = {PIECES}
local mix = {MIX}
local task = "{TASK}"
local counter = 0
local syncs = 0
local heartbeats = 0
math.randomseed(os.time() + {SEED})
local hdr = {{ ["Content-Type"] = "application/json" }}

request = function()
  local p = procs * (math.random(peers) - 1) + proc
  if math.random() < mix then
    local have = ""
    if math.random() < 0.25 then have = tostring(math.random(pieces) - 1) end
    local body = string.format('{{"peerId":"bench-%d","have":[%s],"failed":[],"digestsFrom":%d,"starving":false}}',
                               p, have, pieces)
    return wrk.format("POST", "/api/v1/tasks/" .. task .. "/sync", hdr, body)
  else
    return wrk.format("POST", "/api/v1/peers/bench-" .. p .. "/heartbeat", hdr, "{{}}")
  end
end

done = function(summary, latency, requests)
  io.write(string.format('RESULT {{"requests":%d,"duration_us":%d,"status":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,"mean_us":%f,"p50_us":%d,"p99_us":%d,"max_us":%d}}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, latency.mean, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process C{pid} has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def call(port: int, method: str, path: str, body: Any = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: {r.status} {raw[:300]!r}")
    return json.loads(raw)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(os.path.join(self.workdir, f"{name}.log"), "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        a = self.args
        www = os.path.join(self.workdir, "www")
        os.makedirs(www)
        with open(os.path.join(www, "file.bin"), "wb") as f:
            chunk = random.Random(1).randbytes(1 << 20)
            f.writelines(chunk for _ in range(a.pieces))
        info = os.path.join(self.workdir, "origin.json")
        origin = self.spawn("origin", [sys.executable, "-m", "dragonfly.testing.origin", "--root", www, "--info", info])
        self.origin_port = wait_for_file(info, 20, origin)["port"]
        # one SuperNode per --procs, each with its own port, home and swarm
        self.nodes: list[dict[str, Any]] = []
        for j in range(a.procs):
            home = os.path.join(self.workdir, f"supernode{j}")
            os.makedirs(home)
            proc = self.spawn(f"supernode{j}", [
                _bin("twistd"), "-n", "--pidfile=", "--logfile", os.path.join(self.workdir, f"twistd{j}.log"),
                "supernode", "--port", "0", "--block-port", "0", "--listen", "127.0.0.1", "--home", home,
                "--origin-deny", "none", "--piece-size", "1M", "--peer-ttl", "3600",
            ])
            self.nodes.append({"proc": proc, "home": home})
        for node in self.nodes:
            node["port"] = wait_for_file(os.path.join(node["home"], "supernode.json"), 60, node["proc"])["port"]
        self.supernode = self.nodes[0]["proc"]

    def populate(self) -> None:
        """Peer n registers with SuperNode n % procs and joins that node's swarm of the file."""
        a = self.args
        rng = random.Random(2)
        url = f"http://127.0.0.1:{self.origin_port}/file.bin"
        for j, node in enumerate(self.nodes):
            port = node["port"]
            mine = range(j, a.peers, a.procs)
            for n in mine:
                call(port, "POST", "/api/v1/peers", {"peerId": f"bench-{n}", "ip": "127.0.0.1", "port": 20000 + n})
            node["task"] = call(port, "POST", "/api/v1/tasks", {"peerId": f"bench-{j}", "url": url})["taskId"]
            node["peers"] = len(mine)
            deadline = time.monotonic() + 120
            while call(port, "GET", f"/api/v1/tasks/{node['task']}")["status"] != "success":
                if time.monotonic() > deadline:
                    raise RuntimeError("the CDN did not cache the file")
                time.sleep(0.2)
            pieces = a.pieces
            for n in mine:
                have = sorted(rng.sample(range(pieces), pieces // 2))
                call(port, "POST", f"/api/v1/tasks/{node['task']}/sync", {"peerId": f"bench-{n}", "have": have})

    def wrk(self, mix: float, duration: float) -> dict[str, Any]:
        """One wrk per SuperNode, all at once, the connections split between them."""
        a = self.args
        runs = []
        cpu0 = [cpu_seconds(node["proc"].pid) for node in self.nodes]
        for j, node in enumerate(self.nodes):
            script = os.path.join(self.workdir, f"load{j}.lua")
            with open(script, "w") as f:
                f.write(WRK_SCRIPT.format(PEERS=node["peers"], PROCS=a.procs, PROC=j, PIECES=a.pieces, MIX=mix,
                                          TASK=node["task"], SEED=random.randrange(1000)))
            runs.append(subprocess.Popen(
                ["wrk", "-t1", f"-c{max(1, a.connections // a.procs)}", f"-d{duration:g}s", "--timeout", "5s",
                 "-s", script, f"http://127.0.0.1:{node['port']}"],
                stdout=subprocess.PIPE, text=True,
            ))
        results = []
        for run in runs:
            out, _ = run.communicate()
            line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
            results.append(json.loads(line[len("RESULT "):]))
        cpu = sum(cpu_seconds(node["proc"].pid) - c for node, c in zip(self.nodes, cpu0, strict=True))
        rate = sum(r["requests"] / (r["duration_us"] / 1e6) for r in results)
        total = sum(r["requests"] for r in results)
        mean_us = sum(r["mean_us"] * r["requests"] for r in results) / max(total, 1)
        errors = sum(r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"] for r in results)
        return {
            "procs": a.procs, "mix": mix, "requests_per_s": round(rate, 1), "syncs_per_s": round(rate * mix, 1),
            "mean_ms": round(mean_us / 1000, 2),
            # the p99 of the slowest process (the p99 of all requests is at most this)
            "p99_ms": round(max(r["p99_us"] for r in results) / 1000, 2),
            "max_ms": round(max(r["max_us"] for r in results) / 1000, 2), "errors": errors, "peers": a.peers,
            "connections": a.connections,
            # the machine is shared: how busy it was (1-minute load average) as the run ended
            "load1": round(os.getloadavg()[0], 2),
            # CPU the SuperNodes spent per request: what the rate would be per core were it theirs alone
            "cpu_us_per_request": round(cpu / max(total, 1) * 1e6, 1),
            "requests_per_cpu_s": round(total / cpu, 1) if cpu else None,
        }

    def profile(self, path: str, mix: float, duration: float) -> None:
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        rec = subprocess.Popen(
            [spy, "record", "--pid", str(self.supernode.pid), "--format", "raw", "--output", path,
             "--duration", str(int(duration) + 2), "--rate", "200", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        result = self.wrk(mix, duration)
        _, err = rec.communicate(timeout=duration + 60)
        print(f"profiled run: {json.dumps(result)}", flush=True)
        if rec.returncode:
            print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", flush=True)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=1000)
    p.add_argument("--pieces", type=int, default=128, help="pieces of the task (1 MiB each)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--mix", type=float, default=0.9, help="fraction of requests that are syncs (the rest heartbeats)")
    p.add_argument("--procs", type=int, default=1,
                   help="SuperNode processes, each with its share of the peers and its own swarm (one wrk each)")
    p.add_argument("--profile", help="also profile the SuperNode under the mixed load (py-spy raw output here)")
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("bench.control needs wrk (apt-get install wrk)")
    workdir = tempfile.mkdtemp(prefix="bench-control-")
    bench = Bench(args, workdir)
    try:
        bench.start()
        t0 = time.monotonic()
        bench.populate()
        print(f"{args.peers} peers registered and joined in {time.monotonic() - t0:.1f}s", flush=True)
        bench.wrk(args.mix, 2)  # warm up
        for mix in (args.mix, 1.0):
            r = bench.wrk(mix, args.duration)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"{args.procs} proc syncs {mix:.0%}: {r['requests_per_s']:8.1f} req/s  {r['syncs_per_s']:8.1f} syncs/s  "
                      f"mean {r['mean_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  errors {r['errors']}  "
                      f"CPU {r['cpu_us_per_request']:5.0f} us/req ({r['requests_per_cpu_s']:.0f} req/CPU-s)  load {r['load1']:.2f}", flush=True)
        if args.profile:
            bench.profile(args.profile, args.mix, args.duration)
    finally:
        bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

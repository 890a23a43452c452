"""
CPU per SuperNode API call, dfpeer side and SuperNode side.

    python -m bench.synccost [--calls 2000] [--concurrency 8] [--rounds 2] [--profile]

Starts a real C{twistd -n supernode} on loopback and a local origin, has the
origin's 4 MiB file cached as a task with one registered peer, then issues
C{--calls} syncs (C{POST /api/v1/tasks/{id}/sync}) through
L{SupernodeClient._request}, once one after another and once C{--concurrency}
at a time, with each HTTP client in turn (the lean one of
L{dragonfly.core.leanhttp}, and treq + Agent as before), alternating over
C{--rounds} so both see the same load.  It prints one JSON line per run: the
client process's CPU microseconds per call (C{os.times}, this process only
issues the calls) and the SuperNode's (from /proc), with the 1-minute load
average.  With C{--profile} it runs the lean client's sequential case once
more under py-spy attached to this process and to the SuperNode, and writes
the collapsed stacks next to the JSON (C{synccost-*.txt}).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.control import call, cpu_seconds
from dragonfly.testing.swarm import _bin, wait_for_file


def start(workdir: str) -> tuple[list[subprocess.Popen], int, int]:
    www = os.path.join(workdir, "www")
    os.makedirs(www)
    with open(os.path.join(www, "file.bin"), "wb") as f:
        f.write(random.Random(1).randbytes(4 << 20))
    procs = []
    info = os.path.join(workdir, "origin.json")
    with open(os.path.join(workdir, "origin.log"), "ab") as log:
        origin = subprocess.Popen([sys.executable, "-m", "dragonfly.testing.origin", "--root", www, "--info", info],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    procs.append(origin)
    origin_port = wait_for_file(info, 20, origin)["port"]
    home = os.path.join(workdir, "supernode")
    os.makedirs(home)
    with open(os.path.join(workdir, "supernode.log"), "ab") as log:
        sn = subprocess.Popen([
            _bin("twistd"), "-n", "--pidfile=", "--logfile", os.path.join(workdir, "twistd.log"),
            "supernode", "--port", "0", "--block-port", "0", "--listen", "127.0.0.1", "--home", home,
            "--origin-deny", "none", "--piece-size", "1M", "--peer-ttl", "3600",
        ], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
    procs.append(sn)
    port = wait_for_file(os.path.join(home, "supernode.json"), 60, sn)["port"]
    call(port, "POST", "/api/v1/peers", {"peerId": "bench-0", "ip": "127.0.0.1", "port": 20000})
    task = call(port, "POST", "/api/v1/tasks", {"peerId": "bench-0", "url": f"http://127.0.0.1:{origin_port}/file.bin"})
    deadline = time.monotonic() + 60
    while call(port, "GET", f"/api/v1/tasks/{task['taskId']}")["status"] != "success":
        if time.monotonic() > deadline:
            raise RuntimeError("the CDN did not cache the file")
        time.sleep(0.2)
    return procs, port, task["taskId"]


def run(args: argparse.Namespace, sn_pid: int, port: int, task: str) -> list[dict[str, Any]]:
    from twisted.internet import defer, reactor
    from twisted.internet.task import react
    from twisted.web.client import BrowserLikePolicyForHTTPS

    from dragonfly.core.leanhttp import LeanClient
    from dragonfly.peer.client import SupernodeClient

    def treq_client() -> Any:
        import treq
        from twisted.web.client import Agent, HTTPConnectionPool
        return treq.client.HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(),
                                            pool=HTTPConnectionPool(reactor)))

    makers = {"lean": lambda: LeanClient(reactor, context_factory=BrowserLikePolicyForHTTPS()), "treq": treq_client}
    node = f"127.0.0.1:{port}"
    path = f"/api/v1/tasks/{task}/sync"
    body = {"peerId": "bench-0", "have": [0, 1, 2, 3]}
    rows: list[dict[str, Any]] = []

    async def measure(name: str, concurrency: int) -> dict[str, Any]:
        http = makers[name]()
        client = SupernodeClient(http, [node], reactor)
        for _ in range(20):  # warm up: connections open, code paths hot
            await client._request(node, "POST", path, body)
        t0, s0, w0 = os.times(), cpu_seconds(sn_pid), time.monotonic()
        left = args.calls

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await client._request(node, "POST", path, body)

        await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(concurrency)])
        t1, s1, w1 = os.times(), cpu_seconds(sn_pid), time.monotonic()
        client_cpu = (t1.user - t0.user) + (t1.system - t0.system)
        return {
            "client": name, "concurrency": concurrency, "calls": args.calls,
            "client_cpu_us_per_call": round(client_cpu / args.calls * 1e6, 1),
            "supernode_cpu_us_per_call": round((s1 - s0) / args.calls * 1e6, 1),
            "calls_per_s": round(args.calls / (w1 - w0), 1), "load1": round(os.getloadavg()[0], 2),
            "connections": getattr(http, "connections_made", None),
        }

    async def main(_: Any) -> None:
        for _ in range(args.rounds):
            for concurrency in (1, args.concurrency):
                for name in ("lean", "treq"):
                    row = await measure(name, concurrency)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        if args.profile:
            spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
            for name in ("lean", "treq"):
                spies = [subprocess.Popen([spy, "record", "--nonblocking", "-r", "200", "-f", "raw", "-d", "600",
                                           "-p", str(pid), "-o", f"synccost-{name}-{who}.txt"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                         for who, pid in (("client", os.getpid()), ("supernode", sn_pid))]
                time.sleep(1.0)
                await measure(name, 1)
                for s in spies:
                    s.send_signal(2)
                    s.wait()

    react(main)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="py-spy the client and the SuperNode (lean and treq)")
    args = p.parse_args()
    workdir = tempfile.mkdtemp(prefix="df-synccost-")
    procs: list[subprocess.Popen] = []
    try:
        procs, port, task = start(workdir)
        run(args, procs[1].pid, port, task)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

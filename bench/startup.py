"""
A SuperNode's start-up on loopback: from the spawn of C{twistd supernode}
to its API port bound and to the first answers a restarted SuperNode's
peers wait for (a peer registration, C{/healthz}, a sync), and then to a
call only the full API answers (C{GET /api/v1/tasks}), sent once those are in.

    python -m bench.startup --rounds 5 [TREE ...]

Each TREE (default: this one) is a checkout whose C{dragonfly} and
C{twisted/plugins} are used (C{PYTHONPATH}, compiled to bytecode first);
the trees alternate within each round, and each start has a fresh empty
home.  The requests are sent as soon as a connection to the API port is
made, so they wait in the listen backlog until the process serves them.
Prints each start and the medians per tree.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PEER = b'{"peerId": "bench-peer", "ip": "127.0.0.1", "port": 1}'
SYNC = b'{"peerId": "bench-peer", "have": [], "digestsFrom": 0}'
REQUESTS = {
    "register": b"POST /api/v1/peers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(PEER), PEER),
    "healthz": b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "sync": b"POST /api/v1/tasks/%s/sync HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (b"0" * 64, len(SYNC), SYNC),
    "list": b"GET /api/v1/tasks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
}
#: sent at once as the port is bound; "list" once they are answered
FIRST = ("register", "healthz", "sync")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(port: int, deadline: float) -> socket.socket:
    while True:
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def answer(s: socket.socket) -> tuple[float, int]:
    """The time the whole answer was in, and its status."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    done = time.monotonic()
    s.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return done, status


def start_once(tree: str) -> dict[str, Any]:
    api, block = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="dfb-startup-") as home:
        env = {**os.environ, "PYTHONPATH": tree}
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "supernode", "--port", str(api),
             "--block-port", str(block), "--listen", "127.0.0.1", "--advertise-ip", "127.0.0.1", "--home", home],
            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            first = connect(api, t0 + 30)
            out: dict[str, Any] = {"bind": time.monotonic() - t0}
            socks = {"register": first}
            socks.update({name: connect(api, t0 + 30) for name in FIRST if name != "register"})
            for name, s in socks.items():
                s.sendall(REQUESTS[name])
            for name, s in socks.items():
                done, status = answer(s)
                out[name] = done - t0
                out[name + " status"] = status
            # then a call only the full API answers
            s = connect(api, t0 + 30)
            s.sendall(REQUESTS["list"])
            done, status = answer(s)
            out["list"], out["list status"] = done - t0, status
            return out
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("trees", nargs="*", default=[REPO])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    for tree in args.trees:
        subprocess.run([sys.executable, "-m", "compileall", "-q", "dragonfly", "twisted"], cwd=tree, check=True)
    runs: dict[str, list[dict[str, Any]]] = {tree: [] for tree in args.trees}
    print("load average: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    for r in range(args.rounds):
        order = args.trees if r % 2 == 0 else args.trees[::-1]
        for tree in order:
            out = start_once(tree)
            runs[tree].append(out)
            print(f"{tree}: " + ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()
            ), flush=True)
    print("load average: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    for tree, outs in runs.items():
        print(f"median {tree}: " + ", ".join(
            f"{k} {statistics.median(o[k] for o in outs):.3f}" for k in ("bind", *REQUESTS)
        ) + f"; bind to register {statistics.median(o['register'] - o['bind'] for o in outs):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
The dfpeer's content stream (C{GET /api/v1/downloads/<id>/content}, what
dfdaemon relays) with and without its read-ahead in the pool
(DRAGONFLY_STREAM_WARM), back to back, on loopback with real processes.

    python -m bench.stream [--mib 1024] [--runs 3] [--order 01s]

Each run starts, for each mode (in C{--order}, reversed every other run:
0 without the read-ahead, 1 with it, s with it but never exact), an origin, a SuperNode and one dfpeer, then:

live:  POST the download and GET its content at once: the stream follows
       the pieces as they are written (with C{O_DIRECT}) and sent on;
held:  the page cache of the dfpeer's file dropped (C{POSIX_FADV_DONTNEED}),
       GET the content again: the whole file from the disk through the stream.

Each GET reads the body to the end on one connection and counts its bytes.
Reported per GET: seconds, the dfpeer's CPU-seconds over it, and from the
stream's own log line the reactor thread's time in sendfile (wall, its CPU,
the longest turn) and how often the stream waited for the pool.  Every
daemon and temp dir is removed on exit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit
from urllib.request import urlopen

from dragonfly.testing.swarm import Swarm, write_random_file

MiB = 1 << 20
LINE = re.compile(
    r"stream sent (?P<bytes>\d+) bytes \((?P<zero>\d+) with sendfile: (?P<ms>[\d.]+) ms in the reactor, "
    r"(?P<cpu>[\d.]+) ms of its CPU, (?P<calls>\d+) calls, the longest turn (?P<longest>[\d.]+) ms; "
    r"read ahead: (?P<ahead>[^,]+), waited for it (?P<waits>\d+) times\)"
)


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def get_all(api: str, path: str, size: int) -> float:
    """Seconds to GET C{path} to its end (C{size} bytes, checked)."""
    u = urlsplit(api)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    began = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: {resp.status} {resp.read()[:200]!r}")
    buf = bytearray(MiB)
    got = 0
    while True:
        n = resp.readinto(buf)  # type: ignore[arg-type]
        if not n:
            break
        got += n
    took = time.perf_counter() - began
    conn.close()
    if got != size:
        raise RuntimeError(f"GET {path}: {got} of {size} bytes")
    return took


def stream_lines(log: str, after: int) -> list[dict[str, Any]]:
    with open(log, errors="replace") as f:
        f.seek(after)
        return [m.groupdict() for m in LINE.finditer(f.read())]


def one(work: str, root: str, name: str, size: int, warm: str) -> dict[str, Any]:
    # (the daemons inherit them) s: read ahead, never exact (the kernel's readahead near the frontier too)
    os.environ["DRAGONFLY_STREAM_WARM"] = "0" if warm == "0" else "1"
    os.environ["DRAGONFLY_STREAM_WARM_EXACT"] = "0" if warm == "s" else "1"
    wd = os.path.join(work, f"swarm-{warm}")
    out: dict[str, Any] = {"warm": warm}
    try:
        with Swarm(wd) as swarm:
            origin = swarm.start_origin(root)
            swarm.start_supernode()
            peer = swarm.start_peer("p0")
            api, pid = peer["api"], peer["proc"].pid
            log = os.path.join(wd, "p0.log")
            u = urlsplit(api)
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
            conn.request("POST", "/api/v1/downloads", json.dumps({"url": f"{origin}/{name}"}),
                         {"content-type": "application/json"})
            task_id = json.loads(conn.getresponse().read())["taskId"]
            conn.close()
            path = f"/api/v1/downloads/{task_id}/content"
            for phase in ("live", "held"):
                if phase == "held":
                    data = os.path.join(peer["home"], "data", task_id + ".data")
                    fd = os.open(data, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                mark = os.path.getsize(log)
                cpu = cpu_seconds(pid)
                took = get_all(api, path, size)
                cpu = cpu_seconds(pid) - cpu
                lines: list[dict[str, Any]] = []
                for _ in range(20):  # (the log line written)
                    time.sleep(0.1)
                    lines = stream_lines(log, mark)
                    if lines:
                        break
                s = lines[-1] if lines else {}
                out[phase] = {
                    "seconds": took, "dfpeer_cpu": cpu, "sendfile_ms": float(s.get("ms", "nan")),
                    "sendfile_cpu_ms": float(s.get("cpu", "nan")), "longest_ms": float(s.get("longest", "nan")),
                    "calls": int(s.get("calls", 0)), "waits": int(s.get("waits", 0)), "load": load(),
                }
                if phase == "live":
                    task = json.loads(urlopen(f"{api}/api/v1/downloads/{task_id}", timeout=10).read())
                    out[phase]["task_seconds"] = task.get("elapsed")
                out[phase]["zero_copy"] = int(s.get("zero", 0))
                task_s = out[phase].get("task_seconds")
                print(f"  warm={warm} {phase}: {took:.2f} s" + (f" (the task {task_s:.2f} s)" if task_s else "")
                      + f", {out[phase]['zero_copy'] / MiB:.0f} MiB with sendfile, dfpeer {cpu:.2f} CPU-s; reactor in sendfile "
                      f"{out[phase]['sendfile_ms']:.0f} ms ({out[phase]['sendfile_cpu_ms']:.0f} ms CPU, "
                      f"{out[phase]['calls']} calls, longest {out[phase]['longest_ms']:.1f} ms), "
                      f"waited for the pool {out[phase]['waits']} times; load {load()}", flush=True)
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--order", default="01", help="the modes in the first run's order: 0 (DRAGONFLY_STREAM_WARM=0), "
                    "1 (read ahead), s (read ahead, DRAGONFLY_STREAM_WARM_EXACT=0)")
    ap.add_argument("--workdir", help="where the file and the daemons' homes go (a disk, not tmpfs)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-stream-", dir=args.workdir)
    results: list[dict[str, Any]] = []
    try:
        root = os.path.join(work, "origin")
        os.makedirs(root)
        write_random_file(os.path.join(root, "f.bin"), args.mib * MiB)
        for run in range(args.runs):
            order = args.order if run % 2 == 0 else args.order[::-1]
            print(f"run {run}: {args.mib} MiB, load {load()}", flush=True)
            for warm in order:
                results.append(one(work, root, "f.bin", args.mib * MiB, warm))
    finally:
        os.environ.pop("DRAGONFLY_STREAM_WARM", None)
        os.environ.pop("DRAGONFLY_STREAM_WARM_EXACT", None)
        shutil.rmtree(work, ignore_errors=True)
    for phase in ("live", "held"):
        for warm in sorted(set(args.order)):
            rows = [r[phase] for r in results if r["warm"] == warm]
            med = {k: statistics.median(r[k] for r in rows) for k in ("seconds", "dfpeer_cpu", "sendfile_ms",
                                                                      "sendfile_cpu_ms", "longest_ms")}
            print(f"{phase} warm={warm}: median of {len(rows)}: {med['seconds']:.2f} s, dfpeer {med['dfpeer_cpu']:.2f} "
                  f"CPU-s, reactor in sendfile {med['sendfile_ms']:.0f} ms ({med['sendfile_cpu_ms']:.0f} ms CPU), "
                  f"longest turn {med['longest_ms']:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""
C{make demo}: a local swarm on loopback, end to end.

Starts an origin web server, a SuperNode and 4 dfpeers (real processes, the
documented commands), generates a 256 MiB file, downloads it with dfget on
every peer at the same moment, checks every copy's SHA-256 and prints where
each peer's bytes came from.

    python -m dragonfly.demo [--size 256M] [--peers 4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from .core.units import human_bytes, parse_size
from .testing.swarm import Swarm, sha256_file, write_random_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dragonfly.demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--size", default="256M", help="file size (default 256M)")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--workdir", default=None, help="keep homes and logs here (default: a temp dir, removed)")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    workdir = args.workdir or tempfile.mkdtemp(prefix="dragonfly-demo-")
    www = os.path.join(workdir, "www")
    os.makedirs(www, exist_ok=True)
    print(f"demo: generating a {human_bytes(size)} file ...", flush=True)
    want = write_random_file(os.path.join(www, "demo.bin"), size)
    ok = True
    with Swarm(workdir) as swarm:
        swarm.start_origin(www)
        swarm.start_supernode()
        names = [f"peer{i + 1}" for i in range(args.peers)]
        for name in names:
            swarm.start_peer(name)
        print(f"demo: origin {swarm.origin_url}, supernode {swarm.supernode_addr}, {args.peers} dfpeers; "
              f"running dfget on every peer at once", flush=True)
        url = swarm.origin_url + "/demo.bin"
        t0 = time.monotonic()
        runs = {}
        for name in names:
            out = os.path.join(workdir, f"{name}.out")
            runs[name] = (swarm.dfget(url, out, name), out)
        rows: list[tuple[str, float, dict[str, Any] | None, str]] = []
        for name, (proc, out) in runs.items():
            _, err = proc.communicate(timeout=600)
            wall = time.monotonic() - t0
            if proc.returncode != 0:
                ok = False
                rows.append((name, wall, None, err.decode().strip()))
                continue
            peer_task = swarm.peer_tasks(name)[0]
            rows.append((name, wall, peer_task, "ok" if sha256_file(out) == want else "SHA-256 MISMATCH"))
        stats = swarm.origin_stats()
        sn = swarm.supernode_task(rows[0][2]["taskId"]) if rows[0][2] else None
    print()
    print(f"{'peer':<8} {'time':>7} {'from origin':>12} {'from supernode':>15} {'from peers':>12} {'uploaded':>10}  check")
    for name, wall, task, check in rows:
        if task is None:
            print(f"{name:<8} {wall:6.2f}s  FAILED: {check}")
            continue
        t = task["traffic"]
        print(
            f"{name:<8} {task['elapsed']:6.2f}s {human_bytes(t['back_to_source']):>12} {human_bytes(t['supernode']):>15} "
            f"{human_bytes(t['remote_peer']):>12} {human_bytes(task['uploaded']):>10}  {check}"
        )
        ok = ok and check == "ok"
    requests = stats["requests"].get("/demo.bin", 0)
    print()
    print(f"origin:    {requests} request(s), {human_bytes(stats['bytesSent'])} sent ({stats['bytesSent'] / size:.2f} copies)")
    if sn is not None:
        print(f"supernode: fetched {human_bytes(sn['originBytes'])} once, seeded {human_bytes(sn['seedBytes'])} "
              f"({sn['seedBytes'] / size:.2f} copies); peers served each other the rest")
    print(f"all {args.peers} copies {'match' if ok else 'DO NOT match'} the origin's SHA-256 {want[:16]}...")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"homes and logs kept in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

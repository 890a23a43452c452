"""
Three Docker engines pulling one image through dfdaemon at once, against
one engine pulling alone (issue 13's target: the registry sends each layer
once; the three within 1.3 x the time of one alone).

    python -m bench.docker3 [--runs 2] [--layers-mib 12,8,4] [--engines 3] [--modes dfdaemon,registry]

Root only (dockerd, from Debian's docker.io; L{dragonfly.testing.docker}).
One real registry, a SuperNode and ENGINES hosts, each with its own dfpeer,
dfdaemon and dockerd whose daemon.json names its dfdaemon in
C{registry-mirrors} (written by C{dfdaemon setup docker}), as in the e2e
test.  Each run pulls images of the given layer sizes that no host holds
(a new image for every pull, so every layer is cold everywhere):

  - dfdaemon: engine 0 pulls C{library/<name>} alone (through its
    dfdaemon's mirror), then every engine pulls another image at once;
  - registry: the same, C{127.0.0.1:PORT/<name>} straight from the
    registry (no mirror: what the engines cost by themselves).

For each pull: its seconds (from the common start to the engine's last
line), the seconds at which its last layer's download completed (docker's
C{Download complete}; what follows is extraction), and the CPU seconds the
engines (dockerd and the containerd it runs), the SuperNode, the dfpeers,
the dfdaemons and the registry used meanwhile; for the
dfdaemon mode, the registry's copies of each layer.  Prints the ratio
three-at-once (slowest) over alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from dragonfly.testing.docker import Dockerd, have_dockerd
from dragonfly.testing.registry import Image, Registry, have_tools, make_image
from dragonfly.testing.swarm import Swarm

MiB = 1 << 20
DFDAEMON = os.path.join(os.path.dirname(sys.executable), "dfdaemon")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pids: set[int], sessions: set[int]) -> float:
    """CPU seconds (user + system, with reaped children) of C{pids} and every process in C{sessions}."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # (fields from the state: 0 state, 3 session, 11-14 utime stime cutime cstime)
        if int(entry) in pids or int(fields[3]) in sessions:
            total += sum(int(x) for x in fields[11:15])
    return total / TICK


def pull(engine: Dockerd, ref: str, started: float, out: dict[str, Any]) -> None:
    """C{docker pull ref}: its seconds from C{started}, and when its last layer finished downloading."""
    proc = subprocess.Popen(engine.docker("pull", ref), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    downloaded = 0.0
    lines = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").strip()
        lines.append(line)
        if line.endswith("Download complete") or line.endswith("Already exists"):
            downloaded = time.monotonic() - started
    proc.wait()
    out["seconds"] = time.monotonic() - started
    out["downloaded"] = downloaded
    out["ok"] = proc.returncode == 0
    out["tail"] = "\n".join(lines[-5:])


def pull_all(engines: list[Dockerd], refs: list[str], accounts: dict[str, tuple[set[int], set[int]]]) -> dict[str, Any]:
    """The engines pull at once (engine i pulls refs[i]); each one's times, and the CPU seconds used."""
    before = {name: cpu_of(*ids) for name, ids in accounts.items()}
    started = time.monotonic()
    outs: list[dict[str, Any]] = [{} for _ in engines]
    threads = [threading.Thread(target=pull, args=(e, r, started, o)) for e, r, o in zip(engines, refs, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in outs:
        assert o["ok"], o["tail"]
    cpu = {name: cpu_of(*ids) - before[name] for name, ids in accounts.items()}
    return {"seconds": [o["seconds"] for o in outs], "downloaded": [o["downloaded"] for o in outs], "cpu": cpu}


def copies(registry: Registry, image: Image, sizes: dict[str, int]) -> list[float]:
    """The registry's bytes of each layer (GETs, any status) over the layer's size."""
    sent = dict.fromkeys(image.layers, 0)
    for r in registry.responses():
        if r["method"] == "GET":
            for digest in image.layers:
                if f"/blobs/{digest}" in r["uri"]:
                    sent[digest] += r["written"] or 0
    return [sent[d] / sizes[d] for d in image.layers]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--layers-mib", default="12,8,4", help="the image's layer sizes (MiB, before gzip: random, so about the same after)")
    ap.add_argument("--engines", type=int, default=3)
    ap.add_argument("--modes", default="dfdaemon,registry")
    args = ap.parse_args()
    for missing in (have_tools(), have_dockerd()):
        if missing:
            raise SystemExit(missing)
    layers = [int(float(x) * MiB) for x in args.layers_mib.split(",")]
    modes = args.modes.split(",")
    work = tempfile.mkdtemp(prefix="docker3-")
    registry = Registry(f"{work}/registry").start()
    engines: list[Dockerd] = []
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        with Swarm(f"{work}/swarm") as swarm:
            swarm.start_supernode()
            for i in range(args.engines):
                peer = swarm.start_peer(f"host{i}")
                url = swarm.start_dfdaemon(f"dfdaemon{i}", peer["home"], "--registry", registry.url)
                engine = Dockerd()
                engines.append(engine)
                subprocess.run([DFDAEMON, "setup", "docker", "--target", engine.daemon_json, "--mirror", url],
                               check=True, capture_output=True, timeout=60)
                engine.start()
            assert registry.proc is not None
            accounts = {
                "engines": (set(), {e.proc.pid for e in engines}),
                "supernode": ({p.pid for n, p in swarm.procs if n == "supernode"}, set()),
                "dfpeers": ({p.pid for n, p in swarm.procs if n.startswith("host")}, set()),
                "dfdaemons": ({p.pid for n, p in swarm.procs if n.startswith("dfdaemon")}, set()),
                "registry": ({registry.proc.pid}, set()),
            }
            seed = 100
            for run in range(args.runs):
                for mode in modes:
                    row: dict[str, Any] = {}
                    for what, count in (("alone", 1), ("together", args.engines)):
                        seed += 1
                        name = f"bench{seed}"
                        image = make_image(f"{work}/oci-{seed}", layers, tag="v1", seed=seed)
                        sizes = {d: os.path.getsize(os.path.join(image.layout, "blobs", "sha256", d.split(":")[1]))
                                 for d in image.layers}
                        registry.push(image, f"library/{name}")
                        shutil.rmtree(f"{work}/oci-{seed}", ignore_errors=True)
                        ref = f"{name}:v1" if mode == "dfdaemon" else f"{registry.netloc}/library/{name}:v1"
                        got = pull_all(engines[:count], [ref] * count, accounts)
                        if mode == "dfdaemon":
                            got["copies"] = copies(registry, image, sizes)
                        row[what] = got
                    ratio = max(row["together"]["seconds"]) / row["alone"]["seconds"][0]
                    row["ratio"] = ratio
                    results.setdefault(mode, []).append(row)
                    for what in ("alone", "together"):
                        g = row[what]
                        print(
                            f"run {run} {mode:8s} {what:8s} pull {' '.join(f'{s:5.2f}' for s in g['seconds'])} s"
                            f"  last layer downloaded {' '.join(f'{s:5.2f}' for s in g['downloaded'])} s"
                            f"  cpu s: " + " ".join(f"{k} {v:.2f}" for k, v in g["cpu"].items())
                            + (f"  registry copies per layer {' '.join(f'{c:.2f}' for c in g['copies'])}" if "copies" in g else ""),
                            flush=True,
                        )
                    print(f"run {run} {mode:8s} {args.engines} at once (slowest) / alone: {ratio:.2f} x", flush=True)
    finally:
        for e in engines:
            e.stop()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.engines} engines, layers {args.layers_mib} MiB, {args.runs} runs (median):")
    for mode, rows in results.items():
        alone = statistics.median(r["alone"]["seconds"][0] for r in rows)
        together = statistics.median(max(r["together"]["seconds"]) for r in rows)
        line = (f"  {mode:8s} alone {alone:.2f} s, {args.engines} at once {together:.2f} s (slowest): "
                f"{statistics.median(r['ratio'] for r in rows):.2f} x")
        if mode == "dfdaemon":
            most = max(max(r[w]["copies"]) for r in rows for w in ("alone", "together"))
            line += f"; registry copies of a layer at most {most:.2f}"
        print(line)


if __name__ == "__main__":
    main()

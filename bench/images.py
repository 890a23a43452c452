"""
Image pulls through dfdaemon against the same pulls straight from the
registry (issue 11, target 4), on loopback with the real components of the
e2e tests: Debian's docker-registry, skopeo, containerd + ctr.

    python -m bench.images [--layer-mib 256] [--hosts 10] [--image-mib 16x3] [--runs 1]
                           [--parts layer,containerd,small] [--direct-below 256K,0]
                           [--small-sizes 16K,64K,256K,1M,4M] [--profile DIR] [--json PATH]

layer:      one image of one layer of LAYER_MIB, pushed to the registry.
            Host 1 (its own dfpeer and dfdaemon, a SuperNode beside them)
            GETs the blob through its dfdaemon (the swarm fetches it from the
            registry once), then host 2 (a dfpeer and dfdaemon of its own)
            GETs it through its dfdaemon: its pieces come from host 1's
            dfpeer and the SuperNode's CDN.  Against: the same GET straight
            from the registry.  Each GET runs on a kept-alive connection
            that has first carried what a pull asks before a layer (the
            version check, the manifest, the config), and is hashed as it
            arrives and checked against the digest.
containerd: HOSTS containerd instances (each its own root, state and
            socket) pulling an image of the given layers (``16x3``: three
            layers of 16 MiB) at one moment with ``ctr image pull``: first
            straight from the registry, then (fresh containerds) each through
            its own host's dfdaemon and dfpeer (hosts.toml names dfdaemon as
            the mirror).  Every blob in every containerd's store is checked
            by digest; the registry's log says how many bytes of each layer
            it sent (in copies of the layer).  With --direct-below A,B,... the
            pulls through dfdaemon run once per value of dfdaemon's
            --direct-below, back to back in each run (an A/B).
small:      (not in the default parts) blobs of --small-sizes, each GET by
            HOSTS hosts at once through their dfdaemons with --direct-below 0
            (every blob through the swarm) and straight from the registry:
            where the swarm's fixed costs stop paying (--direct-below's default).

With --trace, the layer part's daemons run with DRAGONFLY_TRACE=1 and host 2's GET is
printed as a timeline (see L{timeline}); --dfdaemon-args adds options to its
dfdaemons (an A/B: one run with --dfdaemon-args=--no-splice, one without).
With --profile DIR, py-spy (``record --nonblocking``) samples host 2's
dfdaemon and dfpeer during its GET; DIR gets their flame graphs (SVG) and
the top of each collapsed profile.  Prints a table; --json writes the
results.  Every daemon, containerd and temp dir is removed on every exit.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit

from dragonfly.core.units import parse_rate
from dragonfly.testing.containerd import Containerd, have_containerd, run_pulls, write_hosts_toml
from dragonfly.testing.registry import OCI_MANIFEST, Image, Registry, have_tools, make_image
from dragonfly.testing.swarm import Swarm, get_json

from .measure import warm_memory

MiB = 1 << 20


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


#: where each timed GET and each round of pulls first warms the machine's memory (L{warm_memory}: the
#: bytes written and removed; on this VM the first to need more memory than it used just before pays the
#: host's faults for it); None: not (--no-warm-memory)
WARM_DIR: str | None = None
#: the bytes warmed before a timed GET (twice the layer part's 256 MiB blob)
WARM_GET = 512 * 1024 * 1024


def warm_first(nbytes: int) -> None:
    if WARM_DIR is not None:
        warm_memory(WARM_DIR, nbytes)


def timed_get(url: str, path: str, before: list[str], digest: str, began: list[float] | None = None) -> float:
    """
    Seconds to GET C{path} (after the C{before} requests on the same
    connection), the body hashed as it arrives and checked against C{digest};
    C{began} gets the wall-clock time the GET was sent.  The machine's memory
    is warmed first (L{warm_first}).
    """
    warm_first(WARM_GET)
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        for warm in before:
            conn.request("GET", warm, headers={"Accept": OCI_MANIFEST})
            conn.getresponse().read()
        h = hashlib.sha256()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        n = 0
        start = time.monotonic()
        if began is not None:
            began.append(time.time())
        conn.request("GET", path)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"GET {url}{path}: {resp.status} {resp.read()[:500]!r}")
        while True:
            got = resp.readinto(buf)
            if not got:
                break
            h.update(view[:got])
            n += got
        took = time.monotonic() - start
    finally:
        conn.close()
    if "sha256:" + h.hexdigest() != digest:
        raise RuntimeError(f"GET {url}{path}: {n} bytes that do not match {digest}")
    return took


def blob_bytes(registry: Registry, digest: str) -> int:
    """Body bytes the registry has sent of blob C{digest} (its log)."""
    return sum(
        r["written"] or 0 for r in registry.responses()
        if r["method"] == "GET" and f"/blobs/{digest}" in r["uri"] and r["status"] in (200, 206)
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pid_of(swarm: Swarm, name: str) -> int:
    return next(p.pid for n, p in swarm.procs if n == name)


class Profiler:
    """py-spy record --nonblocking on some processes, while a block runs."""

    def __init__(self, outdir: str | None, pids: dict[str, int], tag: str) -> None:
        self.outdir = outdir
        self.pids = pids
        self.tag = tag
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Profiler:
        spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        spy = spy if os.path.exists(spy) else shutil.which("py-spy")
        if self.outdir is None or spy is None:
            return self
        os.makedirs(self.outdir, exist_ok=True)
        for name, pid in self.pids.items():
            for fmt, ext in (("raw", "txt"), ("flamegraph", "svg")):
                out = os.path.join(self.outdir, f"{self.tag}-{name}.{ext}")
                self.procs.append(subprocess.Popen(
                    [spy, "record", "--nonblocking", "--threads", "-r", "200", "-f", fmt, "-o", out,
                     "-p", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))
        time.sleep(1.0)  # py-spy attaches
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.outdir is None:
            return
        for name in self.pids:
            raw = os.path.join(self.outdir, f"{self.tag}-{name}.txt")
            if os.path.exists(raw):
                with open(os.path.join(self.outdir, f"{self.tag}-{name}.top.txt"), "w") as f:
                    f.write(summarise(raw))


def summarise(raw: str, top: int = 25) -> str:
    """The functions with the most samples (self, and inclusive) in a py-spy raw (collapsed) profile."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    lines = [f"{total} samples", "", "self:"]
    lines += [f"  {n / total:6.1%}  {fr}" for fr, n in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {fr}" for fr, n in incl.most_common(top)]
    return "\n".join(lines) + "\n"


TRACE_LINE = re.compile(r"trace (?:[0-9a-f]{12} )?(stream waits for piece \d+|stream sees done|stream sent all|relay start|"
                        r"relay took all|relay sent all|start|piece \d+ from \S+) at (\d+\.\d+)(?:, offset (\d+))?")


def timeline(logs: list[str], began: float, took: float) -> dict[str, Any]:
    """
    Host 2's GET from its processes' DRAGONFLY_TRACE lines (seconds from the
    GET's start): the task's start, first and last piece, where the dfpeer's
    in-order stream stood when it saw the task done, its last byte sent, the
    relay's last byte taken and sent, the client's last byte.
    """
    out: dict[str, Any] = {}
    pieces = []
    for path in logs:
        with open(path, errors="replace") as f:
            for m in TRACE_LINE.finditer(f.read()):
                what, t = m.group(1), float(m.group(2)) - began
                if t < -1:
                    continue  # (host 1's GET, in host 1's logs only; or an earlier request)
                if what.startswith("piece"):
                    pieces.append(t)
                elif what.startswith("stream waits"):
                    out["stream_waits"] = out.get("stream_waits", 0) + 1
                elif what not in out:
                    out[what] = t
                    if m.group(3):
                        out["offset at done"] = int(m.group(3))
    if pieces:
        out["first piece"], out["last piece"] = min(pieces), max(pieces)
    out["client done"] = took
    return out


def layer_bench(
    work: str, registry: Registry, image: Image, runs: int, profile: str | None, dfdaemon_args: tuple[str, ...] = (),
    trace: bool = False,
) -> dict[str, Any]:
    digest = image.layers[0]
    size = len(image.blob(digest))
    path = f"/v2/bench/layer/blobs/{digest}"
    warm = ["/v2/", "/v2/bench/layer/manifests/v1", f"/v2/bench/layer/blobs/{image.config_digest}"]
    out: dict[str, Any] = {"size": size, "registry": [], "host1": [], "host2": [], "copies": [], "load": []}
    for run in range(runs):
        out["registry"].append(timed_get(registry.url, path, warm, digest))
        before = blob_bytes(registry, digest)
        wd = os.path.join(work, f"layer-{run}")
        try:
            with Swarm(wd) as swarm:
                swarm.start_supernode()
                urls, apis = [], []
                for h in (1, 2):
                    peer = swarm.start_peer(f"host{h}")
                    apis.append(peer["api"])
                    urls.append(swarm.start_dfdaemon(f"dfdaemon{h}", peer["home"], "--registry", registry.url,
                                                     *dfdaemon_args))
                out["host1"].append(timed_get(urls[0], path, warm, digest))
                pids = {"dfdaemon": pid_of(swarm, "dfdaemon2"), "dfpeer": pid_of(swarm, "host2")}
                cpu = {k: cpu_seconds(p) for k, p in pids.items()}
                began: list[float] = []
                with Profiler(profile if run == 0 else None, pids, "host2"):
                    out["host2"].append(timed_get(urls[1], path, warm, digest, began))
                if trace:
                    time.sleep(0.2)  # (the logs written)
                    tl = timeline([os.path.join(wd, "host2.log"), os.path.join(wd, "dfdaemon2.log")], began[0],
                                  out["host2"][-1])
                    out.setdefault("host2_timeline", []).append(tl)
                    print(f"layer run {run}: host 2's GET, seconds from its start: " + ", ".join(
                        f"{k} {v / MiB:.0f} MiB" if k == "offset at done" else f"{k} {v}" if k == "stream_waits"
                        else f"{k} {v:.3f}" for k, v in sorted(tl.items(), key=lambda kv: (kv[0] != "start", kv[1]))),
                        flush=True)
                for k, p in pids.items():
                    out.setdefault(f"host2_{k}_cpu", []).append(cpu_seconds(p) - cpu[k])
                # again, the blob held on host 2: the dfdaemon -> dfpeer path alone
                cpu = {k: cpu_seconds(p) for k, p in pids.items()}
                out.setdefault("held", []).append(timed_get(urls[1], path, warm, digest))
                for k, p in pids.items():
                    out.setdefault(f"held_{k}_cpu", []).append(cpu_seconds(p) - cpu[k])
                # the dfpeers' own download times (the swarm's part of each GET)
                for h, api in ((1, apis[0]), (2, apis[1])):
                    tasks = [t for t in get_json(api + "/api/v1/tasks")["tasks"] if t["contentLength"] == size]
                    out.setdefault(f"host{h}_task", []).append(tasks[0]["elapsed"] if tasks else None)
                for url in urls:
                    c = get_json(url + "/_dfdaemon/status")["counters"]
                    if c["p2p"] < 1 or c["p2p_bytes"] < size or c["fallbacks"]:
                        raise RuntimeError(f"{url} did not serve the blob from the swarm: {c}")
        finally:
            shutil.rmtree(wd, ignore_errors=True)
        out["copies"].append((blob_bytes(registry, digest) - before) / size)
        out["registry"].append(timed_get(registry.url, path, warm, digest))
        out["load"].append(load())
        print(f"layer run {run}: registry {out['registry'][-2]:.2f}/{out['registry'][-1]:.2f} s, "
              f"host 1 {out['host1'][-1]:.2f} s (its dfpeer's task {out['host1_task'][-1]:.2f} s), "
              f"host 2 {out['host2'][-1]:.2f} s (task {out['host2_task'][-1]:.2f} s; CPU s dfpeer "
              f"{out['host2_dfpeer_cpu'][-1]:.2f}, dfdaemon {out['host2_dfdaemon_cpu'][-1]:.2f}), "
              f"host 2 again (held) {out['held'][-1]:.2f} s (CPU s dfpeer {out['held_dfpeer_cpu'][-1]:.2f}, "
              f"dfdaemon {out['held_dfdaemon_cpu'][-1]:.2f}), "
              f"registry sent {out['copies'][-1]:.2f} copies; load {out['load'][-1]}", flush=True)
    return out


def small_bench(work: str, registry: Registry, hosts: int, sizes: list[int], runs: int) -> dict[str, Any]:
    """
    Blobs of each of C{sizes} GET by C{hosts} hosts at once, through their
    dfdaemons with C{--direct-below 0} (every blob through the swarm) and
    straight from the registry: where the swarm's fixed costs stop paying.
    """
    import concurrent.futures

    image = make_image(os.path.join(work, "oci-small"), sizes, tag="v1", seed=43)
    registry.push(image, "bench/small")
    out: dict[str, Any] = {"hosts": hosts, "sizes": [len(image.blob(d)) for d in image.layers], "swarm": [],
                           "registry": [], "load": []}
    pool = concurrent.futures.ThreadPoolExecutor(hosts)

    def at_once(urls: list[str], digest: str) -> list[float]:
        path = f"/v2/bench/small/blobs/{digest}"
        return list(pool.map(lambda u: timed_get(u, path, [], digest), urls))

    try:
        for run in range(runs):
            wd = os.path.join(work, f"small-{run}")
            try:
                with Swarm(wd) as swarm:
                    swarm.start_supernode()
                    urls = []
                    for h in range(hosts):
                        peer = swarm.start_peer(f"host{h}")
                        urls.append(swarm.start_dfdaemon(f"dfdaemon{h}", peer["home"], "--registry", registry.url,
                                                         "--direct-below", "0"))
                    swarm_times, reg_times = [], []
                    for digest in image.layers:
                        reg_times.append(max(at_once([registry.url] * hosts, digest)))
                        swarm_times.append(max(at_once(urls, digest)))
            finally:
                shutil.rmtree(wd, ignore_errors=True)
            out["swarm"].append(swarm_times)
            out["registry"].append(reg_times)
            out["load"].append(load())
            print(f"small run {run}: slowest of {hosts} at once, registry / swarm: " + ", ".join(
                f"{n / 1024:.0f} KiB {r:.3f}/{s:.3f} s" for n, r, s in zip(out["sizes"], reg_times, swarm_times))
                + f"; load {out['load'][-1]}", flush=True)
    finally:
        pool.shutdown()
    return out


def check_pulled(ctr: Containerd, image: Image) -> None:
    """Every blob of the image in containerd's store, by digest."""
    for digest in image.layers + [image.config_digest]:
        r = subprocess.run(ctr.ctr("content", "get", digest), capture_output=True, timeout=120)
        if r.returncode != 0 or "sha256:" + hashlib.sha256(r.stdout).hexdigest() != digest:
            raise RuntimeError(f"containerd {ctr.root}: {digest} missing or wrong")


def pull_all(
    work: str, registry: Registry, image: Image, ref: str, hosts: int, through: bool, extra: tuple[str, ...] = (),
    profile: str | None = None,
) -> dict[str, Any]:
    """
    C{hosts} containerds pulling C{ref} at once; with C{through}, each
    through its own dfpeer + dfdaemon (C{extra}: more dfdaemon options).
    """
    tag = "dfdaemon" if through else "registry"
    ctrs: list[Containerd] = []
    swarm = Swarm(os.path.join(work, f"swarm-{tag}")) if through else None
    before = {d: blob_bytes(registry, d) for d in image.layers}
    try:
        if swarm is not None:
            swarm.start_supernode()
        commands = []
        urls = []
        for i in range(hosts):
            ctr = Containerd(os.path.join(work, f"ctr-{tag}-{i}"))
            ctrs.append(ctr)
            ctr.start()
            hosts_dir = os.path.join(work, f"hosts-{tag}-{i}")
            if swarm is not None:
                peer = swarm.start_peer(f"host{i}")
                url = swarm.start_dfdaemon(f"dfdaemon{i}", peer["home"], "--registry", registry.url, *extra)
                urls.append(url)
            else:
                url = registry.url
            write_hosts_toml(hosts_dir, registry.netloc, url, registry.url)
            commands.append(ctr.pull_command(ref, hosts_dir))
        # CPU seconds during the pulls, by kind of process
        kinds = {"containerd": [c.proc.pid for c in ctrs]}
        if swarm is not None:
            for name, proc in swarm.procs:
                kind = "supernode" if name == "supernode" else "dfdaemon" if name.startswith("dfdaemon") else "dfpeer"
                kinds.setdefault(kind, []).append(proc.pid)
        spied = {"dfpeer": pid_of(swarm, "host0"), "dfdaemon": pid_of(swarm, "dfdaemon0"),
                 "supernode": pid_of(swarm, "supernode")} if swarm is not None and profile else {}
        with Profiler(profile, spied, "containerd"):
            each_before = {p: cpu_seconds(p) for pids in kinds.values() for p in pids}
            # each host's blobs, in containerd's content store and unpacked, and as much again
            warm_first(4 * hosts * sum(len(image.blob(d)) for d in image.layers))
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            times = run_pulls(commands, os.path.join(work, f"pulls-{tag}"))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            each = {p: cpu_seconds(p) - each_before[p] for p in each_before}
            cpu = {k: sum(each[p] for p in pids) for k, pids in kinds.items()}
            # the spread over the processes of each kind (min, max)
            spread = {k: (round(min(each[p] for p in pids), 2), round(max(each[p] for p in pids), 2))
                      for k, pids in kinds.items()}
        cpu["ctr"] = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        for ctr in ctrs:
            check_pulled(ctr, image)
        copies = {
            d: (blob_bytes(registry, d) - before[d]) / len(image.blob(d)) for d in image.layers
        }
        fallbacks = 0
        for url in urls:
            c = get_json(url + "/_dfdaemon/status")["counters"]
            fallbacks += c["fallbacks"]
        # each dfpeer's downloads: (bytes, seconds), the swarm's part of the pulls
        tasks = []
        if swarm is not None:
            for info in swarm.peers.values():
                tasks.append([(t["contentLength"], round(t["elapsed"], 3))
                              for t in get_json(info["api"] + "/api/v1/tasks")["tasks"]])
        # the SuperNode's syncs (each timed for its schedule histogram) and registrations, for all the pulls
        calls: dict[str, float] = {}
        if swarm is not None:
            for (name, _), value in swarm.metrics().items():
                if name.endswith("_schedule_duration_seconds_count"):
                    calls["syncs"] = value
        return {"times": times, "copies": copies, "fallbacks": fallbacks, "load": load(), "cpu": cpu, "cpu_spread": spread,
                "tasks": tasks, **calls}
    finally:
        if swarm is not None:
            swarm.stop()
            shutil.rmtree(swarm.workdir, ignore_errors=True)
        for ctr in ctrs:
            ctr.stop()


def containerd_bench(
    work: str, registry: Registry, image: Image, hosts: int, runs: int, direct_below: list[str] | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """
    With C{direct_below} (values of dfdaemon's --direct-below), each run
    pulls through dfdaemon once per value, back to back (an A/B in one
    run); C{dfdaemon} holds the first value's pulls, C{by_direct_below} all.
    """
    ref = registry.push(image, "bench/app")
    values = direct_below or [None]
    out: dict[str, Any] = {"hosts": hosts, "layers": [len(image.blob(d)) for d in image.layers], "registry": [],
                           "dfdaemon": [], "by_direct_below": {str(v): [] for v in values}}
    for run in range(runs):
        for mode, value in [("registry", None)] + [("dfdaemon", v) for v in values]:
            extra = ("--direct-below", value) if value is not None else ()
            r = pull_all(work, registry, image, ref, hosts, mode == "dfdaemon", extra,
                         profile if run == 0 and value == values[0] else None)
            if mode == "registry" or value == values[0]:
                out[mode].append(r)
            if mode == "dfdaemon":
                out["by_direct_below"][str(value)].append(r)
            if value is not None:
                mode = f"dfdaemon --direct-below {value}"
            if r["tasks"]:
                by_size: dict[int, list[float]] = {}
                for host in r["tasks"]:
                    for n, secs in host:
                        by_size.setdefault(n, []).append(secs)
                print("  dfpeer task seconds by size (max, mean): " + ", ".join(
                    f"{n}: {max(v):.2f}/{statistics.mean(v):.2f}" for n, v in sorted(by_size.items())), flush=True)
            print(f"containerd run {run} {mode:8s}: slowest {max(r['times']):.2f} s, mean "
                  f"{statistics.mean(r['times']):.2f} s; registry copies per layer "
                  f"{[round(c, 2) for c in r['copies'].values()]}; CPU s {({k: round(v, 1) for k, v in r['cpu'].items()})} "
                  f"(each: {r['cpu_spread']}); " + (f"{r['syncs']:.0f} syncs; " if "syncs" in r else "") +
                  f"load {r['load']}", flush=True)
    return out


def table(results: dict[str, Any]) -> str:
    rows = ["| case | straight from the registry | through dfdaemon | ratio | registry copies per blob | load avg |",
            "|---|---|---|---|---|---|"]
    if "layer" in results:
        lay = results["layer"]
        reg = statistics.median(lay["registry"])
        h1, h2 = statistics.median(lay["host1"]), statistics.median(lay["host2"])
        mib = lay["size"] / MiB
        rows.append(f"| {mib:.0f} MiB layer, host 1 (registry -> SuperNode -> dfpeer -> dfdaemon) | {reg:.2f} s | "
                    f"{h1:.2f} s | {h1 / reg:.2f} x | {max(lay['copies']):.2f} | {lay['load'][-1]} |")
        rows.append(f"| {mib:.0f} MiB layer, host 2 (from host 1's dfpeer) | {reg:.2f} s | {h2:.2f} s | "
                    f"{h2 / reg:.2f} x | - | {lay['load'][-1]} |")
        held = statistics.median(lay["held"])
        rows.append(f"| {mib:.0f} MiB layer, host 2 again (held: dfdaemon -> dfpeer only) | {reg:.2f} s | "
                    f"{held:.2f} s | {held / reg:.2f} x | - | {lay['load'][-1]} |")
    if "containerd" in results:
        c = results["containerd"]
        reg = statistics.median(max(r["times"]) for r in c["registry"])
        dfd = statistics.median(max(r["times"]) for r in c["dfdaemon"])
        copies = max(max(r["copies"].values()) for r in c["dfdaemon"])
        layers = "+".join(f"{n / MiB:.0f}" for n in c["layers"])
        rows.append(f"| {c['hosts']} containerd hosts, {layers} MiB image, slowest pull | {reg:.2f} s | {dfd:.2f} s | "
                    f"{dfd / reg:.2f} x | {copies:.2f} | {c['dfdaemon'][-1]['load']} |")
        variants = c.get("by_direct_below", {})
        for value, pulls in list(variants.items())[1:] if len(variants) > 1 else []:
            dfd = statistics.median(max(r["times"]) for r in pulls)
            copies = max(max(r["copies"].values()) for r in pulls)
            rows.append(f"| same, dfdaemon --direct-below {value} | {reg:.2f} s | {dfd:.2f} s | {dfd / reg:.2f} x | "
                        f"{copies:.2f} | {pulls[-1]['load']} |")
        if len(variants) > 1:
            rows[-len(variants)] = rows[-len(variants)].replace(
                "slowest pull |", f"slowest pull, dfdaemon --direct-below {next(iter(variants))} |")
    if "small" in results:
        sm = results["small"]
        for i, n in enumerate(sm["sizes"]):
            reg = statistics.median(r[i] for r in sm["registry"])
            swarm = statistics.median(r[i] for r in sm["swarm"])
            rows.append(f"| {n / 1024:.0f} KiB blob, {sm['hosts']} hosts at once, slowest (--direct-below 0) | "
                        f"{reg:.3f} s | {swarm:.3f} s | {swarm / reg:.1f} x | - | {sm['load'][-1]} |")
    return "\n".join(rows)


def plot(results: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if "layer" in results:
        lay = results["layer"]
        names = ["registry", "host 1", "host 2"]
        vals = [statistics.median(lay[k]) for k in ("registry", "host1", "host2")]
        axes[0].bar(names, vals, color=["grey", "tab:blue", "tab:green"])
        axes[0].set_title(f"{lay['size'] / MiB:.0f} MiB layer, one GET")
        axes[0].set_ylabel("seconds")
    if "containerd" in results:
        c = results["containerd"]
        for i, mode in enumerate(("registry", "dfdaemon")):
            times = sorted(c[mode][0]["times"])
            axes[1].plot(range(1, len(times) + 1), times, "o-", label=mode, color=["grey", "tab:blue"][i])
        axes[1].set_title(f"{c['hosts']} containerd hosts at once")
        axes[1].set_xlabel("host (sorted by finish)")
        axes[1].set_ylabel("seconds to pulled")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--layer-mib", type=int, default=256)
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--image-mib", default="16x3", help="layers of the containerd image: SIZExCOUNT")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--parts", default="layer,containerd", help="of layer, containerd, small (blob sizes against "
                    "--direct-below: --small-sizes blobs through the swarm and straight, --hosts at once)")
    ap.add_argument("--small-sizes", default="16K,64K,256K,1M,4M")
    ap.add_argument("--direct-below", help="dfdaemon's --direct-below in the containerd part (default: its "
                    "default); several, comma-separated: one pull through dfdaemon per value in each run (A/B)")
    ap.add_argument("--profile", help="py-spy host 2's dfdaemon and dfpeer (layer part), host 0's dfdaemon and "
                    "dfpeer and the SuperNode (containerd part, first run) into this directory")
    ap.add_argument("--dfdaemon-args", default="", help="more options for the layer part's dfdaemons, "
                    "space-separated (e.g. --dfdaemon-args=--no-splice)")
    ap.add_argument("--trace", action="store_true", help="DRAGONFLY_TRACE=1 for the layer part's daemons, and "
                    "host 2's GET as a timeline (task start, pieces, the in-order stream at the task's end, relay)")
    ap.add_argument("--no-warm-memory", action="store_true", help="do not write and remove 512 MiB before each timed"
                    " GET and 4 copies per host of the image before each round of pulls (bench.measure.warm_memory)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="a PNG of the results here")
    args = ap.parse_args()
    parts = args.parts.split(",")
    missing = have_tools() or ("containerd" in parts and have_containerd())
    if missing:
        raise SystemExit(missing)
    # a SIGTERM unwinds like Ctrl-C: every daemon, containerd and dir is removed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = tempfile.mkdtemp(prefix="imagebench-")
    global WARM_DIR
    WARM_DIR = None if args.no_warm_memory else work
    registry = Registry(os.path.join(work, "registry"))
    results: dict[str, Any] = {"load_before": load()}
    try:
        registry.start()
        if "layer" in parts:
            image = make_image(os.path.join(work, "oci-layer"), [args.layer_mib * MiB], tag="v1", seed=41)
            registry.push(image, "bench/layer")
            if args.trace:
                os.environ["DRAGONFLY_TRACE"] = "1"  # (the daemons inherit it)
            results["layer"] = layer_bench(work, registry, image, args.runs, args.profile,
                                           tuple(args.dfdaemon_args.split()), args.trace)
            os.environ.pop("DRAGONFLY_TRACE", None)
        if "small" in parts:
            sizes = [int(parse_rate(v)) for v in args.small_sizes.split(",")]
            results["small"] = small_bench(work, registry, args.hosts, sizes, args.runs)
        if "containerd" in parts:
            size, _, count = args.image_mib.partition("x")
            image = make_image(os.path.join(work, "oci-app"), [int(size) * MiB] * int(count or 1), tag="v1", seed=42)
            results["containerd"] = containerd_bench(
                work, registry, image, args.hosts, args.runs, args.direct_below.split(",") if args.direct_below else None,
                args.profile)
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()

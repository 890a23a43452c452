"""
First byte of a Range request for the tail of a blob no host holds yet
(issue 13's target: within 2 x the time straight from the registry).

    python -m bench.coldrange [--size-mib 256] [--range-mib 1] [--runs 3]

One image with one layer of SIZE, pushed to a real registry (the e2e
tests' one); then, RUNS times each, on a fresh swarm (a SuperNode, one
dfpeer, dfdaemon; new homes, so the blob is cold everywhere):

  - registry: the Range GET straight to the registry;
  - first:    through dfdaemon, default (C{--cold-range first}: a blob's
              first range on a host is the registry's 206, relayed);
  - swarm:    through dfdaemon with C{--cold-range swarm} (the 206 from the
              swarm: the CDN fetches the range's pieces from the registry
              out of order);
  - direct:   through dfdaemon with C{--cold-range direct} (the registry's 206);
  - noprefetch: through dfdaemon with C{--no-prefetch} (a swarm download of the range alone);
  - MODE@DIR:   MODE with the code in DIR (the processes' PYTHONPATH), for
                A/B runs in one go, e.g. C{--modes swarm,swarm@/tmp/base}.

For each: the seconds to the first byte and to the last, the body checked
against the blob, and after the swarm's prefetch of the whole blob, the
registry's bytes for the blob (in copies of it, what it sent to the
dfdaemon and the SuperNode; the paired request below not counted).  Each
dfdaemon mode's request is preceded by the same request straight to the
registry, once the swarm's processes are up (the machine as busy as for the
timed one; the median of 3 such requests): the ratio of the two is
reported pair by pair.  Prints a table.

With C{--blobs N}, many pairs in one go instead (for A/B runs): one swarm,
one host (dfpeer and dfdaemon) per dfdaemon mode, an image of N layers of
SIZE each; for every layer, cold everywhere, each mode's request paired
with the registry's just before it (the modes' order alternating from one
layer to the next), then the prefetches awaited.  Prints the ratio's
median and mean per mode.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import tempfile
import time
from urllib.parse import urlsplit

from dragonfly.core.ids import task_id
from dragonfly.testing.registry import OCI_MANIFEST, Registry, have_tools, make_image
from dragonfly.testing.swarm import Swarm, get_json

MiB = 1 << 20


def warm(url: str, before: list[str]) -> http.client.HTTPConnection:
    """
    A kept-alive connection that has carried the requests a pull makes
    before it reads a layer (C{before}: the version check, the manifest, the
    image's config): what is timed on it is the cold blob, not a process's
    or a connection's first request.
    """
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    for path in before:
        conn.request("GET", path, headers={"Accept": OCI_MANIFEST})
        conn.getresponse().read()
    return conn


def timed(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> tuple[int, bytes, float, float]:
    """GET C{path} on C{conn} (then closed): status, body, seconds to the first byte and to the last."""
    start = time.monotonic()
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    first = resp.read(1)
    first_byte = time.monotonic() - start
    body = first + resp.read()
    last_byte = time.monotonic() - start
    conn.close()
    return resp.status, body, first_byte, last_byte


def timed_get(url: str, path: str, headers: dict[str, str], before: list[str]) -> tuple[int, bytes, float, float]:
    """L{timed} on a connection L{warm} from C{before}."""
    return timed(warm(url, before), path, headers)


#: the User-Agent of the requests sent straight to the registry (not counted in what the swarm cost it)
STRAIGHT = "coldrange-straight"


def blob_bytes(registry: Registry, digest: str) -> int:
    """The blob's bytes the registry sent, but to the requests the bench sent it straight."""
    total = 0
    with open(registry.log_path, "rb") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if (
                entry.get("msg") == "response completed" and entry.get("http.request.method") == "GET"
                and f"/blobs/{digest}" in entry.get("http.request.uri", "")
                and entry.get("http.response.status") in (200, 206)
                and entry.get("http.request.useragent") != STRAIGHT
            ):
                total += entry.get("http.response.written") or 0
    return total


MODE_ARGS = {"direct": ("--cold-range", "direct"), "swarm": ("--cold-range", "swarm"), "noprefetch": ("--no-prefetch",)}


def many_blobs(args: argparse.Namespace) -> None:
    """C{--blobs N}: every dfdaemon mode on its own host in one swarm, N cold blobs, a pair per blob and mode."""
    modes = [m for m in args.modes.split(",") if m != "registry"]
    work = tempfile.mkdtemp(prefix="coldrange-")
    image = make_image(f"{work}/oci", [args.size_mib * MiB] * args.blobs, tag="v1", seed=37)
    warmup = ["/v2/", "/v2/bench/app/manifests/v1", f"/v2/bench/app/blobs/{image.config_digest}"]
    registry = Registry(f"{work}/registry").start()
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    try:
        registry.push(image, "bench/app")
        with Swarm(f"{work}/swarm") as swarm:
            swarm.start_supernode()
            hosts = {}
            for i, mode in enumerate(modes):
                kind, _, code = mode.partition("@")
                saved = os.environ.get("PYTHONPATH")
                if code:
                    os.environ["PYTHONPATH"] = os.path.abspath(code)
                peer = swarm.start_peer(f"host{i}")
                hosts[mode] = (peer, swarm.start_dfdaemon(f"dfdaemon{i}", peer["home"], "--registry", registry.url, *MODE_ARGS.get(kind, ())))
                if code:
                    if saved is None:
                        del os.environ["PYTHONPATH"]
                    else:
                        os.environ["PYTHONPATH"] = saved
            for n, digest in enumerate(image.layers):
                data = image.blob(digest)
                size = len(data)
                rng = f"bytes={size - args.range_mib * MiB}-"
                path = f"/v2/bench/app/blobs/{digest}"
                for mode in modes if n % 2 == 0 else modes[::-1]:
                    conn = warm(hosts[mode][1], warmup)
                    time.sleep(args.settle)
                    paired = statistics.median(
                        timed_get(registry.url, path, {"Range": rng, "User-Agent": STRAIGHT}, warmup)[2] for _ in range(3)
                    )
                    status, body, first, _ = timed(conn, path, {"Range": rng})
                    assert status == 206 and body == data[size - args.range_mib * MiB:], (mode, status, len(body))
                    ratios[mode].append(first / paired)
                    print(f"blob {n:2d} {mode:10s} first byte {first * 1000:7.2f} ms  registry just before {paired * 1000:6.2f} ms:"
                          f" {first / paired:5.2f} x", flush=True)
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:  # the prefetches, before the next blob
                    tasks = [t for peer, _ in hosts.values() for t in get_json(peer["api"] + "/api/v1/tasks")["tasks"]]
                    if all(t["status"] in ("success", "failed") for t in tasks):
                        break
                    time.sleep(0.1)
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.range_mib} MiB tail of {args.blobs} blobs of {args.size_mib} MiB, the first byte over the registry's just before:")
    for mode, xs in ratios.items():
        print(f"  {mode:10s} median {statistics.median(xs):.2f} x, mean {statistics.mean(xs):.2f} x ({min(xs):.2f}-{max(xs):.2f}), {len(xs)} pairs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--range-mib", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="registry,first,swarm,noprefetch")
    ap.add_argument("--settle", type=float, default=0.5, help="seconds between a pull's first requests and the timed one")
    ap.add_argument("--blobs", type=int, default=0, help="many cold blobs of SIZE in one swarm, a pair per blob and mode (A/B)")
    args = ap.parse_args()
    missing = have_tools()
    if missing:
        raise SystemExit(missing)
    if args.blobs:
        many_blobs(args)
        return
    work = tempfile.mkdtemp(prefix="coldrange-")
    image = make_image(f"{work}/oci", [args.size_mib * MiB], tag="v1", seed=31)
    digest = image.layers[0]
    data = image.blob(digest)
    size = len(data)
    rng = f"bytes={size - args.range_mib * MiB}-"
    want = data[size - args.range_mib * MiB:]
    path = f"/v2/bench/app/blobs/{digest}"
    warmup = ["/v2/", "/v2/bench/app/manifests/v1", f"/v2/bench/app/blobs/{image.config_digest}"]
    registry = Registry(f"{work}/registry").start()
    results: dict[str, list[tuple[float, float, float | None, float | None]]] = {}
    try:
        registry.push(image, "bench/app")
        for run in range(args.runs):
            for mode in args.modes.split(","):
                before = blob_bytes(registry, digest)
                copies: float | None = None
                paired: float | None = None
                if mode == "registry":
                    status, body, first, last = timed_get(registry.url, path, {"Range": rng, "User-Agent": STRAIGHT}, warmup)
                else:
                    # NAME@DIR: the mode NAME with the code in DIR (its processes' PYTHONPATH), for A/B runs
                    kind, _, code = mode.partition("@")
                    saved = os.environ.get("PYTHONPATH")
                    if code:
                        os.environ["PYTHONPATH"] = os.path.abspath(code)
                    with Swarm(f"{work}/swarm-{run}") as swarm:
                        swarm.start_supernode()
                        peer = swarm.start_peer("host0")
                        extra = MODE_ARGS.get(kind, ())
                        url = swarm.start_dfdaemon("dfdaemon0", peer["home"], "--registry", registry.url, *extra)
                        # the registry alone (the median of 3), timed just before under the same conditions (the swarm's
                        # processes started, the machine as busy): the ratio is taken pair by pair
                        # (the pull's first requests through dfdaemon, then --settle seconds: the config's
                        # swarm download finishes its last syncs, which would otherwise weigh on one side only)
                        conn = warm(url, warmup)
                        time.sleep(args.settle)
                        paired = statistics.median(
                            timed_get(registry.url, path, {"Range": rng, "User-Agent": STRAIGHT}, warmup)[2] for _ in range(3)
                        )
                        status, body, first, last = timed(conn, path, {"Range": rng})
                        deadline = time.monotonic() + 300
                        blob_task = task_id("", digest=digest)
                        while time.monotonic() < deadline:
                            tasks = get_json(peer["api"] + "/api/v1/tasks")["tasks"]
                            # (the prefetch of --cold-range direct and first starts once the range is sent)
                            started = kind == "noprefetch" or any(blob_task in json.dumps(t) for t in tasks)
                            if started and tasks and all(t["status"] in ("success", "failed") for t in tasks):
                                break
                            time.sleep(0.2)
                        time.sleep(0.3)  # the registry's log line comes after the last byte
                        assert tasks and all(t["status"] == "success" for t in tasks), tasks
                        copies = (blob_bytes(registry, digest) - before) / size
                    if code:
                        if saved is None:
                            del os.environ["PYTHONPATH"]
                        else:
                            os.environ["PYTHONPATH"] = saved
                    shutil.rmtree(f"{work}/swarm-{run}", ignore_errors=True)  # its copies of the blob
                assert status == 206 and body == want, (mode, status, len(body))
                results.setdefault(mode, []).append((first, last, copies, paired))
                print(f"run {run} {mode:10s} first byte {first * 1000:8.1f} ms  last byte {last * 1000:8.1f} ms"
                      + (f"  registry just before {paired * 1000:.1f} ms: {first / paired:.2f} x" if paired else "")
                      + (f"  registry sent {copies:.3f} copies" if copies is not None else ""), flush=True)
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.range_mib} MiB tail of a {size / MiB:.0f} MiB blob, {args.runs} runs (median, min-max):")
    for mode, rows in results.items():
        firsts = [r[0] * 1000 for r in rows]
        lasts = [r[1] * 1000 for r in rows]
        cps = [r[2] for r in rows if r[2] is not None]
        line = (f"  {mode:10s} first byte {statistics.median(firsts):7.1f} ms ({min(firsts):.1f}-{max(firsts):.1f})"
                f"  last byte {statistics.median(lasts):7.1f} ms")
        ratios = [r[0] / r[3] for r in rows if r[3]]
        if ratios:
            line += f"  {statistics.median(ratios):.2f} x the registry just before ({min(ratios):.2f}-{max(ratios):.2f})"
        if cps:
            line += f"  registry sent {max(cps):.3f} copies (max)"
        print(line)


if __name__ == "__main__":
    main()

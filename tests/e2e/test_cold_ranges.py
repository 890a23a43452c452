"""
Range requests for blobs no host holds yet, through dfdaemon against the real
registry: with C{--cold-range swarm} the SuperNode's CDN fetches the range's pieces from the
registry out of order (a 206 of its own, pinned with If-Range) while the
whole blob follows, the registry sending the blob about once; with
C{--no-prefetch} the range alone is a download of its own and the registry
never sends the whole blob.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from dragonfly.testing.registry import Registry, have_tools, make_image
from dragonfly.testing.swarm import Swarm, get_json

from .test_ranges import fetch

pytestmark = pytest.mark.e2e

MiB = 1 << 20

missing = have_tools()
if missing:
    pytest.skip(missing, allow_module_level=True)


def blob_bytes(registry: Registry, digest: str) -> dict[int, int]:
    """Status -> bytes the registry wrote for the blob's GETs."""
    out: dict[int, int] = {}
    for r in registry.responses():
        if r["method"] == "GET" and f"/blobs/{digest}" in r["uri"]:
            out[r["status"]] = out.get(r["status"], 0) + (r["written"] or 0)
    return out


@contextmanager
def one_blob_host(tmp_path: Any, factory: Any, mib: int, seed: int, *dfdaemon_args: str) -> Iterator[Any]:
    """
    A registry holding one image of one C{mib} MiB layer, a SuperNode and one
    host (dfpeer and dfdaemon with C{dfdaemon_args}): (registry, peer,
    dfdaemon URL, the blob's path there, digest, bytes); all stopped after.
    """
    image = make_image(str(factory.mktemp("oci")), [mib * MiB], tag="v1", seed=seed)
    digest = image.layers[0]
    registry = Registry(str(tmp_path / "registry")).start()
    try:
        registry.push(image, "team/app")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            peer = swarm.start_peer("host0")
            url = swarm.start_dfdaemon("dfdaemon0", peer["home"], "--registry", registry.url, *dfdaemon_args)
            yield registry, peer, url, f"/v2/team/app/blobs/{digest}", digest, image.blob(digest)
    finally:
        registry.stop()


def wait_tasks_done(peer: dict[str, Any]) -> list[dict[str, Any]]:
    """The dfpeer's tasks once each succeeded or failed (120 s at most)."""
    deadline = time.monotonic() + 120
    while True:
        tasks: list[dict[str, Any]] = get_json(peer["api"] + "/api/v1/tasks")["tasks"]
        if tasks and all(t["status"] in ("success", "failed") for t in tasks) or time.monotonic() > deadline:
            return tasks
        time.sleep(0.2)


def test_a_cold_tail_range_comes_from_the_registry_out_of_order(tmp_path, tmp_path_factory):
    with one_blob_host(tmp_path, tmp_path_factory, 48, 41, "--cold-range", "swarm") as (registry, peer, url, path, digest, data):
        size = len(data)
        status, headers, body = fetch(url, path, {"Range": f"bytes={size - MiB}-"})
        assert status == 206 and body == data[size - MiB:], (status, body[:300])
        assert headers["Content-Range"] == f"bytes {size - MiB}-{size - 1}/{size}"
        tasks = wait_tasks_done(peer)
        assert tasks and all(t["status"] == "success" for t in tasks), tasks
        # the whole blob, right (its digest checked by the dfpeer), from the local copy
        status, _, whole = fetch(url, path)
        assert status == 200 and whole == data
        sent = blob_bytes(registry, digest)
        assert registry.blob_gets() == {digest: 1}
        assert 0 < sent.get(206, 0) <= 4 * MiB, sent  # the range's pieces (2 at most of 1 MiB pieces)
        assert sum(sent.values()) <= 1.05 * size, sent


def test_no_prefetch_fetches_the_range_alone(tmp_path, tmp_path_factory):
    with one_blob_host(tmp_path, tmp_path_factory, 24, 42, "--no-prefetch") as (registry, peer, url, path, digest, data):
        size = len(data)
        for rng, want, span in [
            ("bytes=-1000", data[-1000:], (size - 1000, size - 1)),
            (f"bytes={5 * MiB}-{6 * MiB + 9}", data[5 * MiB: 6 * MiB + 10], (5 * MiB, 6 * MiB + 9)),
        ]:
            status, headers, body = fetch(url, path, {"Range": rng})
            assert status == 206 and body == want, (rng, status, body[:300])
            assert headers["Content-Range"] == f"bytes {span[0]}-{span[1]}/{size}"
        status, headers, body = fetch(url, path, {"Range": f"bytes={size}-"})
        assert status == 416 and headers["Content-Range"] == f"bytes */{size}"
        time.sleep(1)
        # the registry never sent the whole blob: the two ranges only
        sent = blob_bytes(registry, digest)
        assert registry.blob_gets() == {}, sent
        assert sent.get(206, 0) == 1000 + MiB + 10, sent
        counters = get_json(url + "/_dfdaemon/status")["counters"]
        assert counters["ranges"] == 2 and counters["fallbacks"] == 0, counters


def test_by_default_a_blobs_first_range_comes_from_the_registry_and_the_next_from_the_swarm(tmp_path, tmp_path_factory):
    with one_blob_host(tmp_path, tmp_path_factory, 32, 43) as (registry, peer, url, path, digest, data):
        size = len(data)
        status, headers, body = fetch(url, path, {"Range": f"bytes={size - MiB}-"})
        assert status == 206 and body == data[size - MiB:], (status, body[:300])
        assert headers["Content-Range"] == f"bytes {size - MiB}-{size - 1}/{size}"
        assert headers.get("X-Dragonfly-Task-Id") is None  # the registry's own 206
        status, headers, body = fetch(url, path, {"Range": f"bytes={3 * MiB}-{5 * MiB - 1}"})
        assert status == 206 and body == data[3 * MiB: 5 * MiB], (status, body[:300])
        assert headers.get("X-Dragonfly-Task-Id")  # from the swarm
        counters = get_json(url + "/_dfdaemon/status")["counters"]
        assert counters["ranges_direct"] == 1 and counters["ranges"] == 1 and counters["fallbacks"] == 0, counters
        tasks = wait_tasks_done(peer)
        assert tasks and all(t["status"] == "success" for t in tasks), tasks
        # the blob once for the swarm, the first range, and at most the second range's pieces
        sent = blob_bytes(registry, digest)
        assert registry.blob_gets() == {digest: 1}, sent
        assert sum(sent.values()) <= size + MiB + 8 * MiB, sent

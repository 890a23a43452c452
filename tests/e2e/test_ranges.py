"""
Range requests for blobs through dfdaemon, against the real registry: each
range answered 206 from the swarm with the registry's bytes, the rest of the
blob following in the background so the registry still sends it once.
"""

from __future__ import annotations

import hashlib
import http.client
import time
from urllib.parse import urlsplit

import pytest

from dragonfly.testing.registry import Registry, have_tools, make_image
from dragonfly.testing.swarm import Swarm, get_json

pytestmark = pytest.mark.e2e

MiB = 1 << 20

missing = have_tools()
if missing:
    pytest.skip(missing, allow_module_level=True)


def fetch(url, path, headers=None, method="GET"):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, resp.headers, body


def test_range_requests_are_answered_from_the_swarm(tmp_path, tmp_path_factory):
    image = make_image(str(tmp_path_factory.mktemp("oci")), [20 * MiB + 12345], tag="v1", seed=21)
    digest = image.layers[0]
    data = image.blob(digest)  # the layer as the registry holds it (a tar)
    size = len(data)
    registry = Registry(str(tmp_path / "registry")).start()
    try:
        registry.push(image, "team/app")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            peer = swarm.start_peer("host0")
            url = swarm.start_dfdaemon("dfdaemon0", peer["home"], "--registry", registry.url, "--cold-range", "swarm")
            path = f"/v2/team/app/blobs/{digest}"
            # the last MiB first: the blob is in no host yet
            status, headers, body = fetch(url, path, {"Range": f"bytes={size - MiB}-"})
            assert status == 206, body[:300]
            assert headers["Content-Range"] == f"bytes {size - MiB}-{size - 1}/{size}"
            assert body == data[size - MiB:]
            for rng, want in [
                ("bytes=0-0", data[:1]),
                (f"bytes={5 * MiB - 7}-{9 * MiB + 3}", data[5 * MiB - 7: 9 * MiB + 4]),
                ("bytes=-100", data[-100:]),
                (f"bytes={size - 10}-{size * 2}", data[-10:]),
            ]:
                status, headers, body = fetch(url, path, {"Range": rng})
                assert status == 206 and body == want, (rng, status, len(body))
                assert int(headers["Content-Length"]) == len(want)
            # past the end: 416 with the length; malformed: 416; several ranges: the whole blob
            status, headers, body = fetch(url, path, {"Range": f"bytes={size}-"})
            assert status == 416 and headers["Content-Range"] == f"bytes */{size}", body[:300]
            status, _, body = fetch(url, path, {"Range": "bytes=5-1"})
            assert status == 416 and b"BAD_RANGE" in body
            status, headers, body = fetch(url, path, {"Range": "bytes=0-1,10-20"})
            assert status == 200 and hashlib.sha256(body).hexdigest() == digest.split(":")[1]
            # HEAD keeps working (straight to the registry)
            status, headers, body = fetch(url, path, method="HEAD")
            assert status == 200 and int(headers["Content-Length"]) == size and body == b""
            # the rest followed in the background: the registry sent the blob once
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                tasks = get_json(peer["api"] + "/api/v1/tasks")["tasks"]
                if tasks and all(t["status"] == "success" for t in tasks):
                    break
                time.sleep(0.2)
            assert registry.blob_gets() == {digest: 1}
            counters = get_json(url + "/_dfdaemon/status")["counters"]
            assert counters["ranges"] >= 5 and counters["fallbacks"] == 0, counters
    finally:
        registry.stop()


def test_cold_range_direct_answers_from_the_registry_while_the_swarm_prefetches(tmp_path, tmp_path_factory):
    image = make_image(str(tmp_path_factory.mktemp("oci")), [16 * MiB], tag="v1", seed=22)
    digest = image.layers[0]
    data = image.blob(digest)
    size = len(data)
    registry = Registry(str(tmp_path / "registry")).start()
    try:
        registry.push(image, "team/app")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            peer = swarm.start_peer("host0")
            url = swarm.start_dfdaemon("dfdaemon0", peer["home"], "--registry", registry.url, "--cold-range", "direct")
            path = f"/v2/team/app/blobs/{digest}"
            status, headers, body = fetch(url, path, {"Range": f"bytes={size - MiB}-"})
            assert status == 206 and body == data[size - MiB:]
            assert headers["Content-Range"] == f"bytes {size - MiB}-{size - 1}/{size}"
            # the range came from the registry (its own 206); the whole blob is on its way through the swarm
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                tasks = get_json(peer["api"] + "/api/v1/tasks")["tasks"]
                if tasks and tasks[0]["status"] == "success":
                    break
                time.sleep(0.2)
            assert tasks and tasks[0]["status"] == "success", tasks
            status, headers, body = fetch(url, path, {"Range": "bytes=100-199"})
            assert status == 206 and body == data[100:200]
            counters = get_json(url + "/_dfdaemon/status")["counters"]
            assert counters["ranges_direct"] == 1 and counters["ranges"] == 1, counters
            assert registry.blob_gets() == {digest: 1}  # the whole blob once (the 206 is not a whole send)
    finally:
        registry.stop()

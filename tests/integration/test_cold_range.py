"""
A Range request for the tail of a file no host holds yet, with real
processes on loopback: the dfpeer registers the download with the range it
wants first, the SuperNode's CDN fetches the pieces covering it from the
origin out of order (a second request, C{Range} + C{If-Range}) while its
in-order fetch runs, and the range's bytes reach the client long before the
in-order fetch could have brought them.  The whole file then completes
right, and the origin sends it about once (at most 1.05 copies).
"""

import http.client
import json
import time
import urllib.request
from urllib.parse import urlsplit

import pytest

from dragonfly.testing.swarm import Swarm, get_json, sha256_file, write_random_file

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 64 * MiB
RATE = 16 * MiB  # the origin's pace: the in-order fetch takes 4 s


def post_json(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def get_range(url, rng):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    start = time.monotonic()
    conn.request("GET", parts.path, headers={"Range": rng})
    resp = conn.getresponse()
    first = resp.read(1)
    first_byte = time.monotonic() - start
    body = first + resp.read()
    conn.close()
    return resp.status, resp.headers, body, first_byte


def test_a_cold_tail_range_comes_first_and_the_file_once(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    write_random_file(str(root / "f.bin"), SIZE)
    data = (root / "f.bin").read_bytes()
    with Swarm(str(tmp_path / "swarm")) as swarm:
        swarm.start_origin(str(root))
        swarm.start_supernode()
        peer = swarm.start_peer("p0")
        # the origin is paced: the whole file takes SIZE / RATE seconds, in order or not
        req = urllib.request.Request(
            swarm.origin_url + "/_fault",
            data=json.dumps({"path": "/f.bin", "mode": "slow", "rate": RATE, "times": 0}).encode(), method="POST",
        )
        urllib.request.urlopen(req, timeout=5).read()
        url = swarm.origin_url + "/f.bin"
        rng = f"bytes={SIZE - MiB}-"
        answer = post_json(peer["api"] + "/api/v1/downloads", {"url": url, "range": rng, "notbs": True})
        status, headers, body, first_byte = get_range(
            f"{peer['api']}/api/v1/downloads/{answer['taskId']}/content", rng,
        )
        assert status == 206, body[:300]
        assert headers["Content-Range"] == f"bytes {SIZE - MiB}-{SIZE - 1}/{SIZE}"
        assert body == data[SIZE - MiB:]
        # in order, the tail would come after the whole file (4 s)
        print(f"first byte after {first_byte:.3f}s")
        assert first_byte < 0.5 * SIZE / RATE, first_byte
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            task = get_json(f"{peer['api']}/api/v1/downloads/{answer['taskId']}")
            if task["status"] in ("success", "failed"):
                break
            time.sleep(0.1)
        assert task["status"] == "success", task
        status, _, whole, _ = get_range(f"{peer['api']}/api/v1/downloads/{answer['taskId']}/content", "bytes=0-")
        assert status == 206 and whole == data
        stats = swarm.origin_stats()
        assert stats["ranges"].get("/f.bin") == 1  # the side fetch
        assert stats["bytesOut"] <= 1.05 * SIZE, stats
        sn = get_json(f"{swarm.supernode_api}/api/v1/tasks/{answer['taskId']}")
        assert sn["status"] == "success" and sn["sha256"] is None  # no digest: no whole-file hash


@pytest.mark.parametrize("mode", ["reset", "short"])
def test_a_cut_origin_body_goes_on_in_process(tmp_path, mode):
    """With --origin-retries the download that was running when the origin cut the body does not fail."""
    root = tmp_path / "www"
    root.mkdir()
    size = 48 * MiB
    digest = write_random_file(str(root / "f.bin"), size)
    with Swarm(str(tmp_path / "swarm")) as swarm:
        swarm.start_origin(str(root))
        swarm.start_supernode("--origin-retries", "3")
        swarm.start_peer("p0")
        cut = int(size * 0.6) + 12345
        req = urllib.request.Request(
            swarm.origin_url + "/_fault",
            data=json.dumps({"path": "/f.bin", "mode": mode, "cut": cut, "times": 1}).encode(), method="POST",
        )
        urllib.request.urlopen(req, timeout=5).read()
        proc = swarm.dfget(swarm.origin_url + "/f.bin", str(tmp_path / "a.out"), "p0")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        assert sha256_file(str(tmp_path / "a.out")) == digest
        stats = swarm.origin_stats()
        [task] = get_json(swarm.supernode_api + "/api/v1/tasks")["tasks"]
        assert task["status"] == "success"
        assert stats["ranges"]["/f.bin"] == 1  # the retry: the rest, from the last stored piece
        assert task["originBytes"] <= size * 1.05

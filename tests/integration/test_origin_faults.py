"""
Origin faults with real processes on loopback: the test origin
(L{dragonfly.testing.origin}) answers 404/500, resets or cuts a body, sends
slowly, or changes a file between two requests.  Each failure is one clear
line with the documented exit code and nothing at the output path; nothing
truncated is ever cached, and once the origin recovers the same download
succeeds.  A changed file is fetched as a new version, by every peer,
including one that held the old version.
"""

import json
import os
import time
import urllib.request

import pytest

from dragonfly.testing.swarm import Swarm, sha256_file, write_random_file

from .conftest import leftovers

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    sizes = {"err-404.bin": 3 * MiB, "err-500.bin": 3 * MiB, "reset.bin": 16 * MiB, "short.bin": 16 * MiB, "slow.bin": 4 * MiB,
             "trickle.bin": 2 * MiB + 5, "changes.bin": 6 * MiB}
    digests = {name: write_random_file(str(root / name), size) for name, size in sizes.items()}
    with Swarm(str(tmp_path_factory.mktemp("swarm"))) as s:
        # what a download sees when the CDN's fetch fails for good: no in-process
        # retries of a cut body (their default, 3, is tested in test_cold_range.py)
        s.start_all(str(root), 3, "--origin-retries", "0")
        yield s, str(root), digests


def fault(swarm, path, mode, **kw):
    req = urllib.request.Request(
        swarm.origin_url + "/_fault", data=json.dumps({"path": path, "mode": mode, **kw}).encode(), method="POST"
    )
    urllib.request.urlopen(req, timeout=5).read()


def run(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode()


def supernode_task(swarm, name):
    tasks = json.load(urllib.request.urlopen(swarm.supernode_api + "/api/v1/tasks", timeout=5))["tasks"]
    return [t for t in tasks if t["url"].endswith("/" + name)]


def check_failed_cleanly(code, err, want_code, out, tmp_path):
    assert code == want_code, err
    assert err.startswith("dfget: error:") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    assert leftovers(str(tmp_path)) == []


@pytest.mark.parametrize("status", [404, 500])
def test_origin_error_status_then_recovery(world, tmp_path, status):
    swarm, _, digests = world
    name = f"err-{status}.bin"
    url = swarm.origin_url + "/" + name
    fault(swarm, "/" + name, "status", status=status, times=1)
    out = tmp_path / name
    code, err = run(swarm.dfget(url, str(out), "p0"))
    check_failed_cleanly(code, err, 3, out, tmp_path)
    assert str(status) in err
    # the origin answers again: the same download works
    code, err = run(swarm.dfget(url, str(out), "p0"))
    assert code == 0, err
    assert sha256_file(str(out)) == digests[name]
    # the origin fails again: what is cached (and checked) is still served,
    # after a revalidation the origin could not answer
    fault(swarm, "/" + name, "status", status=503, times=1)
    out2 = tmp_path / ("again-" + name)
    code, err = run(swarm.dfget(url, str(out2), "p1"))
    assert code == 0, err
    assert sha256_file(str(out2)) == digests[name]


@pytest.mark.parametrize("mode", ["reset", "short"])
def test_cut_body_is_never_cached(world, tmp_path, mode):
    """The origin resets the connection, or closes it cleanly, half way through the body."""
    swarm, _, digests = world
    name = f"{mode}.bin"
    url = swarm.origin_url + "/" + name
    fault(swarm, "/" + name, mode, cut=7 * MiB + 123, times=1)
    before = swarm.origin_stats()["requests"].get("/" + name, 0)
    outs = [tmp_path / f"{mode}-{i}.bin" for i in range(2)]
    code, err = run(swarm.dfget(url, str(outs[0]), "p0"))
    check_failed_cleanly(code, err, 3, outs[0], tmp_path)
    assert "origin" in err
    [task] = supernode_task(swarm, name)
    assert task["status"] == "failed"
    assert task["error"]["code"] == "SOURCE_TRUNCATED"
    # nothing of the cut fetch is left in the cache
    repo = os.path.join(swarm.workdir, "supernode", "repo")
    assert not [n for n in os.listdir(repo) if n.startswith(task["taskId"])]
    # the origin recovers: a new fetch, complete and correct, for both peers
    procs = [swarm.dfget(url, str(o), f"p{i}") for i, o in enumerate(outs)]
    for proc, out in zip(procs, outs):
        code, err = run(proc)
        assert code == 0, err
        assert sha256_file(str(out)) == digests[name]
    [task] = supernode_task(swarm, name)
    assert task["status"] == "success" and task["sha256"] is None  # no digest asked: no whole-file hash
    assert swarm.origin_stats()["requests"]["/" + name] == before + 2


def test_slow_origin_times_out_cleanly_and_a_slow_but_alive_one_completes(world, tmp_path):
    swarm, _, digests = world
    # 4 MiB at 256 KiB/s: 16 s, far beyond dfget --timeout 3s
    fault(swarm, "/slow.bin", "slow", rate=256 * 1024, times=1)
    out = tmp_path / "slow.bin"
    t0 = time.monotonic()
    code, err = run(swarm.dfget(swarm.origin_url + "/slow.bin", str(out), "p1", "--timeout", "3s"))
    took = time.monotonic() - t0
    check_failed_cleanly(code, err, 5, out, tmp_path)
    assert "timed out" in err
    print(f"\ndfget --timeout 3s against a slow origin exited after {took:.2f}s")
    assert took < 3 + 5
    # 2 MiB at 1 MiB/s: slow, but sending all the time
    fault(swarm, "/trickle.bin", "slow", rate=MiB, times=1)
    out = tmp_path / "trickle.bin"
    t0 = time.monotonic()
    code, err = run(swarm.dfget(swarm.origin_url + "/trickle.bin", str(out), "p2", "--timeout", "60s"))
    took = time.monotonic() - t0
    assert code == 0, err
    assert sha256_file(str(out)) == digests["trickle.bin"]
    print(f"a 2 MiB download from an origin sending 1 MiB/s took {took:.2f}s")
    assert took >= 1.5


def test_changed_origin_file_is_a_new_version(world, tmp_path):
    """The file changes at the origin (same size, new bytes, new ETag/Last-Modified) between two downloads."""
    swarm, root, digests = world
    url = swarm.origin_url + "/changes.bin"
    first = tmp_path / "v1-p0.bin"
    code, err = run(swarm.dfget(url, str(first), "p0"))
    assert code == 0, err
    assert sha256_file(str(first)) == digests["changes.bin"]
    # an unchanged file is revalidated (304), not fetched again
    sent = swarm.origin_stats()["bytesSent"]
    again = tmp_path / "v1-p1.bin"
    code, err = run(swarm.dfget(url, str(again), "p1"))
    assert code == 0, err
    assert sha256_file(str(again)) == digests["changes.bin"]
    assert swarm.origin_stats()["bytesSent"] == sent
    [v1] = supernode_task(swarm, "changes.bin")
    # now the origin changes it
    time.sleep(0.05)
    new_digest = write_random_file(os.path.join(root, "changes.bin"), 6 * MiB)
    assert new_digest != digests["changes.bin"]
    # a peer that never had it, and the two peers holding the old version
    outs = {n: tmp_path / f"v2-{n}.bin" for n in ("p2", "p0", "p1")}
    for n, out in outs.items():
        code, err = run(swarm.dfget(url, str(out), n))
        assert code == 0, err
        assert sha256_file(str(out)) == new_digest, n
    [v2] = supernode_task(swarm, "changes.bin")
    assert v2["taskId"] == v1["taskId"]  # the same URL names the same task ...
    assert v2["version"] != v1["version"]  # ... in a new version
    assert v2["sha256"] is None and v2["status"] == "success"  # (no digest asked: no whole-file hash)
    # the earlier outputs are untouched (dfget hands out links to files never changed in place)
    assert sha256_file(str(first)) == digests["changes.bin"]
    # the new content crossed the origin link once
    assert swarm.origin_stats()["bytesSent"] == sent + 6 * MiB

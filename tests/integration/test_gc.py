"""
Disk GC on a real SuperNode home: a tiny absolute high watermark, four 2 MiB
files, least-recently-used eviction, a task being downloaded kept although it
is the least recently used, and an evicted task fetched from the origin again.
"""

import os
import time

import pytest

from dragonfly.core.ids import task_id
from dragonfly.testing.swarm import Swarm, get_json, sha256_file, write_random_file

pytestmark = pytest.mark.integration

MiB = 1 << 20


def _wait(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode()


def _cached(swarm):
    return {t["taskId"]: t for t in get_json(swarm.supernode_api + "/api/v1/tasks")["tasks"]}


def test_supernode_disk_gc_evicts_lru_keeps_in_use_and_refetches(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    names = ["a", "b", "c", "d"]
    digests = {n: write_random_file(str(root / f"{n}.bin"), 2 * MiB) for n in names}
    with Swarm(str(tmp_path / "swarm")) as swarm:
        swarm.start_origin(str(root))
        swarm.start_supernode(
            # the home is counted as du counts it: 2 MiB per data file plus a
            # block per meta file, so two tasks are a little over 4M
            "--piece-size", "1M", "--gc-interval", "0.5s", "--gc-disk-high", "5M", "--gc-disk-low", "4200K",
        )
        swarm.start_peer("p0")
        swarm.start_peer("p1")
        urls = {n: f"{swarm.origin_url}/{n}.bin" for n in names}
        ids = {n: task_id(urls[n]) for n in names}
        # "a": a slow download (1 MiB pieces at 128 KiB/s: a seed read every 8 s),
        # so "a" is the least recently used task and in use all along
        slow = swarm.dfget(urls["a"], str(tmp_path / "a.out"), "p0", "--locallimit", "128K")
        deadline = time.monotonic() + 20
        while _cached(swarm).get(ids["a"], {}).get("status") != "success":
            assert time.monotonic() < deadline, "the CDN did not cache a"
            time.sleep(0.1)
        for n in ["b", "c", "d"]:
            code, err = _wait(swarm.dfget(urls[n], str(tmp_path / f"{n}.out"), "p0"))
            assert code == 0, err
            # the peer's last sync of a finished download touches its task:
            # let it land before the next one starts, so the use order is b, c, d
            time.sleep(1.0)
        time.sleep(2.0)  # a few GC runs
        assert slow.poll() is None, "the slow download ended too soon to show that it is kept"
        cached = _cached(swarm)
        # 8 MiB cached, 5M high, 4200K low: the least recently used that are not
        # in use go first (b, then c); a is older but being downloaded
        assert set(cached) == {ids["a"], ids["d"]}, {n: ids[n] in cached for n in names}
        repo = sorted(os.listdir(os.path.join(swarm.workdir, "supernode", "repo")))
        assert repo == sorted(f"{ids[n]}.{ext}" for n in ("a", "d") for ext in ("data", "meta"))
        code, err = _wait(slow)
        assert code == 0, err
        assert sha256_file(str(tmp_path / "a.out")) == digests["a"]
        # an evicted task is fetched from the origin again by the next peer
        assert swarm.origin_stats()["requests"]["/b.bin"] == 1
        code, err = _wait(swarm.dfget(urls["b"], str(tmp_path / "b2.out"), "p1"))
        assert code == 0, err
        assert sha256_file(str(tmp_path / "b2.out")) == digests["b"]
        assert swarm.origin_stats()["requests"]["/b.bin"] == 2
        for n in names:
            assert sha256_file(str(tmp_path / f"{n}.out")) == digests[n]


def test_dfpeer_disk_gc_removes_lru_tasks_and_tells_the_supernode(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    names = ["x", "y", "z"]
    digests = {n: write_random_file(str(root / f"{n}.bin"), MiB) for n in names}
    with Swarm(str(tmp_path / "swarm")) as swarm:
        swarm.start_origin(str(root))
        swarm.start_supernode()
        # three 1 MiB tasks (and their small meta files) against 2500K high, 2100K low
        swarm.start_peer("p0", "--gc-interval", "0.5s", "--gc-disk-high", "2500K", "--gc-disk-low", "2100K")
        urls = {n: f"{swarm.origin_url}/{n}.bin" for n in names}
        ids = {n: task_id(urls[n]) for n in names}
        for n in names:
            code, err = _wait(swarm.dfget(urls[n], str(tmp_path / f"{n}.out"), "p0"))
            assert code == 0, err
        deadline = time.monotonic() + 10
        while {t["taskId"] for t in swarm.peer_tasks("p0")} != {ids["y"], ids["z"]}:
            assert time.monotonic() < deadline, [t["taskId"] for t in swarm.peer_tasks("p0")]
            time.sleep(0.1)
        data = sorted(os.listdir(os.path.join(swarm.peers["p0"]["home"], "data")))
        assert data == sorted(f"{ids[n]}.{ext}" for n in ("y", "z") for ext in ("data", "json"))
        # the SuperNode was told: p0 is no longer in x's swarm, still in z's
        assert swarm.peers["p0"]["peerId"] not in swarm.supernode_task(ids["x"])["peers"]
        assert swarm.peers["p0"]["peerId"] in swarm.supernode_task(ids["z"])["peers"]
        # what dfget handed out is the user's: untouched
        for n in names:
            assert sha256_file(str(tmp_path / f"{n}.out")) == digests[n]

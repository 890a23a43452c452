"""
Real processes on loopback: an origin that counts requests, a SuperNode and
five dfpeers started with twistd, and dfget.
"""

import os

import pytest

from dragonfly.testing.swarm import sha256_file

from .conftest import leftovers

pytestmark = pytest.mark.integration


def _wait(proc, timeout=180):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode()


def test_five_peers_share_one_origin_copy(swarm, files, tmp_path):
    root, digests = files
    url = swarm.origin_url + "/big.bin"
    procs = {name: swarm.dfget(url, str(tmp_path / f"{name}.bin"), name) for name in swarm.peers}
    for proc in procs.values():
        code, err = _wait(proc)
        assert code == 0, err
    for name in procs:
        assert sha256_file(str(tmp_path / f"{name}.bin")) == digests["big.bin"]
    # the origin sent the body exactly once: the SuperNode's CDN fetch
    assert swarm.origin_stats()["requests"]["/big.bin"] == 1
    received = {"supernode": 0, "remote_peer": 0, "back_to_source": 0}
    for name in procs:
        (task,) = [t for t in swarm.peer_tasks(name) if t["url"] == url]
        for kind, n in task["traffic"].items():
            received[kind] += n
    total = sum(received.values())
    assert total >= 5 * 64 * (1 << 20)
    assert received["back_to_source"] == 0
    assert received["remote_peer"] / total >= 0.25, received
    sn = swarm.supernode_task(task["taskId"])
    assert sn["originBytes"] == 64 * (1 << 20)
    assert sn["seedBytes"] == received["supernode"]
    print(f"\nP2P share {received['remote_peer'] / total:.2f}, seed copies {sn['seedBytes'] / (64 << 20):.2f}")


@pytest.mark.parametrize("name", ["empty.bin", "one.bin", "odd.bin"])
def test_edge_sizes(swarm, files, tmp_path, name):
    _, digests = files
    out = tmp_path / name
    code, err = _wait(swarm.dfget(swarm.origin_url + "/" + name, str(out), "peer1"))
    assert code == 0, err
    assert sha256_file(str(out)) == digests[name]
    # a second peer gets it from the swarm, not the origin
    out2 = tmp_path / (name + ".2")
    code, err = _wait(swarm.dfget(swarm.origin_url + "/" + name, str(out2), "peer2"))
    assert code == 0, err
    assert sha256_file(str(out2)) == digests[name]
    assert swarm.origin_stats()["requests"]["/" + name] == 1


def test_not_found_leaves_nothing(swarm, tmp_path):
    out = tmp_path / "missing.bin"
    code, err = _wait(swarm.dfget(swarm.origin_url + "/missing.bin", str(out), "peer3"))
    assert code == 3
    assert "404" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert leftovers(str(tmp_path)) == []


def test_digest_checked(swarm, files, tmp_path):
    _, digests = files
    out = tmp_path / "one.bin"
    code, err = _wait(swarm.dfget(swarm.origin_url + "/one.bin", str(out), "peer4", "--digest", "sha256:" + digests["one.bin"]))
    assert code == 0, err
    assert sha256_file(str(out)) == digests["one.bin"]
    bad = tmp_path / "bad.bin"
    code, err = _wait(swarm.dfget(swarm.origin_url + "/odd.bin", str(bad), "peer4", "--digest", "sha256:" + "0" * 64))
    assert code == 4, err
    assert not bad.exists()
    assert leftovers(str(tmp_path)) == []


def test_bad_input_is_a_clear_error(swarm, tmp_path):
    out = tmp_path / "x"
    for args in (["-u", "ftp://example/x"], ["-u", swarm.origin_url + "/one.bin", "--header", "no colon"],
                 ["-u", swarm.origin_url + "/one.bin", "--digest", "sha256:abc"]):
        code, err = _wait(swarm.dfget(args[1], str(out), "peer1", *args[2:]))
        assert code == 2, err
        assert err.startswith("dfget: error:")
        assert not out.exists()


def test_dfget_starts_a_daemon_when_none_runs(swarm, files, tmp_path):
    _, digests = files
    out = tmp_path / "odd.bin"
    home = tmp_path / "home"
    proc = swarm.dfget(swarm.origin_url + "/odd.bin", str(out), None, "--home", str(home), "--idle-exit", "60")
    code, err = _wait(proc)
    assert code == 0, err
    assert sha256_file(str(out)) == digests["odd.bin"]
    # the daemon it started keeps serving afterwards
    import json
    info = json.load(open(home / "peer.json"))
    os.kill(info["pid"], 0)
    os.kill(info["pid"], 15)


def test_back_to_source_without_supernode(swarm, files, tmp_path):
    _, digests = files
    dead = "127.0.0.1:1"
    out = tmp_path / "one.bin"
    proc = swarm.dfget(swarm.origin_url + "/odd.bin", str(out), None, "--home", str(tmp_path / "h1"), "--node", dead, "--idle-exit", "5")
    code, err = _wait(proc)
    assert code == 0, err
    assert sha256_file(str(out)) == digests["odd.bin"]
    out2 = tmp_path / "two.bin"
    proc = swarm.dfget(swarm.origin_url + "/odd.bin", str(out2), None, "--home", str(tmp_path / "h2"), "--node", dead, "--notbs", "--idle-exit", "5")
    code, err = _wait(proc)
    assert code == 3, err
    assert "--notbs" in err
    assert not out2.exists()
    assert leftovers(str(tmp_path)) == []


def test_output_is_a_link_to_the_verified_file_unless_copy(swarm, files, tmp_path):
    _, digests = files
    linked, copied = tmp_path / "linked.bin", tmp_path / "copied.bin"
    code, err = _wait(swarm.dfget(swarm.origin_url + "/odd.bin", str(linked), "peer5"))
    assert code == 0, err
    code, err = _wait(swarm.dfget(swarm.origin_url + "/odd.bin", str(copied), "peer5", "--copy"))
    assert code == 0, err
    (task,) = [t for t in swarm.peer_tasks("peer5") if t["url"].endswith("/odd.bin")]
    store = os.stat(task["dataPath"])
    assert os.stat(linked).st_ino == store.st_ino
    assert os.stat(copied).st_ino != store.st_ino
    # the dfpeer's finished file is read-only, so the link is too
    assert store.st_mode & 0o222 == 0
    assert sha256_file(str(linked)) == sha256_file(str(copied)) == digests["odd.bin"]


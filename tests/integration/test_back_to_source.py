"""
Back-to-source by piece with real processes on loopback: a dfpeer holding
about half of the pieces loses its SuperNode (SIGKILL) and fetches only the
other half from the origin, by Range; the origin's byte count says so.
"""

import json
import signal
import time
import urllib.request

import pytest

from dragonfly.testing.swarm import Swarm, sha256_file, write_random_file

pytestmark = pytest.mark.integration

MiB = 1 << 20


def wait_until(predicate, timeout, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


def fault(swarm, spec):
    req = urllib.request.Request(swarm.origin_url + "/_fault", data=json.dumps(spec).encode())
    urllib.request.urlopen(req, timeout=10).read()


@pytest.mark.parametrize("origin", ["ranges", "norange"])
def test_peer_with_half_the_pieces_fetches_only_the_rest(tmp_path, origin):
    """With an origin that ignores Range (200) the peer takes the whole file instead, as before."""
    root = tmp_path / "www"
    root.mkdir()
    size = 24 * MiB
    digest = write_random_file(str(root / "f.bin"), size)
    with Swarm(str(tmp_path / "swarm")) as swarm:
        swarm.start_all(str(root), 1)
        url = swarm.origin_url + "/f.bin"
        out = tmp_path / "f.out"
        # 3 MiB/s: about 8 s in the swarm, so the SuperNode dies in the middle
        proc = swarm.dfget(url, str(out), "p0", "--locallimit", "3M")
        # the CDN has the whole file (one origin copy) and the peer about half
        assert wait_until(lambda: any(t["status"] == "success" for t in swarm.supernode_tasks()), 30)
        def half():
            t = swarm.peer_task("p0", url)
            return t if t and t["completedBytes"] >= size // 2 else None

        view = wait_until(half, 30, step=0.05)
        assert view is not None, "the peer never got half of the file"
        sn = next(p for n, p in swarm.procs if n == "supernode")
        sn.send_signal(signal.SIGKILL)
        sn.wait()
        if origin == "norange":
            fault(swarm, {"path": "/f.bin", "mode": "norange"})
        had = swarm.peer_task("p0", url)["completedBytes"]
        before = swarm.origin_stats()
        assert had < size, "the download ended before the SuperNode was killed"
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert sha256_file(str(out)) == digest
        after = swarm.origin_stats()
        task = swarm.peer_task("p0", url)
        fetched = after["bytesOut"] - before["bytesOut"]
        print(f"\npeer held {had} of {size} bytes; origin sent {fetched} more, in {after['ranges']} range answers")
        if origin == "norange":
            # the whole file again, into a new file; served to the user, not saved as verified
            assert fetched == size == task["traffic"]["back_to_source"]
            assert task["status"] == "success" and task["piecesVerified"] is False
            return
        # only what the peer lacked, by Range (not the whole file again)
        assert after["ranges"].get("/f.bin", 0) >= 1
        assert fetched == task["traffic"]["back_to_source"]
        assert 0 < fetched <= size - had
        # verified piece by piece (against the SuperNode's digests): served like any other copy; no
        # whole-file hash, as no digest was asked for (the SuperNode computes none for such a task)
        assert task["status"] == "success" and task["piecesVerified"] is True
        assert task["sha256"] is None

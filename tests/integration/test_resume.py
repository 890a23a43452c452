"""
Resumable origin fetches with real processes on loopback: the SuperNode is
killed with SIGKILL at about 30 %, 60 % and 90 % of one origin fetch and
started again on the same home and ports each time.  The origin is paced
(the test origin's C{slow} mode), so each kill lands mid-body.  Each
restarted CDN goes on with C{Range}/C{If-Range} from the bytes it had
stored; every dfget's output is right and the origin sends the file about
once in all.  A cut origin connection resumes the same way, and an origin
that ignores ranges still gives a right file.
"""

import json
import os
import signal
import socket
import time
import urllib.request

import pytest

from dragonfly.testing.swarm import Swarm, get_json, sha256_file, write_random_file

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 48 * MiB
RATE = 12 * MiB  # the origin's pace: a whole fetch takes 4 s


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fault(swarm, path, mode, **kw):
    req = urllib.request.Request(
        swarm.origin_url + "/_fault", data=json.dumps({"path": path, "mode": mode, **kw}).encode(), method="POST"
    )
    urllib.request.urlopen(req, timeout=5).read()


def wait_until(predicate, timeout, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False


@pytest.fixture()
def origin_file(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    digest = write_random_file(str(root / "f.bin"), SIZE)
    return str(root), digest


def test_supernode_killed_at_30_60_90_percent_resumes(tmp_path, origin_file):
    root, digest = origin_file
    port, block = free_port(), free_port()
    args = ("--port", str(port), "--block-port", str(block))
    with Swarm(str(tmp_path / "swarm")) as swarm:
        names = swarm.start_all(root, 3, *args)
        fault(swarm, "/f.bin", "slow", rate=RATE, times=0)
        url = swarm.origin_url + "/f.bin"
        started = time.monotonic()
        # with the digest: the SuperNode's whole-file SHA-256 then goes on across each restart too
        procs = {
            n: swarm.dfget(url, str(tmp_path / f"{n}.out"), n, "--timeout", "120s", "--digest", "sha256:" + digest)
            for n in names
        }
        kills = []
        for share in (0.3, 0.6, 0.9):
            assert wait_until(lambda share=share: swarm.origin_stats()["bytesOut"] >= share * SIZE, 60), swarm.origin_stats()
            sn = [p for n, p in swarm.procs if n == "supernode"][-1]
            sn.send_signal(signal.SIGKILL)
            sn.wait()
            sent = swarm.origin_stats()["bytesOut"]
            kills.append(sent / SIZE)
            swarm.start_supernode(*args)
        times = {}
        for n in names:
            out, err = procs[n].communicate(timeout=180)
            times[n] = time.monotonic() - started
            assert procs[n].returncode == 0, err.decode()
            assert sha256_file(str(tmp_path / f"{n}.out")) == digest
        stats = swarm.origin_stats()
        copies = stats["bytesOut"] / SIZE
        tasks = get_json(swarm.supernode_api + "/api/v1/tasks")["tasks"]
        print(
            f"\nkills at {', '.join(f'{k:.0%}' for k in kills)} of the origin's bytes; origin sent {copies:.3f} copies "
            f"in {stats['requests']['/f.bin']} requests ({stats['ranges'].get('/f.bin', 0)} ranged); "
            f"slowest dfget {max(times.values()):.1f}s (a fetch alone at the origin's pace {SIZE / RATE:.1f}s)"
        )
        assert [t["status"] for t in tasks] == ["success"] and tasks[0]["sha256"] == digest
        # each restart went on from what the killed process had stored
        assert stats["ranges"]["/f.bin"] == 3
        assert copies <= 1.05


@pytest.mark.parametrize("mode", ["reset", "short"])
def test_a_cut_origin_connection_resumes_on_the_next_try(tmp_path, origin_file, mode):
    """The body is cut at 60 %; the dfget fails cleanly; the next one gets the rest with a Range, not the whole file."""
    root, digest = origin_file
    with Swarm(str(tmp_path / "swarm")) as swarm:
        swarm.start_all(root, 1, "--origin-retries", "0")  # the resume on the next try, not in process
        cut = int(SIZE * 0.6) + 12345
        fault(swarm, "/f.bin", mode, cut=cut, times=1)
        url = swarm.origin_url + "/f.bin"
        first = swarm.dfget(url, str(tmp_path / "a.out"), "p0")
        _, err = first.communicate(timeout=120)
        assert first.returncode == 3, err.decode()
        assert not (tmp_path / "a.out").exists()
        second = swarm.dfget(url, str(tmp_path / "b.out"), "p0")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 0, err.decode()
        assert sha256_file(str(tmp_path / "b.out")) == digest
        stats = swarm.origin_stats()
        [task] = get_json(swarm.supernode_api + "/api/v1/tasks")["tasks"]
        print(
            f"\n{mode} at {cut} bytes: the CDN received {task['originBytes'] / SIZE:.3f} copies "
            f"(the origin handed {stats['bytesOut'] / SIZE:.3f} to its connections)"
        )
        assert stats["ranges"]["/f.bin"] == 1
        # both tries together: one copy and the bytes in flight at the cut
        assert task["originBytes"] <= SIZE * 1.05
        if mode == "short":
            # (a reset drops what sat in the origin's socket buffers: counted as handed over, never sent)
            assert stats["bytesOut"] <= SIZE * 1.05


def test_an_origin_ignoring_ranges_gives_the_whole_file_again(tmp_path, origin_file):
    root, digest = origin_file
    with Swarm(str(tmp_path / "swarm")) as swarm:
        swarm.start_all(root, 1, "--origin-retries", "0")  # the resume on the next try, not in process
        fault(swarm, "/f.bin", "short", cut=SIZE // 2, times=1)
        url = swarm.origin_url + "/f.bin"
        first = swarm.dfget(url, str(tmp_path / "a.out"), "p0")
        assert first.communicate(timeout=120) and first.returncode == 3
        fault(swarm, "/f.bin", "norange", times=0)
        second = swarm.dfget(url, str(tmp_path / "b.out"), "p0")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 0, err.decode()
        assert sha256_file(str(tmp_path / "b.out")) == digest
        stats = swarm.origin_stats()
        assert stats["ranges"].get("/f.bin", 0) == 0
        assert stats["bytesOut"] == SIZE // 2 + SIZE
        assert not os.listdir(os.path.join(swarm.workdir, "supernode", "resume"))

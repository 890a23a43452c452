"""
The rate limits hold within 10 %, measured on real processes over the steady
part of a transfer (the first second and the last half second left out):

- C{twistd supernode --origin-limit} (set here through C{--config}): the
  rate the SuperNode reads the origin's body at, read from its task's
  origin byte counter (the origin's own counter runs ahead by what the
  kernel's socket buffers hold);
- C{twistd dfpeer --upload-limit}: the rate a peer serves two others at
  (one limit for the host, over both connections), read from the serving
  peer's upload counter;
- C{dfget --locallimit}: the rate the download completes at, read from the
  peer's completed bytes.
"""

import pytest
import yaml

from dragonfly.testing.swarm import Swarm, measure_rate, sha256_file, write_random_file

pytestmark = pytest.mark.integration

MiB = 1 << 20
RATE = 8 * MiB
SIZE = 40 * MiB  # 5 s at RATE: a 3.5 s steady window


def _wait(proc, timeout=120):
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode()


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    digests = {name: write_random_file(str(root / name), SIZE) for name in ("origin.bin", "upload.bin", "local.bin")}
    return str(root), digests


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, www):
    """
    No origin limit; 1 MiB pieces: the counters, counted per piece, move 8
    times a second.  A seed window of 4 lets a lone peer keep 4 seed pieces
    in flight, so on a loaded machine it still asks for more than the limit
    lets through (with 1, each piece waits for a sync with the SuperNode).
    """
    root, _ = www
    with Swarm(str(tmp_path_factory.mktemp("swarm"))) as s:
        s.start_origin(root)
        s.start_supernode("--piece-size", "1M", "--seed-window", "4")
        s.start_peer("local")
        s.start_peer("up", "--upload-limit", "8M")
        # two requests outstanding per connection: the limited peer always
        # has the next request queued, so only its limit paces it
        s.start_peer("down1", "--pipeline", "2")
        s.start_peer("down2", "--pipeline", "2")
        yield s


def _origin_bytes_read(s, url):
    """The bytes the SuperNode has read of C{url}'s body: what its limit charges (0 before the task)."""
    return next((t["originBytes"] for t in s.supernode_tasks() if t["url"] == url), 0)


def test_origin_limit(tmp_path, www):
    """
    The limit paces what the SuperNode reads, measured at the SuperNode.
    The origin's own counter runs ahead of it by what the kernel's socket
    buffers hold (a few MiB on loopback, growing during the transfer), so it
    is checked over the whole transfer only: one copy, far below line rate.
    """
    root, digests = www
    config = tmp_path / "supernode.yaml"
    config.write_text(yaml.safe_dump({"origin-limit": "8M", "piece_size": "1M"}))
    with Swarm(str(tmp_path / "swarm")) as s:
        s.start_origin(root)
        s.start_supernode("--config", str(config))
        s.start_peer("p")
        url = s.origin_url + "/origin.bin"
        proc = s.dfget(url, str(tmp_path / "out"), "p")
        m = measure_rate(lambda: _origin_bytes_read(s, url), SIZE)
        code, err = _wait(proc)
        assert code == 0, err
        assert sha256_file(str(tmp_path / "out")) == digests["origin.bin"]
        (task,) = [t for t in s.supernode_tasks() if t["url"] == url]
        assert task["originBytes"] == SIZE and task["pieceSize"] == MiB
        assert s.origin_stats()["bytesSent"] == SIZE
    print(f"\n--origin-limit 8M: the SuperNode read {m}")
    assert m.within(RATE), m
    # unlimited, this origin sends 40 MiB in well under a second
    assert m.total_seconds >= SIZE / (2 * RATE), m


def test_upload_limit(swarm, www, tmp_path):
    _, digests = www
    url = swarm.origin_url + "/upload.bin"
    # the limited peer gets the file first (its downloads are not limited) ...
    code, err = _wait(swarm.dfget(url, str(tmp_path / "up.bin"), "up"))
    assert code == 0, err
    # ... then serves it to two peers at once: the seed gives nothing to peers
    # whose neighbour holds every piece (super-seeding), so the swarm's only
    # source is the limited peer
    names = ["down1", "down2"]
    procs = {n: swarm.dfget(url, str(tmp_path / f"{n}.bin"), n) for n in names}
    m = measure_rate(lambda: (swarm.peer_task("up", url) or {}).get("uploaded", 0), SIZE)
    for name, proc in procs.items():
        code, err = _wait(proc)
        assert code == 0, err
        assert sha256_file(str(tmp_path / f"{name}.bin")) == digests["upload.bin"]
        assert swarm.peer_task(name, url)["traffic"]["supernode"] == 0
    print(f"\n--upload-limit 8M: the peer served {m}")
    assert m.within(RATE), m


def test_locallimit(swarm, www, tmp_path):
    _, digests = www
    url = swarm.origin_url + "/local.bin"
    proc = swarm.dfget(url, str(tmp_path / "local.bin"), "local", "--locallimit", "8M")
    m = measure_rate(lambda: (swarm.peer_task("local", url) or {}).get("completedBytes", 0), SIZE)
    code, err = _wait(proc)
    assert code == 0, err
    assert sha256_file(str(tmp_path / "local.bin")) == digests["local.bin"]
    print(f"\ndfget --locallimit 8M: the download ran at {m}")
    assert m.within(RATE), m

"""
The benchmarks end to end, small: C{python -m bench.swarm --smoke} (3
emulated hosts in network namespaces, a 4 MiB file, 200 Mbit/s links),
Dragonfly and plain HTTP, then the BitTorrent baseline alone (needs root,
C{ip netns} and aria2c; skipped elsewhere); C{python -m bench.datapath
--size 32M} (needs nginx); and the benchmarks' parsers.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXIT_BUSY = 75  # bench.swarm: another run holds the emulated network


def _cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "the swarm benchmark needs root (network namespaces, tc)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "ip netns does not work on this machine"
    return None


def _our_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("dfb-")]


@pytest.mark.timeout(120)
def test_bench_smoke(tmp_path):
    reason = _cannot_run()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.swarm", "--smoke", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )
    elapsed = time.monotonic() - started
    if proc.returncode == EXIT_BUSY:
        pytest.skip("another benchmark run holds the dfb-* namespaces")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"\nsmoke run took {elapsed:.1f}s\n{proc.stdout}")
    assert elapsed < 60

    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    (run,) = results["runs"].values()
    assert set(run) == {"dragonfly", "http"}
    for system, record in run.items():
        assert record["n"] == 3
        assert record["ok"], (system, record["failed"], record["hosts"])
        assert all(h["sha256Ok"] and h["exit"] == 0 for h in record["hosts"].values()), record["hosts"]
        assert record["seconds"]["max"] >= record["seconds"]["p50"] > 0
    dragonfly, http = run["dragonfly"], run["http"]
    # the origin sends one copy through Dragonfly, one per host over plain HTTP
    assert dragonfly["originCopies"] <= 1.02
    assert http["originCopies"] >= 2.98
    assert dragonfly["traffic"].get("back_to_source", 0) == 0
    assert (tmp_path / "results.md").exists()
    assert _our_namespaces() == []


# -- the BitTorrent baseline of the swarm benchmark ------------------------------------


@pytest.mark.timeout(150)
def test_bench_smoke_bittorrent(tmp_path):
    """N = 3 aria2c leechers, an aria2c seed and opentracker on the emulated hosts."""
    from bench import bittorrent

    reason = _cannot_run() or bittorrent.unavailable()
    if reason:
        pytest.skip(reason)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.swarm", "--smoke", "--systems", "bittorrent", "--no-plot", "--out", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=140)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == EXIT_BUSY:
        pytest.skip("another benchmark run holds the dfb-* namespaces")
    assert proc.returncode == 0, stdout + stderr
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    (run,) = results["runs"].values()
    record = run["bittorrent"]
    assert record["ok"], (record["failed"], record["hosts"])
    assert all(h["sha256Ok"] and h["exit"] == 0 for h in record["hosts"].values()), record["hosts"]
    # the origin's HTTP server sent nothing: the seed on its host did, about one copy at least
    assert record["link"]["originUpBytes"] >= results["params"]["file_size"]
    assert record["cpu"]["processSeconds"]["aria2c"] > 0
    assert record["cpuPerPeerPerGiB"] > 0
    assert _our_namespaces() == []
    assert _aria2c_started_by(proc.pid) == []  # every aria2c of the run is gone


def _aria2c_started_by(pid: int) -> list[int]:
    """The live aria2c processes that a benchmark process C{pid} started (they name it in --stop-with-process)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"aria2c") and f"--stop-with-process={pid}".encode() in argv:
            found.append(int(entry))
    return found


# -- the data-path benchmark ------------------------------------------------------------

EXIT_UNAVAILABLE = 77


@pytest.mark.timeout(240)
def test_datapath_smoke(tmp_path):
    """
    C{python -m bench.datapath --size 32M}: curl, Dragonfly (SuperNode ->
    peer A -> peer B) and, where aria2c is installed, BitTorrent, each
    verified, with the CPU and memory of every process.
    """
    from bench import bittorrent

    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.datapath", "--size", "32M", "--startup-runs", "1", "--timeout", "120",
         "--out", str(out), "--workdir", str(tmp_path / "work"), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=230,
    )
    if proc.returncode == EXIT_BUSY:
        pytest.skip("another datapath run is going on")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(proc.stdout)
    with open(out / "datapath.json") as f:
        assert json.load(f)["runs"]["32M"] == record
    assert (out / "datapath.md").read_text().count("| curl: nginx -> file |") == 1

    transfers = {t["key"]: t for t in record["transfers"]}
    want = {"curl-devnull", "curl-file", "origin-supernode-peer", "peer-peer"}
    reason = bittorrent.unavailable()
    if reason:
        assert "bittorrent" in record["skipped"]
    else:
        want.add("bittorrent")
    assert set(transfers) == want
    size = 32 << 20
    for key, t in transfers.items():
        assert t["ok"] and t["bytes"] == size and t["seconds"] > 0, t
        if key != "curl-devnull":
            assert t["sha256Ok"] is True, t
        for p in t["processes"]:
            assert p["cpuSeconds"] >= 0, (key, p)
    # every byte B got came from peer A or the SuperNode's seed, none from the origin
    first, second = transfers["origin-supernode-peer"], transfers["peer-peer"]
    assert first["sources"].get("back_to_source", 0) == 0
    assert first["sources"].get("supernode", 0) == size
    assert second["sources"].get("back_to_source", 0) == 0
    assert second["sources"].get("remote_peer", 0) + second["sources"].get("supernode", 0) == size
    assert second["sources"].get("remote_peer", 0) > 0
    roles = {p["role"]: p for p in first["processes"] + second["processes"]}
    for role in ("SuperNode (fetch, hash, write, seed)", "receiving dfpeer (A)", "receiving dfpeer (B)",
                 "uploading dfpeer (A)"):
        assert roles[role]["peakRssMiB"] > 0, role
    assert roles["receiving dfpeer (A)"]["cpuSeconds"] > 0
    # dfget's start-up, seen from outside, and its imports
    assert 0 < first["firstRequestSeconds"] <= first["askSeconds"] < first["seconds"]
    assert 0 < record["dfget"]["firstRequestMedian"] <= record["dfget"]["askMedian"]
    assert record["dfget"]["importtime"]["modules"] > 10
    assert record["dfget"]["importtime"]["totalSeconds"] > 0
    assert {t["target"] for t in record["targets"]} >= {"peer -> peer", "dfget asks its dfpeer for the file"}
    # nothing left running or on disk
    assert not (tmp_path / "work").exists() or not [
        e for e in os.listdir(tmp_path / "work") if e.startswith("dfb-datapath-")
    ]


# -- parsers (no processes) ------------------------------------------------------------


def _bencode(value) -> bytes:
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(_bencode(v) for v in value) + b"e"
    return b"d" + b"".join(_bencode(k) + _bencode(v) for k, v in sorted(value.items())) + b"e"


_bvalues = st.recursive(
    st.integers(-(10 ** 12), 10 ** 12) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.binary(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(_bvalues)
def test_bdecode_round_trip(value):
    from bench.bittorrent import bdecode

    assert bdecode(_bencode(value)) == value


@given(st.binary(max_size=64))
def test_bdecode_rejects_garbage_with_valueerror(data):
    from bench.bittorrent import bdecode

    try:
        bdecode(data)
    except ValueError:
        pass


def test_info_hash_and_scrape():
    from bench.bittorrent import bdecode, info_hash, seeders

    info = {b"length": 5, b"name": b"payload.bin", b"piece length": 262144, b"pieces": b"x" * 20}
    torrent = _bencode({b"announce": b"http://198.18.0.11:6969/announce", b"creation date": 1, b"info": info})
    assert info_hash(torrent) == hashlib.sha1(_bencode(info)).digest()
    assert bdecode(torrent)[b"info"] == info
    ih = info_hash(torrent)
    reply = _bencode({b"files": {ih: {b"complete": 1, b"downloaded": 0, b"incomplete": 2}}})
    assert seeders(reply, ih) == 1
    assert seeders(_bencode({b"files": {}}), ih) == 0
    with pytest.raises(ValueError):
        info_hash(_bencode({b"announce": b"x"}))


def test_parse_importtime():
    from bench.datapath import parse_importtime

    text = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |        100 |   _io",
        "import time:       200 |        300 | io",
        "import time:      1000 |       1000 |     dragonfly.core.units",
        "import time:       500 |       1500 |   dragonfly.core",
        "import time:      2000 |       3500 | dragonfly.cli.dfget",
        "usage: something else on stderr",
    ])
    got = parse_importtime(text)
    assert got["modules"] == 5
    assert got["totalSeconds"] == 0.0038
    assert got["dragonflySelfSeconds"] == 0.0035
    assert got["slowestTopLevel"] == [["dragonfly.cli.dfget", 0.0035], ["io", 0.0003]]
    assert got["slowestSecondLevel"] == [["dragonfly.core", 0.0015], ["_io", 0.0001]]

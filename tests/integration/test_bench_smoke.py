"""
The swarm benchmark end to end, small: C{python -m bench.swarm --smoke}
(3 emulated hosts in network namespaces, a 4 MiB file, 200 Mbit/s links),
both systems.  Needs root and C{ip netns}; skipped elsewhere.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

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

"""
C{python -m bench.restart} end to end, small: 2 emulated dfpeers, 16 MiB,
the SuperNode killed once at half the origin's bytes and started again
(needs root and C{ip netns}; skipped elsewhere, or while another benchmark
run holds the emulated network).
"""

import json
import os
import subprocess
import sys
import time

import pytest

from .test_bench_smoke import EXIT_BUSY, REPO, _cannot_run, _our_namespaces

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
def test_bench_restart_small(tmp_path):
    reason = _cannot_run()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "restart.json"
    workdirs = {d for d in os.listdir("/dev/shm") if d.startswith("dfb-restart-")}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.restart", "--peers", "2", "--size-mib", "16", "--peer-mbit", "100",
         "--origin-mbit", "100", "--supernode-mbit", "100", "--kills", "0.5", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    elapsed = time.monotonic() - started
    if proc.returncode == EXIT_BUSY:
        pytest.skip("another benchmark run holds the dfb-* namespaces")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    print(f"\nbench.restart (small) took {elapsed:.1f}s\n{proc.stdout[-1500:]}")
    result = json.loads(out.read_text())
    for run in (result["undisturbed"], result["restarts"]):
        assert run["right"] == run["peers"] == 2 and run["exits"] == [0, 0]
    [kill] = result["restarts"]["kills"]
    assert kill["at"] >= 0.5
    # the new process bound its port and answered, and the peers' task came back to it
    assert None not in (kill["bound"], kill["api"], kill["task"]) and kill["api"] <= kill["task"]
    assert not _our_namespaces()
    assert {d for d in os.listdir("/dev/shm") if d.startswith("dfb-restart-")} <= workdirs

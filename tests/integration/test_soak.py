"""
A one-minute soak on emulated hosts (L{bench.soak}): downloads while peers,
the SuperNode and the origin fail at seeded times.  Needs root and
C{ip netns}; skipped with the reason otherwise.
"""

import json
import os
import subprocess
import sys

import pytest

from bench import netem

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_one_minute_soak(tmp_path):
    why = netem.unavailable()
    if why:
        pytest.skip(why)
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--minutes", "1", "--baseline-minutes", "0.5", "--seed", "7",
         "--doc", "", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    if proc.returncode == 2 and "cannot run" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    soak = result["soak"]
    print(json.dumps(result, indent=1))
    assert soak["wrong"] == 0 and soak["partial"] == 0
    assert result["calm"]["done"] == result["calm"]["started"] > 0
    # most downloads survive the faults (a killed peer's own dfget may fail)
    assert soak["done"] >= 0.8 * soak["started"]
    assert sum(result["faults"].values()) >= 5

"""
A dfpeer's block port flooded while real downloads run through it
(L{bench.flood}, on loopback, at a small scale: 300 silent and 150 garbage
connections against a limit of 200): every download right, the excess
answered with ERROR 429, garbage with 400, silence with 408 after the
handshake timeout, and no flood connection left open 10 s after the
flood stopped.  The full scale (2,000 + 1,000) is C{python -m bench.flood}.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_flooded_block_port_sheds_and_recovers(tmp_path):
    out = tmp_path / "flood.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.flood", "--idle", "300", "--garbage", "150", "--sources", "10",
         "--max-connections", "200", "--rounds", "1", "--size-mib", "8", "--rate", "8M", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    print(json.dumps(r, indent=1))
    # the downloads finished with the right bytes (bench.flood checks each SHA-256) under the flood
    assert len(r["flooded"]) == 1 and r["flooded"][0]["A"] > 0
    codes = r["flooder"]["codes"]
    assert codes.get("429", 0) > 0 and codes.get("400", 0) > 0 and codes.get("408", 0) > 0, codes
    assert set(codes) <= {"400", "408", "429"}, codes
    # the limit held: about 200 flood connections at most, not 450 (the rest of
    # the margin: the downloads' own connections and files, refused connections
    # between their accept and their close)
    assert r["fdPeak"] < r["fdBaseline"] + 200 + 100, r
    # once the flood stopped, the port shed what was still open within the handshake timeout
    assert r["floodSocketsAfter"] == 0 and r["secondsToNoFloodSocket"] <= 10.0 + 1.0, r

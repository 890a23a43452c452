"""
The block protocol's data path on real loopback TCP between two processes
(bench/block_loopback.py with --verify): zero-copy uploads, their fallback
when sendfile fails part-way, and the copying path, each byte compared with
the file.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("extra", [[], ["--fault", "short"], ["--fault", "badfd"], ["--no-zero-copy"]])
def test_pieces_arrive_whole(extra):
    out = subprocess.run(
        [sys.executable, "-m", "bench.block_loopback", "--size-mib", "24", "--piece-mib", "1", "--verify", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["wrong_pieces"] == 0 and result["bytes"] == 24 << 20

"""
bench.images runs end to end at a small size (the real registry, dfdaemons,
containerd): its results say each blob left the registry once, and every
pull was checked by digest (the bench fails otherwise).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dragonfly.testing.containerd import have_containerd
from dragonfly.testing.registry import have_tools

pytestmark = pytest.mark.e2e

missing = have_tools()
if missing:
    pytest.skip(missing, allow_module_level=True)


def run_bench(tmp_path, *args):
    out = tmp_path / "images.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.images", "--json", str(out), *args], capture_output=True, timeout=180,
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    return json.loads(out.read_text())


def test_the_layer_part(tmp_path):
    results = run_bench(tmp_path, "--parts", "layer", "--layer-mib", "8")
    layer = results["layer"]
    assert layer["size"] > 8 << 20
    assert layer["copies"] == [1.0]
    assert all(t > 0 for t in layer["registry"] + layer["host1"] + layer["host2"] + layer["held"])


@pytest.mark.skipif(bool(have_containerd()), reason=str(have_containerd()))
def test_the_containerd_part(tmp_path):
    results = run_bench(tmp_path, "--parts", "containerd", "--hosts", "2", "--image-mib", "2x2")
    c = results["containerd"]
    assert [len(r["times"]) for r in c["registry"] + c["dfdaemon"]] == [2, 2]
    assert list(c["registry"][0]["copies"].values()) == [2.0, 2.0]
    assert list(c["dfdaemon"][0]["copies"].values()) == [1.0, 1.0]
    assert c["dfdaemon"][0]["fallbacks"] == 0


def test_the_small_part(tmp_path):
    results = run_bench(tmp_path, "--parts", "small", "--hosts", "2", "--small-sizes", "16K,1M")
    small = results["small"]
    assert small["hosts"] == 2 and len(small["sizes"]) == 2 and small["sizes"][0] < 64 << 10 < 1 << 20 < small["sizes"][1]
    assert [len(r) for r in small["swarm"] + small["registry"]] == [2, 2]
    assert all(t > 0 for r in small["swarm"] + small["registry"] for t in r)


@pytest.mark.parametrize("splice", [True, False])
def test_the_layer_part_traced(tmp_path, splice):
    """
    --trace: host 2's dfpeer stream and dfdaemon relay log their times, in
    the order a GET goes (the relay's last byte after the last piece, the
    client's after the relay's); --dfdaemon-args reaches the dfdaemons.
    The stream's "sees done" line is written when its loop next runs after
    the task's end; a sendfile burst under way may already have sent the
    last byte by then, so the relay's lines are ordered after the last
    piece, not after that line.
    """
    args = ["--parts", "layer", "--layer-mib", "8", "--trace"] + ([] if splice else ["--dfdaemon-args=--no-splice"])
    layer = run_bench(tmp_path, *args)["layer"]
    tl = layer["host2_timeline"][0]
    # the stream logs "sent all" when it ends, which may come after the relay
    # or the client took the last byte, and after the bench read the logs
    if "stream sent all" in tl:
        assert tl["stream sent all"] >= tl["stream sees done"]
    for order in (["start", "first piece", "last piece", "stream sees done"],
                  ["last piece", "relay took all", "relay sent all", "client done"] if splice
                  else ["last piece", "client done"]):
        assert [k for k in order if k in tl] == order
        assert [tl[k] for k in order] == sorted(tl[k] for k in order)
    assert 0 <= tl["offset at done"] <= layer["size"]
    assert ("relay start" in tl) is splice

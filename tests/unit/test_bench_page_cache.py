"""bench.measure's page-cache probe and the VM's free page reporting, and how bench.datapath reports them."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.datapath import _page_cache_line
from bench.measure import feature_bit, free_page_reporting, page_cache_write_cost, warm_memory


def balloon(root, features: str | None) -> str:
    device = root / "virtio3"
    device.mkdir(parents=True)
    if features is not None:
        (device / "features").write_text(features + "\n")
    (root / "bind").write_text("")  # the driver directory's other entries are not devices
    return str(root)


def test_reporting_is_bit_five_of_the_balloon_features(tmp_path):
    assert free_page_reporting(balloon(tmp_path / "on", "0110010100000000")) is True
    assert free_page_reporting(balloon(tmp_path / "off", "0110000100000000")) is False


def test_no_balloon_device_is_none(tmp_path):
    assert free_page_reporting(str(tmp_path / "absent")) is None
    assert free_page_reporting(balloon(tmp_path / "unreadable", None)) is None


@given(st.text(alphabet="01", max_size=140), st.integers(min_value=0, max_value=160))
def test_feature_bit_reads_bit_n_from_the_left(bits, n):
    assert feature_bit(bits, n) == (n < len(bits) and bits[n] == "1")


@given(st.text(min_size=1, max_size=20).filter(lambda t: any(c not in "01" for c in t)))
def test_feature_bit_rejects_anything_but_bits(text):
    with pytest.raises(ValueError, match="not a virtio feature string"):
        feature_bit(text, 0)


def test_the_probe_writes_each_pass_and_leaves_nothing(tmp_path):
    costs = page_cache_write_cost(str(tmp_path), size=4 << 20, passes=3)
    assert len(costs) == 3
    assert all(c >= 0 for c in costs)
    assert os.listdir(tmp_path) == []


def test_the_probe_leaves_nothing_when_writing_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        page_cache_write_cost(str(tmp_path / "missing"), size=1 << 20)
    assert os.listdir(tmp_path) == []


def test_warming_memory_leaves_nothing_behind(tmp_path):
    assert warm_memory(str(tmp_path), 3 << 20) >= 0
    assert os.listdir(tmp_path) == []


def test_datapath_says_what_the_warm_ups_cost():
    line = _page_cache_line({"memoryWarmCpuPerGiB": {"curl-devnull": 2.5, "dfgetA": 0.4}})
    assert "curl-devnull 2.50, dfgetA 0.40" in line
    assert "after the run" not in line


def test_datapath_says_what_the_page_cache_cost():
    line = _page_cache_line({"pageCacheWriteCpuPerGiB": [4.01, 0.31], "freePageReporting": True})
    assert "4.01 then 0.31 CPU s/GiB" in line
    assert "free page reporting to the VM's host: on" in line
    assert _page_cache_line({"freePageReporting": None}) == ""
    assert "no balloon device" in _page_cache_line({"pageCacheWriteCpuPerGiB": [0.2], "freePageReporting": None})

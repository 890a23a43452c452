"""bench.profile: py-spy's raw stacks folded into per-function shares, and /proc counters."""

from __future__ import annotations

import os

import pytest

from bench.profile import Profiler, fold, group_means, proc_counters, top


def write(path, text):
    path.write_text(text)
    return str(path)


def test_fold_adds_up_stacks_of_several_files(tmp_path):
    a = write(tmp_path / "a.txt", "main (x.py:1);f (x.py:5) 3\nmain (x.py:1);g (y.py:7) 1\n")
    b = write(tmp_path / "b.txt", "main (x.py:1);f (x.py:5) 2\nnot a stack line\n")
    stacks = fold([a, b])
    assert stacks == {"main (x.py:1);f (x.py:5)": 5, "main (x.py:1);g (y.py:7)": 1}


def test_top_counts_self_and_total_per_function_not_per_line(tmp_path):
    # f on two lines is one function; main is on every stack
    a = write(tmp_path / "a.txt",
              "main (/r/pkg/x.py:1);f (/r/pkg/x.py:5) 2\n"
              "main (/r/pkg/x.py:1);f (/r/pkg/x.py:6) 1\n"
              "main (/r/pkg/x.py:1) 1\n")
    table = top([a])
    lines = table.splitlines()
    assert lines[0] == "4 samples from 1 processes"
    assert " 75.0%  75.0%  f (pkg/x.py)" in lines
    assert " 25.0% 100.0%  main (pkg/x.py)" in lines


def test_top_with_no_samples(tmp_path):
    assert top([write(tmp_path / "e.txt", "")]) == "no samples\n"


def test_proc_counters_of_this_process_and_of_none():
    mine = proc_counters(os.getpid())
    assert mine["user"] >= 0 and mine["system"] >= 0
    assert "voluntary_ctxt_switches" in mine
    assert proc_counters(2 ** 22 + 12345) == {}


def test_profiler_without_tools_writes_counters(tmp_path):
    with Profiler(str(tmp_path), [os.getpid()], tools=()):
        sum(range(10000))
    assert (tmp_path / "counters.json").exists()
    assert (tmp_path / "top.txt").read_text() == "no samples\n"


def test_profiler_rejects_unknown_tools(tmp_path):
    with pytest.raises(ValueError, match="strace"):
        Profiler(str(tmp_path), [1], tools=("strace",))


def test_group_means_per_process_and_per_gib():
    means = group_means([{"user": 1.0, "system": 0.5}, {"user": 2.0, "system": 0.5}], gib=0.5)
    assert means["user"] == 1.5 and means["system"] == 0.5 and means["processes"] == 2
    assert means["cpuPerGiB"] == 4.0 and means["userPerGiB"] == 3.0 and means["systemPerGiB"] == 1.0
    assert group_means([], gib=1.0) == {}


def test_profiler_groups_in_counters(tmp_path):
    import json

    with Profiler(str(tmp_path), [os.getpid()], tools=(), groups={"a": [os.getpid()], "b": []}, gib=1.0):
        pass
    groups = json.loads((tmp_path / "counters.json").read_text())["groups"]
    assert groups["a"]["processes"] == 1 and groups["b"] == {}

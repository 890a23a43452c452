"""
L{dragonfly.testing.containerd.run_pulls}: commands run at once, each timed
to its own exit, their output to files (a pull that writes more than a
pipe holds does not stop while an earlier one is waited for).
"""

from __future__ import annotations

import os
import sys

import pytest

from dragonfly.testing.containerd import run_pulls


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_each_is_timed_to_its_own_exit_and_a_chatty_one_does_not_block(tmp_path):
    # the first runs longest; the second writes 256 KiB (four pipes' worth) at once and exits
    times = run_pulls([py("import time; time.sleep(2.0)"), py("import sys; sys.stdout.write('x' * (256 << 10))")],
                      str(tmp_path))
    assert times[0] >= 2.0
    assert times[1] < times[0]
    assert os.path.getsize(tmp_path / "pull-1.out") == 256 << 10


def test_a_failure_raises_with_the_tail_of_its_output(tmp_path):
    with pytest.raises(RuntimeError, match="exit 3: .*no such image"):
        run_pulls([py("pass"), py("import sys; print('no such image'); sys.exit(3)")], str(tmp_path))


def test_a_pull_past_the_timeout_is_killed(tmp_path):
    with pytest.raises(RuntimeError, match="still running"):
        run_pulls([py("import time; time.sleep(30)")], str(tmp_path), timeout=0.3)

"""
Tests for L{dragonfly.peer.views} (the task's listeners and the attributes
it shows for its parts) and L{dragonfly.peer.outcome} (the whole-file
digest a request names).
"""

from __future__ import annotations

from typing import Any

import pytest

from dragonfly.peer.outcome import TaskFailed, check_sha256, wanted_sha256
from dragonfly.peer.views import Listeners, Via

SHA = "ab" * 32


class Part:
    def __init__(self) -> None:
        self.size = 3
        self.mode: str | None = None


class Whole:
    size = Via[int]("part")
    mode = Via["str | None"]("part", writable=True)

    def __init__(self) -> None:
        self.part = Part()


def test_via_reads_and_writes_the_part() -> None:
    w = Whole()
    assert w.size == 3
    w.part.size = 4
    assert w.size == 4
    w.mode = "x"
    assert w.part.mode == "x" and w.mode == "x"
    with pytest.raises(AttributeError):
        w.size = 5
    assert w.part.size == 4
    assert isinstance(Whole.size, Via)  # the class shows the descriptor (pydoc, liar.py-style patching)


def test_watchers_hear_every_change_and_may_leave_while_told() -> None:
    listeners = Listeners()
    heard: list[str] = []

    def once() -> None:
        heard.append("once")
        listeners.unwatch(once)

    listeners.watch(once)
    listeners.watch(lambda: heard.append("always"))
    listeners.changed()
    listeners.changed()
    assert heard == ["once", "always", "always"]
    listeners.unwatch(once)  # not watching: nothing happens


def test_waiters_fire_once_at_the_end_after_the_watchers() -> None:
    listeners = Listeners()
    order: list[Any] = []
    listeners.watch(lambda: order.append("watcher"))
    d = listeners.wait("task", ended=False)
    d.addCallback(order.append)
    assert not d.called
    listeners.ended("task")
    assert order == ["watcher", "task"]
    listeners.ended("task")
    assert order == ["watcher", "task", "watcher"]
    assert listeners.wait("task", ended=True).result == "task"


@pytest.mark.parametrize(
    "request_, want",
    [
        ({}, None),
        ({"digest": ""}, None),
        ({"digest": f"sha256:{SHA}"}, SHA),
        ({"digest": f"sha256:{SHA.upper()}"}, SHA),
        ({"digest": "sha256:abc"}, None),
        ({"digest": "md5:" + "0" * 32}, None),
        ({"digest": "nonsense"}, None),
    ],
)
def test_wanted_sha256(request_: dict[str, Any], want: str | None) -> None:
    assert wanted_sha256(request_) == want


def test_check_sha256() -> None:
    check_sha256(SHA, SHA)
    with pytest.raises(TaskFailed) as e:
        check_sha256("00" * 32, SHA, "origin content")
    assert e.value.code == "DIGEST_MISMATCH"
    assert e.value.message == f"origin content has sha256:{'00' * 32}, expected sha256:{SHA}"

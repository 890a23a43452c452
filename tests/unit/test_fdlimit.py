"""L{dragonfly.core.fdlimit}: the block connection limit fits under the open-file limit (rlimit calls faked)."""

from __future__ import annotations

import resource

import pytest

from dragonfly.core import fdlimit


class Limits:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, value: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed")
        soft, hard = value
        assert hard == self.hard and soft <= hard
        self.soft = soft


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch):
    def make(soft: int, hard: int, refuse: bool = False) -> Limits:
        fake = Limits(soft, hard, refuse)
        monkeypatch.setattr(fdlimit.resource, "getrlimit", fake.get)
        monkeypatch.setattr(fdlimit.resource, "setrlimit", fake.set)
        return fake

    return make


def test_a_low_soft_limit_is_raised(limits) -> None:
    fake = limits(1024, 524288)
    assert fdlimit.fit_open_files(1024, reserve=512) == 1024
    assert fake.soft == 1536


def test_a_high_enough_soft_limit_is_left_alone(limits) -> None:
    fake = limits(20000, 20000)
    assert fdlimit.fit_open_files(1024, reserve=512) == 1024
    assert fake.soft == 20000


def test_a_low_hard_limit_lowers_the_connection_limit(limits) -> None:
    fake = limits(1024, 1024)
    assert fdlimit.fit_open_files(1024, reserve=512) == 512
    assert fake.soft == 1024


def test_a_refused_raise_lowers_the_connection_limit(limits) -> None:
    limits(1024, 4096, refuse=True)
    assert fdlimit.fit_open_files(1024, reserve=256) == 768


def test_never_below_one(limits) -> None:
    limits(100, 100)
    assert fdlimit.fit_open_files(1024, reserve=256) == 1


def test_shared_limits_fit_together_when_the_soft_limit_can_be_raised(limits) -> None:
    fake = limits(1024, 524288)
    assert fdlimit.fit_open_files_shared({"seed block": 1024, "API": 4096}, reserve=256) == {
        "seed block": 1024, "API": 4096,
    }
    assert fake.soft == 1024 + 4096 + 256


def test_shared_limits_scale_down_in_proportion_under_a_low_hard_limit(limits) -> None:
    fake = limits(1024, 4096)
    fit = fdlimit.fit_open_files_shared({"seed block": 1024, "API": 4096}, reserve=256)
    assert fake.soft == 4096
    assert fit == {"seed block": 768, "API": 3072}  # 3840 fit, shared 1:4
    assert sum(fit.values()) + 256 <= fake.soft


def test_shared_limits_keep_at_least_one_each(limits) -> None:
    limits(300, 300)
    assert fdlimit.fit_open_files_shared({"a": 1000, "b": 1}, reserve=256) == {"a": 43, "b": 1}

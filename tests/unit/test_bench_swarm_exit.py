"""Which failed downloads make C{python -m bench.swarm} exit 1 (L{bench.swarm.fails_run})."""

from __future__ import annotations

from typing import Any

import pytest

from bench.swarm import fails_run


def _record(system: str, hosts: dict[str, tuple[int, bool]]) -> dict[str, Any]:
    ok = all(exit == 0 and good for exit, good in hosts.values())
    return {
        "system": system, "ok": ok,
        "failed": sorted(n for n, (exit, good) in hosts.items() if not (exit == 0 and good)),
        "hosts": {n: {"exit": exit, "sha256Ok": good} for n, (exit, good) in hosts.items()},
    }


@pytest.mark.parametrize("system", ["dragonfly", "bittorrent", "http"])
def test_a_round_where_everything_finished_right_passes(system: str) -> None:
    assert not fails_run(_record(system, {"peer1": (0, True), "peer2": (0, True)}))


@pytest.mark.parametrize("host", [(1, False), (0, False), (-9, False)])
def test_any_dragonfly_download_that_failed_or_is_wrong_fails_the_run(host: tuple[int, bool]) -> None:
    assert fails_run(_record("dragonfly", {"peer1": (0, True), "peer2": host}))


@pytest.mark.parametrize("system", ["bittorrent", "http"])
def test_a_baseline_download_that_never_finished_is_a_result(system: str) -> None:
    assert not fails_run(_record(system, {"peer1": (0, True), "peer21": (28, False)}))


@pytest.mark.parametrize("system", ["bittorrent", "http"])
def test_a_baseline_download_called_done_but_wrong_fails_the_run(system: str) -> None:
    assert fails_run(_record(system, {"peer1": (0, True), "peer2": (0, False)}))

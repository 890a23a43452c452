"""The opt-in memory trace (dragonfly/core/memtrace.py): off unless asked, and its /proc parsing."""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from dragonfly.core import memtrace


class Reactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.triggers: list[tuple[str, str]] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: object, *args: object) -> None:
        self.triggers.append((phase, event))


def test_proc_status_keeps_the_sizes_in_kib() -> None:
    text = "Name:\tpython\nVmHWM:\t  73052 kB\nVmRSS:\t   64892 kB\nRssAnon:\t 45876 kB\nRssFile:\t 19016 kB\nThreads:\t4\n"
    assert memtrace.proc_status(text) == {"VmHWM": 73052, "VmRSS": 64892, "RssAnon": 45876, "RssFile": 19016}


def test_nothing_happens_unless_asked(monkeypatch) -> None:
    monkeypatch.delenv(memtrace.ENV, raising=False)
    reactor = Reactor()
    assert memtrace.install(reactor, "dfpeer") is False
    assert reactor.getDelayedCalls() == [] and reactor.triggers == []


def test_a_line_per_sample_with_the_daemons_stats(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(memtrace.ENV, str(tmp_path / "m-%p.jsonl"))
    monkeypatch.delenv("DRAGONFLY_TRACEMALLOC", raising=False)
    reactor = Reactor()
    assert memtrace.install(reactor, "dfpeer", lambda: {"lentKiB": 3}) is True
    reactor.advance(0.5)
    (path,) = list(tmp_path.iterdir())
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["name"] == "dfpeer" and rows[0]["lentKiB"] == 3
    assert rows[0]["VmRSS"] > 0 and reactor.triggers == [("before", "shutdown")]

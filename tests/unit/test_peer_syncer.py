"""
Tests for L{dragonfly.peer.syncer.Syncer}: one task's conversation with the
SuperNode, driven by a scripted session, a recording task and a
L{task.Clock}; no sockets, no reactor.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from dragonfly.core.bitmap import Bitmap
from dragonfly.peer.client import SupernodeError, SupernodeUnavailable
from dragonfly.peer.lifecycle import Lifecycle, State
from dragonfly.peer.outcome import BackToSource, TaskFailed
from dragonfly.peer.picker import Picker
from dragonfly.peer.syncer import Progress, Syncer
from dragonfly.protocol.supernode_api import SyncAnswer, SyncReport, TaskRegistered

TID = "a" * 64
URL = "http://origin.test/f"


class Session:
    """Answers from queues (an Exception is raised); records every report."""

    node = "sn.test:8002"
    peer_id = "me"

    def __init__(self) -> None:
        self.registers: list[Any] = []
        self.syncs: list[Any] = []
        self.reports: list[SyncReport] = []
        self.register_calls = 0
        self.peer_registrations = 0

    async def register(self) -> TaskRegistered:
        self.register_calls += 1
        reply = self.registers.pop(0) if self.registers else {"taskId": TID, "task": {"status": "running"}}
        if isinstance(reply, Exception):
            raise reply
        return TaskRegistered.from_json(reply)

    async def sync(self, report: SyncReport) -> SyncAnswer:
        self.reports.append(report)
        # (by default the SuperNode knows the length: see test_polls_faster_until_the_length_is_known)
        reply = self.syncs.pop(0) if self.syncs else {"task": {"status": "running", "contentLength": 10}, "syncInterval": 0.5}
        if isinstance(reply, Exception):
            raise reply
        return SyncAnswer.from_json(reply)

    async def register_peer(self) -> None:
        self.peer_registrations += 1


class Task:
    """A download as the conversation sees it (L{SyncedTask})."""

    def __init__(self, clock: Clock) -> None:
        self.lifecycle = Lifecycle(State.REGISTERING)
        self.clock = clock
        self.is_starting = False
        self.have: Bitmap | None = None
        self.peer_bytes = 0
        self.last_progress = 0.0
        self.applied: list[SyncAnswer] = []
        #: sized and allocated at once once registered
        self.download = False

    def starting(self) -> bool:
        return self.is_starting

    def progress(self) -> Progress:
        return Progress(self.have, 3, False, None, ["bad"], self.peer_bytes, self.last_progress)

    def registered(self) -> None:
        self.lifecycle.move(State.SIZING)
        if self.download:
            self.lifecycle.move(State.ALLOCATING)
            self.lifecycle.move(State.DOWNLOADING)

    def apply(self, reply: SyncAnswer) -> None:
        self.applied.append(reply)


class Host:
    def __init__(self, clock: Clock, seen: float | None = None) -> None:
        self.clock = clock
        self.supernode_seen = seen


def make(request: dict[str, Any] | None = None, seen: float | None = None) -> tuple[Syncer, Session, Task, Clock]:
    clock = Clock()
    session, task = Session(), Task(clock)
    logged: list[str] = []
    syncer = Syncer(task, TID, session, Host(clock, seen), request or {"url": URL}, lambda _l, fmt, **_: logged.append(fmt))
    return syncer, session, task, clock


def run(syncer: Syncer) -> defer.Deferred:
    return defer.Deferred.fromCoroutine(syncer.run())


def error(d: defer.Deferred) -> BaseException:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "did not fail"
    return failures[0].value


# -- registering ------------------------------------------------------------------------------


def test_no_supernode_sends_a_new_task_to_the_origin() -> None:
    syncer, session, task, _ = make()
    session.registers = [SupernodeUnavailable("down")]
    e = error(run(syncer))
    assert isinstance(e, BackToSource) and e.reason == "supernode_unreachable"
    assert task.lifecycle.state is State.REGISTERING


def test_a_supernode_seen_a_moment_ago_is_waited_for() -> None:
    syncer, session, task, clock = make(seen=0.0)
    session.registers = [SupernodeUnavailable("restarting")] * 2
    d = run(syncer)
    assert session.register_calls == 1 and task.lifecycle.state is State.REGISTERING
    clock.advance(1.0)
    clock.advance(1.0)
    assert session.register_calls == 3 and task.lifecycle.state is State.SIZING
    assert not d.called
    assert syncer._host.supernode_seen == 2.0  # type: ignore[attr-defined]


def test_the_wait_ends_after_the_orphan_timeout() -> None:
    syncer, session, _, clock = make(seen=0.0)
    session.registers = [SupernodeUnavailable("gone")] * 100
    d = run(syncer)
    clock.pump([1.0] * 9)
    assert not d.called
    clock.advance(1.0)
    e = error(d)
    assert isinstance(e, BackToSource) and e.reason == "supernode_unreachable"


def test_refused_or_mistaken_registrations_fail() -> None:
    syncer, session, _, _ = make()
    session.registers = [SupernodeError(403, "FORBIDDEN", "no")]
    e = error(run(syncer))
    assert isinstance(e, TaskFailed) and e.code == "FORBIDDEN"
    syncer, session, _, _ = make()
    session.registers = [{"taskId": "b" * 64, "task": {"status": "running"}}]
    e = error(run(syncer))
    assert isinstance(e, TaskFailed) and e.code == "INTERNAL"


# -- syncing ------------------------------------------------------------------------------------


def test_syncs_soon_while_starting_then_at_the_interval() -> None:
    syncer, session, task, clock = make()
    task.is_starting = True
    run(syncer)
    assert len(session.reports) == 1 and len(task.applied) == 1
    clock.advance(Syncer.STARTUP_SYNC)
    assert len(session.reports) == 2
    task.is_starting = False
    clock.advance(Syncer.STARTUP_SYNC)
    assert len(session.reports) == 3
    clock.advance(0.4)
    assert len(session.reports) == 3
    clock.advance(0.1)
    assert len(session.reports) == 4


def test_reports_preparing_until_the_file_is_made() -> None:
    """Sizing or allocating the task refuses block connections: the reports say so (L{SyncReport.preparing})."""
    syncer, session, task, clock = make()
    task.is_starting = True
    run(syncer)
    assert task.lifecycle.state is State.SIZING and session.reports[-1].preparing
    task.lifecycle.move(State.ALLOCATING)
    syncer.kick()
    assert session.reports[-1].preparing and len(session.reports) == 2
    task.lifecycle.move(State.DOWNLOADING)
    syncer.kick()
    assert not session.reports[-1].preparing and len(session.reports) == 3


def test_no_startup_polls_while_the_file_is_made() -> None:
    """Allocating, the task waits for its file (it kicks a sync once made), not for L{Syncer.STARTUP_SYNC}."""
    syncer, session, task, clock = make()
    task.is_starting = True
    run(syncer)
    task.lifecycle.move(State.ALLOCATING)
    syncer.kick()
    assert len(session.reports) == 2
    clock.advance(4 * Syncer.STARTUP_SYNC)
    assert len(session.reports) == 2
    task.lifecycle.move(State.DOWNLOADING)
    syncer.kick()  # the file is made
    assert len(session.reports) == 3
    clock.advance(Syncer.STARTUP_SYNC)
    assert len(session.reports) == 4  # starting: the seed is not connected yet


def test_polls_faster_until_the_length_is_known() -> None:
    """While sizing and the SuperNode has no length yet, every L{Syncer.SIZING_SYNC}; then as usual."""
    syncer, session, task, clock = make()
    sizing = {"task": {"status": "running"}, "syncInterval": 0.5}
    session.syncs = [sizing, sizing]
    run(syncer)
    assert task.lifecycle.state is State.SIZING and len(session.reports) == 1
    clock.advance(Syncer.SIZING_SYNC)
    assert len(session.reports) == 2
    clock.advance(Syncer.SIZING_SYNC)
    assert len(session.reports) == 3  # this answer has the length
    clock.advance(Syncer.SIZING_SYNC)
    assert len(session.reports) == 3
    clock.advance(0.5)
    assert len(session.reports) == 4


def test_no_faster_polls_once_downloading() -> None:
    """A task past sizing (a SuperNode that lost the length) keeps the usual interval."""
    syncer, session, task, clock = make()
    task.download = True
    session.syncs = [{"task": {"status": "running"}, "syncInterval": 0.5}]
    run(syncer)
    assert task.lifecycle.state is State.DOWNLOADING and len(session.reports) == 1
    clock.advance(0.49)
    assert len(session.reports) == 1
    clock.advance(0.01)
    assert len(session.reports) == 2


def test_a_kick_syncs_at_once() -> None:
    syncer, session, _, clock = make()
    run(syncer)
    syncer.kick()
    assert len(session.reports) == 2
    assert clock.getDelayedCalls()[0].getTime() == 0.5  # the next wait starts afresh


def test_each_piece_and_failure_is_reported_once_with_the_peer_bytes_since_the_last() -> None:
    syncer, session, task, clock = make()
    run(syncer)
    syncer.note_have(4)
    syncer.note_failure(2, "liar")
    task.peer_bytes = 100
    clock.advance(0.5)
    last = session.reports[-1]
    assert list(last.have) == [4] and [(f.index, f.parent) for f in last.failed] == [(2, "liar")]
    assert (last.peer_bytes, last.digests_from, list(last.banned)) == (100, 3, ["bad"])
    task.peer_bytes = 150
    clock.advance(0.5)
    last = session.reports[-1]
    assert list(last.have) == [] and list(last.failed) == [] and last.peer_bytes == 50


def test_after_an_outage_everything_held_is_said_again() -> None:
    syncer, session, task, clock = make()
    task.download = True
    task.have = Bitmap(4)
    task.have.set(0)
    run(syncer)
    task.have.set(1)
    syncer.note_have(1)
    syncer.note_failure(3, "p")
    session.syncs = [SupernodeUnavailable("restarting")]
    clock.advance(0.5)
    clock.advance(1.0)
    last = session.reports[-1]
    assert sorted(last.have) == [0, 1] and [f.index for f in last.failed] == [3]


def test_a_supernode_that_forgot_us_hears_of_us_again() -> None:
    syncer, session, task, clock = make()
    task.download = True
    task.have = Bitmap(4)
    task.have.set(2)
    run(syncer)
    session.syncs = [SupernodeError(404, "PEER_UNKNOWN", "who?")]
    clock.advance(0.5)
    assert session.peer_registrations == 1 and session.register_calls == 2
    clock.advance(0.1)
    assert list(session.reports[-1].have) == [2]


def test_a_restarted_supernode_hears_all_we_hold_at_once() -> None:
    """The sync after registering again comes straight away (it brings back the seed and parents)."""
    syncer, session, task, clock = make()
    task.download = True
    task.have = Bitmap(4)
    task.have.set(1)
    task.have.set(3)
    run(syncer)
    session.syncs = [SupernodeError(404, "PEER_UNKNOWN", "who?")]
    clock.advance(0.5)
    before = len(session.reports)
    clock.advance(0.02)
    assert len(session.reports) == before + 1 and sorted(session.reports[-1].have) == [1, 3]


def test_a_lost_supernode_without_progress_sends_the_task_to_the_origin() -> None:
    syncer, session, task, clock = make()
    task.download = True
    d = run(syncer)
    session.syncs = [SupernodeUnavailable("gone")] * 100
    clock.pump([0.5] + [1.0] * 10)
    assert not d.called
    task.last_progress = clock.seconds()  # progress keeps it in the swarm
    clock.pump([1.0] * 10)
    assert not d.called
    clock.pump([1.0] * 2)
    e = error(d)
    assert isinstance(e, BackToSource) and e.reason == "supernode_lost"


@pytest.mark.parametrize(
    "answer, code",
    [
        (SupernodeError(409, "TASK_CHANGED", "changed"), "SOURCE_CHANGED"),
        ({"task": {"status": "running", "version": "v2"}}, "SOURCE_CHANGED"),
        ({"task": {"status": "failed", "error": {"code": "SOURCE_ERROR", "originStatus": 404}}}, "SOURCE_ERROR"),
        (SupernodeError(400, "BAD_REQUEST", "no"), "BAD_REQUEST"),
    ],
)
def test_answers_that_fail_the_task(answer: Any, code: str) -> None:
    syncer, session, task, clock = make()
    session.registers = [{"taskId": TID, "task": {"status": "running", "version": "v1"}}]
    d = run(syncer)
    assert syncer.version == "v1"
    session.syncs = [answer]
    clock.advance(0.5)
    e = error(d)
    assert isinstance(e, TaskFailed) and e.code == code
    if code == "SOURCE_ERROR":
        assert e.origin_status == 404


@pytest.mark.parametrize("notbs", [False, True])
def test_a_supernode_that_cannot_reach_the_origin(notbs: bool) -> None:
    syncer, session, _, _ = make({"url": URL, "notbs": notbs})
    session.syncs = [{"task": {"status": "failed", "error": {"code": "SOURCE_UNREACHABLE"}}}]
    e = error(run(syncer))
    if notbs:
        assert isinstance(e, TaskFailed) and e.code == "SOURCE_UNREACHABLE"
    else:
        assert isinstance(e, BackToSource) and e.reason == "supernode_cannot_reach_origin"


def test_one_last_report_when_done() -> None:
    syncer, session, task, clock = make()
    task.download = True
    d = run(syncer)
    syncer.note_have(3)
    task.lifecycle.move(State.DONE)
    syncer.kick()
    assert d.called and d.result is None
    assert [list(r.have) for r in session.reports] == [[], [3]]
    assert clock.getDelayedCalls() == []


def test_no_last_report_when_all_was_said() -> None:
    syncer, session, task, _ = make()
    task.download = True
    d = run(syncer)
    task.lifecycle.move(State.FAILED)
    syncer.kick()
    assert d.called and len(session.reports) == 1


def test_a_restarting_supernode_is_asked_again_soon_then_every_second() -> None:
    syncer, session, task, clock = make(seen=0.0)
    session.registers = [SupernodeUnavailable("restarting")] * 5
    run(syncer)
    assert session.register_calls == 1
    clock.advance(0.25)
    assert session.register_calls == 2  # a restart takes about half a second: ask again soon
    clock.advance(0.5)
    assert session.register_calls == 3
    clock.advance(0.99)
    assert session.register_calls == 3  # then once a second
    clock.advance(0.01)
    assert session.register_calls == 4
    clock.advance(1.0)
    assert session.register_calls == 5 and task.lifecycle.state is State.REGISTERING


def test_a_download_under_way_asks_a_silent_supernode_often_at_first() -> None:
    """A restart binds its port within a fraction of a second: the first 3 s of an outage are asked every 0.1 s."""
    syncer, session, task, clock = make()
    task.download = True
    run(syncer)
    session.syncs = [SupernodeUnavailable("restarting")] * 100
    clock.advance(0.5)  # the first sync after the registration fails
    failed_at = len(session.reports)
    clock.pump([0.1] * 10)
    assert len(session.reports) == failed_at + 10
    clock.pump([0.1] * 20)  # 3 s into the outage
    calls = len(session.reports)
    clock.pump([0.25] * 4)
    assert len(session.reports) - calls <= 2  # then the usual waits (0.25 s, 0.5 s, then once a second)
    session.syncs = []
    clock.pump([1.0] * 2)
    assert len(task.applied) >= 2  # it answers again: syncs go on



def bits(count: int, held: Any) -> Bitmap:
    out = Bitmap(count)
    for i in held:
        out.set(i)
    return out


def test_a_reader_s_want_syncs_only_when_the_seed_alone_can_help(monkeypatch: Any) -> None:
    syncer, *_ = make()
    picker: Picker[str] = Picker(8)
    picker.add("supernode", seed=True)
    picker.bitfield("supernode", bits(8, range(8)))
    picker.add("a")
    picker.bitfield("a", bits(8, [1]))
    # only the seed holds piece 3: ask the SuperNode now
    assert syncer.want_needs_sync(picker, 3)
    # a neighbour holds it (the scheduler would not give it from the seed), or the seed allowed it already
    assert not syncer.want_needs_sync(picker, 1)
    picker.have("a", 3)
    assert not syncer.want_needs_sync(picker, 3)
    picker.seed_allowed = {5}
    assert not syncer.want_needs_sync(picker, 5)
    picker.remove("a")
    assert syncer.want_needs_sync(picker, 3)
    # before the picker (or without a reader) as before
    assert syncer.want_needs_sync(None, 3) and syncer.want_needs_sync(picker, None)
    monkeypatch.setattr(Syncer, "want_always", True)
    assert syncer.want_needs_sync(picker, 1)

"""
A settled download syncs less (L{Syncer.max_sync}); whatever needs the
SuperNode still syncs at once.  Fake clock, scripted session.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from dragonfly.peer.syncer import Progress, Syncer
from tests.unit.test_peer_syncer import TID, URL, Host, Session, Task, run


class Settled(Task):
    """Connected to the seed and a parent, a piece stored now and then."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.connected = True
        self.starving = False
        self.want: int | None = None

    def progress(self) -> Progress:
        return Progress(self.have, 3, self.starving, self.want, [], self.peer_bytes, self.last_progress,
                        self.connected)


class Timed(Session):
    """Records when each sync was made."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.at: list[float] = []

    async def sync(self, report):  # type: ignore[no-untyped-def]
        self.at.append(round(self.clock.seconds(), 3))
        return await super().sync(report)


def make() -> tuple[Syncer, Timed, Settled, Clock]:
    clock = Clock()
    session, task = Timed(clock), Settled(clock)
    syncer = Syncer(task, TID, session, Host(clock), {"url": URL}, lambda *a, **k: None)
    syncer.max_sync = 2.0
    return syncer, session, task, clock


def times(session: Timed, clock: Clock, task: Settled, until: float) -> list[float]:
    """The times of the syncs after now up to C{until}, a piece stored every 0.125 s."""
    n = len(session.at)
    while clock.seconds() < until - 1e-9:
        task.last_progress = clock.seconds()
        clock.advance(0.125)
    return session.at[n:]


def test_the_wait_doubles_to_max_sync_while_settled() -> None:
    syncer, session, task, clock = make()
    run(syncer)
    assert session.at == [0.0]
    assert times(session, clock, task, 8.0) == [1.0, 3.0, 5.0, 7.0]
    assert syncer.resting


def test_a_download_that_is_not_settled_syncs_every_interval() -> None:
    for change in ("connected", "starving", "want", "stalled"):
        syncer, session, task, clock = make()
        if change == "connected":
            task.connected = False
        elif change == "starving":
            task.starving = True
        elif change == "want":
            task.want = 3
        run(syncer)
        if change == "stalled":
            for _ in range(24):  # nothing stored for longer than FLOWING after t = 0
                clock.advance(0.125)
            assert session.at == [0.0, 1.0, 1.5, 2.0, 2.5, 3.0], change  # one longer wait, then every 0.5 s
            continue
        assert times(session, clock, task, 2.0) == [0.5, 1.0, 1.5, 2.0], change


def test_a_failure_or_starving_while_resting_syncs_at_once() -> None:
    syncer, session, task, clock = make()
    run(syncer)
    times(session, clock, task, 1.5)
    assert syncer.resting and session.at == [0.0, 1.0]  # the next due at 3.0
    syncer.note_failure(4, "liar")
    assert session.at[-1] == 1.5 and [f.index for f in session.reports[-1].failed] == [4]
    # after a failure the wait starts again from the SuperNode's interval
    assert not syncer.resting
    assert times(session, clock, task, 5.0) == [2.0, 3.0, 5.0]
    assert syncer.resting
    syncer.need()  # starving (Neighbours.fill)
    assert session.at == [0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 5.0]


def test_need_does_nothing_outside_a_rest() -> None:
    syncer, session, task, clock = make()
    task.connected = False
    run(syncer)
    n = len(session.reports)
    syncer.need()
    assert len(session.reports) == n and not syncer.resting

"""
Tests for L{dragonfly.supernode.scheduler}: a pure module, time is passed in.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dragonfly.core.bitmap import Bitmap
from dragonfly.supernode.scheduler import (
    SEED_ID,
    Decision,
    PeerInfo,
    Scheduler,
    TaskSwarm,
    UnknownPeer,
    UnknownTask,
)

TASK = "a" * 64


def make(count: int | None = 8, peers: int = 0, seed_all: bool = True, **kw: object) -> Scheduler:
    """A scheduler with a task of C{count} pieces, the seed holding them all, and C{peers} members."""
    # small_window 1: these tests are about the seed window itself (see the small-swarm test)
    s = Scheduler(rng=random.Random(1234), **{"small_window": 1, **kw})  # type: ignore[arg-type]
    s.task(TASK)
    if count is not None:
        s.set_piece_count(TASK, count)
        if seed_all:
            for i in range(count):
                s.seed_piece_ready(TASK, i)
    for n in range(peers):
        add_peer(s, f"p{n}")
    return s


def add_peer(s: Scheduler, peer_id: str, now: float = 0.0, join: bool = True) -> None:
    s.register_peer(PeerInfo(peer_id, "10.0.0.1", 65001), now)
    if join:
        s.join(TASK, peer_id, now)


def parent_ids(d: Decision) -> list[str]:
    return [p.peer_id for p in d.parents]


def swarm(s: Scheduler) -> TaskSwarm:
    return s.tasks[TASK]


def check_holders(s: Scheduler) -> None:
    """holders[i] is the number of members whose bitmap has piece i."""
    for sw in s.tasks.values():
        if sw.piece_count is None:
            continue
        expected = [0] * sw.piece_count
        for m in sw.members.values():
            if m.have is not None:
                for i in m.have:
                    expected[i] += 1
        assert sw.holders == expected
        assert all(h >= 0 for h in sw.holders)
        # seed_sends counts at least the allowances still outstanding
        outstanding = [0] * sw.piece_count
        for m in sw.members.values():
            for i in m.seed:
                outstanding[i] += 1
        assert all(sent >= out >= 0 for sent, out in zip(sw.seed_sends, outstanding))
        assert sw.seed_out == sum(outstanding)


# -- peers and parents ------------------------------------------------------------


def test_unknown_peer_and_task() -> None:
    s = make()
    with pytest.raises(UnknownPeer):
        s.join(TASK, "ghost", 0)
    with pytest.raises(UnknownPeer):
        s.touch("ghost", 0)
    add_peer(s, "p0")
    with pytest.raises(UnknownTask):
        s.sync("b" * 64, "p0", 0)
    with pytest.raises(UnknownTask):
        s.report("b" * 64, "p0", 0, have=[1])


def test_parents_exclude_self_and_are_capped() -> None:
    s = make(peers=10, max_parents=3)
    for n in range(10):
        d = s.sync(TASK, f"p{n}", 1.0)
        ids = parent_ids(d)
        assert f"p{n}" not in ids
        assert len(ids) == 3
        assert len(set(ids)) == 3
        assert SEED_ID not in ids


def test_lone_peer_has_no_parents() -> None:
    s = make(peers=1)
    assert parent_ids(s.sync(TASK, "p0", 0)) == []


def test_a_member_preparing_is_no_parent_until_it_reports_ready() -> None:
    """
    A member that joined preparing (registered, its file not made yet) or
    reports it is preparing is nobody's parent; once a report says it is
    ready, the next top-up may name it.
    """
    s = make(peers=2)
    s.register_peer(PeerInfo("late", "10.0.0.2", 65002), 0.0)
    s.join(TASK, "late", 0.0, preparing=True)
    assert sorted(parent_ids(s.sync(TASK, "p0", 1.0))) == ["p1"]
    s.report(TASK, "late", 1.0, preparing=True)
    assert sorted(parent_ids(s.sync(TASK, "p0", 2.0))) == ["p1"]
    # (skip_preparing off: named as before)
    s.skip_preparing = False
    assert sorted(parent_ids(s.sync(TASK, "p1", 2.0))) == ["late", "p0"]
    s.skip_preparing = True
    s.report(TASK, "late", 2.0)
    assert sorted(parent_ids(s.sync(TASK, "p0", 3.0))) == ["late", "p1"]
    # a preparing member gets parents of its own
    s.register_peer(PeerInfo("new", "10.0.0.3", 65003), 3.0)
    s.join(TASK, "new", 3.0, preparing=True)
    assert sorted(parent_ids(s.sync(TASK, "new", 3.0))) == ["late", "p0", "p1"]


def test_parents_are_kept_across_syncs() -> None:
    s = make(peers=8, max_parents=3)
    first = parent_ids(s.sync(TASK, "p0", 1))
    assert parent_ids(s.sync(TASK, "p0", 2)) == first


def test_peers_holding_more_pieces_preferred() -> None:
    s = make(count=10, peers=8, max_parents=2)
    s.report(TASK, "p5", 0, have=range(10))
    s.report(TASK, "p6", 0, have=range(5))
    s.report(TASK, "p7", 0, have=range(1))
    assert parent_ids(s.sync(TASK, "p0", 1)) == ["p5", "p6"]


def test_load_breaks_ties() -> None:
    """Among candidates with as many pieces, one serving fewer children is preferred."""
    s = make(count=4, peers=0, max_parents=1)
    for p in ("a", "b", "c", "d"):
        add_peer(s, p)
    (first,) = parent_ids(s.sync(TASK, "c", 1))
    assert first in {"a", "b", "d"}
    # everyone else has no pieces and no children: d never picks c's parent
    for t in range(5):
        s.leave(TASK, "d")
        s.join(TASK, "d", 2 + t)
        assert parent_ids(s.sync(TASK, "d", 2 + t)) != [first]


def test_blocked_parents_excluded_then_return() -> None:
    s = make(peers=2, block_after=2, block_for=30.0)
    assert parent_ids(s.sync(TASK, "p0", 0)) == ["p1"]
    s.report(TASK, "p0", 1, failed=[(0, "p1")])
    # one failure is not enough
    assert parent_ids(s.sync(TASK, "p0", 1)) == ["p1"]
    s.report(TASK, "p0", 2, failed=[(3, "p1")])
    assert "p1" not in swarm(s).members["p0"].parents
    assert swarm(s).members["p0"].blocked == {"p1": 32.0}
    assert parent_ids(s.sync(TASK, "p0", 2)) == []
    assert parent_ids(s.sync(TASK, "p0", 31.9)) == []
    # the block ends: p1 may return
    assert parent_ids(s.sync(TASK, "p0", 32.0)) == ["p1"]
    assert swarm(s).members["p0"].blocked == {}
    # the counter restarted: a single new failure does not block again
    s.report(TASK, "p0", 33, failed=[(0, "p1")])
    assert parent_ids(s.sync(TASK, "p0", 33)) == ["p1"]


def test_block_is_per_child() -> None:
    s = make(peers=3, block_after=1)
    s.report(TASK, "p0", 0, failed=[(0, "p2")])
    assert "p2" not in parent_ids(s.sync(TASK, "p0", 0))
    assert "p2" in parent_ids(s.sync(TASK, "p1", 0))


def test_seed_failure_gives_allowance_back() -> None:
    s = make(count=4, peers=1, seed_window=2)
    d = s.sync(TASK, "p0", 0)
    assert len(d.seed_pieces) == 2
    i = d.seed_pieces[0]
    assert swarm(s).seed_sends[i] == 1
    s.report(TASK, "p0", 1, failed=[(i, SEED_ID)])
    assert swarm(s).seed_sends[i] == 0
    assert i not in swarm(s).members["p0"].seed
    # failures from the seed never block the seed
    assert swarm(s).members["p0"].blocked == {}
    check_holders(s)


# -- super-seeding ----------------------------------------------------------------


@pytest.mark.parametrize("peers, max_parents", [(4, 6), (10, 3), (25, 6)])
def test_super_seeding_each_piece_once_before_twice(peers: int, max_parents: int) -> None:
    count = 16
    s = make(count=count, peers=peers, max_parents=max_parents, seed_window=3)
    sw = swarm(s)
    for rnd in range(3):
        for n in range(peers):
            me = f"p{n}"
            before = set(sw.members[me].seed)
            d = s.sync(TASK, me, 1.0 + rnd)
            new = set(d.seed_pieces) - before
            # every piece once before any piece twice
            if max(sw.seed_sends) >= 2:
                assert min(sw.seed_sends) >= 1, sw.seed_sends
            # never a piece a parent holds or is already fetching from the seed
            for p in parent_ids(d):
                parent = sw.members[p]
                assert not new & set(parent.have or ()), (me, p)
                assert not new & set(parent.seed), (me, p)
            assert len(d.seed_pieces) <= 3
            check_holders(s)
    assert sum(sw.seed_sends) == sum(len(m.seed) for m in sw.members.values())


def test_small_swarm_allowances_are_disjoint() -> None:
    """When everyone is everyone's parent, no two peers are given the same piece."""
    s = make(count=12, peers=4, max_parents=6, seed_window=3, seed_slots=12)
    # first everyone picks parents, then the allowances go out
    for n in range(4):
        s.sync(TASK, f"p{n}", 0)
    allowances = [set(swarm(s).members[f"p{n}"].seed) for n in range(4)]
    assert sorted(i for a in allowances for i in a) == list(range(12))
    assert swarm(s).seed_sends == [1] * 12


def test_seed_slots_cap_the_whole_swarm() -> None:
    """The seed has few pieces out at once, so each arrives fast and spreads."""
    s = make(count=40, peers=10, max_parents=2, seed_window=2, seed_slots=5)
    for n in range(10):
        s.sync(TASK, f"p{n}", 0)
    assert swarm(s).seed_out == 5
    assert sum(len(m.seed) for m in swarm(s).members.values()) == 5
    # a finished seed piece frees a slot for the next peer that syncs
    holder = next(m for m in swarm(s).members.values() if m.seed)
    s.report(TASK, holder.peer_id, 1, have=[next(iter(holder.seed))])
    assert swarm(s).seed_out == 4
    for n in range(10):
        s.sync(TASK, f"p{n}", 1)
    assert swarm(s).seed_out == 5


def test_no_allowance_for_pieces_a_parent_holds() -> None:
    s = make(count=6, peers=2, seed_window=6)
    s.report(TASK, "p1", 0, have=[0, 1, 2, 3])
    d = s.sync(TASK, "p0", 0)
    assert parent_ids(d) == ["p1"]
    assert d.seed_pieces == [4, 5]


def test_no_allowance_for_pieces_already_held() -> None:
    s = make(count=6, peers=1, seed_window=6)
    s.report(TASK, "p0", 0, have=[0, 2, 4])
    assert s.sync(TASK, "p0", 0).seed_pieces == [1, 3, 5]


def test_seed_window_caps_outstanding_allowances() -> None:
    s = make(count=10, peers=1, seed_window=4)
    d = s.sync(TASK, "p0", 0)
    assert len(d.seed_pieces) == 4
    # nothing reported: the same allowance comes back, not more
    assert s.sync(TASK, "p0", 1).seed_pieces == d.seed_pieces
    # reporting two frees two slots
    s.report(TASK, "p0", 2, have=d.seed_pieces[:2])
    d2 = s.sync(TASK, "p0", 2)
    assert len(d2.seed_pieces) == 4
    assert set(d.seed_pieces[2:]) <= set(d2.seed_pieces)
    assert not set(d.seed_pieces[:2]) & set(d2.seed_pieces)


def test_only_ready_seed_pieces_are_allowed() -> None:
    s = make(count=6, peers=1, seed_all=False, seed_window=6)
    assert s.sync(TASK, "p0", 0).seed_pieces == []
    s.seed_piece_ready(TASK, 2)
    s.seed_piece_ready(TASK, 5)
    assert s.sync(TASK, "p0", 1).seed_pieces == [2, 5]


def test_no_allowance_before_the_length_is_known() -> None:
    s = make(count=None, peers=1)
    d = s.sync(TASK, "p0", 0)
    assert d.seed_pieces == []
    # a seed_piece_ready before the length is known is ignored, not a crash
    s.seed_piece_ready(TASK, 0)


def test_allowances_lapse_after_ttl() -> None:
    s = make(count=8, peers=1, seed_window=2, assign_ttl=20.0)
    sw = swarm(s)
    d = s.sync(TASK, "p0", 0)
    assert sum(sw.seed_sends) == 2
    # still valid just before the ttl
    assert s.sync(TASK, "p0", 19.9).seed_pieces == d.seed_pieces
    assert sum(sw.seed_sends) == 2
    # at the ttl the old allowance lapses (its sends are taken back) and a new one is made
    s.sync(TASK, "p0", 20.0)
    assert sum(sw.seed_sends) == 2
    assert max(sw.seed_sends) == 1
    assert {a.expires for a in sw.members["p0"].seed.values()} == {40.0}
    check_holders(s)


def test_parent_allowance_lapses_when_a_child_syncs() -> None:
    s = make(count=8, peers=2, seed_window=2, assign_ttl=20.0)
    sw = swarm(s)
    d0 = s.sync(TASK, "p0", 0)
    assert parent_ids(s.sync(TASK, "p1", 1)) == ["p0"]
    assert sum(sw.seed_sends) == 4
    # p0 is silent; when its child p1 asks for seed pieces after the ttl, p0's allowance lapses
    d1 = s.sync(TASK, "p1", 21.0)
    assert sw.members["p0"].seed == {}
    assert sum(sw.seed_sends) == 2
    assert [sw.seed_sends[i] for i in d1.seed_pieces] == [1, 1]
    assert all(sw.seed_sends[i] == 0 for i in set(d0.seed_pieces) - set(d1.seed_pieces))
    check_holders(s)


def test_lapsed_allowance_goes_back_down() -> None:
    """A lapsed allowance is no longer counted as a send."""
    s = make(count=2, peers=1, seed_window=2, assign_ttl=5.0)
    sw = swarm(s)
    assert s.sync(TASK, "p0", 0).seed_pieces == [0, 1]
    assert sw.seed_sends == [1, 1]
    # p0 reported nothing; the seed can no longer serve (so nothing is re-assigned)
    sw.seed_has = Bitmap(2)
    assert s.sync(TASK, "p0", 4.9).seed_pieces == [0, 1]
    assert s.sync(TASK, "p0", 5.0).seed_pieces == []
    assert sw.seed_sends == [0, 0]
    assert sw.members["p0"].seed == {}


def test_stale_parent_allowance_does_not_block_children() -> None:
    """
    A parent that got an allowance and then stopped syncing (its download
    failed or went back to the source; its daemon still heartbeats) must not
    keep those pieces from its children once the allowance lapsed.
    """
    s = make(count=4, peers=2, seed_window=4, assign_ttl=20.0)
    sw = swarm(s)
    assert s.sync(TASK, "p1", 0).seed_pieces == [0, 1, 2, 3]
    # p0's only parent holds every piece as an allowance: p0 gets none for now
    d = s.sync(TASK, "p0", 1)
    assert parent_ids(d) == ["p1"]
    assert d.seed_pieces == []
    # p1 never syncs again but stays alive
    s.touch("p1", 30)
    d = s.sync(TASK, "p0", 30)
    assert parent_ids(d) == ["p1"]
    assert d.seed_pieces == [0, 1, 2, 3]
    assert sw.seed_sends == [1, 1, 1, 1]
    check_holders(s)


def test_seed_lost_withdraws_allowances() -> None:
    s = make(count=6, peers=2, seed_window=2)
    sw = swarm(s)
    got = s.sync(TASK, "p0", 0).seed_pieces
    s.sync(TASK, "p1", 0)
    s.report(TASK, "p0", 1, have=got[:1])
    assert sum(sw.seed_sends) == 4
    s.seed_lost(TASK)
    # the copy p0 received stays counted; outstanding allowances are withdrawn
    assert sum(sw.seed_sends) == 1
    assert s.sync(TASK, "p0", 2).seed_pieces == []
    assert s.sync(TASK, "p1", 2).seed_pieces == []
    check_holders(s)
    # pieces become ready again after a retry
    s.seed_piece_ready(TASK, 4)
    assert s.sync(TASK, "p1", 3).seed_pieces == [4]
    s.seed_lost("f" * 64)  # unknown task: harmless


def test_done_peer_gets_no_seed_allowance() -> None:
    s = make(count=4, peers=2)
    s.report(TASK, "p0", 0, have=range(4))
    m = swarm(s).members["p0"]
    assert m.done
    d = s.sync(TASK, "p0", 0)
    assert d.seed_pieces == []
    assert m.seed == {}
    # a done peer is still a parent candidate for others, preferred
    assert parent_ids(s.sync(TASK, "p1", 0)) == ["p0"]


def test_report_have_updates_holders_and_availability() -> None:
    s = make(count=5, peers=3)
    s.report(TASK, "p0", 0, have=[0, 1])
    s.report(TASK, "p1", 0, have=[1, 4])
    # repeated and out-of-range indices change nothing
    s.report(TASK, "p1", 0, have=[1, 99, -1])
    assert s.availability(TASK) == [1, 2, 0, 0, 1]
    assert swarm(s).holders == [1, 2, 0, 0, 1]
    assert s.availability("f" * 64) == []
    check_holders(s)


def test_report_with_whole_bitmap() -> None:
    s = make(count=10, peers=1)
    bm = Bitmap(10)
    for i in (0, 3, 9):
        bm.set(i)
    s.report(TASK, "p0", 0, have=[5], bitmap=bm)
    assert sorted(swarm(s).members["p0"].have) == [0, 3, 5, 9]
    # a bitmap of the wrong size is ignored
    s.report(TASK, "p0", 0, bitmap=Bitmap(3))
    assert s.availability(TASK) == [1, 0, 0, 1, 0, 1, 0, 0, 0, 1]
    check_holders(s)


def test_received_allowance_counts_as_a_send() -> None:
    s = make(count=4, peers=1, seed_window=1)
    sw = swarm(s)
    (i,) = s.sync(TASK, "p0", 0).seed_pieces
    s.report(TASK, "p0", 1, have=[i])
    assert i not in sw.members["p0"].seed
    assert sw.seed_sends[i] == 1
    assert sw.holders[i] == 1


def test_report_joins_an_unknown_member() -> None:
    s = make(count=4)
    add_peer(s, "p0", join=False)
    s.report(TASK, "p0", 3.0, have=[2])
    assert "p0" in swarm(s).members
    assert s.availability(TASK) == [0, 0, 1, 0]
    assert s.peers["p0"].last_seen == 3.0


# -- leaving and dying ------------------------------------------------------------


def test_remove_peer_fixes_counts_and_parents() -> None:
    s = make(count=4, peers=3, seed_window=2)
    s.report(TASK, "p1", 0, have=[0, 1])
    s.sync(TASK, "p1", 0)  # p1 gets an allowance for 2 and 3
    assert swarm(s).members["p1"].seed
    assert "p1" in parent_ids(s.sync(TASK, "p0", 0))
    s.remove_peer("p1")
    assert "p1" not in s.peers
    assert "p1" not in swarm(s).members
    assert "p1" not in swarm(s).members["p0"].parents
    assert s.availability(TASK) == [0, 0, 0, 0]
    assert "p1" not in parent_ids(s.sync(TASK, "p0", 1))
    check_holders(s)
    # removing twice is harmless
    s.remove_peer("p1")


def test_leave_task_keeps_the_peer() -> None:
    s = make(count=4, peers=2)
    s.report(TASK, "p0", 0, have=[0])
    s.leave(TASK, "p0")
    assert "p0" in s.peers
    assert "p0" not in swarm(s).members
    assert s.availability(TASK) == [0, 0, 0, 0]
    s.leave("e" * 64, "p0")  # an unknown task is harmless
    check_holders(s)


def test_expire_drops_silent_peers() -> None:
    s = make(count=4, peers=0, peer_ttl=60.0)
    add_peer(s, "old", now=0.0)
    add_peer(s, "new", now=50.0)
    s.report(TASK, "old", 0.0, have=[0, 1])
    s.report(TASK, "new", 50.0, have=[1])
    assert s.expire(60.0) == []  # exactly the ttl: still alive
    assert s.expire(60.5) == ["old"]
    assert set(s.peers) == {"new"}
    assert s.availability(TASK) == [0, 1, 0, 0]
    # heartbeats keep a peer alive
    s.touch("new", 100.0)
    assert s.expire(150.0) == []
    assert s.expire(160.5) == ["new"]
    check_holders(s)


def test_set_piece_count_after_members_joined() -> None:
    s = make(count=None, peers=3)
    for m in swarm(s).members.values():
        assert m.have is None
    # reports before the length is known are kept for when it is (a peer
    # re-announces only once after a SuperNode restart), not a crash
    s.report(TASK, "p0", 0, have=[0])
    s.set_piece_count(TASK, 7)
    for m in swarm(s).members.values():
        assert m.have is not None and m.have.count == 7 and len(m.have) == (1 if m.peer_id == "p0" else 0)
    assert swarm(s).holders == [1] + [0] * 6
    assert swarm(s).seed_sends == [0] * 7
    s.report(TASK, "p0", 1, have=[6])
    assert s.availability(TASK) == [1, 0, 0, 0, 0, 0, 1]
    # the same count again keeps the state
    s.set_piece_count(TASK, 7)
    assert s.availability(TASK) == [1, 0, 0, 0, 0, 0, 1]
    check_holders(s)


def test_reregistration_keeps_tasks() -> None:
    s = make(count=4, peers=1)
    s.report(TASK, "p0", 0, have=[1])
    s.register_peer(PeerInfo("p0", "10.0.0.2", 65002), 5.0)
    assert s.peers["p0"].ip == "10.0.0.2"
    assert "p0" in swarm(s).members
    assert s.availability(TASK) == [0, 1, 0, 0]


def test_forget_task() -> None:
    s = make(count=4, peers=1)
    s.forget_task(TASK)
    assert TASK not in s.tasks
    with pytest.raises(UnknownTask):
        s.sync(TASK, "p0", 0)


# -- a random walk ------------------------------------------------------------------

PEERS = [f"p{n}" for n in range(6)]

ops = st.one_of(
    st.tuples(st.just("join"), st.sampled_from(PEERS)),
    st.tuples(st.just("report"), st.sampled_from(PEERS), st.lists(st.integers(-1, 12), max_size=5)),
    st.tuples(st.just("fail"), st.sampled_from(PEERS), st.integers(0, 11), st.sampled_from(PEERS + [SEED_ID])),
    st.tuples(st.just("sync"), st.sampled_from(PEERS)),
    st.tuples(st.just("leave"), st.sampled_from(PEERS)),
    st.tuples(st.just("remove"), st.sampled_from(PEERS)),
    st.tuples(st.just("tick"), st.floats(0, 40)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("ready"), st.integers(0, 11)),
    st.tuples(st.just("count"), st.sampled_from([10, 12])),
    st.tuples(st.just("lost")),
)


@settings(max_examples=150)
@given(st.lists(ops, max_size=60), st.booleans())
# a lone peer gets a larger seed window (small_window): found by hypothesis in CI
@example([("join", "p0"), ("count", 10), ("ready", 0), ("ready", 1), ("ready", 2), ("sync", "p0")], False)
def test_random_walk_keeps_counts_consistent(steps: list[tuple], known_length: bool) -> None:
    s = Scheduler(max_parents=2, seed_window=2, assign_ttl=10.0, block_after=2, block_for=15.0, peer_ttl=60.0,
                  rng=random.Random(0))
    s.task(TASK)
    if known_length:
        s.set_piece_count(TASK, 12)
    now = 0.0
    for step in steps:
        kind = step[0]
        if kind == "join":
            s.register_peer(PeerInfo(step[1], "10.0.0.1", 1000), now)
            s.join(TASK, step[1], now)
        elif kind in ("report", "fail", "sync"):
            if step[1] not in s.peers:
                continue
            if kind == "report":
                s.report(TASK, step[1], now, have=step[2])
            elif kind == "fail":
                s.report(TASK, step[1], now, failed=[(step[2], step[3])])
            else:
                d = s.sync(TASK, step[1], now)
                ids = parent_ids(d)
                assert step[1] not in ids
                assert len(ids) <= 2
                # the seed window (2), or up to small_window when so few peers download
                # that they could not fill the seed's slots (Scheduler._window)
                assert len(d.seed_pieces) <= max(2, s.small_window)
                m = s.tasks[TASK].members[step[1]]
                assert not set(d.seed_pieces) & set(m.have or ())
                assert not set(ids) & set(m.blocked)
        elif kind == "leave":
            s.leave(TASK, step[1])
        elif kind == "remove":
            s.remove_peer(step[1])
        elif kind == "tick":
            now += step[1]
        elif kind == "expire":
            s.expire(now)
        elif kind == "ready":
            if s.tasks[TASK].piece_count is not None and step[1] < s.tasks[TASK].piece_count:
                s.seed_piece_ready(TASK, step[1])
        elif kind == "count":
            s.set_piece_count(TASK, step[1])
        elif kind == "lost":
            s.seed_lost(TASK)
        check_holders(s)
        sw = s.tasks[TASK]
        assert set(sw.members) <= set(s.peers)
        for m in sw.members.values():
            assert m.peer_id not in m.parents
            assert set(m.parents) <= set(sw.members)


def test_only_starving_peers_get_a_second_seed_copy() -> None:
    """A piece the seed already sent goes out again only to a peer with nothing else to fetch."""
    s = make(count=2, peers=3, max_parents=0, seed_window=2, seed_slots=10)
    first = s.sync(TASK, "p0", 0, starving=False).seed_pieces
    assert first == [0, 1]
    # p1 is not a neighbour of p0 (no parents at all): both pieces were sent once
    assert s.sync(TASK, "p1", 0, starving=False).seed_pieces == []
    assert sorted(s.sync(TASK, "p2", 0, starving=True).seed_pieces) == [0, 1]
    assert swarm(s).seed_sends == [2, 2]


def test_a_peer_two_others_cannot_reach_is_dropped_at_once() -> None:
    s = make(count=4, peers=3, max_parents=2)
    s.report(TASK, "p1", 0, have=[0, 1, 2, 3])
    s.report(TASK, "p0", 1, failed=[(-1, "p1")])
    assert "p1" in s.peers  # one report is not enough
    s.report(TASK, "p2", 1, failed=[(-1, "p1")])
    assert "p1" not in s.peers and "p1" not in swarm(s).members
    assert swarm(s).holders == [0, 0, 0, 0]
    # its pieces are given out by the seed again
    assert s.sync(TASK, "p0", 2, starving=False).seed_pieces
    # it comes back with its next heartbeat: registering clears the reports
    add_peer(s, "p1")
    assert "p1" not in s.unreachable


def test_a_banned_neighbour_no_longer_hides_pieces() -> None:
    """A peer's banned neighbour (bad pieces, silence) stops counting as a holder for it."""
    s = make(count=2, peers=2, max_parents=1)
    s.report(TASK, "p1", 0, have=[0, 1])
    assert s.sync(TASK, "p0", 0, starving=True).seed_pieces == []  # p1 holds both
    s.report(TASK, "p0", 1, banned=["p1"])
    d = s.sync(TASK, "p0", 1, starving=True)
    assert parent_ids(d) == []
    assert len(d.seed_pieces) == 1 and d.seed_pieces[0] in (0, 1)  # one at a time (seed_window 1)


def test_a_wanted_piece_goes_first_even_if_the_seed_sent_it_before() -> None:
    s = make(count=16, peers=2, seed_window=1)
    first = s.sync(TASK, "p0", 0).seed_pieces
    s.report(TASK, "p0", 1, have=first)
    s.remove_peer("p0")  # the only holder leaves: the piece was sent, nobody holds it
    # an in-order reader on p1 waits for that piece: it (or one of the next three) comes first
    d = s.sync(TASK, "p1", 2, want=first[0])
    assert d.seed_pieces and first[0] <= d.seed_pieces[0] < first[0] + s.WANT_WINDOW
    # in a fresh swarm too, the reader's window goes before the rest
    s2 = make(count=16, peers=1, seed_window=1)
    d2 = s2.sync(TASK, "p0", 0, want=12)
    assert 12 <= d2.seed_pieces[0] < 16


def test_a_small_swarm_gets_a_larger_seed_window_a_real_one_does_not() -> None:
    # a lone peer: the seed's slots would sit idle with one piece at a time
    s = make(count=32, peers=1, small_window=4)
    assert len(s.sync(TASK, "p0", 0).seed_pieces) == 4
    # two peers: 16 slots / (2 * 4) = 2 each
    s = make(count=32, peers=2, small_window=4)
    assert len(s.sync(TASK, "p0", 0).seed_pieces) == 2
    # four or more downloading: the configured window, 1
    s = make(count=32, peers=4, small_window=4)
    assert [len(s.sync(TASK, f"p{n}", 0).seed_pieces) for n in range(4)] == [1, 1, 1, 1]
    # finished members do not count: with one left downloading the window is 4 again
    s = make(count=8, peers=4, small_window=4)
    assert s._window(swarm(s)) == 1
    for n in range(3):
        s.report(TASK, f"p{n}", 0, have=list(range(8)))
    assert s._window(swarm(s)) == 4


def test_fill_degree_gives_a_peer_nobody_chose_more_parents() -> None:
    """The last peer of a crowd, chosen by nobody, gets up to 2 x max_parents parents; off by default."""
    for fill, expect in ((False, 3), (True, 6)):
        s = make(count=8, max_parents=3, fill_degree=fill)
        for n in range(12):  # a crowd: each peer joins and syncs in turn
            add_peer(s, f"p{n}")
            s.sync(TASK, f"p{n}", 0.0)
        last = "p11"  # chose its parents among those there; nobody chose it
        assert not swarm(s).children.get(last)
        assert len(parent_ids(s.sync(TASK, last, 0.1))) == 3  # not yet: everyone was childless at first
        assert len(parent_ids(s.sync(TASK, last, 1.0))) == expect
        recount(s)
    # a peer with children enough keeps max_parents
    s = make(count=8, max_parents=3, fill_degree=True)
    for n in range(12):
        add_peer(s, f"p{n}")
        s.sync(TASK, f"p{n}", 0.0)
    busy = max(swarm(s).children, key=lambda p: len(swarm(s).children[p]))
    assert len(swarm(s).children[busy]) >= 3
    assert len(parent_ids(s.sync(TASK, busy, 1.0))) == 3


# -- the incremental indexes against a recount ----------------------------------------


def recount(s: Scheduler) -> None:
    """Every index the scheduler keeps incrementally equals a brute-force recount."""
    check_holders(s)
    for sw in s.tasks.values():
        # children per parent
        children: dict[str, set[str]] = {}
        for m in sw.members.values():
            for p in m.parents:
                children.setdefault(p, set()).add(m.peer_id)
        assert sw.children == children
        # downloading count
        assert sw.downloading == sum(1 for m in sw.members.values() if not m.done)
        # the sampling list
        assert sorted(sw.order) == sorted(sw.members)
        assert all(sw.order[sw.slot[p]] == p for p in sw.members)
        assert len(sw.slot) == len(sw.members)
        if sw.piece_count is None:
            continue
        # each member's bit set, and the pieces with no copy out
        for m in sw.members.values():
            assert m.have is not None
            assert m.have_bits == sw.bits_of(m.have)
        fresh = Bitmap(sw.piece_count)
        for i in range(sw.piece_count):
            if sw.seed_sends[i] + sw.holders[i] == 0:
                fresh.set(i)
        assert sw.fresh == sw.bits_of(fresh)
        # every outstanding allowance will lapse: it is in the expiry heap
        queued = {id(entry[3]) for entry in sw.expiries}
        for m in sw.members.values():
            for a in m.seed.values():
                assert id(a) in queued


class SchedulerIndexes(RuleBasedStateMachine):
    """Random registrations, reports, failures, syncs, departures and clock ticks."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(max_parents=3, seed_window=2, assign_ttl=10.0, block_after=2, block_for=15.0,
                           peer_ttl=60.0, parent_sample=4, rng=random.Random(0))
        self.s.task(TASK)
        self.now = 0.0

    def members(self) -> dict:
        return self.s.tasks[TASK].members

    @rule(peer=st.sampled_from(PEERS + ["q0", "q1", "q2"]))
    def join(self, peer: str) -> None:
        self.s.register_peer(PeerInfo(peer, "10.0.0.1", 1000), self.now)
        self.s.join(TASK, peer, self.now)

    @rule(peer=st.sampled_from(PEERS), have=st.lists(st.integers(-1, 40), max_size=8), whole=st.booleans())
    def report(self, peer: str, have: list[int], whole: bool) -> None:
        if peer in self.s.peers:
            count = self.s.tasks[TASK].piece_count
            bitmap = None
            if whole and count is not None:
                bitmap = Bitmap(count)
                for i in have:
                    if 0 <= i < count:
                        bitmap.set(i)
            self.s.report(TASK, peer, self.now, have=have, bitmap=bitmap)

    @rule(peer=st.sampled_from(PEERS), index=st.integers(-1, 40), parent=st.sampled_from(PEERS + [SEED_ID]))
    def fail(self, peer: str, index: int, parent: str) -> None:
        if peer in self.s.peers:
            self.s.report(TASK, peer, self.now, failed=[(index, parent)])

    @rule(peer=st.sampled_from(PEERS), other=st.sampled_from(PEERS))
    def ban(self, peer: str, other: str) -> None:
        if peer in self.s.peers:
            self.s.report(TASK, peer, self.now, banned=[other])

    @rule(peer=st.sampled_from(PEERS + ["q0", "q1", "q2"]), starving=st.booleans(),
          want=st.none() | st.integers(0, 40))
    def sync(self, peer: str, starving: bool, want: int | None) -> None:
        if peer in self.s.peers:
            d = self.s.sync(TASK, peer, self.now, starving=starving, want=want)
            m = self.members()[peer]
            assert peer not in parent_ids(d)
            assert not set(d.seed_pieces) & set(m.have or ())
            assert not set(parent_ids(d)) & set(m.blocked)

    @rule(peer=st.sampled_from(PEERS))
    def leave(self, peer: str) -> None:
        self.s.leave(TASK, peer)

    @rule(peer=st.sampled_from(PEERS))
    def remove(self, peer: str) -> None:
        self.s.remove_peer(peer)

    @rule(dt=st.floats(0, 25))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule()
    def expire(self) -> None:
        self.s.expire(self.now)

    @precondition(lambda self: self.s.tasks[TASK].piece_count is not None)
    @rule(index=st.integers(0, 40))
    def ready(self, index: int) -> None:
        if index < (self.s.tasks[TASK].piece_count or 0):
            self.s.seed_piece_ready(TASK, index)

    @rule(count=st.sampled_from([5, 12, 40]))
    def count(self, count: int) -> None:
        self.s.set_piece_count(TASK, count)

    @rule()
    def lost(self) -> None:
        self.s.seed_lost(TASK)

    @invariant()
    def indexes_match_a_recount(self) -> None:
        recount(self.s)


SchedulerIndexes.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_incremental_indexes = SchedulerIndexes.TestCase


def test_top_up_samples_a_large_swarm() -> None:
    """In a swarm larger than the sample, parents still come from the members and respect the cap."""
    s = make(count=16, peers=200, max_parents=4, parent_sample=8)
    for n in range(200):
        ids = parent_ids(s.sync(TASK, f"p{n}", 1.0))
        assert len(ids) == 4 and f"p{n}" not in ids and len(set(ids)) == 4
    recount(s)


def test_seed_allowances_lapse_for_silent_peers_too() -> None:
    """An allowance of a peer that never syncs again frees its seed slot at anyone's next sync."""
    s = make(count=40, peers=10, max_parents=1, seed_window=1, seed_slots=3, assign_ttl=5.0)
    for n in range(3):
        s.sync(TASK, f"p{n}", 0)
    assert swarm(s).seed_out == 3
    assert s.sync(TASK, "p9", 1).seed_pieces == []  # no slot free
    # p0..p2 go silent; p9's sync after the ttl takes their allowances back
    assert len(s.sync(TASK, "p9", 5.0).seed_pieces) == 1
    assert swarm(s).seed_out == 1
    recount(s)

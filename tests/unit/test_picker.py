"""
Tests for L{dragonfly.peer.picker}: a pure module, time and randomness passed in.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly.core.bitmap import Bitmap
from dragonfly.peer.picker import Picker, in_flight_limit, neighbour_limit


def bits(count: int, held: list[int] | range) -> Bitmap:
    b = Bitmap(count)
    for i in held:
        b.set(i)
    return b


def picker(count: int = 8, seed: int = 1, known: bool = True, **kw: object) -> Picker[str]:
    p: Picker[str] = Picker(count, rng=random.Random(seed), **kw)  # type: ignore[arg-type]
    if known:
        for i in range(count):
            p.digest_known(i)
    return p


def neighbour(p: Picker[str], key: str, held: list[int] | range, seed: bool = False) -> None:
    p.add(key, seed=seed)
    p.bitfield(key, bits(p.count, held))


# -- rules ----------------------------------------------------------------------------


def test_rarest_first() -> None:
    p = picker(4)
    neighbour(p, "a", [0, 1, 2, 3])
    neighbour(p, "b", [0, 1, 3])
    neighbour(p, "c", [0, 3])
    # 2 is held by one neighbour, 1 by two, 0 and 3 by three
    assert p.choose("a", 0.0) == 2
    p.request("a", 2, 0.0)
    assert p.choose("a", 0.0) == 1
    assert p.choose("c", 0.0) in (0, 3)


def test_ties_at_random() -> None:
    seen = Counter()
    for s in range(200):
        p = picker(4, seed=s)
        neighbour(p, "a", [0, 1, 2, 3])
        seen[p.choose("a", 0.0)] += 1
    assert set(seen) == {0, 1, 2, 3}
    assert min(seen.values()) > 20


def test_only_wanted_pieces() -> None:
    p = picker(4, known=False)
    neighbour(p, "a", [0, 1, 2, 3])
    assert p.choose("a", 0.0) is None  # no digest known yet
    p.digest_known(2)
    assert p.choose("a", 0.0) == 2
    assert p.verify(2)
    assert p.choose("a", 0.0) is None
    p.stored(2)
    assert 2 in p.have_bits and p.choose("a", 0.0) is None


def test_stream_window_goes_first() -> None:
    p = picker(12)
    neighbour(p, "a", range(12))
    neighbour(p, "b", [0, 1, 2, 3, 4, 5, 6, 7, 8])  # 9..11 rarer
    p.stream_from = 5
    assert p.choose("a", 0.0) in (5, 6, 7, 8)
    p.stream_from = None
    assert p.choose("a", 0.0) in (9, 10, 11)


def test_stream_window_in_order_from_one_holder() -> None:
    """
    A neighbour holding the whole file is asked for the reader's next pieces
    in order (ties in the window go by index, not at random), and while the
    reader has not yet taken a piece just stored the next request is the
    next piece of the window, not one anywhere in the file.
    """
    for seed in range(20):
        p = picker(64, seed=seed, stream_window=8)
        neighbour(p, "a", range(64))
        p.stream_from = 0
        assert [i for _, i in p.fill(0.0, 4, 4)] == [0, 1, 2, 3]
        assert p.received("a", 0) == []
        assert p.verify(0)
        p.stored(0)  # the reader has not moved on yet: stream_from is still 0
        assert [i for _, i in p.fill(0.0, 4, 4)] == [4]
        p.stream_from = 1
        for i in (1, 2):
            p.received("a", i)
            p.verify(i)
            p.stored(i)
        assert [i for _, i in p.fill(0.0, 4, 4)] == [5, 6]


def test_stream_window_rarest_before_order() -> None:
    p = picker(16, stream_window=8)
    neighbour(p, "a", range(16))
    neighbour(p, "b", [0, 1, 2, 3, 4, 5])  # 6 and 7 are held by "a" alone
    p.stream_from = 0
    assert p.choose("a", 0.0) == 6


def test_seed_allowance() -> None:
    p = picker(8)
    neighbour(p, "seed", range(8), seed=True)
    assert p.choose("seed", 0.0) is None
    p.seed_allowed = {3, 5}
    asked = p.fill(0.0, per_conn=1, limit=4)
    assert sorted(i for _, i in asked) == [3, 5]
    assert all(k == "seed" for k, _ in asked)
    # apart from the budget
    assert p.in_flight == 0
    # the seed does not count in the availability
    assert p.avail == [0] * 8


def test_fill_limits() -> None:
    p = picker(16)
    for k in "abcde":
        neighbour(p, k, range(16))
    asked = p.fill(0.0, per_conn=2, limit=7)
    assert len(asked) == 7 == p.in_flight
    assert max(Counter(k for k, _ in asked).values()) <= 2
    assert len({i for _, i in asked}) == 7  # never the same piece twice
    assert p.fill(0.0, per_conn=2, limit=7) == []


def test_fill_skips_unusable() -> None:
    p = picker(4)
    neighbour(p, "a", range(4))
    neighbour(p, "b", range(4))
    asked = p.fill(0.0, per_conn=4, limit=8, usable=lambda k: k != "a")
    assert {k for k, _ in asked} == {"b"}


def test_endgame() -> None:
    p = picker(4, endgame_after=1.0)
    neighbour(p, "a", range(4))
    neighbour(p, "b", range(4))
    for i in (0, 1):
        assert p.verify(i)
        p.stored(i)
    p.request("a", 2, 10.0)
    p.request("a", 3, 10.0)
    assert p.choose("b", 10.5) is None  # not out long enough
    assert p.choose("a", 12.0) is None  # not from the same holder
    i = p.choose("b", 11.0)
    assert i == 2
    p.request("b", 2, 11.0)
    assert [k for k, _ in p.pending[2]] == ["a", "b"]
    # the first copy in wins; the other is to be cancelled
    assert p.received("b", 2) == ["a"]
    assert 2 not in p.pending and p.outstanding("a") == {3: 10.0}


def test_no_endgame_with_many_missing() -> None:
    p = picker(8)
    neighbour(p, "a", range(8))
    neighbour(p, "b", range(8))
    for i in range(8):
        p.request("a", i, 0.0)
    assert p.choose("b", 100.0) is None


def test_starving() -> None:
    p = picker(4)
    neighbour(p, "seed", range(4), seed=True)
    neighbour(p, "a", [0])
    assert not p.starving()
    p.request("a", 0, 0.0)
    assert not p.starving()  # a request is out
    p.received("a", 0)
    p.verify(0)
    p.stored(0)
    assert p.starving()  # only the seed has what we lack
    p.have("a", 3)
    assert not p.starving()


def test_offer_after_have() -> None:
    p = picker(4)
    neighbour(p, "a", [])
    p.have("a", 1)
    assert p.avail[1] == 1
    assert p.offer("a", 1, 0.0, per_conn=1, limit=4)
    assert p.outstanding("a") == {1: 0.0}
    p.have("a", 2)
    assert not p.offer("a", 2, 0.0, per_conn=1, limit=4)  # one out already


def test_remove_and_reject() -> None:
    p = picker(4)
    neighbour(p, "a", range(4))
    neighbour(p, "b", [0, 1])
    p.request("a", 0, 0.0)
    p.request("b", 1, 0.0)
    p.rejected("b", 1)
    assert p.avail == [2, 1, 1, 1] and 1 not in p.remote("b")  # type: ignore[operator]
    assert p.wanted(1)
    assert p.remove("a") == [0]
    assert p.avail == [1, 0, 0, 0] and p.in_flight == 0 and p.wanted(0)


# -- properties -----------------------------------------------------------------------------


def check(p: Picker[str]) -> None:
    """The incremental state equals a recount from scratch."""
    avail = [0] * p.count
    for k in p.neighbours():
        r = p.remote(k)
        if r is not None and k != p.seed:
            for i in r:
                avail[i] += 1
    assert p.avail == avail
    want: dict[int, set[int]] = {}
    for i in range(p.count):
        if p.wanted(i):
            want.setdefault(avail[i], set()).add(i)
    assert p.buckets() == want
    assert p.in_flight == sum(len(p.outstanding(k)) for k in p.neighbours() if k != p.seed)
    pending: dict[int, set[str]] = {}
    for k in p.neighbours():
        for i in p.outstanding(k):
            pending.setdefault(i, set()).add(k)
    assert {i: {k for k, _ in hs} for i, hs in p.pending.items()} == pending


KEYS = ["seed", "a", "b", "c", "d"]
ops = st.lists(
    st.tuples(
        st.sampled_from(
            ["add", "bitfield", "have", "lost", "remove", "digest", "fill", "receive", "store", "corrupt",
             "reject", "stream", "allow", "time"]
        ),
        st.sampled_from(KEYS),
        st.integers(0, 15),
        st.integers(0, 2**16),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 16), ops=ops, seed=st.integers(0, 1000),
    known=st.integers(0, 2**16), start=st.lists(st.integers(0, 2**16), min_size=5, max_size=5),
)
def test_incremental_state_matches_recount(
    count: int, ops: list[tuple[str, str, int, int]], seed: int, known: int, start: list[int],
) -> None:
    p: Picker[str] = Picker(count, rng=random.Random(seed))
    for i in range(count):
        if known >> i & 1:
            p.digest_known(i)
    for key, mask in zip(KEYS, start):
        if mask & 1:
            neighbour(p, key, [i for i in range(count) if mask >> (i + 1) & 1], seed=key == "seed")
    check(p)
    now = 0.0
    arrived: list[tuple[str, int]] = []
    for op, key, index, mask in ops:
        index %= count
        if op == "add":
            p.add(key, seed=key == "seed")
        elif op == "bitfield":
            p.bitfield(key, bits(count, [i for i in range(count) if mask >> i & 1]))
        elif op == "have":
            p.have(key, index)
        elif op == "lost":
            p.lost(key, index)
        elif op == "remove":
            p.remove(key)
        elif op == "digest":
            p.digest_known(index)
        elif op == "fill":
            before = {i: p.wanted(i) for i in range(count)}
            pending_before = {i: [k for k, _ in hs] for i, hs in p.pending.items()}
            asked = p.fill(now, per_conn=1 + mask % 3, limit=1 + mask % 5)
            for k, i in asked:
                remote = p.remote(k)
                assert remote is not None and i in remote
                assert i not in p.have_bits and i not in p.verifying
                if k == p.seed:
                    assert i in p.seed_allowed
                if not before[i]:
                    # only the endgame asks for a pending piece, from a second holder
                    assert k != p.seed and pending_before.get(i, [None])[0] != k
                    assert len(pending_before[i]) == 1
                    assert p.missing <= p.endgame_pieces
                before[i] = False
            assert len({(k, i) for k, i in asked}) == len(asked)
            arrived.extend(asked)
        elif op == "receive" and arrived:
            k, i = arrived.pop(mask % len(arrived))
            if i in p.outstanding(k):
                others = p.received(k, i)
                assert k not in others
                if p.verify(i):
                    arrived.append(("!" + k, i))
        elif op in ("store", "corrupt"):
            checking = [(k, i) for k, i in arrived if k.startswith("!")]
            if checking:
                k, i = checking[mask % len(checking)]
                arrived.remove((k, i))
                if op == "store":
                    p.stored(i)
                else:
                    p.corrupt(k[1:], i)
        elif op == "reject" and index in p.outstanding(key):
            p.rejected(key, index)
        elif op == "stream":
            p.stream_from = None if mask % 3 == 0 else index
        elif op == "allow":
            p.seed_allowed = {i for i in range(count) if mask >> i & 1}
        elif op == "time":
            now += mask / 1000.0
        check(p)


# -- the rate rules (fill with piece_bytes) -----------------------------------------------

MB = 1 << 20


def measured(p: Picker[str], key: str, index: int, asked: float, done: float, size: int = MB) -> None:
    """C{key} delivered C{index} (asked at C{asked}) at C{done}."""
    p.request(key, index, asked)
    p.received(key, index, done, size)
    assert p.verify(index)
    p.stored(index)


def test_delivery_rate_is_bytes_over_busy_time() -> None:
    p = picker(8)
    neighbour(p, "a", range(8))
    assert p.rate("a") is None
    measured(p, "a", 0, 0.0, 1.0)  # 1 MiB in 1 s
    assert p.rate("a") == MB
    # asked before the previous piece came: busy from that piece on
    p.request("a", 1, 0.5)
    p.received("a", 1, 2.0, MB)
    assert abs(p.rate("a") - MB) < 1e-6  # type: ignore[operator]
    # a piece out for 4 s with nothing back: no faster than 1 MiB / 4 s
    p.request("a", 2, 2.0)
    assert p.rate("a", 6.0, MB) == MB / 4


def test_fast_neighbours_take_the_slots() -> None:
    p = picker(16)
    neighbour(p, "slow", range(16))
    neighbour(p, "fast", range(16))
    measured(p, "slow", 0, 0.0, 10.0)  # 0.1 MiB/s
    measured(p, "fast", 1, 0.0, 0.1)  # 10 MiB/s
    asked = p.fill(10.0, per_conn=1, limit=4, piece_bytes=MB)
    # bandwidth-delay: 10 MiB/s x 1 s = 10 pieces allowed, 4 in all
    assert [k for k, _ in asked] == ["fast"] * 4
    assert p.outstanding("slow") == {}


def test_the_rarest_pieces_go_to_the_fastest_holder() -> None:
    p = picker(8)
    neighbour(p, "slow", [0, 1, 2, 3, 4])
    neighbour(p, "fast", [0, 1, 2, 3, 4, 5])
    neighbour(p, "other", [2, 3, 4, 5])
    neighbour(p, "third", [5])
    measured(p, "slow", 6, 0.0, 10.0)
    measured(p, "fast", 7, 0.0, 0.1)
    asked = p.fill(10.0, per_conn=1, limit=1, piece_bytes=MB)
    # 0 and 1 are the rarest (slow and fast hold them): the fast one is asked
    assert len(asked) == 1 and asked[0][0] == "fast" and asked[0][1] in (0, 1)


def test_rescue_a_slow_neighbours_piece() -> None:
    p = picker(4)
    neighbour(p, "slow", range(4))
    neighbour(p, "fast", range(4))
    measured(p, "slow", 0, 0.0, 10.0)  # 0.1 MiB/s: 10 s a piece
    measured(p, "fast", 1, 0.0, 0.1)  # 10 MiB/s
    p.request("slow", 2, 10.0)
    p.request("fast", 3, 10.0)
    p.received("fast", 3, 10.1, MB)
    assert p.verify(3)
    p.stored(3)
    # missing: only 2, out at slow (expected at 20 s); fast would take 0.1 s
    asked = p.fill(10.2, per_conn=1, limit=4, piece_bytes=MB)
    assert asked == [("fast", 2)]
    assert p.received("fast", 2, 10.3, MB) == ["slow"]  # cancel it there
    assert p.outstanding("slow") == {} and p.in_flight == 0


def test_no_rescue_when_the_first_holder_is_about_as_fast() -> None:
    p = picker(8)
    neighbour(p, "a", range(8))
    neighbour(p, "b", range(8))
    measured(p, "a", 0, 0.0, 1.0)
    measured(p, "b", 1, 0.0, 0.8)
    for i in range(2, 8):
        p.request("a" if i % 2 else "b", i, 1.0)
    assert p.fill(1.1, per_conn=1, limit=8, piece_bytes=MB) == []


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 12), ops=ops, seed=st.integers(0, 1000),
    start=st.lists(st.integers(0, 2**16), min_size=5, max_size=5),
)
def test_rate_rules_keep_the_limits(count: int, ops: list[tuple[str, str, int, int]], seed: int, start: list[int]) -> None:
    """With piece_bytes: at most 2 x limit out, a piece at most at two neighbours, only held and wanted-or-rescued pieces."""
    p: Picker[str] = Picker(count, rng=random.Random(seed))
    for i in range(count):
        p.digest_known(i)
    for key, mask in zip(KEYS, start):
        neighbour(p, key, [i for i in range(count) if mask >> i & 1], seed=key == "seed")
    now = 0.0
    for op, key, index, mask in ops:
        index %= count
        if op in ("fill", "stream", "allow", "digest", "add", "bitfield"):
            per_conn, limit = 1 + mask % 3, 1 + mask % 5
            before = {i: [k for k, _ in hs] for i, hs in p.pending.items()}
            asked = p.fill(now, per_conn=per_conn, limit=limit, piece_bytes=MB)
            assert p.in_flight <= max(2 * limit, before and sum(len(v) for v in before.values()) or 0)
            for k, i in asked:
                remote = p.remote(k)
                assert remote is not None and i in remote and i not in p.have_bits
                if i in before:
                    assert k != p.seed and len(before[i]) == 1 and before[i][0] != k
            for hs in p.pending.values():
                assert len([k for k, _ in hs if k != p.seed]) <= 2
        elif op == "have":
            p.have(key, index)
        elif op == "remove":
            p.remove(key)
        elif op in ("receive", "store", "corrupt", "reject"):
            out = [(k, i) for k in p.neighbours() for i in p.outstanding(k)]
            if out:
                k, i = out[mask % len(out)]
                if op == "reject":
                    p.rejected(k, i)
                else:
                    p.received(k, i, now, MB)
                    if p.verify(i):
                        if op == "corrupt":
                            p.corrupt(k, i)
                        else:
                            p.stored(i)
        elif op == "time":
            now += mask / 1000.0
        check(p)


def test_the_limit_grows_by_bandwidth_delay_only_when_allowed() -> None:
    for grow, expected in ((1.0, 2), (4.0, 4)):
        p = picker(16, max_grow=grow)
        neighbour(p, "a", range(16))
        neighbour(p, "b", range(16))
        measured(p, "a", 0, 0.0, 0.1)  # 10 MiB/s each: 10 pieces a second
        measured(p, "b", 1, 0.0, 0.1)
        asked = p.fill(1.0, per_conn=1, limit=2, piece_bytes=MB)
        # each neighbour's budget is capped by limit (2); the whole download's grows to 4 x 2
        assert len(asked) == expected == p.in_flight


def test_a_corrupt_piece_forgets_the_rate() -> None:
    p = picker(8)
    neighbour(p, "a", range(8))
    p.request("a", 0, 0.0)
    p.received("a", 0, 0.001, MB)  # "fast", but wrong
    assert p.rate("a") is not None and p.verify(0)
    p.corrupt("a", 0)
    assert p.rate("a") is None
    asked = p.fill(1.0, per_conn=1, limit=8, piece_bytes=MB)
    assert len(asked) == 1  # per_conn again, not the bandwidth-delay budget


def test_the_limit_grows_to_one_piece_per_neighbour_within_its_bytes() -> None:
    mib = 1 << 20
    # no more neighbours than the limit: unchanged
    most = 16 * mib
    assert neighbour_limit(6, 4, mib, most) == 6
    assert neighbour_limit(6, 6, mib, most) == 6
    # more: one piece each, within the bytes
    assert neighbour_limit(6, 9, mib, most) == 9
    assert neighbour_limit(6, 40, mib, most) == 16
    assert neighbour_limit(6, 40, mib, most_bytes=12 * mib) == 12
    # pieces so large that the bytes hold fewer than the limit: never below it
    assert neighbour_limit(8, 18, 2 * mib, most) == 8
    assert neighbour_limit(2, 18, 15 * mib, most) == 2
    # off
    assert neighbour_limit(6, 9, mib, most_bytes=0) == 6


def test_in_flight_limit_scales_with_a_fast_link_only() -> None:
    mib = 1 << 20
    # the bytes in pieces, at least 4: as before when the link is not known
    assert in_flight_limit(6 * mib, 2 * mib) == 4
    assert in_flight_limit(16 * mib, 2 * mib) == 8
    assert in_flight_limit(6 * mib, 8 * mib) == 4
    # a 1 Gbit/s link carries 12.5 MB in 0.1 s: fewer than 8 pieces of 2 MiB, unchanged
    assert in_flight_limit(16 * mib, 2 * mib, link_rate=125e6, link_time=0.1) == 8
    # a 10 Gbit/s link: 125 MB in 0.1 s, 59 pieces of 2 MiB
    assert in_flight_limit(16 * mib, 2 * mib, link_rate=1.25e9, link_time=0.1) == 59
    # off without a time
    assert in_flight_limit(16 * mib, 2 * mib, link_rate=1.25e9) == 8

"""
The fast picker (L{dragonfly.peer.picker.Picker}: bit sets, cached rates)
makes the same decisions as a brute-force one
(L{tests.unit.picker_reference.ReferencePicker}: every choice recounted from
scratch, the rate rules as they were written before): both are driven by the
same random operations and every answer is compared.
"""

from __future__ import annotations

import heapq
import math
import random
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from dragonfly.core.bitmap import Bitmap
from dragonfly.peer.picker import Neighbour, Picker, _heapify, _heappop, _heappush

from .picker_reference import ReferencePicker

KEYS = ["seed", "a", "b", "c", "d", "e", "f"]
MB = 1 << 20

OPS = [
    "add", "bitfield", "have", "lost", "remove", "digest", "fill", "fill_rate", "choose", "offer", "receive",
    "store", "corrupt", "reject", "cancel", "stream", "allow", "time", "unverified", "heard",
]


def bits(count: int, rng: random.Random, density: float) -> Bitmap:
    b = Bitmap(count)
    for i in range(count):
        if rng.random() < density:
            b.set(i)
    return b


def state(p: Any) -> Any:
    """What both pickers must agree on after every step."""
    keys = list(p.neighbours())
    return (
        p.avail, {i: list(h) for i, h in p.pending.items()}, sorted(p.verifying), p.in_flight, p.missing,
        keys, {k: dict(p.outstanding(k)) for k in keys},
        {k: (None if p.remote(k) is None else p.remote(k).to_bytes()) for k in keys},
        p.buckets(), p.starving(), [p.wanted(i) for i in range(p.count)], p.seed,
    )


def consistent(p: Picker[Any]) -> None:
    """The fast picker's own caches agree with what they cache."""
    for i in range(p.count):
        assert p._in_want[i] == bool(p._want >> p.prio[i] & 1)
    for nb in p._nb.values():
        assert nb.oldest == min(nb.out.values(), default=math.inf)
        assert nb.newest == max(nb.out.values(), default=-math.inf)


def run(
    count: int, seed: int, steps: list[tuple[int, int, int, int]], max_grow: float, known_all: bool,
    attach: bool = False,
) -> None:
    fast: Picker[str] = Picker(count, rng=random.Random(seed), max_grow=max_grow)
    ref: ReferencePicker[str] = ReferencePicker(count, rng=random.Random(seed), max_grow=max_grow)
    assert fast.prio == ref.prio
    both = (fast, ref)
    rng = random.Random(seed)  # the operations' own draws
    now = 0.0
    if known_all:
        if seed & 1:
            fast.digests_known(range(count))
            for i in range(count):
                ref.digest_known(i)
        else:
            for p in both:
                for i in range(count):
                    p.digest_known(i)
    if attach:
        # every neighbour there from the start, each holding a random share
        for key in KEYS:
            b = bits(count, rng, rng.random())
            for p in both:
                p.add(key, seed=key == "seed")
                p.bitfield(key, b)
    # pieces received and being checked: (key, piece)
    checking: list[tuple[str, int]] = []
    for op_n, key_n, index, x in steps:
        op = OPS[op_n % len(OPS)]
        key = KEYS[key_n % len(KEYS)]
        index %= count
        if op == "add":
            for p in both:
                p.add(key, seed=key == "seed")
        elif op == "bitfield":
            b = bits(count, rng, (x % 11) / 10)
            for p in both:
                p.bitfield(key, b)
        elif op == "have":
            for p in both:
                p.have(key, index)
        elif op == "lost":
            for p in both:
                p.lost(key, index)
        elif op == "remove":
            assert fast.remove(key) == ref.remove(key)
            checking = [(k, i) for k, i in checking if k != key]
        elif op == "digest":
            if x & 1:
                # a batch (repeats and pieces out of range too): one call to digests_known
                batch = [(index + j * (x >> 1)) % (count + 2) - 1 for j in range(1 + x % 9)]
                fast.digests_known(batch)
                for i in batch:
                    ref.digest_known(i)
            else:
                for p in both:
                    p.digest_known(index)
        elif op in ("fill", "fill_rate"):
            per_conn, limit = 1 + x % 3, 1 + (x >> 2) % 6
            banned = KEYS[(x >> 5) % len(KEYS)] if x & 1 else None
            usable = (lambda k, banned=banned: k != banned) if banned is not None else None
            pb = MB if op == "fill_rate" else None
            a = fast.fill(now, per_conn, limit, usable=usable, piece_bytes=pb)
            b2 = ref.fill(now, per_conn, limit, usable=usable, piece_bytes=pb)
            assert a == b2
        elif op == "choose":
            assert fast.choose(key, now) == ref.choose(key, now)
        elif op == "offer":
            per_conn, limit = 1 + x % 3, 1 + (x >> 2) % 6
            assert fast.offer(key, index, now, per_conn, limit) == ref.offer(key, index, now, per_conn, limit)
        elif op == "heard":
            # the HAVE and the offer in one call on the neighbour's record (the simulator's)
            per_conn, limit = 1 + x % 3, 1 + (x >> 2) % 6
            record = fast.record(key)
            if record is None:
                fast.have(key, index)
                a = fast.offer(key, index, now, per_conn, limit)
            else:
                assert record.key == key
                a = fast.heard(record, index, now, per_conn, limit)
            ref.have(key, index)
            assert a == ref.offer(key, index, now, per_conn, limit)
        elif op in ("receive", "reject", "cancel"):
            out = [(k, i) for k in fast.neighbours() for i in fast.outstanding(k)]
            if out:
                k, i = out[x % len(out)]
                if op == "receive":
                    size = MB if x & 2 else MB // 2
                    timed = x & 4
                    a = fast.received(k, i, now, size) if timed else fast.received(k, i)
                    b2 = ref.received(k, i, now, size) if timed else ref.received(k, i)
                    assert a == b2
                    v = fast.verify(i)
                    assert v == ref.verify(i)
                    if v:
                        checking.append((k, i))
                elif op == "reject":
                    for p in both:
                        p.rejected(k, i)
                else:
                    for p in both:
                        p.cancelled(k, i)
        elif op in ("store", "corrupt", "unverified"):
            if checking:
                k, i = checking.pop(x % len(checking))
                for p in both:
                    if op == "store":
                        p.stored(i)
                    elif op == "corrupt":
                        p.corrupt(k, i)
                    else:
                        p.unverified(i)
        elif op == "stream":
            for p in both:
                p.stream_from = None if x % 3 == 0 else index - (x % 5)
        elif op == "allow":
            allowed = {i for i in range(count) if rng.random() < (x % 5) / 8}
            for p in both:
                p.seed_allowed = set(allowed)
        elif op == "time":
            now += (x % 3000) / 1000.0
        for k in KEYS:
            assert fast.rate(k) == ref.rate(k)
            assert fast.rate(k, now, MB) == ref.rate(k, now, MB)
        assert state(fast) == state(ref)
        consistent(fast)


step = st.tuples(st.integers(0, 10_000), st.integers(0, 100), st.integers(0, 10_000), st.integers(0, 2**20))


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 80), seed=st.integers(0, 10_000), steps=st.lists(step, max_size=150),
    max_grow=st.sampled_from([1.0, 1.0, 4.0]), known_all=st.booleans(), attach=st.booleans(),
)
@example(
    count=40, seed=3, steps=[(n, n * 7, n * 13, n * 977) for n in range(150)], max_grow=1.0, known_all=True,
    attach=True,
)
def test_the_fast_picker_decides_as_the_brute_force_one(
    count: int, seed: int, steps: list[tuple[int, int, int, int]], max_grow: float, known_all: bool, attach: bool,
) -> None:
    run(count, seed, steps, max_grow, known_all, attach)


def test_many_random_swarms_decide_alike() -> None:
    """Longer runs than hypothesis makes: most neighbours attached, many rate-rule fills and receipts."""
    for seed in range(30):
        r = random.Random(seed)
        count = r.choice([7, 64, 65, 200])
        steps = []
        for _ in range(400):
            op = r.choice(OPS + ["fill_rate"] * 8 + ["receive"] * 8 + ["store"] * 6 + ["have"] * 4 + ["time"] * 6)
            steps.append((OPS.index(op), r.randrange(100), r.randrange(10_000), r.randrange(2**20)))
        run(count, seed, steps, r.choice([1.0, 4.0]), True, attach=True)


@settings(max_examples=200, deadline=None)
@given(
    finishes=st.lists(st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.5]), max_size=40),
    ops=st.lists(st.tuples(st.booleans(), st.sampled_from([0.5, 1.0, 2.0, 3.5])), max_size=60),
)
def test_the_rate_heap_keeps_heapqs_order(finishes: list[float], ops: list[tuple[bool, float]]) -> None:
    """The records' heap pops the same neighbours and leaves its array in the same order as heapq on tuples."""
    made = [Neighbour(n) for n in range(len(finishes))]
    for n, (nb, f) in enumerate(zip(made, finishes, strict=True)):
        nb.finish, nb.place = f, n
    tuples = [(nb.finish, nb.place, nb) for nb in made]
    heapq.heapify(tuples)
    heap = list(made)
    _heapify(heap)
    assert heap == [e[2] for e in tuples]
    for push, f in ops:
        if push or not tuples:
            nb = Neighbour(len(made))
            nb.finish, nb.place = f, len(made)
            made.append(nb)
            heapq.heappush(tuples, (nb.finish, nb.place, nb))
            _heappush(heap, nb)
        else:
            assert _heappop(heap) is heapq.heappop(tuples)[2]
        assert heap == [e[2] for e in tuples]

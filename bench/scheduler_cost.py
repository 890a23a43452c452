"""
CPU per scheduler sync against the size of the swarm.

    python -m bench.scheduler_cost [--module PATH] [--syncs N] [--sizes 100,1000,10000] [--pieces 128,4096]

For each swarm size and piece count it builds one swarm in two states and
times L{Scheduler.sync} alone (thread CPU time, per call):

  - I{spreading}: the seed has sent about half the pieces; each member holds
    a random eighth of those and every sync is answered with the seed piece
    it was given (reported, untimed), so allowances keep going out;
  - I{sent}: the seed has sent every piece at least once; members hold a
    random eighth of the file; most syncs have nothing to take from the
    seed (the state a long download spends most of its time in).
  - I{reporting}: as I{sent}, and each timed call is a L{Scheduler.report}
    of C{--report} pieces the member lacked (what a peer stored since its
    last sync: a 1 Gbit/s peer stores about 30 pieces of 2 MiB in a sync
    interval) followed by its sync, as the simulator times them.

C{--module} times another copy of the scheduler (say the one before this
change: C{git show REV:dragonfly/supernode/scheduler.py > /tmp/old.py}).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from types import ModuleType

from dragonfly.core.bitmap import Bitmap

TASK = "t" * 64


def load(path: str | None) -> ModuleType:
    if path is None:
        from dragonfly.supernode import scheduler
        return scheduler
    spec = importlib.util.spec_from_file_location("dragonfly.supernode._bench_scheduler", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def build(mod: ModuleType, members: int, pieces: int, state: str, rng: random.Random):  # type: ignore[no-untyped-def]
    s = mod.Scheduler(rng=random.Random(1))
    s.task(TASK)
    s.set_piece_count(TASK, pieces)
    for i in range(pieces):
        s.seed_piece_ready(TASK, i)
    sent = pieces // 2 if state == "spreading" else pieces
    nbytes = (pieces + 7) // 8
    for n in range(members):
        pid = f"p{n}"
        s.register_peer(mod.PeerInfo(pid, "10.0.0.1", 1000 + n % 60000), 0.0)
        s.join(TASK, pid, 0.0)
        # a random eighth of the sent pieces
        held = bytearray(nbytes)
        for i in rng.sample(range(sent), max(1, sent // 8)):
            held[i >> 3] |= 0x80 >> (i & 7)
        s.report(TASK, pid, 0.0, bitmap=Bitmap.from_bytes(pieces, bytes(held)))
    if state == "sent":
        # every piece has a copy out: make sure of it
        holders = s.tasks[TASK].holders
        for i in range(pieces):
            if holders[i] == 0:
                s.report(TASK, f"p{i % members}", 0.0, have=[i])
    for n in range(members):  # everyone has parents
        s.sync(TASK, f"p{n}", 0.5)
    return s


def measure(mod: ModuleType, members: int, pieces: int, state: str, syncs: int, report: int = 8) -> float:
    rng = random.Random(7)
    s = build(mod, members, pieces, "sent" if state == "reporting" else state, rng)
    costs = []
    now = 1.0
    clock = time.thread_time_ns
    for _k in range(syncs):
        pid = f"p{rng.randrange(members)}"
        have: list[int] = []
        if state == "reporting":
            # pieces it lacks, drawn at random: little work between two timed
            # calls (a scan of the whole bitmap here left the caches cold
            # for the call and tripled its time at 4,096 pieces)
            held, top = s.tasks[TASK].members[pid].have_bits, s.tasks[TASK].width - 1
            for _t in range(64 * report):
                i = rng.randrange(pieces)
                if not held >> (top - i) & 1 and i not in have:
                    have.append(i)
                    if len(have) == report:
                        break
        t0 = clock()
        if have:
            s.report(TASK, pid, now, have=have)
        d = s.sync(TASK, pid, now)
        costs.append(clock() - t0)
        if d.seed_pieces:
            s.report(TASK, pid, now, have=d.seed_pieces)
        now += 0.001
    return statistics.fmean(costs) / 1000.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--module", help="the scheduler module to time (a file)")
    p.add_argument("--syncs", type=int, default=2000)
    p.add_argument("--sizes", default="100,1000,10000")
    p.add_argument("--pieces", default="128,4096")
    p.add_argument("--report", type=int, default=8, help="pieces reported before each sync in the reporting state")
    args = p.parse_args(argv)
    mod = load(args.module)
    print(f"{'members':>8} {'pieces':>7} {'spreading us/sync':>18} {'sent us/sync':>13} {'report+sync us':>15}")
    for members in [int(x) for x in args.sizes.split(",")]:
        for pieces in [int(x) for x in args.pieces.split(",")]:
            a = measure(mod, members, pieces, "spreading", args.syncs)
            b = measure(mod, members, pieces, "sent", args.syncs)
            c = measure(mod, members, pieces, "reporting", args.syncs, args.report)
            print(f"{members:>8} {pieces:>7} {a:>18.1f} {b:>13.1f} {c:>15.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
L{dragonfly.supernode.scheduler} after a SuperNode restart: the peers
re-announce what they hold (once) before the restarted CDN knows the task's
length again.  Those pieces must not be forgotten, or the seed allowance goes
to pieces the peers already hold and nobody asks for the ones they lack.
"""

from __future__ import annotations

import random

from dragonfly.supernode.scheduler import PeerInfo, Scheduler

TASK = "b" * 64


def restarted(peers: int) -> Scheduler:
    """A fresh scheduler (a restarted SuperNode): the task known, its length not yet."""
    s = Scheduler(rng=random.Random(7))
    s.task(TASK)
    for n in range(peers):
        s.register_peer(PeerInfo(f"p{n}", "10.0.0.1", 65001 + n), 0.0)
        s.join(TASK, f"p{n}", 0.0)
    return s


def test_pieces_reported_before_the_length_are_kept() -> None:
    s = restarted(2)
    s.report(TASK, "p0", 1.0, have=[0, 1, 2, 5])
    s.report(TASK, "p1", 1.0, have=list(range(8)))
    s.set_piece_count(TASK, 8)
    sw = s.tasks[TASK]
    p0, p1 = sw.members["p0"], sw.members["p1"]
    assert p0.have is not None and sorted(p0.have) == [0, 1, 2, 5]
    assert p1.have is not None and sorted(p1.have) == list(range(8)) and p1.done
    assert sw.holders == [2, 2, 2, 1, 1, 2, 1, 1]
    assert sw.downloading == 1


def test_the_seed_allowance_after_a_restart_is_what_the_peer_lacks() -> None:
    s = restarted(1)
    held = [i for i in range(16) if i not in (3, 9, 14)]
    s.report(TASK, "p0", 1.0, have=held)
    s.set_piece_count(TASK, 16)
    for i in range(16):
        s.seed_piece_ready(TASK, i)
    allowed = s.sync(TASK, "p0", 2.0).seed_pieces
    assert allowed and set(allowed) <= {3, 9, 14}


def test_early_pieces_out_of_range_are_dropped() -> None:
    s = restarted(1)
    s.report(TASK, "p0", 1.0, have=[1, 7, 8, 1000, -1])
    s.set_piece_count(TASK, 8)
    member = s.tasks[TASK].members["p0"]
    assert member.have is not None and sorted(member.have) == [1, 7]
    assert not member.early

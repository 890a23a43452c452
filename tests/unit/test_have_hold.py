"""How long a dfpeer holds the HAVEs of a piece it stored (L{HaveHold}), on fake times."""

from __future__ import annotations

from dragonfly.peer.neighbours import HAVE_DELAY, HAVE_GAPS, HaveHold


def test_nothing_is_held_before_two_pieces():
    hold = HaveHold(cap=0.5)
    assert hold.stored(10.0) == 0.0


def test_held_a_few_gaps_between_stored_pieces():
    hold = HaveHold(cap=10.0)
    hold.stored(10.0)
    assert abs(hold.stored(10.1) - HAVE_GAPS * 0.1) < 1e-9
    # a moving average: a gap of 0.5 moves it a quarter of the way
    assert abs(hold.stored(10.6) - HAVE_GAPS * 0.2) < 1e-9


def test_never_longer_than_the_cap_and_nothing_with_no_cap():
    hold = HaveHold(cap=0.5)
    hold.stored(0.0)
    assert hold.stored(2.0) == 0.5
    off = HaveHold(cap=0.0)
    off.stored(0.0)
    assert off.stored(0.1) == 0.0


def test_the_dfpeer_announces_at_once_by_default():
    """HAVE_DELAY is 0: a stored piece's HAVEs go out at once (each hop of a piece waited up to a hold before)."""
    hold = HaveHold(cap=HAVE_DELAY)
    for t in (0.0, 0.01, 0.02, 0.5):
        assert hold.stored(t) == 0.0

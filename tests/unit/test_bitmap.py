"""Tests for :mod:`dragonfly.core.bitmap`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly.core.bitmap import MAX_COUNT, Bitmap

COUNTS = st.integers(min_value=0, max_value=300)


@st.composite
def bitmaps(draw: st.DrawFn) -> tuple[int, set[int]]:
    """A piece count and a subset of ``range(count)``."""
    count = draw(COUNTS)
    members = draw(st.sets(st.integers(0, count - 1))) if count else set()
    return count, members


def build(count: int, members: set[int]) -> Bitmap:
    """Build a bitmap with the given members set."""
    bm = Bitmap(count)
    for i in members:
        bm.set(i)
    return bm


def reference_bytes(count: int, members: set[int]) -> bytes:
    """Independent MSB-first encoding of ``members``."""
    out = bytearray((count + 7) // 8)
    for i in members:
        out[i // 8] |= 1 << (7 - i % 8)
    return bytes(out)


def test_empty() -> None:
    """A zero-size bitmap is empty, complete and encodes to nothing."""
    bm = Bitmap(0)
    assert bm.count == 0
    assert len(bm) == 0
    assert bm.complete
    assert list(bm) == []
    assert list(bm.missing()) == []
    assert bm.to_bytes() == b""
    assert Bitmap.from_bytes(0, b"") == bm
    assert 0 not in bm


def test_msb_first_layout() -> None:
    """Piece 0 is bit 7 of byte 0; piece 9 is bit 6 of byte 1."""
    bm = Bitmap(10)
    bm.set(0)
    bm.set(9)
    assert bm.to_bytes() == b"\x80\x40"


def test_set_clear_idempotent_counter() -> None:
    """Setting or clearing twice does not disturb the counter."""
    bm = Bitmap(16)
    bm.set(3)
    bm.set(3)
    assert len(bm) == 1
    bm.clear(3)
    bm.clear(3)
    assert len(bm) == 0
    assert 3 not in bm


@pytest.mark.parametrize("i", [-1, 8, 100])
def test_out_of_range(i: int) -> None:
    """set/clear raise IndexError out of range; membership is False."""
    bm = Bitmap(8)
    with pytest.raises(IndexError):
        bm.set(i)
    with pytest.raises(IndexError):
        bm.clear(i)
    assert i not in bm


def test_contains_non_int() -> None:
    """Non-integers are never members."""
    bm = Bitmap(8)
    bm.set(1)
    assert "1" not in bm
    assert None not in bm


def test_count_limits() -> None:
    """Counts outside 0..MAX_COUNT are rejected; the maximum is fine."""
    with pytest.raises(ValueError):
        Bitmap(-1)
    with pytest.raises(ValueError):
        Bitmap(MAX_COUNT + 1)
    bm = Bitmap(MAX_COUNT)
    bm.set(MAX_COUNT - 1)
    assert list(bm) == [MAX_COUNT - 1]
    assert len(bm.to_bytes()) == MAX_COUNT // 8


def test_complete() -> None:
    """complete flips exactly when the last piece is set."""
    bm = Bitmap(9)
    for i in range(8):
        bm.set(i)
    assert not bm.complete
    bm.set(8)
    assert bm.complete
    assert list(bm.missing()) == []
    assert bm.to_bytes() == b"\xff\x80"


def test_from_bytes_wrong_length() -> None:
    """from_bytes requires exactly ceil(count / 8) bytes."""
    with pytest.raises(ValueError):
        Bitmap.from_bytes(9, b"\x00")
    with pytest.raises(ValueError):
        Bitmap.from_bytes(8, b"\x00\x00")
    with pytest.raises(ValueError):
        Bitmap.from_bytes(0, b"\x00")


def test_from_bytes_copies() -> None:
    """The bitmap does not alias the source buffer."""
    src = bytearray(b"\x80")
    bm = Bitmap.from_bytes(8, src)
    src[0] = 0xFF
    assert list(bm) == [0]


def test_eq() -> None:
    """Equality needs the same size and bits; other types are unequal."""
    assert Bitmap(8) == Bitmap(8)
    assert Bitmap(8) != Bitmap(9)
    a = Bitmap(8)
    a.set(2)
    assert a != Bitmap(8)
    assert a != object()


@settings(max_examples=200, deadline=None)
@given(bitmaps())
def test_round_trip(cm: tuple[int, set[int]]) -> None:
    """to_bytes matches a reference encoding and from_bytes inverts it."""
    count, members = cm
    bm = build(count, members)
    data = bm.to_bytes()
    assert data == reference_bytes(count, members)
    back = Bitmap.from_bytes(count, data)
    assert back == bm
    assert len(back) == len(members)
    assert list(back) == sorted(members)
    assert back.complete == (len(members) == count)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300).filter(lambda c: c % 8), st.data())
def test_spare_bits_rejected(count: int, data: st.DataObject) -> None:
    """Any set bit past count makes from_bytes fail."""
    spare = 8 - count % 8
    bit = data.draw(st.integers(0, spare - 1))
    raw = bytearray((count + 7) // 8)
    raw[-1] |= 1 << bit
    with pytest.raises(ValueError):
        Bitmap.from_bytes(count, bytes(raw))


@settings(max_examples=200, deadline=None)
@given(
    COUNTS.filter(bool).flatmap(
        lambda c: st.tuples(
            st.just(c),
            st.lists(st.tuples(st.booleans(), st.integers(0, c - 1)), max_size=200),
        )
    )
)
def test_random_operations(case: tuple[int, list[tuple[bool, int]]]) -> None:
    """After random set/clear, len, iteration, membership and missing agree."""
    count, ops = case
    bm = Bitmap(count)
    model: set[int] = set()
    for do_set, i in ops:
        if do_set:
            bm.set(i)
            model.add(i)
        else:
            bm.clear(i)
            model.discard(i)
        assert len(bm) == len(model)
    assert list(bm) == sorted(model)
    assert len(bm) == sum(1 for _ in bm)
    missing = list(bm.missing())
    assert missing == sorted(set(range(count)) - model)
    assert sorted(missing + list(bm)) == list(range(count))
    assert all((i in bm) == (i in model) for i in range(count))
    assert bm.complete == (len(model) == count)


@settings(max_examples=100, deadline=None)
@given(bitmaps(), st.data())
def test_copy_independent(cm: tuple[int, set[int]], data: st.DataObject) -> None:
    """copy() is equal but independent of the original."""
    count, members = cm
    bm = build(count, members)
    cp = bm.copy()
    assert cp == bm
    assert len(cp) == len(bm)
    if count:
        i = data.draw(st.integers(0, count - 1))
        if i in cp:
            cp.clear(i)
        else:
            cp.set(i)
        assert cp != bm
        assert list(bm) == sorted(members)
        assert len(bm) == len(members)

"""HAVE_MANY (version 2): several HAVEs in one frame, checked from the header alone."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.protocol.frames import (
    HAVE_MANY,
    MAX_HAVES_PER_FRAME,
    FrameDecoder,
    Have,
    HaveMany,
    ProtocolError,
    encode_have,
    encode_have_many,
)

U32 = st.integers(0, 0xFFFFFFFF)


@given(st.lists(U32, min_size=1, max_size=3 * MAX_HAVES_PER_FRAME // 2), st.integers(1, 64))
def test_round_trip_in_any_chunks(indexes: list[int], step: int) -> None:
    """Any indexes come back in order, split into frames of at most MAX_HAVES_PER_FRAME, however fed."""
    wire = b"".join(encode_have_many(indexes)) + encode_have(7)
    d = FrameDecoder()
    events = []
    for k in range(0, len(wire), step):
        events += d.feed(wire[k : k + step])
    assert events[-1] == Have(7)
    frames = events[:-1]
    assert all(isinstance(e, HaveMany) and 1 <= len(e.indexes) <= MAX_HAVES_PER_FRAME for e in frames)
    assert [i for e in frames for i in e.indexes] == indexes
    assert len(frames) == -(-len(indexes) // MAX_HAVES_PER_FRAME)


def test_wire_format() -> None:
    assert encode_have_many([1, 0x01020304]) == [b"\x0c\x00\x00\x00\x08\x00\x00\x00\x01\x01\x02\x03\x04"]
    assert encode_have_many([]) == []
    with pytest.raises(ValueError):
        encode_have_many([1 << 32])


@given(st.integers(0, 0xFFFFFFFF).filter(lambda n: n == 0 or n % 4 or n > 4 * MAX_HAVES_PER_FRAME))
def test_bad_counts_are_refused_from_the_header_alone(length: int) -> None:
    """A body that is empty, not a whole number of indexes, or more than the most indexes: the header
    alone kills the decoder (no body byte is waited for)."""
    d = FrameDecoder()
    with pytest.raises(ProtocolError, match="HAVE_MANY|control frame"):
        d.feed(struct.pack(">BI", HAVE_MANY, length))
    assert d.dead


@given(st.binary(max_size=64))
def test_garbage_after_a_header_never_crashes(tail: bytes) -> None:
    """Any body: either events of whole indexes or a ProtocolError, nothing else."""
    d = FrameDecoder()
    try:
        events = d.feed(struct.pack(">BI", HAVE_MANY, 8) + tail)
    except ProtocolError:
        assert d.dead
        return
    if len(tail) >= 8:
        assert isinstance(events[0], HaveMany) and len(events[0].indexes) == 2

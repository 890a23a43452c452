"""Tests for the sans-IO framer :mod:`dragonfly.protocol.frames`."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly.core.bitmap import Bitmap
from dragonfly.protocol import frames
from dragonfly.protocol.frames import (
    BITFIELD,
    CANCEL,
    ERROR,
    HAVE,
    HELLO,
    KEEPALIVE,
    MAX_CONTROL_BODY,
    MAX_PIECE_SIZE,
    MAX_PIECES,
    PIECE,
    PROTOCOL_VERSION,
    REJECT,
    REJECT_BUSY,
    REJECT_NOT_HELD,
    REJECT_SHUTTING_DOWN,
    REQUEST,
    BitfieldMsg,
    Cancel,
    Digests,
    ErrorMsg,
    FrameDecoder,
    Have,
    HaveMany,
    Hello,
    KeepAlive,
    PieceData,
    PieceEnd,
    PieceStart,
    ProtocolError,
    Reject,
    Request,
    encode_bitfield,
    encode_cancel,
    encode_digests,
    encode_error,
    encode_have,
    encode_hello,
    encode_keepalive,
    encode_reject,
    encode_request,
    piece_header,
)

TASK = bytes(range(32))
U32 = st.integers(0, 0xFFFFFFFF)

# A decoded piece, normalised: ("piece", index, body bytes).
Piece = tuple[str, int, bytes]


def header(ftype: int, length: int) -> bytes:
    """Raw 5-byte frame header."""
    return struct.pack(">BI", ftype, length)


# ---------------------------------------------------------------------------
# Message strategies: each draws (wire bytes, expected normalised events).


def _random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@st.composite
def hello_msgs(draw: st.DrawFn) -> tuple[bytes, list[Any]]:
    task = draw(st.binary(min_size=32, max_size=32))
    peer = draw(st.text(min_size=1, max_size=16))
    version = draw(st.integers(0, 255))
    return encode_hello(task, peer, version), [Hello(version, task, peer)]


@st.composite
def bitfield_msgs(draw: st.DrawFn) -> tuple[bytes, list[Any]]:
    count = draw(
        st.one_of(st.integers(0, 2000), st.sampled_from([0, 1, 7, 8, 9, MAX_PIECES]))
    )
    rng = random.Random(draw(st.integers(0, 2**32)))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    bm = Bitmap(count)
    for i in range(count) if count <= 4096 else rng.sample(range(count), 200):
        if rng.random() < density:
            bm.set(i)
    return encode_bitfield(bm), [BitfieldMsg(bm.copy())]


@st.composite
def index_msgs(draw: st.DrawFn) -> tuple[bytes, list[Any]]:
    index = draw(U32)
    kind = draw(st.sampled_from(["have", "request", "cancel"]))
    if kind == "have":
        return encode_have(index), [Have(index)]
    if kind == "request":
        return encode_request(index), [Request(index)]
    return encode_cancel(index), [Cancel(index)]


@st.composite
def reject_msgs(draw: st.DrawFn) -> tuple[bytes, list[Any]]:
    index = draw(U32)
    reason = draw(
        st.one_of(
            st.sampled_from([REJECT_NOT_HELD, REJECT_BUSY, REJECT_SHUTTING_DOWN]),
            st.integers(0, 255),
        )
    )
    return encode_reject(index, reason), [Reject(index, reason)]


@st.composite
def error_msgs(draw: st.DrawFn) -> tuple[bytes, list[Any]]:
    code = draw(st.integers(0, 0xFFFF))
    message = draw(st.text(max_size=256))  # <= 1024 utf-8 bytes
    return encode_error(code, message), [ErrorMsg(code, message)]


@st.composite
def piece_msgs(draw: st.DrawFn, max_size: int = 200 * 1024) -> tuple[bytes, list[Any]]:
    index = draw(U32)
    size = draw(
        st.one_of(
            st.integers(0, max_size),
            st.sampled_from([0, 1, min(65536, max_size), max_size]),
        )
    )
    body = _random_bytes(draw(st.integers(0, 2**32)), size)
    return piece_header(index, size) + body, [("piece", index, body)]


@st.composite
def digests_msgs(draw: st.DrawFn) -> tuple[bytes, list[Any]]:
    first = draw(st.integers(0, 1 << 20))
    n = draw(st.integers(1, 40))
    digests = [_random_bytes(draw(st.integers(0, 2**32)), 32) for _ in range(n)]
    return b"".join(encode_digests(first, digests)), [Digests(first, digests)]


def keepalive_msgs() -> st.SearchStrategy[tuple[bytes, list[Any]]]:
    return st.just((encode_keepalive(), [KeepAlive()]))


def any_msg(max_piece: int = 200 * 1024) -> st.SearchStrategy[tuple[bytes, list[Any]]]:
    return st.one_of(
        hello_msgs(),
        bitfield_msgs(),
        index_msgs(),
        reject_msgs(),
        error_msgs(),
        piece_msgs(max_piece),
        keepalive_msgs(),
        digests_msgs(),
    )


def streams(
    max_piece: int = 200 * 1024, max_msgs: int = 8
) -> st.SearchStrategy[tuple[bytes, list[Any]]]:
    """A concatenated stream of valid frames and its expected events."""

    def join(msgs: list[tuple[bytes, list[Any]]]) -> tuple[bytes, list[Any]]:
        data = b"".join(m[0] for m in msgs)
        expected = [e for m in msgs for e in m[1]]
        return data, expected

    return st.lists(any_msg(max_piece), max_size=max_msgs).map(join)


# ---------------------------------------------------------------------------
# Helpers


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Cut ``data`` at the given positions (clamped, deduplicated)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


class Collector:
    """Feed chunks into a decoder and normalise its events, checking structure.

    Pieces are reassembled into ``("piece", index, bytes)``; every PieceData
    must be non-empty and lie between a PieceStart and PieceEnd of the same
    index, and a piece's data must add up to PieceStart.length.
    """

    def __init__(self, decoder: FrameDecoder) -> None:
        self.decoder = decoder
        self.out: list[Any] = []
        self.current: tuple[int, int, list[bytes]] | None = None

    def feed(self, chunk: bytes) -> list[Any]:
        events = self.decoder.feed(chunk)
        for ev in events:
            self._take(ev)
        return events

    def _take(self, ev: Any) -> None:
        if isinstance(ev, PieceStart):
            assert self.current is None, "nested PieceStart"
            assert 0 <= ev.length <= self.decoder.max_piece
            self.current = (ev.index, ev.length, [])
        elif isinstance(ev, PieceData):
            assert self.current is not None, "PieceData outside a piece"
            index, length, parts = self.current
            assert ev.index == index
            assert isinstance(ev.data, (memoryview, bytes))
            assert len(ev.data) > 0, "empty PieceData emitted"
            parts.append(bytes(ev.data))
            assert sum(map(len, parts)) <= length
        elif isinstance(ev, PieceEnd):
            assert self.current is not None, "PieceEnd outside a piece"
            index, length, parts = self.current
            assert ev.index == index
            body = b"".join(parts)
            assert len(body) == length
            self.out.append(("piece", index, body))
            self.current = None
        else:
            assert self.current is None, "control event inside a piece"
            assert isinstance(
                ev, (Hello, BitfieldMsg, Have, Request, Cancel, Reject, ErrorMsg, KeepAlive, Digests, HaveMany)
            )
            self.out.append(ev)


def decode(chunks: Sequence[bytes], max_piece: int = MAX_PIECE_SIZE) -> list[Any]:
    """Decode a valid stream fed as ``chunks``; it must end on a boundary."""
    c = Collector(FrameDecoder(max_piece))
    for chunk in chunks:
        c.feed(chunk)
    assert c.current is None
    assert c.decoder.idle
    return c.out


def feed_expecting_only_protocol_errors(chunks: Sequence[bytes]) -> Collector:
    """Feed possibly invalid chunks; only ProtocolError may escape."""
    c = Collector(FrameDecoder(max_piece=300 * 1024))
    for chunk in chunks:
        try:
            c.feed(chunk)
        except ProtocolError as e:
            assert str(e)
            assert c.decoder.dead
            with pytest.raises(ProtocolError):
                c.decoder.feed(b"\x09\x00\x00\x00\x00")
            break
    return c


# ---------------------------------------------------------------------------
# (a) round trips


@settings(max_examples=150, deadline=None)
@given(streams(), st.lists(st.integers(0, 2_000_000), max_size=40))
def test_round_trip_random_cuts(
    stream: tuple[bytes, list[Any]], cuts: list[int]
) -> None:
    """Any valid stream, cut anywhere, decodes to its messages."""
    data, expected = stream
    assert decode(split(data, cuts)) == expected


@settings(max_examples=150, deadline=None)
@given(streams(), st.integers(512, 70_000))
def test_round_trip_fixed_chunks(stream: tuple[bytes, list[Any]], size: int) -> None:
    """Feeding in fixed-size chunks decodes the same as one big feed."""
    data, expected = stream
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    assert decode(chunks) == expected
    assert decode([data]) == expected


@settings(max_examples=60, deadline=None)
@given(streams(max_piece=300, max_msgs=6).filter(lambda s: len(s[0]) < 20_000))
def test_round_trip_one_byte_feeds(stream: tuple[bytes, list[Any]]) -> None:
    """A small stream fed one byte at a time decodes correctly."""
    data, expected = stream
    assert decode([data[i : i + 1] for i in range(len(data))]) == expected


def test_empty_feed() -> None:
    """Feeding nothing yields nothing and keeps the decoder idle."""
    d = FrameDecoder()
    assert d.feed(b"") == []
    assert d.idle
    d.feed(encode_have(1)[:3])
    assert not d.idle
    assert d.feed(b"") == []


def test_zero_length_piece() -> None:
    """A zero-length piece yields PieceStart then PieceEnd, no PieceData."""
    events = FrameDecoder().feed(piece_header(7, 0))
    assert events == [PieceStart(7, 0), PieceEnd(7)]


def test_hello_version_mismatch_is_not_a_decode_error() -> None:
    """The HELLO event carries whatever version was sent."""
    (ev,) = FrameDecoder().feed(encode_hello(TASK, "peer-1", version=99))
    assert ev == Hello(99, TASK, "peer-1")
    assert PROTOCOL_VERSION == 1


def test_bytearray_and_memoryview_input() -> None:
    """feed accepts any bytes-like object."""
    data = encode_have(3) + piece_header(1, 3) + b"abc"
    for chunk in (bytearray(data), memoryview(data)):
        assert decode([chunk]) == [Have(3), ("piece", 1, b"abc")]  # type: ignore[list-item]


def test_wire_format_examples() -> None:
    """Spot-check the byte layout of each encoder."""
    assert encode_have(1) == b"\x03\x00\x00\x00\x04\x00\x00\x00\x01"
    assert encode_request(0x01020304) == b"\x04\x00\x00\x00\x04\x01\x02\x03\x04"
    assert encode_cancel(2) == b"\x05\x00\x00\x00\x04\x00\x00\x00\x02"
    assert encode_reject(2, REJECT_BUSY) == b"\x06\x00\x00\x00\x05\x00\x00\x00\x02\x02"
    assert encode_keepalive() == b"\x09\x00\x00\x00\x00"
    assert encode_error(0x0102, "hi") == b"\x07\x00\x00\x00\x04\x01\x02hi"
    assert piece_header(5, 10) == b"\x08\x00\x00\x00\x0e\x00\x00\x00\x05"
    bm = Bitmap(9)
    bm.set(0)
    bm.set(8)
    assert encode_bitfield(bm) == b"\x02\x00\x00\x00\x06\x00\x00\x00\x09\x80\x80"
    assert encode_bitfield(Bitmap(0)) == b"\x02\x00\x00\x00\x04\x00\x00\x00\x00"
    assert (
        encode_hello(TASK, "ab")
        == b"\x01\x00\x00\x00\x24\x01" + TASK + b"\x02ab"
    )
    assert (REJECT_NOT_HELD, REJECT_BUSY, REJECT_SHUTTING_DOWN) == (1, 2, 3)
    assert MAX_CONTROL_BODY == 4 + (1 << 20) // 8


# ---------------------------------------------------------------------------
# (b) garbage and (c) mutations


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Random bytes, biased towards plausible headers so bodies get parsed."""
    parts = draw(
        st.lists(
            st.one_of(
                st.binary(max_size=64),
                st.tuples(
                    st.integers(0, 12), st.integers(0, 140), st.binary(max_size=140)
                ).map(lambda t: header(t[0], t[1]) + t[2]),
            ),
            max_size=12,
        )
    )
    return b"".join(parts)


@settings(max_examples=300, deadline=None)
@given(garbage(), st.lists(st.integers(0, 2000), max_size=20))
def test_garbage_only_protocol_error(data: bytes, cuts: list[int]) -> None:
    """Random input never raises anything but ProtocolError."""
    feed_expecting_only_protocol_errors(split(data, cuts))


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    """A valid stream with a few bytes flipped, inserted or deleted."""
    data, _ = draw(streams(max_piece=2000, max_msgs=6))
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = draw(st.integers(0, len(buf)))
        byte = draw(st.integers(0, 255))
        if op == "insert":
            buf[pos:pos] = bytes([byte])
        elif buf and pos < len(buf):
            if op == "flip":
                buf[pos] ^= byte or 0x01
            else:
                del buf[pos]
    return bytes(buf)


@settings(max_examples=300, deadline=None)
@given(mutated_streams(), st.lists(st.integers(0, 200_000), max_size=20))
def test_mutated_streams_only_protocol_error(data: bytes, cuts: list[int]) -> None:
    """Corrupted valid streams yield valid events or a ProtocolError."""
    feed_expecting_only_protocol_errors(split(data, cuts))


# ---------------------------------------------------------------------------
# (d) specific rejections


def assert_rejected(data: bytes, match: str, max_piece: int = MAX_PIECE_SIZE) -> None:
    """Feeding ``data`` (in one go) raises a ProtocolError matching ``match``."""
    d = FrameDecoder(max_piece)
    with pytest.raises(ProtocolError, match=match):
        d.feed(data)
    assert d.dead


@pytest.mark.parametrize("ftype", [HELLO, BITFIELD, HAVE, ERROR, KEEPALIVE])
def test_overlong_control_rejected_from_header(ftype: int) -> None:
    """An over-limit control length fails on the 5 header bytes alone."""
    assert_rejected(
        header(ftype, MAX_CONTROL_BODY + 1),
        f"control frame of {MAX_CONTROL_BODY + 1} bytes exceeds limit {MAX_CONTROL_BODY}",
    )
    assert_rejected(header(ftype, 0xFFFFFFFF), "exceeds limit")


def test_overlong_control_rejected_incrementally() -> None:
    """The header may even arrive a byte at a time."""
    d = FrameDecoder()
    data = header(HAVE, 9999999)
    for b in data[:-1]:
        assert d.feed(bytes([b])) == []
    with pytest.raises(ProtocolError, match="9999999 bytes exceeds limit 131076"):
        d.feed(data[-1:])


@pytest.mark.parametrize(
    ("ftype", "length"),
    [
        (HAVE, 3),
        (HAVE, 5),
        (REQUEST, 0),
        (CANCEL, 8),
        (REJECT, 4),
        (REJECT, 6),
        (KEEPALIVE, 1),
        (ERROR, 1),
        (ERROR, 2 + 1025),
        (BITFIELD, 3),
        (HELLO, 34),
        (HELLO, 34 + 65),
    ],
)
def test_bad_control_length_rejected_from_header(ftype: int, length: int) -> None:
    """Impossible body sizes for a type are rejected before the body."""
    assert_rejected(header(ftype, length), frames.FRAME_NAMES[ftype])


@pytest.mark.parametrize("ftype", [0x00, 0x0B, 0x2A, 0xFF])
def test_unknown_type_rejected_from_header(ftype: int) -> None:
    """Unknown frame types fail on the header alone."""
    assert_rejected(header(ftype, 4), f"frame type 0x{ftype:02x} is unknown")


def test_piece_too_large_rejected() -> None:
    """A piece over max_piece is rejected by the time header + index arrive."""
    assert_rejected(piece_header(3, 101), "exceeds limit 100", max_piece=100)
    assert decode([piece_header(3, 100) + bytes(100)], max_piece=100) == [
        ("piece", 3, bytes(100))
    ]
    assert_rejected(header(PIECE, 4 + MAX_PIECE_SIZE + 1), "exceeds limit")


@pytest.mark.parametrize("length", [0, 1, 3])
def test_piece_shorter_than_index_rejected(length: int) -> None:
    """A PIECE frame must at least hold its index."""
    assert_rejected(header(PIECE, length), "too short")


def test_hello_peer_id_length_mismatch() -> None:
    """HELLO's body length must match its peer id length exactly."""
    good = encode_hello(TASK, "abc")
    # Claim a 4-byte peer id in a body holding 3.
    bad = bytearray(good)
    bad[5 + 33] = 4
    assert_rejected(bytes(bad), "HELLO")
    # Claim a 2-byte peer id in a body holding 3.
    bad[5 + 33] = 2
    assert_rejected(bytes(bad), "HELLO")
    # Zero-length peer id.
    body = bytes([1]) + TASK + b"\x00" + b"x"
    assert_rejected(header(HELLO, len(body)) + body, "HELLO")


def test_hello_peer_id_not_utf8() -> None:
    """HELLO peer ids must be utf-8."""
    body = bytes([1]) + TASK + b"\x02\xff\xfe"
    assert_rejected(header(HELLO, len(body)) + body, "utf-8")


def test_error_message_not_utf8() -> None:
    """ERROR messages must decode as utf-8."""
    body = b"\x00\x01" + "é".encode()[:1]
    assert_rejected(header(ERROR, len(body)) + body, "utf-8")


def test_bitfield_spare_bits_and_length() -> None:
    """BITFIELD bodies must match their count and keep spare bits zero."""
    body = struct.pack(">I", 9) + b"\xff\x40"
    assert_rejected(header(BITFIELD, len(body)) + body, "BITFIELD")
    body = struct.pack(">I", 9) + b"\xff"
    assert_rejected(header(BITFIELD, len(body)) + body, "BITFIELD")
    body = struct.pack(">I", MAX_PIECES + 1) + b"\x00"
    assert_rejected(header(BITFIELD, len(body)) + body, "BITFIELD")


def test_dead_after_error() -> None:
    """After a ProtocolError every feed raises, even with valid data."""
    d = FrameDecoder()
    assert d.feed(encode_have(1)) == [Have(1)]
    with pytest.raises(ProtocolError):
        d.feed(header(0x42, 0))
    assert d.dead
    for _ in range(2):
        with pytest.raises(ProtocolError, match="dead"):
            d.feed(encode_have(2))
    with pytest.raises(ProtocolError):
        d.feed(b"")


# ---------------------------------------------------------------------------
# Encoder validation


def test_encoder_validation() -> None:
    """Encoders reject out-of-range arguments with ValueError."""
    for enc in (encode_have, encode_request, encode_cancel):
        enc(0xFFFFFFFF)
        with pytest.raises(ValueError):
            enc(0x1_0000_0000)
        with pytest.raises(ValueError):
            enc(-1)
    with pytest.raises(ValueError):
        encode_reject(-1, 1)
    with pytest.raises(ValueError):
        encode_reject(1, 256)
    with pytest.raises(ValueError):
        piece_header(0x1_0000_0000, 0)
    with pytest.raises(ValueError):
        piece_header(0, -1)
    with pytest.raises(ValueError):
        encode_hello(b"short", "p")
    with pytest.raises(ValueError):
        encode_hello(TASK, "")
    with pytest.raises(ValueError):
        encode_hello(TASK, "x" * 65)
    with pytest.raises(ValueError):
        encode_hello(TASK, "é" * 33)  # 66 utf-8 bytes
    encode_hello(TASK, "x" * 64)
    with pytest.raises(ValueError):
        encode_hello(TASK, "p", version=256)
    with pytest.raises(ValueError):
        encode_error(0x10000, "")
    with pytest.raises(ValueError):
        FrameDecoder(max_piece=-1)


@pytest.mark.parametrize("prefix", ["", "a", "ab", "abc"])
def test_encode_error_truncates_on_utf8_boundary(prefix: str) -> None:
    """Long messages are cut to <= 1024 bytes without splitting a character."""
    message = prefix + "€" * 400  # 3 bytes each
    data = encode_error(9, message)
    (ev,) = FrameDecoder().feed(data)
    assert isinstance(ev, ErrorMsg)
    raw = ev.message.encode()
    assert 1024 - 3 < len(raw) <= 1024
    assert message.startswith(ev.message)


# ---------------------------------------------------------------------------
# (e) no buffering of piece bodies


def test_large_piece_is_streamed_as_slices() -> None:
    """A piece fed in 64 KiB chunks comes out as zero-copy slices, one per feed."""
    size = 3 * 1024 * 1024 + 12345
    body = _random_bytes(1, size)
    data = piece_header(42, size) + body + encode_have(1)
    chunk = 64 * 1024
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    d = FrameDecoder()
    pieces: list[PieceData] = []
    feeds_with_body = 0
    body_start = frames.PIECE_HEADER_SIZE
    body_end = body_start + size
    offset = 0
    tail: list[Any] = []
    for c in chunks:
        if offset + len(c) > body_start and offset < body_end:
            feeds_with_body += 1
        offset += len(c)
        for ev in d.feed(c):
            if isinstance(ev, PieceData):
                assert isinstance(ev.data, memoryview)
                assert ev.data.obj is c, "PieceData must slice the fed buffer"
                pieces.append(ev)
            else:
                tail.append(ev)
    assert len(pieces) == feeds_with_body
    assert sum(len(p.data) for p in pieces) == size
    assert b"".join(bytes(p.data) for p in pieces) == body
    assert tail == [PieceStart(42, size), PieceEnd(42), Have(1)]
    assert d.idle


def test_digests_frame_bounds() -> None:
    """DIGESTS bodies must be 4 + n*32 bytes with 1..4096 digests."""
    assert_rejected(header(frames.DIGESTS, 4 + 31) + bytes(35), "DIGESTS")
    assert_rejected(header(frames.DIGESTS, 4), "DIGESTS")
    many = [bytes([i % 256]) * 32 for i in range(5000)]
    encoded = encode_digests(7, many)
    assert len(encoded) == 2
    events = decode([b"".join(encoded)])
    assert events == [Digests(7, many[:4096]), Digests(7 + 4096, many[4096:])]


# ---------------------------------------------------------------------------
# skip_body: a reader that fills a piece's buffer itself (recv_into)


def decode_skipping(chunks: Sequence[bytes], takes: Iterable[int]) -> list[Any]:
    """
    Decode like a receiver that, inside a piece body, takes up to the next
    of ``takes`` bytes of it itself (then tells the decoder with skip_body)
    before feeding the rest of the chunk.
    """
    decoder = FrameDecoder()
    out: list[Any] = []
    takes = iter(takes)
    body: list[bytes] = []
    start: PieceStart | None = None

    def handle(events: list[Any]) -> None:
        nonlocal start, body
        for ev in events:
            if isinstance(ev, PieceStart):
                start, body = ev, []
            elif isinstance(ev, PieceData):
                body.append(bytes(ev.data))
            elif isinstance(ev, PieceEnd):
                assert start is not None and ev.index == start.index
                joined = b"".join(body)
                assert len(joined) == start.length
                out.append(("piece", ev.index, joined))
                start = None
            else:
                out.append(ev)

    for chunk in chunks:
        pos = 0
        while pos < len(chunk):
            remaining = decoder.body_remaining
            if remaining:
                n = min(next(takes, 0), remaining, len(chunk) - pos)
                if n:
                    body.append(chunk[pos:pos + n])
                    pos += n
                    handle(decoder.skip_body(n))
                    continue
            # feed up to the end of the chunk
            handle(decoder.feed(chunk[pos:]))
            pos = len(chunk)
    assert decoder.idle
    return out


@settings(max_examples=150, deadline=None)
@given(streams(), st.lists(st.integers(0, 300_000), max_size=40), st.lists(st.integers(0, 100_000), max_size=40))
def test_skip_body_gives_the_same_stream(
    stream: tuple[bytes, list[Any]], cuts: list[int], takes: list[int]
) -> None:
    data, expected = stream
    assert decode_skipping(split(data, cuts), takes) == decode([data])


def test_skip_body_outside_a_body_is_refused() -> None:
    d = FrameDecoder()
    with pytest.raises(ValueError):
        d.skip_body(1)
    d.feed(piece_header(3, 10) + b"abc")
    assert d.body_remaining == 7
    with pytest.raises(ValueError):
        d.skip_body(8)
    assert d.skip_body(7) == [PieceEnd(3)]
    assert d.idle

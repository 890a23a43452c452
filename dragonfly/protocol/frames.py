"""Sans-IO framing of the dragonfly peer block protocol.

This module performs no I/O and imports nothing from Twisted: it turns
messages into bytes (the ``encode_*`` functions and :func:`piece_header`) and
bytes into events (:class:`FrameDecoder`).

Wire format
===========

Every frame is::

    type (u8) | length (u32, big-endian) | body (length bytes)

All integers are unsigned big-endian.  Frame types and bodies:

=========  ====  ==========================================================
Name       Type  Body
=========  ====  ==========================================================
HELLO      0x01  version u8 | task_id 32 raw bytes | peer_id_len u8 |
                 peer_id utf-8 (1..64 bytes).  The body length must be
                 exactly ``34 + peer_id_len``.  The version is *not*
                 checked here: the event carries it and the protocol layer
                 decides (it speaks :data:`PROTOCOL_VERSION` ..
                 :data:`MAX_PROTOCOL_VERSION`).
BITFIELD   0x02  count u32 (``<= MAX_PIECES``) | ``ceil(count / 8)`` bytes
                 of MSB-first bits (bit 7 of byte 0 is piece 0); spare bits
                 past ``count`` must be zero.
HAVE       0x03  index u32 (body exactly 4 bytes)
REQUEST    0x04  index u32 (body exactly 4 bytes)
CANCEL     0x05  index u32 (body exactly 4 bytes)
REJECT     0x06  index u32 | reason u8 (see ``REJECT_*``)
ERROR      0x07  code u16 | message utf-8 (0..1024 bytes)
PIECE      0x08  index u32 | piece data (``length - 4`` bytes, at most the
                 decoder's ``max_piece``, :data:`MAX_PIECE_SIZE` by default)
KEEPALIVE  0x09  empty
DIGESTS    0x0A  first index u32 | n x 32-byte SHA-256 (1..4096 digests),
                 the digests of pieces first..first+n-1.  Sent by the seed
                 (the SuperNode) only; peers accept it from the seed only.
HAVE_MANY  0x0C  n x index u32 (1..:data:`MAX_HAVES_PER_FRAME`): several
                 HAVEs in one frame; the body length must be a multiple of
                 4.  Version 2 only: sent to a peer whose HELLO said 2.
=========  ====  ==========================================================

Limits enforced by the decoder from the 5-byte header alone, before any
body byte is buffered: the type must be known, a non-PIECE body may not
exceed :data:`MAX_CONTROL_BODY` (enough for the largest bitfield) and must be
of a size valid for its type, and a PIECE length must lie in
``4 .. 4 + max_piece``.

Piece bodies are never buffered: :class:`FrameDecoder` hands them out as
:class:`PieceData` events holding zero-copy slices of the fed data, bracketed
by :class:`PieceStart` and :class:`PieceEnd`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from attrs import frozen

from dragonfly.core.bitmap import Bitmap

__all__ = [
    "PROTOCOL_VERSION",
    "HELLO",
    "BITFIELD",
    "HAVE",
    "REQUEST",
    "CANCEL",
    "REJECT",
    "ERROR",
    "PIECE",
    "KEEPALIVE",
    "FRAME_NAMES",
    "REJECT_NOT_HELD",
    "REJECT_BUSY",
    "REJECT_SHUTTING_DOWN",
    "TASK_ID_LENGTH",
    "MAX_PEER_ID_LENGTH",
    "MAX_ERROR_MESSAGE",
    "MAX_PIECES",
    "MAX_PIECE_SIZE",
    "MAX_CONTROL_BODY",
    "HEADER_SIZE",
    "PIECE_HEADER_SIZE",
    "ProtocolError",
    "Hello",
    "BitfieldMsg",
    "Have",
    "Request",
    "Cancel",
    "Reject",
    "ErrorMsg",
    "PieceStart",
    "PieceData",
    "PieceEnd",
    "KeepAlive",
    "Event",
    "FrameDecoder",
    "encode_hello",
    "encode_bitfield",
    "encode_have",
    "encode_request",
    "encode_cancel",
    "encode_reject",
    "encode_error",
    "encode_keepalive",
    "piece_header",
    "Digests",
    "encode_digests",
    "DIGESTS",
    "HAVE_MANY",
    "HAVE_MANY_VERSION",
    "MAX_PROTOCOL_VERSION",
    "MAX_HAVES_PER_FRAME",
    "HaveMany",
    "encode_have_many",
]

#: The base version byte of HELLO (what :func:`encode_hello` sends by default).
PROTOCOL_VERSION = 1
#: The version that adds HAVE_MANY: a peer whose HELLO says less is sent none.
HAVE_MANY_VERSION = 2
#: The highest version spoken here.
MAX_PROTOCOL_VERSION = 2

# Frame types.
HELLO = 0x01
BITFIELD = 0x02
HAVE = 0x03
REQUEST = 0x04
CANCEL = 0x05
REJECT = 0x06
ERROR = 0x07
PIECE = 0x08
KEEPALIVE = 0x09
DIGESTS = 0x0A
HAVE_MANY = 0x0C

#: Human-readable frame type names, for messages and logs.
FRAME_NAMES: dict[int, str] = {
    HELLO: "HELLO",
    BITFIELD: "BITFIELD",
    HAVE: "HAVE",
    REQUEST: "REQUEST",
    CANCEL: "CANCEL",
    REJECT: "REJECT",
    ERROR: "ERROR",
    PIECE: "PIECE",
    KEEPALIVE: "KEEPALIVE",
    DIGESTS: "DIGESTS",
    HAVE_MANY: "HAVE_MANY",
}

# REJECT reasons.  Only NOT_HELD is sent today; BUSY and SHUTTING_DOWN are
# reserved on the wire (a receiver treats every reason alike: ask elsewhere).
REJECT_NOT_HELD = 1
REJECT_BUSY = 2
REJECT_SHUTTING_DOWN = 3

#: Length of a raw task id in HELLO.
TASK_ID_LENGTH = 32
#: Largest peer id in HELLO, in utf-8 bytes.
MAX_PEER_ID_LENGTH = 64
#: Largest ERROR message, in utf-8 bytes.
MAX_ERROR_MESSAGE = 1024
#: Largest piece count in a BITFIELD.
MAX_PIECES = 1 << 20
#: Default largest piece body accepted by the decoder.
MAX_PIECE_SIZE = 64 * 1024 * 1024
#: Largest body of any non-PIECE frame: a bitfield of MAX_PIECES pieces.
MAX_CONTROL_BODY = 4 + (MAX_PIECES + 7) // 8

#: Length of a piece digest (SHA-256) in DIGESTS.
DIGEST_LENGTH = 32
#: Most digests in one DIGESTS frame.
MAX_DIGESTS_PER_FRAME = 4096
#: Most indexes in one HAVE_MANY frame.
MAX_HAVES_PER_FRAME = 1024

_U32_MAX = 0xFFFFFFFF

_HEADER = struct.Struct(">BI")
_HEADER_INDEX = struct.Struct(">BII")
_U32 = struct.Struct(">I")
_INDEX_REASON = struct.Struct(">IB")
_HEADER_INDEX_REASON = struct.Struct(">BIIB")
_U16 = struct.Struct(">H")
_HELLO_FIXED = struct.Struct(">B32sB")

#: Size of a frame header.
HEADER_SIZE = _HEADER.size
#: Size of a PIECE frame header plus its index (what :func:`piece_header` returns).
PIECE_HEADER_SIZE = _HEADER_INDEX.size

_HELLO_MIN = _HELLO_FIXED.size + 1
_HELLO_MAX = _HELLO_FIXED.size + MAX_PEER_ID_LENGTH

# Allowed (min, max) body lengths of control frames, indexed by type.
_CONTROL_LIMITS: dict[int, tuple[int, int]] = {
    HELLO: (_HELLO_MIN, _HELLO_MAX),
    BITFIELD: (4, MAX_CONTROL_BODY),
    HAVE: (4, 4),
    REQUEST: (4, 4),
    CANCEL: (4, 4),
    REJECT: (5, 5),
    ERROR: (2, 2 + MAX_ERROR_MESSAGE),
    KEEPALIVE: (0, 0),
    DIGESTS: (4 + DIGEST_LENGTH, 4 + MAX_DIGESTS_PER_FRAME * DIGEST_LENGTH),
    HAVE_MANY: (4, 4 * MAX_HAVES_PER_FRAME),
}


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame stream."""


# ---------------------------------------------------------------------------
# Events


@frozen
class Hello:
    """HELLO: the peer's protocol version, task and identity."""

    version: int
    task_id: bytes
    peer_id: str


@frozen
class BitfieldMsg:
    """BITFIELD: the set of pieces the peer holds."""

    bitmap: Bitmap


@frozen
class Have:
    """HAVE: the peer now holds piece ``index``."""

    index: int


@frozen
class HaveMany:
    """HAVE_MANY: the peer now holds these pieces (in the order sent)."""

    indexes: tuple[int, ...]


@frozen
class Request:
    """REQUEST: the peer asks for piece ``index``."""

    index: int


@frozen
class Cancel:
    """CANCEL: the peer withdraws its request for piece ``index``."""

    index: int


@frozen
class Reject:
    """REJECT: the peer will not serve piece ``index`` (``REJECT_*`` reason)."""

    index: int
    reason: int


@frozen
class ErrorMsg:
    """ERROR: the peer reports a fatal error before closing."""

    code: int
    message: str


@frozen
class PieceStart:
    """Start of a PIECE frame carrying ``length`` data bytes."""

    index: int
    length: int


@frozen
class PieceData:
    """A chunk of a piece body (never empty).

    ``data`` is usually a memoryview slice of the buffer passed to
    :meth:`FrameDecoder.feed`; consume or copy it before mutating that
    buffer.
    """

    index: int
    data: memoryview | bytes


@frozen
class PieceEnd:
    """End of the PIECE frame for piece ``index``."""

    index: int


@frozen
class KeepAlive:
    """KEEPALIVE: no payload."""


@frozen
class Digests:
    """DIGESTS (seed only): the SHA-256 of pieces C{first}, C{first + 1}, ..."""

    first: int
    digests: list[bytes]


Event = (
    Hello | BitfieldMsg | Have | Request | Cancel | Reject | ErrorMsg | PieceStart | PieceData | PieceEnd
    | KeepAlive | Digests | HaveMany
)

_KEEPALIVE_EVENT = KeepAlive()


def encode_digests(first: int, digests: list[bytes]) -> list[bytes]:
    """DIGESTS frames for C{digests} of pieces C{first}...; several when many."""
    frames = []
    for start in range(0, len(digests), MAX_DIGESTS_PER_FRAME):
        chunk = digests[start : start + MAX_DIGESTS_PER_FRAME]
        index = first + start
        _check_index(index + len(chunk) - 1)
        if any(len(d) != DIGEST_LENGTH for d in chunk):
            raise ValueError(f"digests must be {DIGEST_LENGTH} bytes each")
        body_len = 4 + DIGEST_LENGTH * len(chunk)
        frames.append(_HEADER.pack(DIGESTS, body_len) + _U32.pack(index) + b"".join(chunk))
    return frames


# ---------------------------------------------------------------------------
# Decoder

# Decoder states.
_S_HEADER = 0  # buffering a 5-byte header
_S_INDEX = 1  # buffering the 4-byte index of a PIECE frame
_S_CONTROL = 2  # buffering a control frame body
_S_BODY = 3  # streaming a piece body out


def _decode_control(ftype: int, body: bytes | bytearray | memoryview) -> Event:
    """Decode a complete control frame body, whose length is pre-checked."""
    if ftype == HAVE:
        return Have(_U32.unpack(body)[0])
    if ftype == HAVE_MANY:
        return HaveMany(struct.unpack(f">{len(body) >> 2}I", body))
    if ftype == REQUEST:
        return Request(_U32.unpack(body)[0])
    if ftype == CANCEL:
        return Cancel(_U32.unpack(body)[0])
    if ftype == KEEPALIVE:
        return _KEEPALIVE_EVENT
    if ftype == REJECT:
        index, reason = _INDEX_REASON.unpack(body)
        return Reject(index, reason)
    if ftype == BITFIELD:
        (count,) = _U32.unpack_from(body, 0)
        if count > MAX_PIECES:
            raise ProtocolError(
                f"BITFIELD of {count} pieces exceeds limit {MAX_PIECES}"
            )
        expected = 4 + ((count + 7) >> 3)
        if len(body) != expected:
            raise ProtocolError(
                f"BITFIELD of {count} pieces needs a {expected}-byte body,"
                f" got {len(body)}"
            )
        try:
            bitmap = Bitmap.from_bytes(count, body[4:])
        except ValueError as e:
            raise ProtocolError(f"BITFIELD is invalid: {e}") from None
        return BitfieldMsg(bitmap)
    if ftype == HELLO:
        version, task_id, plen = _HELLO_FIXED.unpack_from(body, 0)
        if not 1 <= plen <= MAX_PEER_ID_LENGTH:
            raise ProtocolError(
                f"HELLO peer id length {plen} is outside 1..{MAX_PEER_ID_LENGTH}"
            )
        if len(body) != _HELLO_FIXED.size + plen:
            raise ProtocolError(
                f"HELLO body of {len(body)} bytes does not match peer id"
                f" length {plen} (expected {_HELLO_FIXED.size + plen})"
            )
        try:
            peer_id = str(body[_HELLO_FIXED.size :], "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("HELLO peer id is not valid utf-8") from None
        return Hello(version, task_id, peer_id)
    if ftype == DIGESTS:
        (first,) = _U32.unpack_from(body, 0)
        if (len(body) - 4) % DIGEST_LENGTH:
            raise ProtocolError(
                f"DIGESTS body of {len(body)} bytes is not 4 + n*{DIGEST_LENGTH}"
            )
        n = (len(body) - 4) // DIGEST_LENGTH
        if first + n - 1 > _U32_MAX:
            raise ProtocolError(f"DIGESTS for pieces {first}.. runs past the last index")
        raw = bytes(body[4:])
        return Digests(first, [raw[k : k + DIGEST_LENGTH] for k in range(0, len(raw), DIGEST_LENGTH)])
    if ftype == ERROR:
        (code,) = _U16.unpack_from(body, 0)
        try:
            message = str(body[2:], "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("ERROR message is not valid utf-8") from None
        return ErrorMsg(code, message)
    raise AssertionError(f"unhandled control frame type {ftype}")  # pragma: no cover


class FrameDecoder:
    """Incremental decoder: feed it bytes, get events back.

    Only frame headers, piece indices and (small) control bodies are
    buffered; piece bodies are emitted as :class:`PieceData` slices of the
    fed data as they arrive.  After a :class:`ProtocolError` the decoder is
    dead and every further :meth:`feed` raises :class:`ProtocolError`.
    """

    __slots__ = (
        "max_piece",
        "_state",
        "_buf",
        "_need",
        "_type",
        "_index",
        "_remaining",
        "_error",
    )

    def __init__(self, max_piece: int = MAX_PIECE_SIZE) -> None:
        """Create a decoder accepting piece bodies of at most ``max_piece`` bytes."""
        if not 0 <= max_piece <= _U32_MAX - 4:
            raise ValueError(f"max_piece {max_piece} is outside 0..{_U32_MAX - 4}")
        self.max_piece = max_piece
        self._state = _S_HEADER
        self._buf = bytearray()
        self._need = HEADER_SIZE
        self._type = 0
        self._index = 0
        self._remaining = 0
        self._error: ProtocolError | None = None

    @property
    def dead(self) -> bool:
        """True once a protocol error has been raised."""
        return self._error is not None

    @property
    def body_remaining(self) -> int:
        """Bytes of the current piece body still to come (0 outside a piece body)."""
        return self._remaining if self._state == _S_BODY else 0

    @property
    def idle(self) -> bool:
        """True when no partial frame is pending (a clean place to stop)."""
        return self._state == _S_HEADER and not self._buf

    def skip_body(self, n: int) -> list[Event]:
        """The caller put the next ``n`` bytes of the current piece body where
        they belong itself (read straight from a socket into the piece's
        buffer): account for them, and return :class:`PieceEnd` when they
        end the body."""
        if self._error is not None or self._state != _S_BODY or not 0 < n <= self._remaining:
            raise ValueError(f"{n} bytes are not part of the current piece body")
        self._remaining -= n
        if self._remaining:
            return []
        self._state = _S_HEADER
        self._need = HEADER_SIZE
        return [PieceEnd(self._index)]

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Consume ``data`` and return the events it completes.

        Raises :class:`ProtocolError` on malformed input; the decoder is
        then unusable.
        """
        if self._error is not None:
            raise ProtocolError(f"decoder is dead after an earlier error: {self._error}")
        try:
            return self._feed(data)
        except ProtocolError as e:
            self._error = e
            raise
        except (ValueError, struct.error) as e:  # pragma: no cover - defensive
            err = ProtocolError(f"malformed frame: {e}")
            self._error = err
            raise err from None

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        events: list[Event] = []
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        n = len(mv)
        pos = 0
        append = events.append
        while pos < n:
            if self._state == _S_BODY:
                # Hot path: hand out a slice of the caller's buffer.
                remaining = self._remaining
                avail = n - pos
                if avail < remaining:
                    append(PieceData(self._index, mv[pos:]))
                    self._remaining = remaining - avail
                    break
                append(PieceData(self._index, mv[pos : pos + remaining]))
                pos += remaining
                append(PieceEnd(self._index))
                self._state = _S_HEADER
                self._need = HEADER_SIZE
                continue

            # Buffered states: header, piece index, control body.
            need = self._need
            buf = self._buf
            if not buf and n - pos >= need:
                chunk: bytes | bytearray | memoryview = mv[pos : pos + need]
                pos += need
            else:
                take = min(need - len(buf), n - pos)
                buf += mv[pos : pos + take]
                pos += take
                if len(buf) < need:
                    break
                chunk = bytes(buf)
                buf.clear()

            state = self._state
            if state == _S_HEADER:
                ftype, length = _HEADER.unpack(chunk)
                self._start_frame(ftype, length, append)
            elif state == _S_INDEX:
                (index,) = _U32.unpack(chunk)
                self._index = index
                append(PieceStart(index, self._remaining))
                if self._remaining:
                    self._state = _S_BODY
                else:
                    append(PieceEnd(index))
                    self._state = _S_HEADER
                    self._need = HEADER_SIZE
            else:
                append(_decode_control(self._type, chunk))
                self._state = _S_HEADER
                self._need = HEADER_SIZE
        return events

    def _start_frame(
        self, ftype: int, length: int, append: Callable[[Event], None]
    ) -> None:
        """Validate a header and enter the state for its body."""
        if ftype == PIECE:
            if length < 4:
                raise ProtocolError(
                    f"PIECE frame of {length} bytes is too short for its index"
                )
            size = length - 4
            if size > self.max_piece:
                raise ProtocolError(
                    f"PIECE of {size} bytes exceeds limit {self.max_piece}"
                )
            self._remaining = size
            self._state = _S_INDEX
            self._need = 4
            return
        limits = _CONTROL_LIMITS.get(ftype)
        if limits is None:
            raise ProtocolError(f"frame type 0x{ftype:02x} is unknown")
        if length > MAX_CONTROL_BODY:
            raise ProtocolError(
                f"control frame of {length} bytes exceeds limit {MAX_CONTROL_BODY}"
            )
        lo, hi = limits
        if ftype == HAVE_MANY and length % 4:
            raise ProtocolError(f"HAVE_MANY frame body of {length} bytes is not a multiple of 4")
        if not lo <= length <= hi:
            name = FRAME_NAMES[ftype]
            if lo == hi:
                raise ProtocolError(
                    f"{name} frame body must be {lo} bytes, got {length}"
                )
            raise ProtocolError(
                f"{name} frame body of {length} bytes is outside {lo}..{hi}"
            )
        if length == 0:
            append(_decode_control(ftype, b""))
            self._need = HEADER_SIZE
            return
        self._type = ftype
        self._state = _S_CONTROL
        self._need = length


# ---------------------------------------------------------------------------
# Encoders


def _check_index(index: int) -> None:
    if not 0 <= index <= _U32_MAX:
        raise ValueError(f"piece index {index} is outside 0..{_U32_MAX}")


def encode_hello(
    task_id: bytes, peer_id: str, version: int = PROTOCOL_VERSION
) -> bytes:
    """Encode a HELLO frame."""
    if len(task_id) != TASK_ID_LENGTH:
        raise ValueError(
            f"task id must be {TASK_ID_LENGTH} bytes, got {len(task_id)}"
        )
    if not 0 <= version <= 0xFF:
        raise ValueError(f"version {version} is outside 0..255")
    pid = peer_id.encode("utf-8")
    if not 1 <= len(pid) <= MAX_PEER_ID_LENGTH:
        raise ValueError(
            f"peer id of {len(pid)} utf-8 bytes is outside 1..{MAX_PEER_ID_LENGTH}"
        )
    body_len = _HELLO_FIXED.size + len(pid)
    return (
        _HEADER.pack(HELLO, body_len)
        + _HELLO_FIXED.pack(version, bytes(task_id), len(pid))
        + pid
    )


def encode_bitfield(bitmap: Bitmap) -> bytes:
    """Encode a BITFIELD frame describing ``bitmap``."""
    bits = bitmap.to_bytes()
    return _HEADER_INDEX.pack(BITFIELD, 4 + len(bits), bitmap.count) + bits


def encode_have(index: int) -> bytes:
    """Encode a HAVE frame."""
    _check_index(index)
    return _HEADER_INDEX.pack(HAVE, 4, index)


def encode_have_many(indexes: list[int]) -> list[bytes]:
    """Encode HAVE_MANY frames for C{indexes} (several when more than L{MAX_HAVES_PER_FRAME})."""
    frames = []
    for start in range(0, len(indexes), MAX_HAVES_PER_FRAME):
        chunk = indexes[start : start + MAX_HAVES_PER_FRAME]
        for index in chunk:
            _check_index(index)
        frames.append(_HEADER.pack(HAVE_MANY, 4 * len(chunk)) + struct.pack(f">{len(chunk)}I", *chunk))
    return frames


def encode_request(index: int) -> bytes:
    """Encode a REQUEST frame."""
    _check_index(index)
    return _HEADER_INDEX.pack(REQUEST, 4, index)


def encode_cancel(index: int) -> bytes:
    """Encode a CANCEL frame."""
    _check_index(index)
    return _HEADER_INDEX.pack(CANCEL, 4, index)


def encode_reject(index: int, reason: int) -> bytes:
    """Encode a REJECT frame with a ``REJECT_*`` reason."""
    _check_index(index)
    if not 0 <= reason <= 0xFF:
        raise ValueError(f"reject reason {reason} is outside 0..255")
    return _HEADER_INDEX_REASON.pack(REJECT, 5, index, reason)


def encode_error(code: int, message: str) -> bytes:
    """Encode an ERROR frame; ``message`` is truncated to 1024 utf-8 bytes."""
    if not 0 <= code <= 0xFFFF:
        raise ValueError(f"error code {code} is outside 0..65535")
    msg = message.encode("utf-8")
    if len(msg) > MAX_ERROR_MESSAGE:
        # Cut, then drop any partial trailing character.
        msg = msg[:MAX_ERROR_MESSAGE].decode("utf-8", "ignore").encode("utf-8")
    return _HEADER.pack(ERROR, 2 + len(msg)) + _U16.pack(code) + msg


_KEEPALIVE_FRAME = _HEADER.pack(KEEPALIVE, 0)


def encode_keepalive() -> bytes:
    """Encode a KEEPALIVE frame."""
    return _KEEPALIVE_FRAME


def piece_header(index: int, data_length: int) -> bytes:
    """Return the header and index of a PIECE frame with ``data_length`` bytes.

    Send the piece as ``transport.writeSequence([piece_header(i, len(data)),
    data])``.
    """
    _check_index(index)
    if not 0 <= data_length <= _U32_MAX - 4:
        raise ValueError(
            f"piece data length {data_length} is outside 0..{_U32_MAX - 4}"
        )
    return _HEADER_INDEX.pack(PIECE, 4 + data_length, index)

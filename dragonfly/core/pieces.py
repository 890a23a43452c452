"""
Piece maths: how a task of a given length is cut into pieces.

The default follows Dragonfly 1.x: 4 MiB pieces for files up to 200 MiB, then
1 MiB more for every further full 100 MiB, capped at 15 MiB.  A SuperNode may be
configured with a fixed piece size instead (see C{supernode --piece-size}).
"""

from __future__ import annotations

MiB = 1 << 20
DEFAULT_PIECE_SIZE = 4 * MiB
MAX_PIECE_SIZE = 15 * MiB
MIN_PIECE_SIZE = 64 * 1024


def piece_size_for(length: int | None) -> int:
    """
    The Dragonfly piece size for a file of C{length} bytes (C{None} when the
    origin did not say).
    """
    if length is None or length <= 200 * MiB:
        return DEFAULT_PIECE_SIZE
    # Dragonfly 1.x: (length // 100 MiB - 2) MiB on top of the default
    extra = length // (100 * MiB) - 2
    return min(DEFAULT_PIECE_SIZE + extra * MiB, MAX_PIECE_SIZE)


def piece_count(length: int, piece_size: int) -> int:
    """How many pieces a file of C{length} bytes has: zero for an empty file."""
    if length < 0 or piece_size <= 0:
        raise ValueError(f"bad length {length} or piece size {piece_size}")
    return -(-length // piece_size)


def piece_span(index: int, length: int, piece_size: int) -> tuple[int, int]:
    """The C{(offset, size)} of piece C{index}; the last piece may be short."""
    count = piece_count(length, piece_size)
    if not 0 <= index < count:
        raise IndexError(f"piece {index} out of range 0..{count - 1}")
    offset = index * piece_size
    return offset, min(piece_size, length - offset)

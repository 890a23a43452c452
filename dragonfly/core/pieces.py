"""
Piece maths: how a task of a given length is cut into pieces.

Two rules, chosen with C{supernode --piece-size}:

  - C{auto} (the default, L{swarm_piece_size}): about 128 pieces per file,
    a power of two from 1 MiB up to 15 MiB.  Measured on emulated hosts
    (docs/benchmarks.md): a piece can be passed on only once it is whole, so
    smaller pieces spread sooner; below 1 MiB the per-piece costs (requests,
    HAVEs, hashing calls, syncs) start to show.
  - C{dragonfly} (L{dragonfly_piece_size}): Dragonfly 1.x's rule, 4 MiB for
    files up to 200 MiB, then 1 MiB more for every further full 100 MiB,
    capped at 15 MiB.

or a fixed size.
"""

from __future__ import annotations

MiB = 1 << 20
DEFAULT_PIECE_SIZE = 4 * MiB
MAX_PIECE_SIZE = 15 * MiB
MIN_PIECE_SIZE = 64 * 1024


#: pieces per file the C{auto} rule aims at
TARGET_PIECES = 128
AUTO_MIN_PIECE = 1 * MiB


def swarm_piece_size(length: int | None, target: int = TARGET_PIECES) -> int:
    """
    The C{auto} piece size for a file of C{length} bytes (C{None} when the
    origin did not say): the power of two nearest above C{length / target}
    (C{target}: L{TARGET_PIECES}, 128), within 1 MiB .. 15 MiB.
    """
    if length is None:
        return DEFAULT_PIECE_SIZE
    if target < 1:
        raise ValueError(f"target pieces {target} is not 1 or more")
    want = max(-(-length // target), 1)
    size = 1 << (want - 1).bit_length()
    return max(AUTO_MIN_PIECE, min(size, MAX_PIECE_SIZE))


def dragonfly_piece_size(length: int | None) -> int:
    """
    Dragonfly 1.x's piece size for a file of C{length} bytes (C{None} when
    the origin did not say).
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

"""
Pieces a download wants first, fetched from the origin out of order: the
pure half of the CDN's side fetches (no I/O; L{dragonfly.supernode.cdn}
does the rest).

A registration may carry the byte range its client asked for (a dfdaemon
answering a C{Range} request): one RFC 9110 byte range, C{bytes=a-b},
C{bytes=a-} or C{bytes=-n}.  Once the origin's length is known the CDN maps
it to the pieces covering it (L{wanted_pieces}).  Those the in-order fetch
will reach soon (within a lookahead of its position) or has stored already
are left to it; for the rest (L{side_plan}) a second origin request asks
for exactly their bytes, C{Range: bytes=s-e} pinned with C{If-Range} to the
validator the main fetch saw (L{side_headers}).  Only a 206 for exactly
those bytes of the same length and validators is taken (L{side_ok}); any
other answer (a 200: the origin ignores ranges or the file changed) drops
the side fetch and the main fetch serves the range as it would have.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any

from ..core.ranges import ByteRange, parse_content_range
from .resume import if_range_value

#: the main fetch is left to serve pieces it will reach within this many bytes
LOOKAHEAD = 16 << 20


def wanted_pieces(spec: ByteRange, length: int, piece_size: int) -> tuple[int, int] | None:
    """The pieces C{[first, end)} holding the bytes C{spec} names in a file of C{length}; None: none."""
    span = spec.resolve(length)
    if span is None:
        return None
    start, end = span
    return start // piece_size, -(-end // piece_size)


def piece_bytes(first: int, end: int, length: int, piece_size: int) -> tuple[int, int]:
    """The bytes C{[start, end)} of pieces C{[first, end)}."""
    return first * piece_size, min(end * piece_size, length)


def side_plan(
    wanted: tuple[int, int],
    piece_size: int,
    reach: int,
    taken: Container[int],
    lookahead: int = LOOKAHEAD,
) -> tuple[int, int] | None:
    """
    The pieces C{[first, end)} of C{wanted} a side fetch should ask for, or
    None: the main fetch (at byte C{reach}) gets to the rest within
    C{lookahead} bytes, or they are in C{taken} (stored, or asked for by
    another side fetch).  Pieces are trimmed from both ends only, so one
    request covers the rest.
    """
    first, end = wanted
    horizon = reach + lookahead
    while first < end and (first in taken or first * piece_size < horizon):
        first += 1
    while end > first and (end - 1) in taken:
        end -= 1
    return (first, end) if first < end else None


def side_headers(validators: Mapping[str, Any], start: int, end: int) -> dict[str, str] | None:
    """The headers of a side fetch of bytes C{[start, end)}; None without a validator that pins the version."""
    length = validators.get("length")
    if not isinstance(length, int) or isinstance(length, bool) or not 0 <= start < end <= length:
        return None
    pin = if_range_value(validators)
    if pin is None:
        return None
    return {"Range": f"bytes={start}-{end - 1}", "If-Range": pin}


def side_ok(
    start: int,
    end: int,
    stored: Mapping[str, Any],
    status: int,
    content_range: str | bytes | None,
    answered: Mapping[str, Any],
) -> bool:
    """Whether the origin's answer to a side fetch is bytes C{[start, end)} of the version the main fetch has."""
    if status != 206:
        return False
    rng = parse_content_range(content_range)
    if rng is None or (rng.first, rng.last + 1, rng.total) != (start, end, stored.get("length")):
        return False
    for key in ("etag", "lastModified"):
        if answered.get(key) is not None and answered.get(key) != stored.get(key):
            return False
    return True

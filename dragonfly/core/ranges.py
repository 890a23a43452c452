"""
HTTP C{Range} request headers (RFC 9110 section 14), sans-IO.

Only what dfdaemon and the dfpeer's content stream need: one byte range.

  - no header, or a unit other than C{bytes}: C{None} (serve the whole body);
  - several ranges in one header: L{MULTIPLE} (the whole body with 200, which
    RFC 9110 14.2 allows: a server MAY ignore Range);
  - one range: a L{ByteRange}, resolved against the length once it is known
    (L{ByteRange.resolve} returns None when it cannot be satisfied: 416);
  - anything else after C{bytes=} (no digits, last < first, junk): L{BadRange},
    answered 416 too.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from attrs import frozen

#: the most digits a position may have (a 2**63 file is 19 digits)
MAX_DIGITS = 19
_SPEC = re.compile(rf"(\d{{1,{MAX_DIGITS}}})-(\d{{1,{MAX_DIGITS}}})?|-(\d{{1,{MAX_DIGITS}}})")


class BadRange(ValueError):
    """A C{bytes=} Range header that does not parse (RFC 9110: answer 416)."""


@frozen
class ByteRange:
    """C{first-last} (last None: to the end) or, with C{suffix}, the last C{suffix} bytes."""

    first: int | None = None
    last: int | None = None
    suffix: int | None = None

    def resolve(self, length: int) -> tuple[int, int] | None:
        """C{(start, end)} (end exclusive) within a body of C{length} bytes, or None: unsatisfiable."""
        if self.suffix is not None:
            if self.suffix == 0 or length == 0:
                return None
            return max(0, length - self.suffix), length
        assert self.first is not None
        if self.first >= length:
            return None
        last = length - 1 if self.last is None else min(self.last, length - 1)
        return self.first, last + 1

    def header(self) -> str:
        """This range as a Range header value."""
        if self.suffix is not None:
            return f"bytes=-{self.suffix}"
        return f"bytes={self.first}-{'' if self.last is None else self.last}"


#: several ranges in one header: served as the whole body
MULTIPLE = object()


def parse_range(value: str | bytes | None) -> ByteRange | object | None:
    """The Range header C{value}: None, L{MULTIPLE} or a L{ByteRange}; raises L{BadRange}."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    unit, sep, rest = value.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None  # another unit (or none): ignored, the whole body
    specs = [s.strip() for s in rest.split(",")]
    specs = [s for s in specs if s]  # RFC 9110's #rule allows empty list elements
    if not specs:
        raise BadRange(f"no range in {value!r}")
    parsed = []
    for spec in specs:
        m = _SPEC.fullmatch(spec)
        if m is None:
            raise BadRange(f"bad byte range {spec!r}")
        if m.group(3) is not None:
            parsed.append(ByteRange(suffix=int(m.group(3))))
        else:
            first = int(m.group(1))
            last = None if m.group(2) is None else int(m.group(2))
            if last is not None and last < first:
                raise BadRange(f"byte range {spec!r} ends before it starts")
            parsed.append(ByteRange(first=first, last=last))
    if len(parsed) > 1:
        return MULTIPLE
    return parsed[0]


def content_range(start: int, end: int, length: int) -> str:
    """The Content-Range of bytes C{start}..C{end} (exclusive) of C{length}."""
    return f"bytes {start}-{end - 1}/{length}"


class ContentRange(NamedTuple):
    """A C{Content-Range: bytes first-last/total} (total None for C{*})."""

    first: int
    last: int
    total: int | None


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d{1,19})-(\d{1,19})/(\d{1,19}|\*)\s*$", re.IGNORECASE)


def parse_content_range(value: str | bytes | None) -> ContentRange | None:
    """C{bytes first-last/total} (total may be C{*}), or None when it is not that."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    m = _CONTENT_RANGE.match(value)
    if m is None:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < first or (total is not None and last >= total):
        return None
    return ContentRange(first, last, total)

"""
Whether and how an origin fetch goes on from bytes already on disk: the
C{Range}/C{If-Range} request and the judgement of the origin's answer, as
pure functions (no I/O; the CDN does the rest).

A fetch resumes only with a validator that pins the bytes on disk: a strong
C{ETag}, else C{Last-Modified} (RFC 9110 13.1.5: a weak tag never goes in
C{If-Range}), and a known length.  The origin then answers

  - 206 with C{Content-Range: bytes N-(L-1)/L} for the same length and
    validators: the rest of the same version; go on from N;
  - 200: it ignores ranges, or the validator changed: a new version, taken
    from byte 0 from the response in hand (as a fetch without a resume);
  - 416, or a 206 for some other range, length or validator: the bytes on
    disk cannot be completed; drop them and fetch again from byte 0;
  - anything else: the fetch fails as any fetch would, and the bytes on disk
    wait for the next try.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from ..core.ranges import ContentRange as ContentRange
from ..core.ranges import parse_content_range as parse_content_range


class Verdict(enum.Enum):
    CONTINUE = "continue"  # a 206 for the rest of the same version
    FROM_ZERO = "from-zero"  # a 200: the whole body of the (maybe new) version is in hand
    REFETCH = "refetch"  # unusable: drop the stored bytes and ask again without a range
    FAIL = "fail"  # an error status: fail the fetch, keep the stored bytes


def if_range_value(validators: Mapping[str, Any]) -> str | None:
    """The C{If-Range} value that pins C{validators}: a strong ETag, else Last-Modified."""
    etag = validators.get("etag")
    if isinstance(etag, str) and etag.startswith('"') and etag.endswith('"') and len(etag) >= 2:
        return etag
    modified = validators.get("lastModified")
    if isinstance(modified, str) and modified:
        return modified
    return None


def resume_headers(validators: Mapping[str, Any], offset: int) -> dict[str, str] | None:
    """
    The headers that ask for the rest of a body from C{offset}, or None when
    a resume is not possible (nothing stored, no length, no validator, or
    the whole body is stored already).
    """
    length = validators.get("length")
    if not isinstance(length, int) or isinstance(length, bool) or not 0 < offset < length:
        return None
    pin = if_range_value(validators)
    if pin is None:
        return None
    return {"Range": f"bytes={offset}-", "If-Range": pin}


def judge(
    offset: int,
    stored: Mapping[str, Any],
    status: int,
    content_range: str | bytes | None,
    answered: Mapping[str, Any],
) -> Verdict:
    """
    What to do with the origin's answer to a resume request from C{offset}.

    @param stored: the validators of the bytes on disk (etag, lastModified, length).
    @param answered: the validators of the response (etag, lastModified; None when absent).
    """
    if status == 200:
        return Verdict.FROM_ZERO
    if status == 416:
        return Verdict.REFETCH
    if status != 206:
        return Verdict.FAIL
    rng = parse_content_range(content_range)
    length = stored.get("length")
    if rng is None or rng.total is None or rng.first != offset or rng.total != length or rng.last != rng.total - 1:
        return Verdict.REFETCH
    for key in ("etag", "lastModified"):
        # a validator the 206 carries must be the stored one (RFC 9110 15.3.7:
        # a 206 carries the ETag and Last-Modified a 200 would)
        if answered.get(key) is not None and answered.get(key) != stored.get(key):
            return Verdict.REFETCH
    return Verdict.CONTINUE

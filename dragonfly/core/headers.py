"""HTTP header sets used by more than one part (the CDN's origin fetch, dfdaemon's proxy)."""

from __future__ import annotations

#: headers that belong to one connection and are never passed on (RFC 9110 7.6.1), lowercase
HOP_BY_HOP: frozenset[str] = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
#: the same, as the bytes twisted.web's headers carry
HOP_BY_HOP_BYTES: frozenset[bytes] = frozenset(h.encode("ascii") for h in HOP_BY_HOP)
#: request headers a peer's task may not hand to the CDN's origin fetch: the
#: hop-by-hop ones and those the fetch sets itself (framing, ranges, encoding)
NOT_TO_ORIGIN: frozenset[str] = HOP_BY_HOP | {"host", "content-length", "range", "accept-encoding"}


def safe_header_map(headers: dict[str, str]) -> bool:
    """
    Header names and values a request may carry on: a map of non-empty
    names to strings, with no CR, LF or NUL to split or end a header line.
    """
    if not isinstance(headers, dict):
        return False
    for k, v in headers.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            return False
        if any(c in k or c in v for c in "\r\n\x00"):
            return False
    return True

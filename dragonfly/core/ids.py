"""
Task identity: which downloads share one swarm.

A task id is 64 lowercase hex characters (a SHA-256).  When the content address
is known (an OCI blob digest, C{dfget --digest sha256:...}) the id derives from
it alone, so the same blob fetched through two URLs shares one swarm.  Otherwise
it derives from the URL, with the query keys named by C{--filter} removed, plus
the optional C{--identifier}.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: the peer id of the seed (the SuperNode) in HELLO and in parent lists
SEED_ID = "supernode"

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_DIGEST = re.compile(r"(?P<algo>sha256|sha512|md5):(?P<hex>[0-9a-fA-F]+)\Z")
_HEX_LENGTHS = {"sha256": 64, "sha512": 128, "md5": 32}


class BadInput(ValueError):
    """A user-supplied URL, digest or header that cannot be used."""


def parse_digest(text: str) -> tuple[str, str]:
    """
    Parse C{algo:hex} into C{(algo, lowercase hex)}.

    @raise BadInput: for an unknown algorithm or a hex string of the wrong length.
    """
    m = _DIGEST.match(text.strip())
    if m is None:
        raise BadInput(f"digest {text!r} is not of the form sha256:<hex>")
    algo, hexpart = m.group("algo"), m.group("hex").lower()
    if len(hexpart) != _HEX_LENGTHS[algo]:
        raise BadInput(
            f"digest {text!r}: {algo} wants {_HEX_LENGTHS[algo]} hex digits, got {len(hexpart)}"
        )
    return algo, hexpart


def check_url(url: str) -> str:
    """Return C{url} if it is an absolute http(s) URL with a host, else raise L{BadInput}."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise BadInput(f"URL {url!r} cannot be parsed: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise BadInput(f"URL {url!r}: only http and https are supported")
    if not parts.hostname:
        raise BadInput(f"URL {url!r} has no host")
    if any(c in url for c in "\r\n\x00 "):
        raise BadInput(f"URL {url!r} contains whitespace or control characters")
    try:
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError:
        raise BadInput(f"URL {url!r} has a bad port") from None
    return url


def filter_url(url: str, keys: list[str] | tuple[str, ...] = ()) -> str:
    """Remove the query parameters named in C{keys} (Dragonfly's C{--filter})."""
    if not keys:
        return url
    parts = urlsplit(url)
    drop = set(keys)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in drop]
    return urlunsplit(parts._replace(query=urlencode(query)))


def parse_filter(text: str | None) -> list[str]:
    """Dragonfly's filter syntax: keys separated by C{&}."""
    if not text:
        return []
    return [k for k in text.split("&") if k]


def task_id(
    url: str,
    *,
    digest: str | None = None,
    identifier: str | None = None,
    filter_keys: list[str] | tuple[str, ...] = (),
) -> str:
    """The task id for a download (see the module docstring)."""
    if digest:
        algo, hexpart = parse_digest(digest)
        material = f"digest\0{algo}:{hexpart}"
    else:
        material = f"url\0{filter_url(url, filter_keys)}\0{identifier or ''}"
    import hashlib  # here: dfget loads this module and must start fast

    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def is_task_id(text: str) -> bool:
    """True for a well-formed task id (also guards file names built from it)."""
    return isinstance(text, str) and _HEX64.match(text) is not None


_PEER_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}\Z")


def is_peer_id(text: str) -> bool:
    """True for a well-formed peer id: 1 to 64 of C{[A-Za-z0-9._:-]}."""
    return isinstance(text, str) and _PEER_ID.match(text) is not None


def parse_header(text: str) -> tuple[str, str]:
    """Parse one C{--header 'K: V'} into C{(K, V)}."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not name or any(c in name for c in " \t\r\n") or any(c in value for c in "\r\n\x00"):
        raise BadInput(f"header {text!r} is not of the form 'Name: value'")
    return name, value.strip()

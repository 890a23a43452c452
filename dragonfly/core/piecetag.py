"""
Piece tags: the SuperNodes of one cluster vouch for the piece digests they
hand out, so that a SuperNode that takes a task over (its owner died) can
trust the digests the peers bring back without fetching those pieces itself.

A tag is HMAC-SHA256 under a key the SuperNodes share (C{--piece-key-file})
and the peers never see (unlike the cluster token, which every peer holds),
truncated to L{TAG_BYTES} and written in lowercase hex.  Every tag names its
task, the origin's version of the content (its validators: ETag,
Last-Modified and length) and the piece size, so a tag can never be moved to
another task, another version or another cut of the file:

  - the origin tag (L{PieceKey.origin_tag}) vouches for the version itself:
    the validators, the length and the piece size (and, in L{sha256_tag},
    the whole file's SHA-256);
  - a piece tag (L{PieceKey.piece_tag}) vouches for one piece: its index,
    its length and its SHA-256, under that version.

A peer keeps the tags beside the digests (and in its task meta) and sends
them back when it re-announces to a node that lacks the digests.  The node
checks each with a constant-time compare (L{PieceKey.check}); only pieces
whose tag is right are adopted, anything else is ignored (and fetched from
the origin), never trusted.

The message is the fields, each with its length in front (None apart from
the empty string), so no two different sets of fields share a message.
Pure: no I/O apart from L{load_key}.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Mapping
from typing import Any

from attrs import frozen

#: a tag is the first this many bytes of the HMAC-SHA256, in hex
TAG_BYTES = 16
#: the shortest key accepted
MIN_KEY_BYTES = 16

_HEX = re.compile(r"[0-9a-f]+")


@frozen
class Origin:
    """The version of a task's content the tags name: the origin's validators, the length, the piece size."""

    etag: str | None
    last_modified: str | None
    length: int
    piece_size: int

    def piece_length(self, index: int) -> int | None:
        """The length of piece C{index}, or None when there is no such piece."""
        if self.piece_size <= 0 or not 0 <= index or index * self.piece_size >= self.length:
            return None
        return min(self.piece_size, self.length - index * self.piece_size)

    @property
    def piece_count(self) -> int:
        return -(-self.length // self.piece_size) if self.piece_size > 0 else 0

    def validators(self) -> dict[str, Any]:
        """As the CDN keeps them (C{CdnTask.validators})."""
        return {"etag": self.etag, "lastModified": self.last_modified, "length": self.length}

    @classmethod
    def from_validators(cls, validators: Mapping[str, Any], piece_size: int) -> Origin | None:
        """From the CDN's validators; None without a length."""
        length = validators.get("length")
        if not isinstance(length, int) or isinstance(length, bool) or length < 0 or piece_size <= 0:
            return None
        return cls(_str_or_none(validators.get("etag")), _str_or_none(validators.get("lastModified")), length, piece_size)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _field(value: str | None) -> bytes:
    if value is None:
        return b"\xff\xff\xff\xff"
    raw = value.encode("utf-8", "surrogatepass")
    return struct.pack(">I", len(raw)) + raw


def _message(kind: str, task_id: str, origin: Origin, *rest: str) -> bytes:
    fields = [
        "dragonfly-piece-tag-1", kind, task_id, origin.etag, origin.last_modified,
        str(origin.length), str(origin.piece_size), *rest,
    ]
    return b"".join(_field(f) for f in fields)


def well_formed(tag: Any) -> bool:
    """A tag as the wire carries it: L{TAG_BYTES} bytes in lowercase hex."""
    return isinstance(tag, str) and len(tag) == 2 * TAG_BYTES and _HEX.fullmatch(tag) is not None


class PieceKey:
    """The cluster's piece key: makes and checks tags."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a piece key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._key = key

    def __repr__(self) -> str:
        return "<PieceKey>"  # never the key itself in a log line

    def _tag(self, message: bytes) -> str:
        return hmac.new(self._key, message, hashlib.sha256).digest()[:TAG_BYTES].hex()

    def origin_tag(self, task_id: str, origin: Origin) -> str:
        """Vouches for the version: validators, length and piece size of C{task_id}."""
        return self._tag(_message("origin", task_id, origin))

    def sha256_tag(self, task_id: str, origin: Origin, sha256: str) -> str:
        """Vouches for the whole file's SHA-256 (hex) under that version."""
        return self._tag(_message("sha256", task_id, origin, sha256))

    def piece_tag(self, task_id: str, origin: Origin, index: int, digest: str) -> str:
        """Vouches for piece C{index}'s SHA-256 (hex) under that version; its length is part of the message."""
        length = origin.piece_length(index)
        if length is None:
            raise ValueError(f"piece {index} is not in a file of {origin.length} bytes in pieces of {origin.piece_size}")
        return self._tag(_message("piece", task_id, origin, str(index), str(length), digest))

    def check(self, expected: str, given: Any) -> bool:
        """Whether C{given} (from a peer) is the tag C{expected}, compared in constant time."""
        if not well_formed(given):
            return False
        return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii"))

    def check_piece(self, task_id: str, origin: Origin, index: int, digest: Any, tag: Any) -> bool:
        """Whether C{tag} vouches for C{digest} as piece C{index} of that version."""
        if not isinstance(digest, str) or len(digest) != 64 or _HEX.fullmatch(digest) is None:
            return False
        if origin.piece_length(index) is None:
            return False
        return self.check(self.piece_tag(task_id, origin, index, digest), tag)

    def check_origin(self, task_id: str, origin: Origin, tag: Any) -> bool:
        return self.check(self.origin_tag(task_id, origin), tag)

    def check_sha256(self, task_id: str, origin: Origin, sha256: Any, tag: Any) -> bool:
        if not isinstance(sha256, str) or len(sha256) != 64 or _HEX.fullmatch(sha256) is None:
            return False
        return self.check(self.sha256_tag(task_id, origin, sha256), tag)


def load_key(path: str) -> PieceKey:
    """
    The key in file C{path}: its bytes less surrounding white space, at
    least L{MIN_KEY_BYTES} (e.g. C{head -c 32 /dev/urandom | base64 > FILE}).

    @raise ValueError: unreadable, or too short (the message names the file).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read().strip()
    except OSError as e:
        raise ValueError(f"--piece-key-file: {e.strerror}: {path}") from None
    if len(raw) < MIN_KEY_BYTES:
        raise ValueError(f"--piece-key-file {path}: the key needs at least {MIN_KEY_BYTES} bytes, it has {len(raw)}")
    return PieceKey(raw)


def origin_json(key: PieceKey, task_id: str, origin: Origin, sha256: str | None) -> dict[str, Any]:
    """The tagged origin as a sync answer carries it (the peer gives it back when it re-registers)."""
    out: dict[str, Any] = {
        "etag": origin.etag, "lastModified": origin.last_modified, "length": origin.length,
        "pieceSize": origin.piece_size, "tag": key.origin_tag(task_id, origin),
    }
    if sha256:
        out["sha256"] = sha256
        out["sha256Tag"] = key.sha256_tag(task_id, origin, sha256)
    return out


def origin_from_json(body: Any) -> Origin | None:
    """The L{Origin} an C{origin} object names (its tag not checked); None when malformed."""
    if not isinstance(body, Mapping):
        return None
    length, piece_size = body.get("length"), body.get("pieceSize")
    for v in (length, piece_size):
        if not isinstance(v, int) or isinstance(v, bool):
            return None
    assert isinstance(length, int) and isinstance(piece_size, int)
    if length < 0 or piece_size <= 0:
        return None
    etag, modified = body.get("etag"), body.get("lastModified")
    if not (etag is None or isinstance(etag, str)) or not (modified is None or isinstance(modified, str)):
        return None
    return Origin(etag, modified, length, piece_size)

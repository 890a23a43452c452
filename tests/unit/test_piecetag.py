"""
Piece tags (L{dragonfly.core.piecetag}): a tag checks only for exactly the
task, version, piece and digest it was made for, under the key it was made
with; anything else a peer sends (another field, a forged or missing tag,
malformed values) never checks.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.core.piecetag import (
    MIN_KEY_BYTES,
    TAG_BYTES,
    Origin,
    PieceKey,
    load_key,
    origin_from_json,
    origin_json,
    well_formed,
)

KEY = PieceKey(b"k" * 32)

hexes = st.binary(min_size=32, max_size=32).map(bytes.hex)
task_ids = hexes
texts = st.one_of(st.none(), st.text(max_size=20))
origins = st.builds(
    Origin, texts, texts, st.integers(1, 1 << 40), st.integers(1, 1 << 26),
)


def piece_of(origin: Origin, n: int) -> int:
    return n % origin.piece_count


@given(task_ids, origins, st.integers(0, 1 << 30), hexes)
def test_a_tag_checks_for_what_it_was_made_for(tid: str, origin: Origin, n: int, digest: str) -> None:
    index = piece_of(origin, n)
    tag = KEY.piece_tag(tid, origin, index, digest)
    assert well_formed(tag) and len(tag) == 2 * TAG_BYTES
    assert KEY.check_piece(tid, origin, index, digest, tag)
    assert KEY.check_origin(tid, origin, KEY.origin_tag(tid, origin))
    assert KEY.check_sha256(tid, origin, digest, KEY.sha256_tag(tid, origin, digest))


@given(task_ids, origins, st.integers(0, 1 << 30), hexes, st.data())
def test_any_change_to_any_field_breaks_a_piece_tag(tid: str, origin: Origin, n: int, digest: str, data: Any) -> None:
    index = piece_of(origin, n)
    tag = KEY.piece_tag(tid, origin, index, digest)
    field = data.draw(st.sampled_from(["task", "etag", "modified", "length", "piece_size", "index", "digest", "key"]))
    t, o, i, d, key = tid, origin, index, digest, KEY
    if field == "task":
        t = data.draw(task_ids.filter(lambda x: x != tid))
    elif field == "etag":
        o = Origin(data.draw(texts.filter(lambda x: x != origin.etag)), o.last_modified, o.length, o.piece_size)
    elif field == "modified":
        o = Origin(o.etag, data.draw(texts.filter(lambda x: x != origin.last_modified)), o.length, o.piece_size)
    elif field == "length":
        o = Origin(o.etag, o.last_modified, data.draw(st.integers(1, 1 << 41).filter(lambda x: x != origin.length)), o.piece_size)
    elif field == "piece_size":
        o = Origin(o.etag, o.last_modified, o.length, data.draw(st.integers(1, 1 << 27).filter(lambda x: x != origin.piece_size)))
    elif field == "index":
        i = data.draw(st.integers(0, 1 << 31).filter(lambda x: x != index))
    elif field == "digest":
        d = data.draw(hexes.filter(lambda x: x != digest))
    else:
        key = PieceKey(data.draw(st.binary(min_size=MIN_KEY_BYTES, max_size=64).filter(lambda k: k != b"k" * 32)))
    assert not key.check_piece(t, o, i, d, tag)
    # nor does a piece tag pass for the origin, or the other way round
    assert not KEY.check_origin(tid, origin, tag)
    assert not KEY.check_piece(tid, origin, index, digest, KEY.origin_tag(tid, origin))


@given(task_ids, origins, st.data())
def test_any_change_breaks_an_origin_tag(tid: str, origin: Origin, data: Any) -> None:
    tag = KEY.origin_tag(tid, origin)
    other = data.draw(origins.filter(lambda o: o != origin))
    assert not KEY.check_origin(tid, other, tag)
    assert not KEY.check_origin(data.draw(task_ids.filter(lambda x: x != tid)), origin, tag)


@given(task_ids, origins, st.integers(0, 1 << 30), hexes, st.one_of(st.none(), st.integers(), st.text(max_size=40), hexes))
def test_a_forged_or_missing_tag_never_checks(tid: str, origin: Origin, n: int, digest: str, forged: Any) -> None:
    index = piece_of(origin, n)
    real = KEY.piece_tag(tid, origin, index, digest)
    if forged == real:
        return
    assert not KEY.check_piece(tid, origin, index, digest, forged)
    # a tag cut, padded or in upper case is not the tag
    for near in (real[:-1], real + "0", real.upper() if real.upper() != real else None, real[:-1] + ("1" if real[-1] == "0" else "0")):
        assert not KEY.check_piece(tid, origin, index, digest, near)


def test_malformed_digests_and_pieces_past_the_end_never_check() -> None:
    origin = Origin('"e"', None, 10, 4)  # pieces 0..2, the last 2 bytes
    assert origin.piece_count == 3 and origin.piece_length(2) == 2 and origin.piece_length(3) is None
    digest = "a" * 64
    tag = KEY.piece_tag("t", origin, 2, digest)
    for bad in ("A" * 64, "a" * 63, None, 5, "g" * 64):
        assert not KEY.check_piece("t", origin, 2, bad, tag)
    assert not KEY.check_piece("t", origin, 3, digest, tag) and not KEY.check_piece("t", origin, -1, digest, tag)
    with pytest.raises(ValueError):
        KEY.piece_tag("t", origin, 3, digest)


def test_none_and_empty_validators_are_different_versions() -> None:
    a, b = Origin(None, None, 10, 4), Origin("", None, 10, 4)
    assert KEY.origin_tag("t", a) != KEY.origin_tag("t", b)
    # and fields cannot be shifted from one into the next
    assert KEY.origin_tag("t", Origin("ab", "c", 10, 4)) != KEY.origin_tag("t", Origin("a", "bc", 10, 4))


def test_the_origin_round_trips_through_json() -> None:
    origin = Origin('"v1"', "Tue, 01 Dec 2026 10:00:00 GMT", 5000, 1024)
    sha = hashlib.sha256(b"x").hexdigest()
    body = origin_json(KEY, "t", origin, sha)
    back = origin_from_json(body)
    assert back == origin and KEY.check_origin("t", back, body["tag"])
    assert KEY.check_sha256("t", back, body["sha256"], body["sha256Tag"])
    assert not KEY.check_sha256("t", back, "0" * 64, body["sha256Tag"])
    assert Origin.from_validators(origin.validators(), 1024) == origin
    for bad in (None, [], {"length": "5", "pieceSize": 4}, {"length": 5, "pieceSize": 0}, {"length": True, "pieceSize": 4},
                {"length": 5, "pieceSize": 4, "etag": 3}):
        assert origin_from_json(bad) is None
    assert "k" not in repr(KEY)


def test_load_key(tmp_path: Any) -> None:
    path = os.path.join(tmp_path, "key")
    with open(path, "wb") as f:
        f.write(b"  0123456789abcdef0123  \n")
    assert load_key(path).piece_tag("t", Origin(None, None, 1, 1), 0, "a" * 64) == PieceKey(b"0123456789abcdef0123").piece_tag(
        "t", Origin(None, None, 1, 1), 0, "a" * 64,
    )
    with open(path, "wb") as f:
        f.write(b"short\n")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        load_key(path)
    with pytest.raises(ValueError, match="piece-key-file"):
        load_key(os.path.join(tmp_path, "nope"))


def test_the_supernode_option_and_its_config_key(tmp_path: Any) -> None:
    from twisted.python import usage

    from dragonfly.supernode import tap

    key = os.path.join(tmp_path, "piece.key")
    with open(key, "w") as f:
        f.write("0123456789abcdef0123456789abcdef\n")
    o = tap.Options()
    o.parseOptions(["--home", str(tmp_path), "--piece-key-file", key])
    assert isinstance(o["piece-key"], PieceKey)
    plain = tap.Options()
    plain.parseOptions(["--home", str(tmp_path)])
    assert plain["piece-key"] is None
    config = os.path.join(tmp_path, "supernode.yaml")
    with open(config, "w") as f:
        f.write(f"piece-key-file: {key}\n")
    from_file = tap.Options()
    from_file.parseOptions(["--config", config, "--home", str(tmp_path)])
    assert isinstance(from_file["piece-key"], PieceKey)
    with open(key, "w") as f:
        f.write("short\n")
    with pytest.raises(usage.UsageError, match="at least 16 bytes"):
        tap.Options().parseOptions(["--home", str(tmp_path), "--piece-key-file", key])

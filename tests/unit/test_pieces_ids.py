"""
Tests for the small pure helpers: L{dragonfly.core.pieces},
L{dragonfly.core.ids} and L{dragonfly.core.units}.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly.core import ids
from dragonfly.core.ids import (
    BadInput,
    check_url,
    filter_url,
    is_peer_id,
    is_task_id,
    parse_digest,
    parse_filter,
    parse_header,
    task_id,
)
from dragonfly.core.pieces import (
    DEFAULT_PIECE_SIZE,
    MAX_PIECE_SIZE,
    MiB,
    dragonfly_piece_size,
    piece_count,
    piece_span,
    swarm_piece_size,
)
from dragonfly.core.units import human_bytes, parse_duration, parse_rate, parse_size

SHA = "ab" * 32
OTHER_SHA = "cd" * 32


# -- pieces -----------------------------------------------------------------


@pytest.mark.parametrize(
    "length, expected_mib",
    [
        (None, 4),  # the origin did not say
        (0, 4),
        (1, 4),
        (200 * MiB, 4),
        (200 * MiB + 1, 4),  # not yet a full 100 MiB above 200 MiB
        (300 * MiB - 1, 4),
        (300 * MiB, 5),
        (399 * MiB, 5),
        (400 * MiB, 6),
        (1000 * MiB, 12),
        (1299 * MiB, 14),
        (1300 * MiB, 15),  # the cap is reached
        (1400 * MiB, 15),
        (100 * 1024 * MiB, 15),
    ],
)
def test_piece_size_dragonfly_rule(length: int | None, expected_mib: int) -> None:
    """4 MiB up to 200 MiB, then +1 MiB per full 100 MiB (Dragonfly 1.x), capped at 15 MiB."""
    assert dragonfly_piece_size(length) == expected_mib * MiB


@given(st.integers(min_value=0, max_value=1 << 45))
def test_piece_size_bounds_and_monotonic(length: int) -> None:
    """Always between 4 and 15 MiB, a whole number of MiB, never shrinking with length."""
    size = dragonfly_piece_size(length)
    assert DEFAULT_PIECE_SIZE <= size <= MAX_PIECE_SIZE
    assert size % MiB == 0
    assert dragonfly_piece_size(length + 100 * MiB) >= size


def test_piece_count_basics() -> None:
    assert piece_count(0, 4) == 0
    assert piece_count(1, 4) == 1
    assert piece_count(4, 4) == 1
    assert piece_count(5, 4) == 2
    assert piece_count(8, 4) == 2
    assert piece_count(9, 4) == 3


@pytest.mark.parametrize("length, size", [(-1, 4), (10, 0), (10, -4)])
def test_piece_count_rejects_bad_input(length: int, size: int) -> None:
    with pytest.raises(ValueError):
        piece_count(length, size)


def test_piece_span_last_piece_short() -> None:
    assert piece_span(0, 10, 4) == (0, 4)
    assert piece_span(1, 10, 4) == (4, 4)
    assert piece_span(2, 10, 4) == (8, 2)
    # an exact multiple: the last piece is full
    assert piece_span(1, 8, 4) == (4, 4)


@pytest.mark.parametrize("index, length", [(0, 0), (3, 10), (-1, 10), (100, 10)])
def test_piece_span_out_of_range(index: int, length: int) -> None:
    """The empty file has no piece 0; negative and past-the-end indices fail."""
    with pytest.raises(IndexError):
        piece_span(index, length, 4)


@given(st.integers(min_value=0, max_value=1 << 40), st.data())
def test_spans_tile_the_file(length: int, data: st.DataObject) -> None:
    """The spans are contiguous, non-empty, at most C{size} and cover [0, length) exactly."""
    # at most a few hundred pieces, so each example stays fast
    size = data.draw(st.integers(min_value=max(1, length // 300), max_value=max(1, 2 * length)), label="size")
    count = piece_count(length, size)
    offset = 0
    for i in range(count):
        start, n = piece_span(i, length, size)
        assert start == offset
        assert 0 < n <= size
        if i < count - 1:
            assert n == size
        offset += n
    assert offset == length


# -- task ids ---------------------------------------------------------------


def test_task_id_is_64_hex() -> None:
    for tid in (
        task_id("http://h/f"),
        task_id("http://h/f", digest=f"sha256:{SHA}"),
        task_id("http://h/f", identifier="x"),
        task_id("http://h/f?a=1", filter_keys=["a"]),
    ):
        assert is_task_id(tid)
        assert len(tid) == 64


@given(st.text(max_size=80), st.one_of(st.none(), st.text(max_size=20)))
def test_task_id_always_well_formed(path: str, identifier: str | None) -> None:
    tid = task_id("http://h/" + path, identifier=identifier)
    assert is_task_id(tid)


def test_same_digest_same_id_whatever_the_url() -> None:
    """A content address alone names the swarm."""
    a = task_id("http://mirror-a/blob", digest=f"sha256:{SHA}")
    b = task_id("https://mirror-b:8443/other/path?token=1", digest=f"sha256:{SHA}")
    assert a == b
    # the identifier does not split a content-addressed swarm either
    assert task_id("http://x/", digest=f"sha256:{SHA}", identifier="v2") == a
    # hex case does not matter
    assert task_id("http://x/", digest=f"sha256:{SHA.upper()}") == a


def test_different_digest_different_id() -> None:
    assert task_id("http://h/f", digest=f"sha256:{SHA}") != task_id("http://h/f", digest=f"sha256:{OTHER_SHA}")
    assert task_id("http://h/f", digest=f"sha256:{SHA}") != task_id("http://h/f")


def test_bad_digest_in_task_id_raises_bad_input() -> None:
    with pytest.raises(BadInput):
        task_id("http://h/f", digest="sha256:1234")


def test_url_matters_without_digest() -> None:
    assert task_id("http://h/a") != task_id("http://h/b")
    assert task_id("http://h/a") == task_id("http://h/a")


def test_filter_keys_drop_params_from_the_id() -> None:
    signed_1 = "http://h/file?Expires=1&Signature=aaa&v=1"
    signed_2 = "http://h/file?Expires=2&Signature=bbb&v=1"
    keys = ["Expires", "Signature"]
    assert task_id(signed_1, filter_keys=keys) == task_id(signed_2, filter_keys=keys)
    # without the filter they are distinct tasks
    assert task_id(signed_1) != task_id(signed_2)
    # other params still matter
    assert task_id(signed_1, filter_keys=keys) != task_id(
        "http://h/file?Expires=1&Signature=aaa&v=2", filter_keys=keys
    )
    # a filtered key only matters by name
    assert task_id(signed_1, filter_keys=["Expires"]) != task_id(signed_2, filter_keys=["Expires"])


def test_filter_url() -> None:
    assert filter_url("http://h/f?a=1&b=2&c=3", ["b"]) == "http://h/f?a=1&c=3"
    assert filter_url("http://h/f?a=1&b=2", ["a", "b"]) == "http://h/f"
    assert filter_url("http://h/f?a=1", []) == "http://h/f?a=1"
    # blank values survive
    assert filter_url("http://h/f?a=&b=2", ["b"]) == "http://h/f?a="


def test_parse_filter() -> None:
    assert parse_filter(None) == []
    assert parse_filter("") == []
    assert parse_filter("a&b") == ["a", "b"]
    assert parse_filter("&a&&b&") == ["a", "b"]


def test_identifier_changes_id() -> None:
    base = task_id("http://h/f")
    assert task_id("http://h/f", identifier="one") != base
    assert task_id("http://h/f", identifier="one") != task_id("http://h/f", identifier="two")
    assert task_id("http://h/f", identifier="one") == task_id("http://h/f", identifier="one")
    # an empty identifier is no identifier
    assert task_id("http://h/f", identifier="") == base


def test_is_task_id() -> None:
    assert is_task_id("0" * 64)
    assert not is_task_id("0" * 63)
    assert not is_task_id("0" * 65)
    assert not is_task_id("A" * 64)  # lowercase only
    assert not is_task_id("g" * 64)
    assert not is_task_id("0" * 64 + "\n")
    assert not is_task_id("../" + "0" * 61)
    assert not is_task_id(None)  # type: ignore[arg-type]


def test_is_peer_id() -> None:
    assert is_peer_id("peer-1")
    assert is_peer_id("10.0.0.1:65001")
    assert is_peer_id("a" * 64)
    assert not is_peer_id("")
    assert not is_peer_id("a" * 65)
    assert not is_peer_id("has space")
    assert not is_peer_id("a/b")
    assert not is_peer_id("a\n")
    assert not is_peer_id(7)  # type: ignore[arg-type]


# -- parse_digest -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"sha256:{SHA}", ("sha256", SHA)),
        (f"sha256:{SHA.upper()}", ("sha256", SHA)),
        (f"  sha256:{SHA}\n", ("sha256", SHA)),
        ("sha512:" + "0f" * 64, ("sha512", "0f" * 64)),
        ("md5:" + "9" * 32, ("md5", "9" * 32)),
    ],
)
def test_parse_digest_good(text: str, expected: tuple[str, str]) -> None:
    assert parse_digest(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        SHA,  # no algorithm
        f"sha1:{SHA[:40]}",  # unknown algorithm
        f"SHA256:{SHA}",  # algorithm names are lowercase
        f"sha256:{SHA[:-1]}",  # too short
        f"sha256:{SHA}0",  # too long
        "sha256:" + "z" * 64,  # not hex
        "md5:" + "0" * 64,  # wrong length for md5
        f"sha256: {SHA}",
        f"sha256:{SHA}:x",
    ],
)
def test_parse_digest_bad(text: str) -> None:
    with pytest.raises(BadInput):
        parse_digest(text)


# -- check_url ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/f",
        "https://example.com:8443/a/b?c=d#e",
        "http://127.0.0.1:8080/",
        "http://[::1]:80/x",
        "http://user:pw@host/x",
    ],
)
def test_check_url_good(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "",
        "example.com/f",
        "ftp://example.com/f",
        "file:///etc/passwd",
        "http:///no-host",
        "http://",
        "http://host/a b",
        "http://host/a\r\nX-Injected: 1",
        "http://host/\x00",
        "http://host:99999/",
        "http://host:port/",
        "http://[::1/",
    ],
)
def test_check_url_bad(url: str) -> None:
    with pytest.raises(BadInput):
        check_url(url)


# -- parse_header ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("X-Token: abc", ("X-Token", "abc")),
        ("X-Token:abc", ("X-Token", "abc")),
        ("  Authorization :  Bearer x  ", ("Authorization", "Bearer x")),
        ("Range: bytes=0-1:2", ("Range", "bytes=0-1:2")),
        ("X-Empty:", ("X-Empty", "")),
    ],
)
def test_parse_header_good(text: str, expected: tuple[str, str]) -> None:
    assert parse_header(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "no colon", ": value", "   : value", "Two Words: v", "Tab\there: v", "X: a\r\nY: b", "X: a\nb", "X: a\x00"],
)
def test_parse_header_bad(text: str) -> None:
    with pytest.raises(BadInput):
        parse_header(text)


# -- units ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("20M", 20 * 1024 * 1024),
        ("20m", 20 * 1024 * 1024),
        ("20MB", 20 * 1024 * 1024),
        ("20MiB", 20 * 1024 * 1024),
        ("20M/s", 20 * 1024 * 1024),
        (" 20 M ", 20 * 1024 * 1024),
        ("512K", 512 * 1024),
        ("512k", 512 * 1024),
        ("1G", 1 << 30),
        ("1.5M", 3 * 512 * 1024),
        ("100", 100),
        ("0", 0),
        (20, 20),
    ],
)
def test_parse_rate_good(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1M", "20T", "abc", "1e6", "20MM", "1,5M", "20 Mbits", "9" * 400])
def test_parse_rate_bad(text: str) -> None:
    with pytest.raises(BadInput):
        parse_rate(text)


@given(st.integers(min_value=0, max_value=1 << 40), st.sampled_from(["", "K", "M", "G", "KiB", "MB", "k", "g"]))
def test_parse_size_agrees_with_rate(n: int, unit: str) -> None:
    """A size is a rate's number without C{/s}; its errors speak of a size."""
    assert parse_size(f"{n}{unit}") == parse_rate(f"{n}{unit}")


@pytest.mark.parametrize("text", ["", "M", "-1M", "20T", "64K/s", "1e6", "9" * 400])
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(BadInput, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5m", 300.0),
        ("30s", 30.0),
        ("300", 300.0),
        ("500ms", 0.5),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        (" 2 s ", 2.0),
        (7, 7.0),
    ],
)
def test_parse_duration_good(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "m", "5d", "-5s", "5 min", "5M", "1h30m", "9" * 400])
def test_parse_duration_bad(text: str) -> None:
    with pytest.raises(BadInput):
        parse_duration(text)


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(20 * MiB) == "20.0 MiB"
    assert human_bytes(3 << 40) == "3072.0 GiB"


# -- never anything but BadInput ------------------------------------------------

PARSERS = [parse_digest, check_url, parse_header, parse_rate, parse_duration]

# text that looks roughly like the real thing, so the parsers get past their first check
near_misses = st.one_of(
    st.text(),
    st.from_regex(r"\A(sha256|sha512|md5|SHA1)?:?[0-9a-fA-Fg]{0,130}\s?\Z"),
    st.from_regex(r"\A(https?|ftp|file)?:?/{0,3}[\w\[\]:.@%-]{0,30}(:\d{0,7})?(/[\w ?&=%]*)?\Z"),
    st.from_regex(r"\A[\w -]{0,10}:?[^\n]{0,20}\Z"),
    st.from_regex(r"\A\s?\d{0,400}(\.\d*)?\s?([KMGkmg]|ms|s|m|h)?(i?B)?(/s)?\Z"),
)


@settings(max_examples=300)
@given(st.sampled_from(PARSERS), near_misses)
def test_parsers_only_raise_bad_input(parser: object, text: str) -> None:
    try:
        parser(text)  # type: ignore[operator]
    except BadInput:
        pass


@given(near_misses)
def test_check_url_result_is_usable(text: str) -> None:
    """Whatever check_url accepts can be turned into a task id with a filter."""
    try:
        url = check_url(text)
    except BadInput:
        return
    assert is_task_id(task_id(url, filter_keys=["x"]))


def test_bad_input_is_a_value_error() -> None:
    """Callers that catch ValueError keep working."""
    assert issubclass(ids.BadInput, ValueError)


def test_task_id_matches_documented_material() -> None:
    """The id is a SHA-256 (stable across releases: peers and CDN caches rely on it)."""
    assert task_id("http://h/f") == hashlib.sha256(b"url\0http://h/f\0").hexdigest()
    assert task_id("u", digest=f"sha256:{SHA}") == hashlib.sha256(f"digest\0sha256:{SHA}".encode()).hexdigest()


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (None, 4 * MiB),
        (0, 1 * MiB),
        (1, 1 * MiB),
        (64 * MiB, 1 * MiB),
        (128 * MiB, 1 * MiB),
        (128 * MiB + 1, 2 * MiB),
        (256 * MiB, 2 * MiB),
        (1 << 30, 8 * MiB),
        (10 << 30, 15 * MiB),
    ],
)
def test_auto_piece_size(length, expected):
    assert swarm_piece_size(length) == expected


def test_auto_piece_size_with_another_target():
    assert swarm_piece_size(1 << 30, 512) == 2 * MiB
    assert swarm_piece_size(1 << 30, 128) == swarm_piece_size(1 << 30) == 8 * MiB
    assert swarm_piece_size(1 << 30, 4096) == 1 * MiB  # never under 1 MiB
    with pytest.raises(ValueError):
        swarm_piece_size(1 << 30, 0)


@given(st.integers(0, 1 << 40))
def test_auto_piece_size_bounds(length):
    size = swarm_piece_size(length)
    assert 1 * MiB <= size <= 15 * MiB
    if size < 8 * MiB:
        assert size & (size - 1) == 0
    # at most 128 pieces until the cap
    if size < 15 * MiB and length:
        assert piece_count(length, size) <= 128

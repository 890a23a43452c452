"""The runtime kit in dragonfly.core: periodic loops, header safety, the loopback HTTP answer parser, token files."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python import usage

from dragonfly.core.headers import HOP_BY_HOP, HOP_BY_HOP_BYTES, NOT_TO_ORIGIN, safe_header_map
from dragonfly.core.localhttp import parse_response
from dragonfly.core.periodic import periodic
from dragonfly.core.tapkit import read_token


def test_periodic_runs_on_its_clock_and_survives_failures() -> None:
    clock = Clock()
    runs: list[float] = []

    def step() -> Any:
        runs.append(clock.seconds())
        if len(runs) == 2:
            raise RuntimeError("one bad step")
        if len(runs) == 3:
            return defer.fail(RuntimeError("one failed Deferred"))
        return None

    service = periodic(10.0, step, clock, "test")
    service.startService()
    assert runs == [0.0]
    clock.pump([10.0] * 4)
    assert runs == [0.0, 10.0, 20.0, 30.0, 40.0]
    service.stopService()
    clock.advance(100)
    assert len(runs) == 5


def test_periodic_waits_for_a_step_in_flight() -> None:
    clock = Clock()
    pending: list[defer.Deferred] = []
    service = periodic(1.0, lambda: pending.append(defer.Deferred()) or pending[-1], clock)
    service.startService()
    clock.pump([1.0] * 5)
    assert len(pending) == 1
    pending[0].callback(None)
    clock.advance(1.0)
    assert len(pending) == 2
    service.stopService()


def test_header_sets() -> None:
    assert "connection" in HOP_BY_HOP and b"transfer-encoding" in HOP_BY_HOP_BYTES
    assert HOP_BY_HOP < NOT_TO_ORIGIN and {"host", "range", "content-length", "accept-encoding"} <= NOT_TO_ORIGIN
    assert all(h == h.lower() for h in NOT_TO_ORIGIN)


@pytest.mark.parametrize(
    "headers, ok",
    [({}, True), ({"A": "b c"}, True), ({"A": "b\r\nC: d"}, False), ({"A\n": "b"}, False), ({"A": "\x00"}, False)],
)
def test_safe_header_map(headers: dict[str, str], ok: bool) -> None:
    assert safe_header_map(headers) is ok


def test_parse_response() -> None:
    assert parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}") == (200, b"{}")
    assert parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n") == (404, b"")
    for cut in (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n{}", b"HTTP/1.0 200 OK\r\n", b"", b"SSH-2.0\r\n\r\n"):
        with pytest.raises(ConnectionError):
            parse_response(cut)


@given(st.binary(max_size=200))
def test_parse_response_takes_any_bytes(raw: bytes) -> None:
    try:
        status, body = parse_response(raw)
    except ConnectionError:
        return
    assert 0 <= status and raw.endswith(body)


def test_read_token(tmp_path: Any) -> None:
    path = tmp_path / "t"
    path.write_text("  a-long-token\n")
    assert read_token(None, str(path), "cluster") == "a-long-token"
    assert read_token("another-token", None, "admin") == "another-token"
    assert read_token(None, None, "admin") is None
    for value, file in (("short", None), ("has space in", None), ("x" * 8, str(path)), (None, str(tmp_path / "none"))):
        with pytest.raises(usage.UsageError):
            read_token(value, file, "cluster")


def test_a_header_map_must_map_names_to_strings() -> None:
    """What a JSON body may put in 'headers' beyond strings is refused, never a crash (schemathesis found {'': None})."""
    assert safe_header_map({"A": "b"})
    for bad in ({"": None}, {"A": None}, {"A": 1}, {"": "x"}, {"A": ["b"]}, [], None):
        assert not safe_header_map(bad)  # type: ignore[arg-type]


def test_one_daemon_per_home(tmp_path: Any) -> None:
    """A second process cannot take a home another holds, and is told the holder's pid; the lock dies with its holder."""
    import subprocess
    import sys

    from dragonfly.core.files import lock_home

    home = str(tmp_path / "home")
    lock_home(home, "dfpeer")
    lock_home(home, "dfpeer")  # the same process again: still ours
    code = (
        "import sys\nfrom dragonfly.core.files import HomeLocked, lock_home\n"
        f"try:\n    lock_home({home!r}, 'dfpeer')\nexcept HomeLocked as e:\n    print(e); sys.exit(3)\n"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode == 3, other.stderr
    assert f"pid {os.getpid()}" in other.stdout and home in other.stdout
    # another home is free
    free = subprocess.run([sys.executable, "-c", code.replace(repr(home), repr(home + "2"))], timeout=60)
    assert free.returncode == 0



def test_writes_start_their_writeback_and_never_fail_for_it(tmp_path: Any) -> None:
    """pwrite_all writes every byte; asking for writeback never raises, even on a pipe."""
    from dragonfly.core.files import pwrite_all, start_writeback

    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pwrite_all(fd, b"abc" * 1000, 10)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 10 + b"abc" * 1000
    r, w = os.pipe()
    try:
        start_writeback(w, 0, 10)
    finally:
        os.close(r)
        os.close(w)

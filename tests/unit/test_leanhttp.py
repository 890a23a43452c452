"""The lean HTTP/1.1 client of the SuperNode API: its sans-IO parser, connection reuse, and every way an answer can fail."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dragonfly.core.leanhttp import BadResponse, LeanClient, ResponseFailed, ResponseParser
from dragonfly.peer.client import SupernodeClient, SupernodeError, SupernodeUnavailable


def parse(chunks: list[bytes], eof: bool = False, head_only: bool = False) -> ResponseParser:
    p = ResponseParser(head_only=head_only)
    for c in chunks:
        p.feed(c)
    if eof:
        p.eof()
    return p


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for c in points:
        out.append(data[last:c])
        last = c
    out.append(data[last:])
    return out


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, i = [], 0
    for s in sizes:
        piece = body[i:i + max(1, s)]
        if not piece:
            break
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        i += len(piece)
    if i < len(body):
        out.append(b"%x;ext=1\r\n%s\r\n" % (len(body) - i, body[i:]))
    return b"".join(out) + b"0\r\nX-Trailer: 1\r\n\r\n"


def test_content_length_answer() -> None:
    p = parse([b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"])
    assert p.done and p.code == 200 and p.body == b"{}" and p.keep_alive and p.rest == b""
    assert p.headers["content-type"] == ["application/json"]


def test_connection_close_and_http10() -> None:
    assert not parse([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"]).keep_alive
    assert not parse([b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"]).keep_alive
    assert parse([b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"]).keep_alive


def test_read_to_close_body() -> None:
    p = parse([b"HTTP/1.1 200 OK\r\n\r\nabc", b"def"])
    assert not p.done
    p.eof()
    assert p.done and p.body == b"abcdef" and not p.keep_alive


def test_no_body_statuses_and_head() -> None:
    assert parse([b"HTTP/1.1 204 No Content\r\n\r\n"]).done
    assert parse([b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"]).body == b""
    assert parse([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"], head_only=True).done


def test_interim_answer_skipped() -> None:
    p = parse([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx"])
    assert p.code == 201 and p.body == b"x"


def test_bytes_after_the_answer_are_kept_apart() -> None:
    p = parse([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1"])
    assert p.body == b"x" and p.rest == b"HTTP/1.1"


@given(
    body=st.binary(max_size=300),
    code=st.sampled_from([200, 201, 400, 404, 500, 503]),
    sizes=st.lists(st.integers(1, 50), max_size=10),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    form=st.sampled_from(["length", "chunked", "close"]),
)
def test_any_chunking_gives_the_same_answer(body: bytes, code: int, sizes: list[int], cuts: list[int], form: str) -> None:
    head = b"HTTP/1.1 %d X\r\nServer: t\r\n" % code
    if form == "length":
        raw = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    elif form == "chunked":
        raw = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, sizes)
    else:
        raw = head + b"\r\n" + body
    whole = parse([raw], eof=form == "close")
    pieces = parse(split(raw, cuts), eof=form == "close")
    assert whole.done and pieces.done
    assert (pieces.code, pieces.body, pieces.keep_alive) == (whole.code, whole.body, whole.keep_alive) == (
        code, body, form != "close")


MALFORMED = [
    b"HTTP/2 200 OK\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 099 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n Folded: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 2000,
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 * 1024),
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_raises(raw: bytes) -> None:
    with pytest.raises(BadResponse):
        parse([raw])


@given(st.sampled_from(MALFORMED), st.lists(st.integers(0, 100_000), max_size=8))
def test_malformed_raises_whatever_the_chunking(raw: bytes, cuts: list[int]) -> None:
    with pytest.raises(BadResponse):
        parse(split(raw, cuts))


@pytest.mark.parametrize("raw", [
    b"",
    b"HTTP/1.1 200 OK\r\nContent-Le",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
])
def test_cut_answer_raises_at_eof(raw: bytes) -> None:
    p = parse([raw])
    assert not p.done
    with pytest.raises(BadResponse):
        p.eof()


@given(st.binary(max_size=200), st.lists(st.integers(0, 1000), max_size=6))
def test_garbage_never_escapes_as_other_errors(data: bytes, cuts: list[int]) -> None:
    p = ResponseParser()
    try:
        for c in split(data, cuts):
            p.feed(c)
        p.eof()
    except BadResponse:
        return
    assert p.done


# -- the client over fake connections ------------------------------------------------------


class FakeEndpoint:
    """Connects at once over a StringTransport (or refuses); remembers every protocol made."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []
        self.refuse = False
        self.pending: Deferred[Any] | None = None
        self.hang = False

    def __call__(self, scheme: bytes, host: str, port: int) -> FakeEndpoint:
        self.last = (scheme, host, port)
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.refuse:
            return fail(ConnectionRefusedError())
        if self.hang:
            self.pending = Deferred()
            return self.pending
        p = factory.buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        self.protocols.append(p)
        return succeed(p)


def lose(p: Any) -> None:
    p.transport.disconnecting = True
    p.connectionLost(Failure(ConnectionDone()))


def make(timeout: float = 5.0) -> tuple[LeanClient, FakeEndpoint, MemoryReactorClock]:
    clock = MemoryReactorClock()
    ep = FakeEndpoint()
    return LeanClient(clock, clock=clock, timeout=timeout, endpoint=ep), ep, clock


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"ok\": true}"[:-1]


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_request_in_one_write_and_answer() -> None:
    c, ep, _ = make()
    d = c.request("POST", "http://sn:8002/api/v1/tasks/t/sync?x=1", data=b"{}",
                  headers={"Content-Type": ["application/json"], "Authorization": ["Bearer t"]})
    p = ep.protocols[0]
    assert ep.last == (b"http", "sn", 8002)
    assert p.transport.value() == (
        b"POST /api/v1/tasks/t/sync?x=1 HTTP/1.1\r\nHost: sn:8002\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer t\r\nContent-Length: 2\r\n\r\n{}")
    p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    r = result(d)
    assert r.code == 200 and result(r.content()) == b"{}"


def test_keep_alive_reuses_the_connection() -> None:
    c, ep, _ = make()
    for _ in range(3):
        d = c.request("GET", "http://sn:8002/healthz")
        ep.protocols[-1].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        assert result(d).code == 200
    assert len(ep.protocols) == 1 and ep.protocols[0].requests == 3


def test_connection_close_is_not_reused() -> None:
    c, ep, _ = make()
    for _ in range(2):
        d = c.request("GET", "http://sn:8002/healthz")
        ep.protocols[-1].dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        assert result(d).code == 200
        assert ep.protocols[-1].transport.disconnecting
    assert len(ep.protocols) == 2


def test_concurrent_requests_use_separate_connections_and_idle_ones_are_capped() -> None:
    clock = MemoryReactorClock()
    ep = FakeEndpoint()
    c = LeanClient(clock, clock=clock, endpoint=ep, max_idle=2)
    ds = [c.request("GET", "http://sn:1/x") for _ in range(4)]
    assert len(ep.protocols) == 4
    for p in ep.protocols:
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert [result(d).code for d in ds] == [200] * 4
    assert sum(p.transport.disconnecting for p in ep.protocols) == 2


def test_server_closing_an_idle_connection_retries_once_on_a_new_one() -> None:
    c, ep, _ = make()
    d = c.request("GET", "http://sn:1/x")
    ep.protocols[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    result(d)
    d = c.request("POST", "http://sn:1/x", data=b"{}")
    lose(ep.protocols[0])  # closed by the server as the request went out
    assert len(ep.protocols) == 2
    ep.protocols[1].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert result(d).code == 200


def test_cut_answer_fails_cleanly() -> None:
    c, ep, _ = make()
    d = c.request("GET", "http://sn:1/x")
    ep.protocols[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    lose(ep.protocols[0])
    with pytest.raises(ResponseFailed):
        result(d)
    assert len(ep.protocols) == 1  # a started answer is never sent again


def test_malformed_answer_aborts_the_connection() -> None:
    c, ep, _ = make()
    d = c.request("GET", "http://sn:1/x")
    ep.protocols[0].dataReceived(b"SPDY/3 200 OK\r\n\r\n")
    with pytest.raises(ResponseFailed):
        result(d)
    assert ep.protocols[0].transport.disconnecting
    d = c.request("GET", "http://sn:1/x")
    assert len(ep.protocols) == 2  # never reused


def test_silent_server_times_out_on_the_clock() -> None:
    c, ep, clock = make(timeout=5.0)
    d = c.request("GET", "http://sn:1/x")
    ep.protocols[0].dataReceived(b"HTTP/1.1 200 OK\r\n")
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    with pytest.raises(ResponseFailed):
        result(d)
    assert ep.protocols[0].transport.disconnecting
    lose(ep.protocols[0])  # the abort's connectionLost fires nothing twice


def test_connect_that_hangs_times_out() -> None:
    c, ep, clock = make(timeout=3.0)
    ep.hang = True
    d = c.request("GET", "http://sn:1/x")
    clock.advance(3.0)
    with pytest.raises(ResponseFailed):
        result(d)


def test_bytes_nobody_asked_for_close_the_connection() -> None:
    c, ep, _ = make()
    d = c.request("GET", "http://sn:1/x")
    ep.protocols[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert result(d).code == 200
    assert ep.protocols[0].transport.disconnecting
    c.request("GET", "http://sn:1/x")
    assert len(ep.protocols) == 2


def test_header_injection_refused() -> None:
    c, _, _ = make()
    with pytest.raises(ValueError):
        c.request("GET", "http://sn:1/x", headers={"X": ["a\r\nEvil: 1"]})


# -- through SupernodeClient -----------------------------------------------------------------


def sn_client(timeout: float = 10.0) -> tuple[SupernodeClient, FakeEndpoint, MemoryReactorClock]:
    clock = MemoryReactorClock()
    ep = FakeEndpoint()
    http = LeanClient(clock, clock=clock, endpoint=ep, timeout=60.0)
    return SupernodeClient(http, ["sn:8002"], clock, timeout=timeout), ep, clock


def test_supernode_client_answer_and_error() -> None:
    c, ep, _ = sn_client()
    d = Deferred.fromCoroutine(c.healthz())
    ep.protocols[0].dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"ok\r\n6\r\n\": 1}\n\r\n0\r\n\r\n")
    assert result(d) == {"ok": 1}
    d = Deferred.fromCoroutine(c.healthz())
    body = b'{"error": {"code": "NOPE", "message": "m"}}'
    ep.protocols[0].dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    with pytest.raises(SupernodeError) as e:
        result(d)
    assert (e.value.status, e.value.code) == (404, "NOPE")


@pytest.mark.parametrize("how", ["cut", "malformed", "silent", "refused"])
def test_supernode_client_unavailable_never_hangs(how: str) -> None:
    c, ep, clock = sn_client(timeout=10.0)
    ep.refuse = how == "refused"
    d = Deferred.fromCoroutine(c.healthz())
    if how == "cut":
        ep.protocols[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{")
        lose(ep.protocols[0])
    elif how == "malformed":
        ep.protocols[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: zz\r\n\r\n")
    elif how == "silent":
        clock.advance(10.0)
    with pytest.raises(SupernodeUnavailable):
        result(d)
    assert not c.alive("sn:8002")
    c.stop()


def test_a_request_made_as_the_answer_arrives_reuses_the_connection() -> None:
    c, ep, _ = make()
    seen: list[int] = []

    async def two() -> None:
        for _ in range(2):
            seen.append((await c.request("GET", "http://sn:1/x")).code)

    done = Deferred.fromCoroutine(two())
    ep.protocols[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert len(ep.protocols) == 1  # the second request went out on the same connection
    ep.protocols[0].dataReceived(b"HTTP/1.1 201 OK\r\nContent-Length: 0\r\n\r\n")
    result(done)
    assert seen == [200, 201] and c.connections_made == 1


def test_https_goes_through_the_policy_given() -> None:
    from dragonfly.core.leanhttp import _default_endpoint
    from dragonfly.core.tls import TlsClientEndpoint

    asked: list[tuple[bytes, int]] = []

    class Policy:
        def creatorForNetloc(self, host: bytes, port: int) -> object:
            asked.append((host, port))
            return object()

    endpoint = _default_endpoint(MemoryReactorClock(), Policy())
    assert isinstance(endpoint(b"https", "localhost", 8443), TlsClientEndpoint)
    assert asked == [(b"localhost", 8443)]
    assert not isinstance(endpoint(b"http", "localhost", 8002), TlsClientEndpoint)
    assert asked == [(b"localhost", 8443)]


def test_dfpeer_uses_the_lean_client_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    import treq

    from dragonfly.peer.tap import supernode_http

    monkeypatch.delenv("DRAGONFLY_LEAN_API", raising=False)
    assert isinstance(supernode_http(MemoryReactorClock(), None), LeanClient)
    monkeypatch.setenv("DRAGONFLY_LEAN_API", "0")
    assert isinstance(supernode_http(MemoryReactorClock(), None), treq.client.HTTPClient)

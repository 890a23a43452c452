"""
Connection hygiene of our HTTP servers (L{dragonfly.core.httpapi.guard_site}):
bodies over the limit refused from their Content-Length before a byte of
them is read, a malformed Content-Length answered with the JSON envelope,
slow headers cut, concurrent connections bounded.  No sockets: the channel
is driven through a StringTransport with a fake clock.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site

from dragonfly.core.httpapi import MAX_BODY, HttpLimits, guard_site


class Echo(Resource):
    """Answers with the size of the body it was given; counts its calls."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def render(self, request: Any) -> bytes:
        self.calls += 1
        return json.dumps({"got": len(request.content.read())}).encode()


class Server:
    def __init__(self, limits: HttpLimits | None = None) -> None:
        self.clock = MemoryReactorClock()
        self.resource = Echo()
        self.site = guard_site(Site(self.resource, reactor=self.clock), limits)

    def connect(self) -> tuple[Any, StringTransport]:
        proto = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        proto.makeConnection(transport)
        return proto, transport


def answer(transport: StringTransport) -> tuple[int, dict[str, Any] | None]:
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    assert headers[b"content-type"].lower().startswith(b"application/json")
    return status, json.loads(body)


def post(length_header: bytes, body: bytes = b"") -> bytes:
    return b"POST /x HTTP/1.1\r\nHost: a\r\n" + length_header + b"\r\n\r\n" + body


def test_a_body_over_the_limit_is_refused_from_its_content_length() -> None:
    server = Server(HttpLimits(max_body=1000))
    proto, transport = server.connect()
    proto.dataReceived(post(b"Content-Length: 1001"))  # not a byte of the body sent
    status, data = answer(transport)
    assert status == 413 and data["error"]["code"] == "BODY_TOO_LARGE"
    assert transport.disconnecting
    assert server.resource.calls == 0
    # the body arriving after the refusal is not read
    proto.dataReceived(b"x" * 1001)
    assert server.resource.calls == 0


@given(st.integers(0, 3000))
def test_bodies_up_to_the_limit_pass(size: int) -> None:
    server = Server(HttpLimits(max_body=1500))
    proto, transport = server.connect()
    proto.dataReceived(post(b"Content-Length: %d" % size, b"y" * size))
    if size > 1500:
        assert answer(transport)[0] == 413 and server.resource.calls == 0
    else:
        assert server.resource.calls == 1
        assert json.loads(transport.value().split(b"\r\n\r\n", 1)[1]) == {"got": size}


def test_the_default_limit_is_the_api_s() -> None:
    server = Server()
    proto, transport = server.connect()
    proto.dataReceived(post(b"Content-Length: %d" % (MAX_BODY + 1)))
    assert answer(transport)[0] == 413


malformed = st.one_of(
    st.sampled_from([b"-1", b"+5", b"1,2", b"1 2", b"0x10", b"", b"1e3", b"12a", b"\xd9\xa3", b"9" * 40]),
    st.binary(min_size=1, max_size=12).filter(lambda v: not v.strip(b" \t").isdigit() and b"\r" not in v and b"\n" not in v),
)


@given(malformed)
def test_a_malformed_content_length_gets_the_json_400(value: bytes) -> None:
    server = Server()
    proto, transport = server.connect()
    proto.dataReceived(post(b"Content-Length: " + value))
    status, data = answer(transport)
    assert status == 400 and set(data) == {"error"} and data["error"]["code"] == "BAD_REQUEST"
    assert transport.disconnecting and server.resource.calls == 0


def test_two_content_lengths_get_the_json_400() -> None:
    server = Server()
    proto, transport = server.connect()
    proto.dataReceived(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
    status, data = answer(transport)
    assert status == 400 and data["error"]["code"] == "BAD_REQUEST"
    assert server.resource.calls == 0


def test_a_chunked_body_is_cut_when_it_passes_the_limit() -> None:
    server = Server(HttpLimits(max_body=100))
    proto, transport = server.connect()
    proto.dataReceived(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    proto.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert transport.value() == b""
    proto.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n0\r\n\r\n")
    assert answer(transport)[0] == 413 and server.resource.calls == 0


def test_slow_headers_are_cut() -> None:
    server = Server(HttpLimits(header_timeout=10.0))
    proto, transport = server.connect()
    proto.dataReceived(b"GET /x HTTP/1.1\r\n")
    for _ in range(9):
        server.clock.advance(1.05)
        proto.dataReceived(b"X-A: b\r\n")  # a header a second: never idle, never done
    assert transport.value() == b""
    server.clock.advance(1.0)
    status, data = answer(transport)
    assert status == 408 and data["error"]["code"] == "REQUEST_TIMEOUT"
    assert transport.disconnecting
    # a client that never reads its answer is aborted
    server.clock.advance(15)
    assert server.resource.calls == 0


def test_a_connection_that_sends_nothing_is_cut() -> None:
    server = Server(HttpLimits(header_timeout=5.0))
    proto, transport = server.connect()
    server.clock.advance(4.9)
    assert not transport.disconnecting
    server.clock.advance(0.2)
    assert answer(transport)[0] == 408


def test_headers_in_time_are_served_and_an_idle_keep_alive_connection_stays() -> None:
    server = Server(HttpLimits(header_timeout=5.0))
    proto, transport = server.connect()
    proto.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n")
    server.clock.advance(4)
    proto.dataReceived(b"\r\n")
    assert server.resource.calls == 1
    transport.clear()
    # between requests the header deadline does not run (the site's idle timeout does: 60 s)
    server.clock.advance(50)
    assert not transport.disconnecting and transport.value() == b""
    # the next request's headers get their own deadline from its first byte
    proto.dataReceived(b"GET /x HTTP/1.1\r\n")
    server.clock.advance(5.1)
    assert answer(transport)[0] == 408


def test_connections_are_bounded() -> None:
    server = Server(HttpLimits(max_connections=2))
    (a, _), _ = server.connect(), server.connect()
    c, tc = server.connect()
    status, data = answer(tc)
    assert status == 503 and data["error"]["code"] == "TOO_MANY_CONNECTIONS"
    assert tc.disconnecting
    c.connectionLost(None)
    assert server.site.protocol.limits.open == 2
    # one closes: a new one is taken
    a.connectionLost(None)
    d, td = server.connect()
    d.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert server.resource.calls == 1 and b" 200 " in td.value().split(b"\r\n")[0]
    assert server.site.protocol.limits.refused == {"TOO_MANY_CONNECTIONS": 1}

"""dfdaemon with several registries (ns=) and Range requests, without sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from dragonfly.core.ranges import MULTIPLE, BadRange, ByteRange, content_range, parse_range
from dragonfly.daemon import tap
from dragonfly.daemon.front import FrontFactory
from dragonfly.daemon.proxy import DaemonCore, ProxyResource, UnlistedRegistry, pick_registry, split_ns
from dragonfly.daemon.rules import DEFAULT_RULES

HEX = "cd" * 32
REGISTRIES = ("https://registry.example", "http://127.0.0.1:5000", "https://registry-1.docker.io")


# -- ns= -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, path, ns",
    [
        ("/v2/a/blobs/x?ns=registry.example", "/v2/a/blobs/x", "registry.example"),
        ("/v2/a/blobs/x?foo=1&ns=h:5000&bar=2", "/v2/a/blobs/x?foo=1&bar=2", "h:5000"),
        ("/v2/a/manifests/v1?ns=127.0.0.1%3A5000", "/v2/a/manifests/v1", "127.0.0.1:5000"),  # as containerd sends it
        ("/v2/a/blobs/x?nsx=1", "/v2/a/blobs/x?nsx=1", None),
        ("/v2/", "/v2/", None),
        ("/v2/?ns=", "/v2/", ""),
    ],
)
def test_split_ns(uri, path, ns):
    assert split_ns(uri) == (path, ns)


def test_pick_registry_by_ns_first_without_it_and_refuses_unlisted_hosts():
    assert pick_registry(REGISTRIES, None) == "https://registry.example"
    assert pick_registry(REGISTRIES, "") == "https://registry.example"
    assert pick_registry(REGISTRIES, "127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert pick_registry(REGISTRIES, "REGISTRY.example") == "https://registry.example"
    assert pick_registry(REGISTRIES, "docker.io") == "https://registry-1.docker.io"
    for bad in ("127.0.0.1", "127.0.0.1:5001", "evil.example", "registry.example.evil"):
        with pytest.raises(UnlistedRegistry):
            pick_registry(REGISTRIES, bad)
    assert pick_registry((), "x") is None


class Recorder:
    """An upstream client that records where requests go and fails them (502 names the URL)."""

    def __init__(self):
        self.urls = []

    def request(self, method, url, **kw):
        self.urls.append((method, url, dict(kw.get("headers").getAllRawHeaders()) if kw.get("headers") else {}))
        raise ConnectionRefusedError("recorded")

    post = get = lambda self, *a, **kw: (_ for _ in ()).throw(AssertionError("no dfpeer here"))


def front(registries, http=None):
    http = http or Recorder()
    core = DaemonCore(None, registries, DEFAULT_RULES, peer=None, http=http, local_http=http)
    site = Site(ProxyResource(core))
    site.protocol = HTTPChannel
    proto = FrontFactory(None, site, core).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return core, http, proto, transport


def status_of(transport):
    return int(transport.value().split(b" ", 2)[1])


def body_of(transport):
    body = transport.value().split(b"\r\n\r\n", 1)[1]
    return json.loads(body[body.index(b"{"): body.rindex(b"}") + 1])


@pytest.mark.parametrize(
    "uri, upstream",
    [
        ("/v2/team/app/manifests/v1", "https://registry.example/v2/team/app/manifests/v1"),
        ("/v2/team/app/manifests/v1?ns=127.0.0.1:5000", "http://127.0.0.1:5000/v2/team/app/manifests/v1"),
        ("/v2/library/busybox/manifests/1?ns=docker.io", "https://registry-1.docker.io/v2/library/busybox/manifests/1"),
    ],
)
def test_mirror_requests_go_to_the_registry_ns_names(uri, upstream):
    core, http, proto, transport = front(REGISTRIES)
    proto.dataReceived(f"GET {uri} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n".encode())
    assert http.urls[0][:2] == ("GET", upstream)
    assert http.urls[0][2][b"Authorization"] == [b"Bearer t"]  # auth passes through to that registry
    assert status_of(transport) == 502


@pytest.mark.parametrize("ns", ["evil.example", "127.0.0.1:5001", "127.0.0.1"])
def test_an_unlisted_ns_gets_a_json_403_naming_the_option_and_no_fetch(ns):
    core, http, proto, transport = front(REGISTRIES)
    proto.dataReceived(f"GET /v2/a/blobs/sha256:{HEX}?ns={ns} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status_of(transport) == 403
    err = body_of(transport)["error"]
    assert err["code"] == "REGISTRY_NOT_LISTED" and "--registry" in err["message"] and ns in err["message"]
    assert http.urls == []
    assert core.counters.unlisted == 1


def test_one_registry_still_works_as_a_string():
    core = DaemonCore(None, "https://one.example/", DEFAULT_RULES, None, None, None)
    assert core.registries == ("https://one.example",) and core.registry == "https://one.example"


# -- options -------------------------------------------------------------------------------------


def test_registry_repeats_on_the_command_line_and_is_a_list_in_the_file(tmp_path):
    o = tap.Options()
    o.parseOptions(["--registry", "https://a.example", "--registry", "http://127.0.0.1:5000", "--home", str(tmp_path)])
    assert o["registries"] == ["https://a.example", "http://127.0.0.1:5000"]
    assert o["registry"] == "https://a.example"
    config = tmp_path / "c.yaml"
    config.write_text("registry:\n  - https://b.example\n  - https://c.example:5000\n")
    o = tap.Options()
    o.parseOptions(["--config", str(config), "--home", str(tmp_path)])
    assert o["registries"] == ["https://b.example", "https://c.example:5000"]
    o = tap.Options()
    o.parseOptions(["--config", str(config), "--registry", "https://d.example", "--home", str(tmp_path)])
    assert o["registries"] == ["https://d.example"]  # the command line replaces the file's list


@pytest.mark.parametrize(
    "args, message",
    [
        (["--registry", "ftp://a"], "http\\(s\\) URL"),
        (["--registry", "https://a.example/v2/"], "has no path"),
        (["--registry", "https://a.example", "--registry", "http://A.example"], "same host"),
    ],
)
def test_bad_registries_are_refused(tmp_path, args, message):
    with pytest.raises(usage.UsageError, match=message):
        tap.Options().parseOptions([*args, "--home", str(tmp_path)])


# -- Range ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, parsed",
    [
        (None, None),
        ("bytes=0-99", ByteRange(0, 99)),
        ("bytes=100-", ByteRange(100, None)),
        ("bytes=-500", ByteRange(suffix=500)),
        ("Bytes = 5-5", ByteRange(5, 5)),
        (b"bytes=0-0", ByteRange(0, 0)),
        ("items=0-5", None),  # another unit: ignored
        ("bytes=0-1,5-9", MULTIPLE),
        ("bytes=0-1, ,", ByteRange(0, 1)),
    ],
)
def test_parse_range(value, parsed):
    assert parse_range(value) == parsed


@pytest.mark.parametrize("value", ["bytes=", "bytes=abc", "bytes=9-1", "bytes=--1", "bytes=1-2-3", "bytes= -", "bytes=0x1-2"])
def test_malformed_ranges_raise(value):
    with pytest.raises(BadRange):
        parse_range(value)


@pytest.mark.parametrize(
    "spec, length, span",
    [
        (ByteRange(0, 99), 1000, (0, 100)),
        (ByteRange(900, 5000), 1000, (900, 1000)),
        (ByteRange(1000, None), 1000, None),
        (ByteRange(999, None), 1000, (999, 1000)),
        (ByteRange(suffix=10), 1000, (990, 1000)),
        (ByteRange(suffix=5000), 1000, (0, 1000)),
        (ByteRange(suffix=0), 1000, None),
        (ByteRange(0, 0), 0, None),
    ],
)
def test_resolve(spec, length, span):
    assert spec.resolve(length) == span


def test_content_range_and_header_round_trip():
    assert content_range(990, 1000, 1000) == "bytes 990-999/1000"
    for spec in (ByteRange(0, 9), ByteRange(5, None), ByteRange(suffix=3)):
        assert parse_range(spec.header()) == spec


@given(st.text(max_size=80))
def test_parse_range_raises_only_bad_range(value):
    try:
        spec = parse_range(value)
    except BadRange:
        return
    if isinstance(spec, ByteRange):
        for length in (0, 1, 1000):
            span = spec.resolve(length)
            assert span is None or 0 <= span[0] < span[1] <= length


def test_a_malformed_blob_range_is_a_416_before_anything_is_fetched():
    core, http, proto, transport = front(REGISTRIES)
    proto.dataReceived(f"GET /v2/a/blobs/sha256:{HEX} HTTP/1.1\r\nHost: x\r\nRange: bytes=9-1\r\n\r\n".encode())
    assert status_of(transport) == 416
    assert body_of(transport)["error"]["code"] == "BAD_RANGE"
    assert http.urls == []


def test_several_ranges_are_dropped_for_the_whole_blob():
    core, http, proto, transport = front(REGISTRIES)
    core.check_access = False
    core.peer = type("NoPeer", (), {"api": lambda self: (_ for _ in ()).throw(OSError("no dfpeer"))})()
    proto.dataReceived(f"GET /v2/a/blobs/sha256:{HEX} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1,4-5\r\n\r\n".encode())
    # the P2P path is unavailable here, so it goes direct: without the Range header
    method, url, headers = http.urls[0]
    assert url == f"https://registry.example/v2/a/blobs/sha256:{HEX}"
    assert b"Range" not in headers


class FakePeerHttp:
    """The dfpeer's local API: a download that has just started (status running)."""

    def __init__(self):
        self.posts = []

    def post(self, url, json=None, timeout=None):
        from twisted.internet.defer import succeed

        self.posts.append(json)

        class R:
            code = 200

            def json(self):
                return succeed({"taskId": "ab" * 32, "status": "running"})

        return succeed(R())

    def get(self, *a, **kw):
        raise AssertionError("a cold range must not wait for the swarm")


def test_a_cold_range_goes_direct_with_its_range_while_the_swarm_prefetches():
    from twisted.internet.defer import succeed

    upstream = Recorder()
    local = FakePeerHttp()
    core = DaemonCore(None, REGISTRIES, DEFAULT_RULES, peer=None, http=upstream, local_http=local)
    core.check_access = False
    core.cold_range_direct = True
    core.peer = type("Peer", (), {"api": lambda self: succeed("http://127.0.0.1:1")})()
    site = Site(ProxyResource(core))
    site.protocol = HTTPChannel
    proto = FrontFactory(None, site, core).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(f"GET /v2/a/blobs/sha256:{HEX} HTTP/1.1\r\nHost: x\r\nRange: bytes=-1048576\r\n\r\n".encode())
    assert local.posts and local.posts[0]["digest"] == f"sha256:{HEX}"  # the prefetch started
    method, url, headers = upstream.urls[0]
    assert url == f"https://registry.example/v2/a/blobs/sha256:{HEX}" and headers[b"Range"] == [b"bytes=-1048576"]
    assert core.counters.ranges_direct == 1


def test_cold_range_option(tmp_path):
    o = tap.Options()
    o.parseOptions(["--cold-range", "direct", "--home", str(tmp_path)])
    assert o["cold-range"] == "direct"
    with pytest.raises(usage.UsageError, match="--cold-range"):
        tap.Options().parseOptions(["--cold-range", "sometimes", "--home", str(tmp_path)])


def test_a_warm_range_cancels_the_registry_request_asked_for_meanwhile():
    """The registry is asked for a range while the dfpeer is asked whether it holds the blob: held, that request is dropped."""
    from twisted.internet.defer import Deferred, succeed

    cancelled = []

    class Pending:
        def __init__(self):
            self.urls = []

        def request(self, method, url, **kw):
            self.urls.append(url)
            return Deferred(lambda d: cancelled.append(url))

    class HeldPeer(FakePeerHttp):
        def get(self, url, timeout=None):
            class R:
                code = 200

                def json(self):
                    return succeed({"status": "success"})

            return succeed(R())

    upstream, local = Pending(), HeldPeer()
    core = DaemonCore(None, REGISTRIES, DEFAULT_RULES, peer=None, http=upstream, local_http=local)
    core.check_access = False
    core.cold_range_direct = True
    core.peer = type("Peer", (), {"api": lambda self: succeed("http://127.0.0.1:1")})()
    site = Site(ProxyResource(core))
    site.protocol = HTTPChannel
    proto = FrontFactory(None, site, core).buildProtocol(None)
    proto.makeConnection(StringTransport())
    proto.dataReceived(f"GET /v2/a/blobs/sha256:{HEX} HTTP/1.1\r\nHost: x\r\nRange: bytes=-1048576\r\n\r\n".encode())
    assert upstream.urls[0] == f"https://registry.example/v2/a/blobs/sha256:{HEX}"  # asked at once
    assert cancelled == upstream.urls[:1]  # and dropped: the swarm holds the blob
    assert core.counters.ranges_direct == 0


class RegistryRange:
    """The registry's 206 for a range, delivered when the test says (a pending upstream request)."""

    def __init__(self, body=b"tail-bytes"):
        from twisted.internet.defer import Deferred

        self.urls = []
        self.body = body
        self.pending = Deferred()
        self.cancelled = False

    def request(self, method, url, **kw):
        from twisted.internet.defer import Deferred

        self.urls.append(url)
        d = Deferred(lambda _: setattr(self, "cancelled", True))
        self.pending.addCallback(lambda _: d.callback(self.response()))
        return d

    def response(self):
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone

        body = self.body

        class Producer:
            def pauseProducing(self):
                pass

            def resumeProducing(self):
                pass

            def stopProducing(self):
                pass

        class Response:
            code, phrase, length = 206, b"Partial Content", len(body)
            headers = Headers({b"Content-Range": [f"bytes 90-{89 + len(body)}/{90 + len(body)}".encode()]})

            def deliverBody(self, protocol):
                protocol.makeConnection(Producer())
                protocol.dataReceived(body)
                protocol.connectionLost(Failure(ResponseDone()))

        return Response()


class SlowPeer(FakePeerHttp):
    """A dfpeer whose answer to "do you hold it?" comes when the test says."""

    def __init__(self, held=False):
        from twisted.internet.defer import Deferred

        super().__init__()
        self.held = held
        self.answer = Deferred()
        self.gets = []

    def get(self, url, timeout=None, **kw):
        from twisted.internet.defer import Deferred, succeed

        self.gets.append(url)
        if url.endswith("/content"):
            return Deferred()  # the swarm's stream: not started in these tests
        held = self.held

        class R:
            code = 200 if held else 404

            def json(self):
                return succeed({"status": "success"} if held else {"error": {"code": "TASK_UNKNOWN"}})

        d = self.answer
        return d.addCallback(lambda _: R())


def cold_core(upstream, local):
    from twisted.internet.defer import succeed

    core = DaemonCore(None, REGISTRIES, DEFAULT_RULES, peer=None, http=upstream, local_http=local)
    core.check_access = False
    core.cold_range_direct = True
    core.peer = type("Peer", (), {"api": lambda self: succeed("http://127.0.0.1:1")})()
    site = Site(ProxyResource(core))
    site.protocol = HTTPChannel
    proto = FrontFactory(None, site, core).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return core, proto, transport


RANGE_GET = f"GET /v2/a/blobs/sha256:{HEX} HTTP/1.1\r\nHost: x\r\nRange: bytes=90-\r\n\r\n".encode()


def test_a_cold_range_is_relayed_before_the_dfpeer_answers_and_prefetched_after_it_is_sent():
    """The first byte waits for the registry only; the swarm's whole-blob fetch starts once the range is sent."""
    upstream, local = RegistryRange(), SlowPeer(held=False)
    core, proto, transport = cold_core(upstream, local)
    proto.dataReceived(RANGE_GET)
    assert upstream.urls and local.gets  # both asked at once
    assert local.posts == []  # no prefetch while the range is on its way
    upstream.pending.callback(None)  # the registry answers; the dfpeer has not yet
    assert status_of(transport) == 206 and transport.value().endswith(b"tail-bytes")
    assert local.posts == []
    local.answer.callback(None)  # not held: now the prefetch
    assert [p["digest"] for p in local.posts] == [f"sha256:{HEX}"]
    assert core.counters.ranges_direct == 1 and f"sha256:{HEX}" not in core.held


def test_a_range_of_a_blob_the_dfpeer_was_seen_to_hold_never_asks_the_registry():
    upstream, local = RegistryRange(), SlowPeer(held=True)
    core, proto, transport = cold_core(upstream, local)
    proto.dataReceived(RANGE_GET)
    upstream.pending.callback(None)  # the registry first: relayed, and no prefetch (held)
    local.answer.callback(None)
    assert status_of(transport) == 206 and local.posts == []
    assert f"sha256:{HEX}" in core.held
    upstream.urls.clear()
    proto.dataReceived(RANGE_GET)  # the next one goes to the swarm at once
    assert upstream.urls == [] and local.posts and local.posts[0]["range"] == "bytes=90-"


def test_an_unreachable_registry_waits_for_the_dfpeer_which_may_hold_the_blob():
    from twisted.internet.defer import fail

    class Down:
        urls = []

        def request(self, method, url, **kw):
            self.urls.append(url)
            return fail(ConnectionRefusedError("down"))

    local = SlowPeer(held=True)
    core, proto, transport = cold_core(Down(), local)
    proto.dataReceived(RANGE_GET)
    assert transport.value() == b""  # no 502 yet: the dfpeer may hold it
    local.answer.callback(None)
    assert local.posts and local.posts[0]["range"] == "bytes=90-"  # served from the swarm
    assert core.counters.ranges_direct == 0


def test_held_digests_keeps_the_most_recent():
    from dragonfly.daemon.proxy import RecentDigests

    held = RecentDigests(size=2)
    for d in ("a", "b", "a", "c"):
        held.add(d)
    assert "a" in held and "c" in held and "b" not in held and len(held) == 2


def test_a_range_of_a_blob_this_dfdaemon_prefetched_waits_for_the_dfpeer_which_may_hold_it_by_now():
    from twisted.internet.defer import Deferred

    upstream, local = RegistryRange(), SlowPeer(held=False)
    core, proto, transport = cold_core(upstream, local)
    proto.dataReceived(RANGE_GET)
    upstream.pending.callback(None)
    local.answer.callback(None)
    assert len(local.posts) == 1  # the prefetch
    sent = transport.value()
    local.held, local.answer = True, Deferred()  # the prefetch completes
    proto.dataReceived(RANGE_GET)  # the registry answers at once this time ...
    assert transport.value() == sent  # ... and is not relayed before the dfpeer answers
    local.answer.callback(None)
    assert len(local.posts) == 2 and local.posts[1]["range"] == "bytes=90-"  # from the swarm
    assert core.counters.ranges_direct == 1 and f"sha256:{HEX}" in core.held


def test_a_client_gone_before_either_answer_drops_the_registry_request():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    upstream, local = RegistryRange(), SlowPeer(held=False)
    core, proto, transport = cold_core(upstream, local)
    proto.dataReceived(RANGE_GET)
    proto.connectionLost(Failure(ConnectionDone()))
    assert upstream.cancelled
    local.answer.callback(None)  # the dfpeer's late answer: no prefetch for a request nobody waits for
    assert local.posts == []

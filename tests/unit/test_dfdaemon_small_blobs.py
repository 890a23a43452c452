"""dfdaemon --direct-below (small blobs straight from the registry, the rest through the swarm), and the spliced relay's head parser; no sockets."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import fail, succeed
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from dragonfly.daemon import tap
from dragonfly.daemon.front import FrontFactory
from dragonfly.daemon.proxy import DaemonCore, ProxyResource
from dragonfly.daemon.rules import DEFAULT_RULES
from dragonfly.daemon.splice import BadHead, parse_head

REGISTRY = "http://registry.example"


class Producer:
    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class Response:
    def __init__(self, code, body, head=False, length=None):
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Unauthorized"
        self.headers = Headers({b"Content-Length": [str(len(body) if length is None else length).encode()]})
        self.length = 0 if head else len(body)
        self.body = b"" if head else body

    def deliverBody(self, protocol):
        protocol.makeConnection(Producer())
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class Registry:
    """An upstream client serving blobs by path, recording every request."""

    def __init__(self, blobs, code=200):
        self.blobs = blobs
        self.code = code
        self.requests = []

    def request(self, method, url, **kw):
        self.requests.append((method, url))
        body = self.blobs[url.rsplit("/", 1)[1]]
        return succeed(Response(self.code, body, head=method == "HEAD"))


class NoPeer:
    """A dfpeer link that records being asked and has no dfpeer (the swarm path falls back)."""

    def __init__(self):
        self.asked = 0

    def api(self):
        self.asked += 1
        return fail(ConnectionRefusedError("no dfpeer"))


def get(core, digest):
    site = Site(ProxyResource(core))
    site.protocol = HTTPChannel
    proto = FrontFactory(None, site, core).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(f"GET /v2/team/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def blob(n):
    data = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


@pytest.mark.parametrize("check_access", [True, False])
def test_a_small_blob_goes_to_the_registry_and_a_big_one_to_the_swarm(check_access):
    small, small_body = blob(1000)
    big, big_body = blob(5000)
    registry = Registry({small: small_body, big: big_body})
    peer = NoPeer()
    core = DaemonCore(None, REGISTRY, DEFAULT_RULES, peer=peer, http=registry, local_http=None)
    core.check_access = check_access
    core.direct_below = 4096

    assert get(core, small) == (200, small_body)
    assert peer.asked == 0 and core.counters.small == 1 and core.counters.direct_bytes == len(small_body)
    assert registry.requests == [("HEAD", f"{REGISTRY}/v2/team/app/blobs/{small}"),
                                 ("GET", f"{REGISTRY}/v2/team/app/blobs/{small}")]

    # at the threshold and above: the swarm is asked (here it has no dfpeer, so the blob falls back)
    assert get(core, big) == (200, big_body)
    assert peer.asked == 1 and core.counters.small == 1 and core.counters.fallbacks == 1


def test_a_blob_at_the_threshold_goes_to_the_swarm_and_zero_turns_the_rule_off():
    digest, body = blob(4096)
    peer = NoPeer()
    core = DaemonCore(None, REGISTRY, DEFAULT_RULES, peer=peer, http=Registry({digest: body}), local_http=None)
    core.direct_below = 4096
    assert get(core, digest) == (200, body)
    assert peer.asked == 1 and core.counters.small == 0
    core.direct_below = 0
    core.check_access = False
    registry = core.http = Registry({digest: body})
    assert get(core, digest) == (200, body)
    assert peer.asked == 2 and core.counters.small == 0
    assert [m for m, _ in registry.requests] == ["GET"]  # no HEAD at all


def test_a_small_blob_that_does_not_match_its_digest_is_cut_short():
    digest, _ = blob(1000)
    _, other = blob(999)
    core = DaemonCore(None, REGISTRY, DEFAULT_RULES, peer=NoPeer(), http=Registry({digest: other}), local_http=None)
    core.direct_below = 4096
    site = Site(ProxyResource(core))
    site.protocol = HTTPChannel
    proto = FrontFactory(None, site, core).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(f"GET /v2/team/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert core.counters.small == 1
    assert other not in transport.value()  # never the whole (wrong) body
    assert transport.disconnecting  # the client sees it cut short


def test_a_refused_client_gets_the_registry_answer_whatever_the_size():
    digest, body = blob(1000)
    registry = Registry({digest: body}, code=401)
    core = DaemonCore(None, REGISTRY, DEFAULT_RULES, peer=NoPeer(), http=registry, local_http=None)
    core.direct_below = 4096
    status, _ = get(core, digest)
    assert status == 401 and core.counters.denied == 1 and core.counters.small == 0


@pytest.mark.parametrize("value, parsed", [("0", 0), ("256K", 256 << 10), ("1M", 1 << 20), ("300000", 300000),
                                           ("512KiB", 512 << 10)])
def test_direct_below_option(value, parsed):
    options = tap.Options()
    options.parseOptions(["--direct-below", value])
    assert options["direct-below-bytes"] == parsed


def test_direct_below_default_and_bad_values():
    options = tap.Options()
    options.parseOptions([])
    assert options["direct-below-bytes"] == 256 << 10
    with pytest.raises(usage.UsageError, match="--direct-below"):
        tap.Options().parseOptions(["--direct-below", "lots"])


# -- the spliced relay's head parser (dragonfly.daemon.splice) ---------------------------------


def test_parse_head():
    status, headers = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Type:  x/y ")
    assert status == 200 and headers == {b"content-length": b"12", b"content-type": b"x/y"}
    for bad in (b"", b"HTTP/1.1", b"HTTP/2 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 200 OK\r\nNoColon",
                b"HTTP/1.1 200 OK\r\nA: 1\r\na: 2", b"HTTP/1.1 200 OK\r\n Folded: x"):
        with pytest.raises(BadHead):
            parse_head(bad)


@given(st.binary(max_size=300))
def test_parse_head_raises_only_badhead(data):
    try:
        status, headers = parse_head(data)
    except BadHead:
        return
    assert 100 <= status <= 999 and all(k == k.lower() for k in headers)

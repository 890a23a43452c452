"""dfdaemon without sockets: rules, the CONNECT parser and front protocol, the CA, the verifying relay, options."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site

from dragonfly.daemon import tap
from dragonfly.daemon.ca import CaError, CertificateAuthority, LeafMinter, make_ca, write_ca
from dragonfly.daemon.front import MAX_HEAD, FrontFactory, parse_connect
from dragonfly.daemon.proxy import Counters, _blob_headers, _passable, _Relay, _VerifyingRelay
from dragonfly.daemon.rules import DEFAULT_RULES, Decision, Rule, RuleError, blob_digest, decide

HEX = "ab" * 32
BLOB = f"https://registry.example/v2/team/app/blobs/sha256:{HEX}"


# -- rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, p2p",
    [
        (BLOB, True),
        (BLOB + "?ns=registry.example", True),
        (f"http://r:5000/v2/a/b/c/blobs/sha256:{HEX}", True),
        ("https://registry.example/v2/team/app/manifests/latest", False),
        ("https://registry.example/v2/team/app/blobs/uploads/123", False),
        ("https://registry.example/v2/", False),
        ("https://auth.example/token?scope=repository:team/app:pull", False),
        (f"https://registry.example/v2/team/app/blobs/sha256:{HEX}extra", False),
    ],
)
def test_default_rules_send_only_blob_gets_through_the_swarm(url, p2p):
    d = decide(DEFAULT_RULES, "GET", url)
    assert d.p2p is p2p
    assert d.url == url
    assert (d.digest == f"sha256:{HEX}") is p2p
    assert decide(DEFAULT_RULES, "HEAD", url).p2p is False


def test_first_matching_rule_wins_with_direct_use_https_and_redirect():
    rules = (
        Rule(r"private\.example", direct=True),
        Rule(r"plain\.example", use_https=True),
        Rule(r"old\.example", redirect="new.example:5000"),
        *DEFAULT_RULES,
    )
    assert decide(rules, "GET", f"https://private.example/v2/x/blobs/sha256:{HEX}").p2p is False
    d = decide(rules, "GET", f"http://plain.example/v2/x/blobs/sha256:{HEX}")
    assert d.p2p and d.url == f"https://plain.example/v2/x/blobs/sha256:{HEX}"
    d = decide(rules, "GET", f"http://old.example/v2/x/blobs/sha256:{HEX}?a=1")
    assert d.p2p and d.url == f"http://new.example:5000/v2/x/blobs/sha256:{HEX}?a=1"
    assert decide(rules, "PUT", f"http://old.example/v2/x/blobs/sha256:{HEX}").p2p is False
    assert decide(rules, "GET", "http://elsewhere.example/file").p2p is False


@pytest.mark.parametrize(
    "item, message",
    [
        ({"regx": "("}, "bad regex"),
        ({"regx": "a", "direct": True, "use_https": True}, "cannot be combined"),
        ({"regx": "a", "redirect": "http://x/"}, "redirect must be host"),
        ({"regx": "a", "typo": 1}, "unknown key 'typo'"),
        ({"direct": True}, "needs a 'regx'"),
        ({"regx": "a", "direct": "yes"}, "must be true or false"),
        ("a", "must be a mapping"),
    ],
)
def test_bad_rules_are_refused_with_a_reason(item, message):
    with pytest.raises(RuleError, match=message):
        Rule.from_dict(item)


@given(st.text(max_size=300), st.sampled_from(["GET", "HEAD", "PUT", "POST"]))
def test_decide_never_raises(url, method):
    d = decide(DEFAULT_RULES, method, url)
    assert d.p2p is False or (method == "GET" and blob_digest(url) == d.digest)


# -- CONNECT and the front protocol --------------------------------------------------------


def test_parse_connect():
    assert parse_connect(b"CONNECT registry.example:443 HTTP/1.1\r\nHost: x\r\n\r\n") == ("registry.example", 443)
    assert parse_connect(b"CONNECT [::1]:5000 HTTP/1.1\r\n\r\n") == ("::1", 5000)
    for bad in (b"CONNECT x HTTP/1.1", b"CONNECT x:0 HTTP/1.1", b"CONNECT x:99999 HTTP/1.1",
                b"CONNECT a/b:1 HTTP/1.1", b"GET x:1 HTTP/1.1", b"CONNECT x:1 SPDY/3"):
        with pytest.raises(ValueError):
            parse_connect(bad + b"\r\n\r\n")


@given(st.binary(max_size=200))
def test_parse_connect_raises_only_valueerror(data):
    try:
        host, port = parse_connect(data)
    except ValueError:
        return
    assert 0 < port < 65536 and host


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello " + request.uri


def front(hijack=(), minter=None):
    site = Site(Hello())
    site.protocol = HTTPChannel
    factory = FrontFactory(None, site, type("Core", (), {"counters": Counters()})(), hijack, minter)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def status_of(transport):
    return int(transport.value().split(b" ", 2)[1])


def test_plain_http_goes_to_the_web_site_in_any_pieces():
    proto, transport = front()
    for b in b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n":
        proto.dataReceived(bytes([b]))
    assert status_of(transport) == 200
    assert transport.value().endswith(b"hello /v2/")


@pytest.mark.parametrize(
    "data, status",
    [
        (b"CONNECT nowhere HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT x:443 HTTP/1.1\r\n\r\nearly bytes", 400),
        (b"CONNECT x:443 HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEAD // 6), 431),
    ],
)
def test_bad_connects_get_a_json_error_and_the_connection_closes(data, status):
    proto, transport = front()
    proto.dataReceived(data)
    assert status_of(transport) == status
    assert b'"code": "BAD_CONNECT"' in transport.value()
    assert transport.disconnecting


# -- the CA ----------------------------------------------------------------------------


def test_minted_leaves_are_signed_by_the_ca_for_names_and_addresses():
    ca = CertificateAuthority(*make_ca())
    for host in ("registry.example", "127.0.0.1", "::1"):
        chain, key = ca.mint(host)
        certs = x509.load_pem_x509_certificates(chain)
        leaf = certs[0]
        leaf.verify_directly_issued_by(ca.cert)
        assert certs[1] == ca.cert
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host in [str(v) for v in sans.get_values_for_type(x509.DNSName)] + [
            str(v) for v in sans.get_values_for_type(x509.IPAddress)
        ]
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_ca_that_is_not_one_is_refused(tmp_path):
    ca = CertificateAuthority(*make_ca())
    leaf, key = ca.mint("x.example")
    with pytest.raises(CaError, match="not a CA"):
        CertificateAuthority(leaf.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n", key)
    other_cert, _ = make_ca()
    _, other_key = make_ca()
    with pytest.raises(CaError, match="does not belong"):
        CertificateAuthority(other_cert, other_key)
    with pytest.raises(CaError):
        CertificateAuthority(b"junk", b"junk")


def test_gen_ca_writes_a_private_key_and_never_overwrites(tmp_path):
    cert, key = str(tmp_path / "ca.crt"), str(tmp_path / "ca.key")
    write_ca(cert, key)
    assert os.stat(key).st_mode & 0o077 == 0
    CertificateAuthority.load(cert, key)
    with pytest.raises(CaError, match="exists"):
        write_ca(cert, key)


class SyncPool:
    def __init__(self):
        self.calls = 0

    def run(self, f, *args):
        from twisted.internet.defer import maybeDeferred

        self.calls += 1
        return maybeDeferred(f, *args)


def test_leaf_contexts_are_minted_once_per_host():
    pool = SyncPool()
    minter = LeafMinter(CertificateAuthority(*make_ca()), pool)
    seen = []
    for _ in range(3):
        minter.context_for("registry.example").addCallback(seen.append)
    minter.context_for("other.example").addCallback(seen.append)
    assert len(seen) == 4 and seen[0] is seen[1] is seen[2]
    assert pool.calls == 2


# -- the verifying relay ----------------------------------------------------------------


class FakeChannel:
    def __init__(self):
        self.transport = StringTransport()
        self.aborted = False
        self.transport.abortConnection = self._abort

    def _abort(self):
        self.aborted = True


class FakeRequest:
    def __init__(self):
        self.written = []
        self.finished = False
        self.channel = FakeChannel()
        self.producer = None

    def write(self, data):
        self.written.append(data)

    def finish(self):
        self.finished = True

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def notifyFinish(self):
        from twisted.internet.defer import Deferred

        return Deferred()


def relay_through(cls, chunks, digest=None):
    from twisted.internet.defer import Deferred

    request, done = FakeRequest(), Deferred()
    relay = cls(request, lambda n: None, done, digest) if digest else cls(request, lambda n: None, done)
    relay.makeConnection(StringTransport())
    for c in chunks:
        relay.dataReceived(c)
    relay.connectionLost(Failure(ResponseDone()))
    results = []
    done.addCallback(results.append)
    return request, results[0]


@given(st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=20))
@settings(max_examples=50)
def test_a_verified_body_is_delivered_whole(chunks):
    body = b"".join(chunks)
    request, complete = relay_through(_VerifyingRelay, chunks, "sha256:" + hashlib.sha256(body).hexdigest())
    assert complete and request.finished and not request.channel.aborted
    assert b"".join(request.written) == body


@given(st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=20))
@settings(max_examples=50)
def test_a_body_that_does_not_match_its_digest_is_cut_before_its_last_chunk(chunks):
    body = b"".join(chunks)
    request, complete = relay_through(_VerifyingRelay, chunks, "sha256:" + "0" * 64)
    assert not complete and not request.finished and request.channel.aborted
    assert b"".join(request.written) == body[: len(body) - len(chunks[-1])]


def test_a_plain_relay_cut_short_cuts_the_client():
    from twisted.internet.defer import Deferred
    from twisted.internet.error import ConnectionLost

    request, done = FakeRequest(), Deferred()
    relay = _Relay(request, lambda n: None, done)
    relay.makeConnection(StringTransport())
    relay.dataReceived(b"part")
    relay.connectionLost(Failure(ConnectionLost()))
    assert request.channel.aborted and not request.finished


# -- options -------------------------------------------------------------------------------


def test_config_file_rules_hijack_and_flag_precedence(tmp_path):
    ca_cert, ca_key = tmp_path / "ca.crt", tmp_path / "ca.key"
    write_ca(str(ca_cert), str(ca_key))
    config = tmp_path / "dfdaemon.yaml"
    config.write_text(
        f"""
port: 65011
registry: https://registry.example
proxies:
  - regx: internal\\.example
    direct: true
  - regx: blobs/sha256.*
hijack_https:
  cert: {ca_cert}
  key: {ca_key}
  hosts:
    - regx: registry\\.example
"""
    )
    o = tap.Options()
    o.parseOptions(["--config", str(config), "--port", "7000", "--home", str(tmp_path)])
    assert o["port"] == 7000  # the flag wins
    assert o["registry"] == "https://registry.example"
    assert [r.regex for r in o["compiled-rules"]] == [r"internal\.example", "blobs/sha256.*"]
    assert o["compiled-rules"][0].direct
    assert o["ca"] is not None and o["compiled-hijack"][0].pattern == r"registry\.example"
    # rules on the command line replace the file's
    o = tap.Options()
    o.parseOptions(["--config", str(config), "--rule", "only-this", "--home", str(tmp_path)])
    assert [r.regex for r in o["compiled-rules"]] == ["only-this"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("colour: blue\n", "unknown key 'colour'"),
        ("port: [1]\n", "'port' in .* takes a string or a number"),
        ("proxies: blobs\n", "must be a list"),
        ("hijack_https: {certs: x}\n", "unknown key 'hijack_https.certs'"),
        ("- a\n", "mapping"),
        ("port: 1\n  bad: [\n", "bad YAML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(usage.UsageError, match=message):
        tap.Options().parseOptions(["--config", str(config), "--home", str(tmp_path)])


# -- bad requests ------------------------------------------------------------------------


def proxy_front(registry=None):
    from dragonfly.daemon.proxy import DaemonCore, ProxyResource

    class NoHttp:
        def request(self, *a, **kw):
            raise AssertionError("nothing may go upstream")

    core = DaemonCore(None, registry, DEFAULT_RULES, peer=None, http=NoHttp(), local_http=NoHttp())
    site = Site(ProxyResource(core))
    site.protocol = HTTPChannel
    proto = FrontFactory(None, site, core).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


@pytest.mark.parametrize(
    "request_line, code",
    [
        (b"GET ftp://registry.example/v2/ HTTP/1.1", b"NO_UPSTREAM"),  # unsupported scheme
        (b"GET file:///etc/passwd HTTP/1.1", b"NO_UPSTREAM"),
        (b"GET /v2/team/app/manifests/v1 HTTP/1.1", b"NO_UPSTREAM"),  # a mirror request without --registry
    ],
)
def test_requests_dfdaemon_cannot_place_get_a_json_400(request_line, code):
    proto, transport = proxy_front()
    proto.dataReceived(request_line + b"\r\nHost: x\r\n\r\n")
    assert status_of(transport) == 400
    assert b'"code": "' + code + b'"' in transport.value()
    assert b"application/json" in transport.value()


def test_a_malformed_request_line_is_refused_by_the_web_server():
    proto, transport = proxy_front("http://registry.example")
    proto.dataReceived(b"GARBAGE\r\n\r\n")
    assert status_of(transport) == 400
    assert transport.disconnecting


def test_passable_drops_hop_by_hop_and_an_empty_content_encoding() -> None:
    """treq's decoder leaves C{Content-Encoding: } on an answer that had none: not passed on; a real one is."""
    from twisted.web.http_headers import Headers

    h = Headers({b"Content-Encoding": [b""], b"Connection": [b"close"], b"Host": [b"r"], b"Content-Type": [b"x/y"]})
    assert dict(_passable(h)) == {b"Content-Type": [b"x/y"]}
    h = Headers({b"Content-Encoding": [b"gzip"]})
    assert dict(_passable(h)) == {b"Content-Encoding": [b"gzip"]}


def test_a_blob_by_digest_from_the_swarm_is_cacheable_and_names_its_digest() -> None:
    from twisted.web.test.requesthelper import DummyRequest

    digest = "sha256:" + "ab" * 32
    request = DummyRequest([b""])
    _blob_headers(request, Decision("http://r/v2/x/blobs/" + digest, True, digest), "t" * 64)
    h = request.responseHeaders
    assert h.getRawHeaders(b"docker-content-digest") == [digest.encode()]
    assert h.getRawHeaders(b"etag") == [f'"{digest}"'.encode()]
    assert h.getRawHeaders(b"cache-control") == [b"max-age=31536000"]
    assert h.getRawHeaders(b"x-dragonfly-task-id") == [b"t" * 64]
    # a body named by no digest (a plain URL through the swarm): nothing claims it never changes
    request = DummyRequest([b""])
    _blob_headers(request, Decision("http://files/f", True), "u" * 64)
    assert not request.responseHeaders.hasHeader(b"cache-control")
    assert not request.responseHeaders.hasHeader(b"etag")

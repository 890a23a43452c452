"""
A cold Range with C{--cold-range direct} once dfdaemon knows what its
dfpeer holds (its task list, asked once at the first blob request): the
registry alone is asked before the range is sent; the dfpeer after it.
Without sockets.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from dragonfly.core.ids import task_id
from dragonfly.daemon import tap
from dragonfly.daemon.front import FrontFactory
from dragonfly.daemon.proxy import DaemonCore, ProxyResource, held_digests
from dragonfly.daemon.rules import DEFAULT_RULES

from .test_dfdaemon_registries import HEX, REGISTRIES, RegistryRange, status_of

DIGEST = f"sha256:{HEX}"
OTHER = "sha256:" + "ef" * 32
RANGE_GET = f"GET /v2/a/blobs/{DIGEST} HTTP/1.1\r\nHost: x\r\nRange: bytes=90-\r\n\r\n".encode()
CONFIG_GET = f"GET /v2/a/blobs/{OTHER} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def blob_task(digest, status="success"):
    return {"taskId": task_id("", digest=digest), "status": status, "sha256": digest.split(":", 1)[1]}


class Answer:
    def __init__(self, code, body):
        self.code = code
        self.body = body

    def json(self):
        return succeed(self.body)


class Dfpeer:
    """The dfpeer's local API: its task list, "do you hold it?" (answered when the test says), downloads."""

    def __init__(self, tasks, held=False):
        self.tasks = tasks
        self.held = held
        self.gets = []
        self.posts = []
        self.answers = []

    def get(self, url, timeout=None, **kw):
        self.gets.append(url)
        if url.endswith("/api/v1/tasks"):
            return succeed(Answer(200, {"tasks": self.tasks}))
        if url.endswith("/content"):
            return Deferred()  # the swarm's stream: not started in these tests
        d = Deferred()
        self.answers.append(d)
        held = self.held
        return d.addCallback(lambda _: Answer(200, {"status": "success"}) if held else Answer(404, {}))

    def post(self, url, json=None, timeout=None):
        self.posts.append(json)
        return succeed(Answer(200, {"taskId": "ab" * 32, "status": "running"}))

    def asked(self):
        return [u for u in self.gets if "/api/v1/downloads/" in u and not u.endswith("/content")]

    def prefetches(self):
        return [p for p in self.posts if p.get("digest") == DIGEST]


class NoBody:
    """A registry that answers the config's GET (the first blob request) with a pending request."""

    def __init__(self, inner):
        self.inner = inner

    def request(self, method, url, **kw):
        if OTHER in url:
            return Deferred()
        return self.inner.request(method, url, **kw)


def core_knowing(tasks, upstream, held=False):
    """A dfdaemon whose first blob request (another blob) has had it list the dfpeer's tasks."""
    local = Dfpeer(tasks, held)
    core = DaemonCore(None, REGISTRIES, DEFAULT_RULES, peer=None, http=NoBody(upstream), local_http=local)
    core.check_access = False
    core.cold_range_direct = True
    core.peer = type("Peer", (), {"api": lambda self: succeed("http://127.0.0.1:1")})()
    site = Site(ProxyResource(core))
    site.protocol = HTTPChannel
    first = FrontFactory(None, site, core).buildProtocol(None)
    first.makeConnection(StringTransport())
    first.dataReceived(CONFIG_GET)
    assert core.knows_held
    proto = FrontFactory(None, site, core).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return core, local, proto, transport


def test_a_cold_range_asks_the_dfpeer_only_once_the_range_is_sent():
    upstream = RegistryRange()
    core, local, proto, transport = core_knowing([blob_task(OTHER)], upstream)
    proto.dataReceived(RANGE_GET)
    assert len(upstream.urls) == 1 and DIGEST in upstream.urls[0]
    assert local.asked() == [] and local.prefetches() == []  # nothing competes with the registry's answer
    upstream.pending.callback(None)
    assert status_of(transport) == 206 and transport.value().endswith(b"tail-bytes")
    assert len(local.asked()) == 1 and local.prefetches() == []  # now: does the dfpeer hold it?
    local.answers[0].callback(None)  # no: the prefetch
    assert len(local.prefetches()) == 1 and "range" not in local.prefetches()[0]
    assert core.counters.ranges_direct == 1


def test_a_blob_in_the_dfpeers_task_list_is_served_from_the_swarm_without_the_registry():
    upstream = RegistryRange()
    core, local, proto, transport = core_knowing([blob_task(DIGEST)], upstream)
    proto.dataReceived(RANGE_GET)
    assert upstream.urls == []
    assert local.posts and local.posts[-1]["digest"] == DIGEST and local.posts[-1]["range"] == "bytes=90-"
    assert core.counters.ranges_direct == 0


def test_the_task_list_is_asked_once():
    upstream = RegistryRange()
    core, local, proto, transport = core_knowing([], upstream)
    proto.dataReceived(RANGE_GET)
    proto.dataReceived(RANGE_GET)
    assert [u for u in local.gets if u.endswith("/api/v1/tasks")] == ["http://127.0.0.1:1/api/v1/tasks"]


def test_an_unreachable_registry_then_asks_the_dfpeer_which_may_hold_the_blob():
    class Down:
        urls: list = []

        def request(self, method, url, **kw):
            self.urls.append(url)
            return fail(ConnectionRefusedError("down"))

    core, local, proto, transport = core_knowing([], Down(), held=True)
    proto.dataReceived(RANGE_GET)
    assert transport.value() == b"" and len(local.asked()) == 1  # no 502: the dfpeer may hold it
    local.answers[0].callback(None)
    assert local.posts and local.posts[-1]["range"] == "bytes=90-"  # served from the swarm
    assert core.counters.ranges_direct == 0


def test_a_failed_task_list_keeps_asking_the_dfpeer_alongside_the_registry():
    upstream = RegistryRange()
    local = Dfpeer([])
    local.get_tasks = local.get

    def get(url, timeout=None, **kw):
        if url.endswith("/api/v1/tasks"):
            local.gets.append(url)
            return succeed(Answer(500, {"error": {}}))
        return local.get_tasks(url, timeout)

    local.get = get
    core = DaemonCore(None, REGISTRIES, DEFAULT_RULES, peer=None, http=upstream, local_http=local)
    core.check_access = False
    core.cold_range_direct = True
    core.peer = type("Peer", (), {"api": lambda self: succeed("http://127.0.0.1:1")})()
    site = Site(ProxyResource(core))
    site.protocol = HTTPChannel
    proto = FrontFactory(None, site, core).buildProtocol(None)
    proto.makeConnection(StringTransport())
    proto.dataReceived(RANGE_GET)
    assert not core.knows_held
    assert upstream.urls and len(local.asked()) == 1  # both at once, as before the list


def test_held_digests_takes_the_blobs_held_whole():
    url_task = {"taskId": task_id("http://x/f"), "status": "success", "sha256": HEX}
    tasks = [
        blob_task(DIGEST), blob_task(OTHER, status="running"), url_task,
        {"taskId": "zz", "status": "success", "sha256": "nothex"}, "junk", {"status": "success"},
    ]
    assert held_digests(tasks) == [DIGEST]


@given(st.lists(st.one_of(
    st.none(), st.text(max_size=5),
    st.dictionaries(st.sampled_from(["taskId", "status", "sha256"]), st.one_of(st.text(max_size=70), st.integers())),
)))
def test_held_digests_never_fails_on_what_it_is_given(tasks):
    for digest in held_digests(tasks):
        assert digest.startswith("sha256:")


def test_cold_range_defaults_to_first(tmp_path):
    o = tap.Options()
    o.parseOptions(["--home", str(tmp_path)])
    assert o["cold-range"] == "first"
    o = tap.Options()
    o.parseOptions(["--home", str(tmp_path), "--cold-range", "swarm"])
    assert o["cold-range"] == "swarm"


def test_first_sends_only_a_blobs_first_range_to_the_registry():
    """--cold-range first: later ranges of the blob (even while the first is on its way) go to the swarm."""
    upstream = RegistryRange()
    core, local, proto, transport = core_knowing([], upstream)
    core.cold_range_once = True
    proto.dataReceived(RANGE_GET)
    assert len(upstream.urls) == 1
    second = FrontFactory(None, proto.factory.site, core).buildProtocol(None)
    second.makeConnection(StringTransport())
    second.dataReceived(RANGE_GET)  # the first range not answered yet
    assert len(upstream.urls) == 1  # not to the registry
    assert [p["range"] for p in local.prefetches()] == ["bytes=90-"]  # from the swarm (which fetches the blob)
    upstream.pending.callback(None)
    assert status_of(transport) == 206 and transport.value().endswith(b"tail-bytes")
    assert core.counters.ranges_direct == 1


def test_without_prefetch_a_cold_range_never_goes_direct():
    """--no-prefetch: a range is a swarm download of those bytes alone, whatever --cold-range says."""
    class Methods(RegistryRange):
        methods: list = []

        def request(self, method, url, **kw):
            self.methods.append(method)
            return super().request(method, url, **kw)

    upstream = Methods()
    core, local, proto, transport = core_knowing([], upstream)
    core.prefetch = False
    proto.dataReceived(RANGE_GET)
    assert upstream.methods == ["HEAD"]  # the blob's length, for a download of the range alone; no GET of it
    assert local.prefetches() == []


def test_a_refused_first_range_starts_no_prefetch_and_the_retry_goes_to_the_registry_too():
    """A 401 (the client has no token yet): relayed; no download with those credentials; the authenticated retry is direct."""
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseDone
    from twisted.web.http_headers import Headers

    class Refusing(RegistryRange):
        def response(self):
            class Response:
                code, phrase, length = 401, b"Unauthorized", 2
                headers = Headers({b"WWW-Authenticate": [b'Bearer realm="https://auth.example/token"']})

                def deliverBody(self, protocol):
                    protocol.makeConnection(type("P", (), {"pauseProducing": lambda s: None, "resumeProducing": lambda s: None, "stopProducing": lambda s: None})())
                    protocol.dataReceived(b"{}")
                    protocol.connectionLost(Failure(ResponseDone()))

            return Response()

    upstream = Refusing()
    core, local, proto, transport = core_knowing([], upstream)
    core.cold_range_once = True
    proto.dataReceived(RANGE_GET)
    upstream.pending.callback(None)
    assert status_of(transport) == 401 and b"WWW-Authenticate: Bearer" in transport.value()
    assert local.asked() == [] and local.prefetches() == []
    again = FrontFactory(None, proto.factory.site, core).buildProtocol(None)
    again.makeConnection(StringTransport())
    again.dataReceived(RANGE_GET)
    assert len(upstream.urls) == 2 and local.prefetches() == []  # to the registry again, not the swarm

"""
Tokens, the origin allow/deny policy, CDN revalidation and path checks,
without sockets (StubTreq, fake origin, fake clock).
"""

from __future__ import annotations

import ipaddress
import os
import random

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.web.http_headers import Headers

from dragonfly.core.ids import task_id
from dragonfly.core.security import OriginDenied, OriginPolicy, bearer, tokens_equal
from dragonfly.peer.client import node_host, node_url, parse_nodes
from dragonfly.peer.store import PieceStore
from dragonfly.supernode.api import SupernodeApi
from dragonfly.supernode.cdn import Cdn
from dragonfly.supernode.node import SuperNode
from dragonfly.supernode.scheduler import Scheduler

from .test_supernode_api import BASE, BODY, PIECE, URL, Env, FakeHttp, FakeResponse, SyncPool, result

ADMIN, CLUSTER = "admin-token-123", "cluster-token-456"


def failure_of(d):
    out = []
    d.addBoth(out.append)
    assert out
    return out[0]


# -- tokens ---------------------------------------------------------------------


def test_tokens_compare():
    assert tokens_equal(b"secret-1", "secret-1")
    assert not tokens_equal(b"secret-2", "secret-1")
    assert not tokens_equal(b"secret-", "secret-1")
    assert not tokens_equal(None, "secret-1")
    assert bearer(b"Bearer abc") == b"abc"
    assert bearer(b"bearer   abc ") == b"abc"
    assert bearer(b"Basic abc") is None
    assert bearer(b"Bearer ") is None
    assert bearer(None) is None


def make_env(home, **api_kwargs) -> Env:
    from twisted.internet.task import Clock

    clock = Clock()
    http = FakeHttp()
    node = SuperNode(
        lambda track: Cdn(home, http, SyncPool(), clock, piece_size=PIECE, on_new_task=track, revalidate_after=0.0),
        Scheduler(rng=random.Random(0)), clock, "10.0.0.9", 8001,
    )
    return Env(home, clock, http, node, StubTreq(SupernodeApi(node, **api_kwargs).resource()))


def req(env, method, path, body=None, token=None):
    headers = {b"authorization": [f"Bearer {token}".encode()]} if token else {}
    d = env.stub.request(method, BASE + path, json=body, headers=headers)
    env.stub.flush()
    response = result(d)
    import json

    return response.code, json.loads(result(response.content())), response


def test_cluster_token_guards_peer_routes_and_admin_token_guards_delete(tmp_path):
    env = make_env(str(tmp_path), admin_token=ADMIN, cluster_token=CLUSTER)
    peer = {"peerId": "p1", "ip": "10.0.0.1", "port": 1}
    code, body, resp = req(env, "POST", "/api/v1/peers", peer)
    assert code == 401 and body["error"]["code"] == "UNAUTHORIZED"
    assert resp.headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="dragonfly"']
    assert req(env, "POST", "/api/v1/peers", peer, "nope")[0] == 401
    assert req(env, "GET", "/healthz")[0] == 200
    assert req(env, "POST", "/api/v1/peers", peer, CLUSTER)[0] == 200
    assert req(env, "POST", "/api/v1/peers", peer, ADMIN)[0] == 200  # the admin token works everywhere
    code, body, _ = req(env, "POST", "/api/v1/tasks", {"peerId": "p1", "url": URL}, CLUSTER)
    assert code == 200
    tid = body["taskId"]
    env.http.serve(FakeResponse(body=BODY))
    for token in (None, CLUSTER, ADMIN + "x"):
        assert req(env, "DELETE", f"/api/v1/tasks/{tid}", token=token)[0] == 401
    assert os.listdir(os.path.join(env.home, "repo"))
    code, body, _ = req(env, "DELETE", f"/api/v1/tasks/{tid}", token=ADMIN)
    assert code == 200 and body == {"taskId": tid, "removed": True}
    assert os.listdir(os.path.join(env.home, "repo")) == []
    assert req(env, "GET", f"/api/v1/tasks/{tid}", token=CLUSTER)[0] == 404


def test_without_tokens_everything_is_open(tmp_path):
    env = make_env(str(tmp_path))
    assert req(env, "POST", "/api/v1/peers", {"peerId": "p1", "ip": "10.0.0.1", "port": 1})[0] == 200
    assert req(env, "DELETE", "/api/v1/tasks/" + "a" * 64)[0] == 404


# -- origin policy ----------------------------------------------------------------------


def fake_dns(table):
    def resolve(host, port):
        if host not in table:
            return defer.fail(OSError(f"{host}: no such host"))
        return defer.succeed([ipaddress.ip_address(a) for a in table[host]])

    return resolve


DNS = fake_dns({
    "metadata.internal": ["169.254.169.254"],
    "files.example.com": ["93.184.216.34"],
    "cdn.example.com": ["10.1.2.3"],
    "mixed.example.com": ["10.1.2.3", "127.0.0.1"],
    "evil.example.net": ["127.0.0.1"],
    "example.com": ["93.184.216.34"],
})


@pytest.mark.parametrize(
    "allow, deny, url, ok",
    [
        ("", "169.254.0.0/16,fe80::/10", "http://169.254.169.254/latest/meta-data", False),
        ("", "169.254.0.0/16,fe80::/10", "http://metadata.internal/x", False),  # by resolved address
        ("", "169.254.0.0/16,fe80::/10", "http://[fe80::1]/x", False),
        ("", "169.254.0.0/16,fe80::/10", "http://files.example.com/x", True),
        ("", "169.254.0.0/16,fe80::/10", "http://10.0.0.1/x", True),
        ("", "none", "http://169.254.169.254/x", True),
        ("", "127.0.0.0/8", "http://evil.example.net/x", False),  # DNS cannot bypass a CIDR deny
        ("", "files.example.com", "http://FILES.example.com./x", False),
        ("", ".example.com", "http://cdn.example.com/x", False),
        ("", "*.example.com", "http://example.com/x", True),
        ("10.0.0.0/8", "", "http://cdn.example.com/x", True),
        ("10.0.0.0/8", "", "http://mixed.example.com/x", False),  # every address must be allowed
        ("10.0.0.0/8", "", "http://files.example.com/x", False),
        ("files.example.com", "", "http://files.example.com/x", True),
        ("files.example.com", "", "http://unknown.example.org/x", False),  # refused without DNS
        ("files.example.com", "93.0.0.0/8", "http://files.example.com/x", False),  # deny wins
    ],
)
def test_origin_policy(allow, deny, url, ok):
    policy = OriginPolicy(allow, deny, resolve=DNS)
    result_ = failure_of(policy.check_url(url))
    if ok:
        assert isinstance(result_, list)
    else:
        assert result_.check(OriginDenied), result_


@pytest.mark.parametrize("text", ["http://x", "a b", "host/path", "user@host", "10.0.0.0/33"])
def test_origin_policy_rejects_bad_entries(text):
    with pytest.raises(ValueError):
        OriginPolicy(deny=text)


def test_denied_origin_is_a_403_and_never_fetched(tmp_path):
    env = make_env(str(tmp_path), origin_policy=OriginPolicy("", "169.254.0.0/16", resolve=DNS))
    assert req(env, "POST", "/api/v1/peers", {"peerId": "p1", "ip": "10.0.0.1", "port": 1})[0] == 200
    code, body, _ = req(env, "POST", "/api/v1/tasks", {"peerId": "p1", "url": "http://metadata.internal/latest"})
    assert code == 403 and body["error"]["code"] == "ORIGIN_DENIED"
    assert "169.254.169.254" in body["error"]["message"]
    assert env.http.calls == [] and env.node.cdn.tasks == {}


# -- revalidation -------------------------------------------------------------------------


def response(body, etag, last_modified="Sun, 29 Nov 2026 10:00:00 GMT", code=200):
    r = HeadedResponse(body=body, code=code)
    r.headers = Headers({b"etag": [etag.encode()], b"last-modified": [last_modified.encode()]})
    return r


class HeadedResponse(FakeResponse):
    pass


@pytest.fixture
def cached(tmp_path):
    env = make_env(str(tmp_path))
    env.register_peer()
    code, data = env.register_task()
    r = response(BODY, '"v1"')
    env.http.calls[-1].d.callback(r)
    assert env.node.cdn.tasks[data["taskId"]].status == "success"
    return env, data["taskId"]


def test_unchanged_file_answers_304_and_stays(cached):
    env, tid = cached
    v1 = env.node.cdn.tasks[tid].version
    env.register_peer("peer-2", port=2)
    d = env.stub.request("POST", BASE + "/api/v1/tasks", json={"peerId": "peer-2", "url": URL})
    call = env.http.calls[-1]
    assert call.headers["If-None-Match"] == ['"v1"']
    assert call.headers["If-Modified-Since"] == ["Sun, 29 Nov 2026 10:00:00 GMT"]
    call.d.callback(response(b"", '"v1"', code=304))
    env.stub.flush()
    resp = result(d)
    assert resp.code == 200
    task = env.node.cdn.tasks[tid]
    assert task.status == "success" and task.version == v1
    assert len(env.http.calls) == 2


def test_origin_that_ignores_conditions_but_sends_the_same_validators(cached):
    env, tid = cached
    v1 = env.node.cdn.tasks[tid].version
    d = env.stub.request("POST", BASE + "/api/v1/tasks", json={"peerId": "peer-1", "url": URL})
    full = response(BODY, '"v1"')
    env.http.calls[-1].d.callback(full)
    env.stub.flush()
    assert result(d).code == 200
    assert env.node.cdn.tasks[tid].version == v1 and env.node.cdn.tasks[tid].status == "success"


@pytest.mark.parametrize("failure", ["5xx", "401", "unreachable"])
def test_an_origin_in_trouble_leaves_the_cache_in_use(cached, failure):
    env, tid = cached
    d = env.stub.request("POST", BASE + "/api/v1/tasks", json={"peerId": "peer-1", "url": URL})
    if failure in ("5xx", "401"):
        env.http.calls[-1].d.callback(response(b"oops", '"x"', code=503 if failure == "5xx" else 401))
    else:
        env.http.calls[-1].d.errback(ConnectionRefusedError())
    env.stub.flush()
    assert result(d).code == 200
    assert env.node.cdn.tasks[tid].status == "success"
    assert open(env.node.cdn.tasks[tid].data_path, "rb").read() == BODY


def test_changed_file_becomes_a_new_version(cached):
    env, tid = cached
    old = env.node.cdn.tasks[tid]
    code, data = env.sync(tid)
    assert code == 200
    env.register_peer("peer-2", port=2)
    new_body = bytes(reversed(BODY))
    d = env.stub.request("POST", BASE + "/api/v1/tasks", json={"peerId": "peer-2", "url": URL})
    env.http.calls[-1].d.callback(response(new_body, '"v2"'))
    env.stub.flush()
    assert result(d).code == 200
    new = env.node.cdn.tasks[tid]
    assert new is not old and old.status == "failed" and old.error.code == "SOURCE_CHANGED"
    assert new.status == "success" and new.version != old.version
    assert open(new.data_path, "rb").read() == new_body
    # a peer still syncing with the old version is told so
    code, data = env.sync(tid, version=old.version)
    assert code == 409 and data["error"]["code"] == "TASK_CHANGED"
    code, data = env.sync(tid, "peer-2", version=new.version)
    assert code == 200


def test_a_file_gone_at_the_origin_is_not_served_from_the_cache(cached):
    env, tid = cached
    d = env.stub.request("POST", BASE + "/api/v1/tasks", json={"peerId": "peer-1", "url": URL, "headers": {"X-Auth": "k"}})
    call = env.http.calls[-1]
    assert call.headers["X-Auth"] == ["k"]  # revalidated with the registering peer's headers
    call.d.callback(response(b"gone", '"x"', code=404))
    env.stub.flush()
    assert result(d).code == 200
    task = env.node.cdn.tasks[tid]
    assert task.status == "failed" and task.error.http_status == 404
    assert env.repo_files() == []


def test_content_addressed_tasks_are_not_revalidated(tmp_path):
    import hashlib

    env = make_env(str(tmp_path))
    env.register_peer()
    digest = "sha256:" + hashlib.sha256(BODY).hexdigest()
    env.register_task(digest=digest)
    env.http.calls[-1].d.callback(response(BODY, '"v1"'))
    env.register_task(digest=digest)
    assert len(env.http.calls) == 1


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../" * 5 + "etc/passwd", "/etc/passwd", "a" * 63 + "/", "A" * 64, "", "a" * 65,
                                 "..", "a" * 62 + "\0a"])
def test_store_refuses_bad_task_ids(tmp_path, bad):
    store = PieceStore(str(tmp_path), SyncPool())
    with pytest.raises(ValueError):
        store.data_path(bad)
    with pytest.raises(ValueError):
        store.read(bad, 0, 1)
    with pytest.raises(ValueError):
        store.remove(bad)
    assert store.data_path(task_id("http://x/y")).startswith(str(tmp_path) + "/data/")


def test_cdn_refuses_bad_task_ids(tmp_path):
    cdn = Cdn(str(tmp_path), FakeHttp(), SyncPool(), None)
    with pytest.raises(ValueError):
        cdn.ensure("../../etc/passwd", URL)


def test_supernode_addresses():
    assert parse_nodes("https://sn.example:8443,sn2") == ["https://sn.example:8443", "sn2:8002"]
    assert parse_nodes("http://sn:1") == ["sn:1"]
    assert node_url("https://sn:1") == "https://sn:1" and node_url("sn:1") == "http://sn:1"
    assert node_host("https://sn.example:8443") == "sn.example" and node_host("sn:1") == "sn"


def test_an_address_denied_at_connect_time_fails_the_task_as_origin_denied(tmp_path):
    env = make_env(str(tmp_path))
    env.register_peer()
    code, data = env.register_task()
    env.http.calls[-1].d.errback(OriginDenied("origin host origin.test has address 169.254.169.254, in denied network"))
    code, data = env.sync(data["taskId"])
    assert data["task"]["status"] == "failed"
    assert data["task"]["error"]["code"] == "ORIGIN_DENIED"


def test_policy_endpoint_checks_before_connecting():
    from twisted.internet.testing import MemoryReactorClock
    from twisted.web.client import URI

    from dragonfly.core.security import PolicyEndpointFactory

    reactor = MemoryReactorClock()
    factory = PolicyEndpointFactory(reactor, OriginPolicy("", "127.0.0.0/8", resolve=DNS))
    d = factory.endpointForURI(URI.fromBytes(b"http://evil.example.net:8080/x")).connect(object())
    assert failure_of(d).check(OriginDenied)
    assert reactor.tcpClients == []
    factory.endpointForURI(URI.fromBytes(b"https://files.example.com/x")).connect(object())
    [(host, port, *_)] = reactor.tcpClients
    assert (host, port) == ("93.184.216.34", 443)

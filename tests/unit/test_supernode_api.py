"""
Tests for the SuperNode REST API (L{dragonfly.supernode.api}) through
L{treq.testing.StubTreq}: no sockets, no reactor, no origin.

The CDN gets a fake HTTP client whose C{get} returns a Deferred the test
fires, and a worker pool that runs everything at once, so a whole origin
fetch happens synchronously inside C{Origin.serve}.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any

import pytest
from attrs import define, field
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from dragonfly.core.ids import task_id
from dragonfly.supernode.api import SupernodeApi
from dragonfly.supernode.cdn import Cdn
from dragonfly.supernode.node import REGISTER_LENGTH_WAIT, SuperNode
from dragonfly.supernode.scheduler import Scheduler

BASE = "http://supernode.test"
URL = "http://origin.test/files/blob.bin"
PIECE = 1024
BODY = bytes(random.Random(7).getrandbits(8) for _ in range(5 * PIECE + 100))  # 6 pieces, the last short


# -- fakes ----------------------------------------------------------------------


class SyncPool:
    """A WorkerPool that runs the function at once."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, f: Any, *a: Any, **kw: Any) -> defer.Deferred:
        self.calls += 1
        return defer.maybeDeferred(f, *a, **kw)


class FakeTransport:
    """The producer side of a response body."""

    def __init__(self) -> None:
        self.paused = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


@define
class FakeResponse:
    code: int = 200
    phrase: bytes = b"OK"
    body: bytes = b""
    length: Any = None  # None: len(body); UNKNOWN_LENGTH: no Content-Length
    chunk: int = 700
    delivered: bool = False
    headers: Headers = field(factory=lambda: Headers({b"content-type": [b"application/x-test"]}))

    def __attrs_post_init__(self) -> None:
        if self.length is None:
            self.length = len(self.body)

    def deliverBody(self, protocol: Any) -> None:
        self.delivered = True
        protocol.makeConnection(FakeTransport())
        for i in range(0, len(self.body), self.chunk):
            protocol.dataReceived(self.body[i : i + self.chunk])
        protocol.connectionLost(Failure(ResponseDone()))


@define
class Call:
    url: str
    headers: dict
    kwargs: dict
    d: defer.Deferred = field(factory=defer.Deferred)


class FakeHttp:
    """Stands for treq.HTTPClient: records each GET and returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def get(self, url: str, headers: Any = None, **kwargs: Any) -> defer.Deferred:
        call = Call(url, headers, kwargs)
        self.calls.append(call)
        return call.d

    def serve(self, response: FakeResponse, n: int = -1) -> None:
        self.calls[n].d.callback(response)


@define
class Env:
    home: str
    clock: Clock
    http: FakeHttp
    node: SuperNode
    stub: StubTreq

    # -- HTTP helpers --

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, dict, Any]:
        kwargs: dict[str, Any] = {}
        if raw is not None:
            kwargs["data"] = raw
            kwargs["headers"] = {b"content-type": [b"application/json"]}
        elif body is not None:
            kwargs["json"] = body
        d = self.stub.request(method, BASE + path, **kwargs)
        self.stub.flush()
        response = result(d)
        content = result(response.content())
        ctype = response.headers.getRawHeaders(b"content-type", [b""])[0].decode()
        assert ctype == "application/json", (response.code, content)
        data = json.loads(content)
        if response.code >= 400:
            assert set(data) == {"error"}
            assert isinstance(data["error"]["code"], str) and data["error"]["code"]
            assert isinstance(data["error"]["message"], str)
        return response.code, {"content-type": ctype}, data

    def get(self, path: str) -> tuple[int, Any]:
        code, _, data = self.request("GET", path)
        return code, data

    def post(self, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        code, _, data = self.request("POST", path, body, raw)
        return code, data

    def register_peer(self, peer_id: str = "peer-1", port: int = 65001) -> None:
        code, data = self.post("/api/v1/peers", {"peerId": peer_id, "ip": "10.0.0.1", "port": port})
        assert code == 200, data

    def register_task(self, peer_id: str = "peer-1", url: str = URL, **extra: Any) -> tuple[int, Any]:
        return self.post("/api/v1/tasks", {"peerId": peer_id, "url": url, **extra})

    def sync(self, tid: str, peer_id: str = "peer-1", **extra: Any) -> tuple[int, Any]:
        return self.post(f"/api/v1/tasks/{tid}/sync", {"peerId": peer_id, **extra})

    def repo_files(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.home, "repo")))


def result(d: defer.Deferred) -> Any:
    """The result a Deferred already has (everything here is synchronous)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def make_env(home: str) -> Env:
    clock = Clock()
    http = FakeHttp()
    pool = SyncPool()
    node = SuperNode(
        lambda track: Cdn(home, http, pool, clock, piece_size=PIECE, on_new_task=track),
        Scheduler(rng=random.Random(0)),
        clock,
        "10.0.0.9",
        8001,
    )
    return Env(home, clock, http, node, StubTreq(SupernodeApi(node).resource()))


@pytest.fixture
def env(tmp_path: Any) -> Env:
    return make_env(str(tmp_path))


def error_code(data: Any) -> str:
    return data["error"]["code"]


# -- peers ------------------------------------------------------------------------


def test_healthz(env: Env) -> None:
    assert env.get("/healthz") == (200, {"ok": True, "tasks": 0, "peers": 0})


def test_register_peer(env: Env) -> None:
    code, data = env.post("/api/v1/peers", {"peerId": "peer-1", "ip": "10.0.0.1", "port": 65001, "hostname": "h1"})
    assert code == 200
    assert data["peerId"] == "peer-1"
    assert data["heartbeatInterval"] > 0
    code, data = env.get("/api/v1/peers")
    assert code == 200
    assert data["peers"] == [
        {"peerId": "peer-1", "ip": "10.0.0.1", "port": 65001, "hostname": "h1", "lastSeen": 0.0}
    ]


@pytest.mark.parametrize(
    "body, code",
    [
        ({"peerId": "bad id", "ip": "10.0.0.1", "port": 1}, "BAD_PEER_ID"),
        ({"peerId": "", "ip": "10.0.0.1", "port": 1}, "BAD_PEER_ID"),
        ({"peerId": "x" * 65, "ip": "10.0.0.1", "port": 1}, "BAD_PEER_ID"),
        ({"peerId": "../etc", "ip": "10.0.0.1", "port": 1}, "BAD_PEER_ID"),
        ({}, "MISSING_FIELD"),
        ({"ip": "10.0.0.1", "port": 1}, "MISSING_FIELD"),
        ({"peerId": "p", "port": 1}, "MISSING_FIELD"),
        ({"peerId": "p", "ip": "10.0.0.1"}, "MISSING_FIELD"),
        ({"peerId": "p", "ip": "10.0.0.1", "port": None}, "MISSING_FIELD"),
        ({"peerId": 7, "ip": "10.0.0.1", "port": 1}, "BAD_FIELD"),
        ({"peerId": "p", "ip": ["10.0.0.1"], "port": 1}, "BAD_FIELD"),
        ({"peerId": "p", "ip": "10.0.0.1", "port": "80"}, "BAD_FIELD"),
        ({"peerId": "p", "ip": "10.0.0.1", "port": 80.0}, "BAD_FIELD"),
        ({"peerId": "p", "ip": "10.0.0.1", "port": True}, "BAD_FIELD"),
        ({"peerId": "p", "ip": "10.0.0.1", "port": 1, "hostname": 5}, "BAD_FIELD"),
        ({"peerId": "p", "ip": "10.0.0.1", "port": 0}, "BAD_FIELD"),
        ({"peerId": "p", "ip": "10.0.0.1", "port": -1}, "BAD_FIELD"),
        ({"peerId": "p", "ip": "10.0.0.1", "port": 65536}, "BAD_FIELD"),
        ({"peerId": "p", "ip": "", "port": 1}, "BAD_FIELD"),
        ({"peerId": "p", "ip": "10.0.0.1 x", "port": 1}, "BAD_FIELD"),
    ],
)
def test_register_peer_bad(env: Env, body: dict, code: str) -> None:
    status, data = env.post("/api/v1/peers", body)
    assert status == 400
    assert error_code(data) == code
    assert env.node.scheduler.peers == {}


@pytest.mark.parametrize("port", [1, 65535])
def test_register_peer_port_bounds(env: Env, port: int) -> None:
    code, _ = env.post("/api/v1/peers", {"peerId": "p", "ip": "10.0.0.1", "port": port})
    assert code == 200


def test_malformed_json_body(env: Env) -> None:
    code, data = env.post("/api/v1/peers", raw=b'{"peerId": ')
    assert code == 400
    assert error_code(data) == "BAD_JSON"


def test_non_utf8_body(env: Env) -> None:
    code, data = env.post("/api/v1/peers", raw=b"\xff\xfe{}")
    assert code == 400
    assert error_code(data) == "BAD_JSON"


@pytest.mark.parametrize("raw", [b"[]", b'["peerId"]', b"3", b'"x"', b"null"])
def test_json_body_not_an_object(env: Env, raw: bytes) -> None:
    code, data = env.post("/api/v1/peers", raw=raw)
    assert code == 400
    assert error_code(data) == "BAD_JSON"


def test_body_too_large(env: Env) -> None:
    code, data = env.post("/api/v1/peers", raw=b" " * ((1 << 20) + 1))
    assert code == 413
    assert error_code(data) == "BODY_TOO_LARGE"


def test_unknown_route(env: Env) -> None:
    code, data = env.get("/api/v1/nothing-here")
    assert code == 404
    assert error_code(data) == "NOT_FOUND"


@pytest.mark.parametrize("method, path", [("PUT", "/api/v1/peers"), ("DELETE", "/api/v1/tasks"), ("GET", "/api/v1/tasks/x/sync")])
def test_wrong_method(env: Env, method: str, path: str) -> None:
    code, _, data = env.request(method, path)
    assert code == 405
    assert error_code(data) == "METHOD_NOT_ALLOWED"


def test_heartbeat_and_remove(env: Env) -> None:
    code, data = env.post("/api/v1/peers/ghost/heartbeat")
    assert code == 404 and error_code(data) == "PEER_UNKNOWN"
    env.register_peer("peer-1")
    env.clock.advance(5)
    assert env.post("/api/v1/peers/peer-1/heartbeat") == (200, {})
    assert env.node.scheduler.peers["peer-1"].last_seen == 5
    code, _, _ = env.request("DELETE", "/api/v1/peers/peer-1")
    assert code == 200
    assert env.node.scheduler.peers == {}
    code, data = env.post("/api/v1/peers/bad%20id/heartbeat")
    assert code == 400 and error_code(data) == "BAD_PEER_ID"


# -- registering tasks ---------------------------------------------------------------


def test_register_task_unknown_peer(env: Env) -> None:
    code, data = env.register_task("ghost")
    assert code == 404
    assert error_code(data) == "PEER_UNKNOWN"
    assert env.http.calls == []


@pytest.mark.parametrize(
    "url", ["ftp://origin.test/f", "file:///etc/passwd", "origin.test/f", "http:///f", "http://h/a b", "http://h:99999/"]
)
def test_register_task_bad_url(env: Env, url: str) -> None:
    env.register_peer()
    code, data = env.register_task(url=url)
    assert code == 400
    assert error_code(data) == "BAD_INPUT"
    assert env.http.calls == []


@pytest.mark.parametrize(
    "extra, code",
    [
        ({"digest": "sha256:1234"}, "BAD_INPUT"),
        ({"digest": 5}, "BAD_FIELD"),
        ({"filter": "a&b"}, "BAD_FIELD"),
        ({"filter": [1]}, "BAD_FIELD"),
        ({"headers": {"X-A": 1}}, "BAD_FIELD"),
        ({"headers": {"X-A": "a\r\nX-B: b"}}, "BAD_FIELD"),
        ({"headers": ["X-A: b"]}, "BAD_FIELD"),
        ({"identifier": "x" * 1025}, "BAD_FIELD"),
        ({"url": None}, "MISSING_FIELD"),
    ],
)
def test_register_task_bad_fields(env: Env, extra: dict, code: str) -> None:
    env.register_peer()
    status, data = env.register_task(**extra)
    assert status == 400
    assert error_code(data) == code
    assert env.http.calls == []


def test_register_task_id_follows_ids_module(env: Env) -> None:
    env.register_peer()
    code, data = env.register_task(url=URL + "?sig=1&v=2", filter=["sig"], identifier="one")
    assert code == 200
    assert data["taskId"] == task_id(URL + "?sig=1&v=2", identifier="one", filter_keys=["sig"])
    # the origin is fetched with the URL as given
    assert env.http.calls[0].url == URL + "?sig=1&v=2"


def test_register_task_drops_hop_by_hop_headers(env: Env) -> None:
    env.register_peer()
    env.register_task(headers={"Authorization": "Bearer t", "Connection": "close", "Range": "bytes=0-1"})
    assert env.http.calls[0].headers == {"Authorization": ["Bearer t"]}
    assert env.http.calls[0].kwargs == {"unbuffered": True}


# -- the happy path ------------------------------------------------------------------


def piece_digests(body: bytes) -> list[str]:
    return [hashlib.sha256(body[i : i + PIECE]).hexdigest() for i in range(0, len(body), PIECE)]


def test_happy_path(env: Env) -> None:
    env.register_peer("peer-1")
    code, data = env.register_task()
    assert code == 200
    tid = data["taskId"]
    assert tid == task_id(URL)
    assert data["task"]["status"] == "running"
    assert len(env.http.calls) == 1

    env.http.serve(FakeResponse(body=BODY))

    code, data = env.sync(tid)
    assert code == 200
    task = data["task"]
    assert task["status"] == "success"
    assert task["contentLength"] == len(BODY)
    assert task["pieceSize"] == PIECE
    assert task["pieceCount"] == 6
    assert task["piecesReady"] == 6
    assert task["sha256"] is None  # no digest given: no whole-file hash (the pieces' digests are the check)
    assert task["originBytes"] == len(BODY)
    assert task["contentType"] == "application/x-test"  # the origin's, passed on
    assert data["digestsFrom"] == 0
    assert data["digests"] == piece_digests(BODY)
    assert {"peerId": "supernode", "ip": "10.0.0.9", "port": 8001, "seed": True} in data["parents"]
    assert data["seedPieces"]
    assert set(data["seedPieces"]) <= set(range(6))
    assert data["syncInterval"] > 0

    # on disk: the data and its meta file, nothing else
    assert env.repo_files() == [tid + ".data", tid + ".meta"]
    with open(os.path.join(env.home, "repo", tid + ".data"), "rb") as f:
        assert f.read() == BODY
    # the seed serves what the CDN holds
    assert result(env.node.cdn.read_piece(env.node.cdn.tasks[tid], 5)) == BODY[5 * PIECE :]

    # digestsFrom skips digests the peer already has
    code, data = env.sync(tid, digestsFrom=4)
    assert data["digestsFrom"] == 4
    assert data["digests"] == piece_digests(BODY)[4:]


def test_unknown_length_origin(env: Env) -> None:
    env.register_peer()
    tid = env.register_task()[1]["taskId"]
    env.http.serve(FakeResponse(body=BODY, length=UNKNOWN_LENGTH))
    code, data = env.sync(tid)
    assert data["task"]["status"] == "success"
    assert data["task"]["contentLength"] == len(BODY)
    assert data["digests"] == piece_digests(BODY)


def test_empty_file(env: Env) -> None:
    env.register_peer()
    tid = env.register_task()[1]["taskId"]
    env.http.serve(FakeResponse(body=b""))
    code, data = env.sync(tid)
    assert code == 200
    assert data["task"]["status"] == "success"
    assert data["task"]["pieceCount"] == 0
    assert data["digests"] == []
    assert data["seedPieces"] == []


def test_sync_have_shows_in_availability(env: Env) -> None:
    env.register_peer("peer-1")
    env.register_peer("peer-2", port=65002)
    tid = env.register_task("peer-1")[1]["taskId"]
    env.register_task("peer-2")
    env.http.serve(FakeResponse(body=BODY))

    assert env.sync(tid, "peer-1", have=[0, 1, 2])[0] == 200
    code, data = env.sync(tid, "peer-2", have=[2, 5])
    assert code == 200
    # peer-1 is a parent of peer-2, next to the seed
    assert [p["peerId"] for p in data["parents"]] == ["supernode", "peer-1"]
    assert data["parents"][1] == {"peerId": "peer-1", "ip": "10.0.0.1", "port": 65001, "seed": False}
    # no seed allowance for what the parent holds or peer-2 has
    assert not set(data["seedPieces"]) & {0, 1, 2, 5}

    code, view = env.get(f"/api/v1/tasks/{tid}")
    assert code == 200
    assert view["availability"] == [1, 1, 2, 0, 0, 1]
    assert view["peers"] == ["peer-1", "peer-2"]
    assert view["status"] == "success"

    code, listing = env.get("/api/v1/tasks")
    assert [t["taskId"] for t in listing["tasks"]] == [tid]

    # leaving the task takes its pieces out of the availability
    code, _, _ = env.request("DELETE", f"/api/v1/tasks/{tid}/peers/peer-1")
    assert code == 200
    assert env.get(f"/api/v1/tasks/{tid}")[1]["availability"] == [0, 0, 1, 0, 0, 1]


@pytest.mark.parametrize(
    "extra, code",
    [
        ({"have": [6]}, "BAD_FIELD"),
        ({"have": [-1]}, "BAD_FIELD"),
        ({"have": ["1"]}, "BAD_FIELD"),
        ({"have": [True]}, "BAD_FIELD"),
        ({"have": 3}, "BAD_FIELD"),
        ({"failed": [3]}, "BAD_FIELD"),
        ({"failed": [{"index": 99, "parent": "peer-2"}]}, "BAD_FIELD"),
        ({"failed": [{"index": 1}]}, "MISSING_FIELD"),
        ({"digestsFrom": -1}, "BAD_FIELD"),
        ({"peerId": "bad id"}, "BAD_PEER_ID"),
    ],
)
def test_sync_bad_fields(env: Env, extra: dict, code: str) -> None:
    env.register_peer()
    tid = env.register_task()[1]["taskId"]
    env.http.serve(FakeResponse(body=BODY))
    status, data = env.sync(tid, **extra)
    assert status == 400
    assert error_code(data) == code


def test_sync_unknown_task_and_peer(env: Env) -> None:
    env.register_peer()
    code, data = env.sync("0" * 64)
    assert code == 404 and error_code(data) == "TASK_UNKNOWN"
    code, data = env.sync("not-a-task-id")
    assert code == 400 and error_code(data) == "BAD_TASK_ID"
    code, data = env.get("/api/v1/tasks/" + "A" * 64)
    assert code == 400 and error_code(data) == "BAD_TASK_ID"
    tid = env.register_task()[1]["taskId"]
    code, data = env.sync(tid, "ghost")
    assert code == 404 and error_code(data) == "PEER_UNKNOWN"


def test_sync_failures_block_a_parent(env: Env) -> None:
    env.register_peer("peer-1")
    env.register_peer("peer-2", port=65002)
    tid = env.register_task("peer-1")[1]["taskId"]
    env.register_task("peer-2")
    env.http.serve(FakeResponse(body=BODY))
    env.sync(tid, "peer-2")  # its file is made: it may be named as a parent
    assert [p["peerId"] for p in env.sync(tid, "peer-1")[1]["parents"]] == ["supernode", "peer-2"]
    bad = [{"index": 0, "parent": "peer-2"}, {"index": 1, "parent": "peer-2"}]
    code, data = env.sync(tid, "peer-1", failed=bad)
    assert code == 200
    assert [p["peerId"] for p in data["parents"]] == ["supernode"]
    # -1: could not connect at all
    assert env.sync(tid, "peer-1", failed=[{"index": -1, "parent": "peer-2"}])[0] == 200


def _pending_registration(env: Env) -> defer.Deferred:
    """A C{waitLength} registration sent, not answered yet."""
    env.register_peer("peer-1")
    d = env.stub.request("POST", BASE + "/api/v1/tasks", json={"peerId": "peer-1", "url": URL, "waitLength": True})
    env.stub.flush()
    answered: list[Any] = []
    d.addBoth(lambda r: (answered.append(r), r)[1])
    assert not answered
    return d


def test_a_registration_that_asks_waits_for_the_length(env: Env) -> None:
    """C{waitLength}: answered once the CDN has the origin's length, not polled for it."""
    d = _pending_registration(env)
    env.http.serve(FakeResponse(body=BODY))
    env.stub.flush()
    task = json.loads(result(result(d).content()))["task"]
    assert task["contentLength"] == len(BODY) and task["pieceCount"] == 6


def test_a_registration_waits_for_the_length_a_moment_only(env: Env) -> None:
    d = _pending_registration(env)
    env.clock.advance(REGISTER_LENGTH_WAIT)
    env.stub.flush()
    task = json.loads(result(result(d).content()))["task"]
    assert task["status"] in ("waiting", "running") and task.get("contentLength") is None
    # without waitLength the answer comes at once
    assert env.register_task("peer-1")[1]["task"].get("contentLength") is None


def test_a_peer_preparing_is_named_to_nobody(env: Env) -> None:
    """
    A peer that has just registered, or says it is C{preparing} (its file
    not made yet: it refuses block connections for the task), is no one's
    parent until a sync says it is ready.
    """
    env.register_peer("peer-1")
    env.register_peer("peer-2", port=65002)
    tid = env.register_task("peer-1")[1]["taskId"]
    env.register_task("peer-2")
    env.http.serve(FakeResponse(body=BODY))
    names = lambda data: [p["peerId"] for p in data["parents"]]  # noqa: E731
    assert names(env.sync(tid, "peer-1")[1]) == ["supernode"]
    env.sync(tid, "peer-2", preparing=True)
    assert names(env.sync(tid, "peer-1")[1]) == ["supernode"]
    env.sync(tid, "peer-2")
    assert names(env.sync(tid, "peer-1")[1]) == ["supernode", "peer-2"]


# -- single flight and origin failures -------------------------------------------------


def test_single_flight(env: Env) -> None:
    env.register_peer("peer-1")
    env.register_peer("peer-2", port=65002)
    a = env.register_task("peer-1")
    b = env.register_task("peer-2")
    assert a[0] == b[0] == 200
    assert a[1]["taskId"] == b[1]["taskId"]
    assert len(env.http.calls) == 1
    env.http.serve(FakeResponse(body=BODY))
    # a later registration is served from the cache
    env.register_peer("peer-3", port=65003)
    assert env.register_task("peer-3")[1]["task"]["status"] == "success"
    assert len(env.http.calls) == 1
    assert env.node.cdn.origin_fetches == 1


def test_same_digest_two_urls_one_fetch(env: Env) -> None:
    env.register_peer()
    digest = "sha256:" + hashlib.sha256(BODY).hexdigest()
    a = env.register_task(url="http://mirror-a.test/blob", digest=digest)[1]["taskId"]
    b = env.register_task(url="http://mirror-b.test/blob", digest=digest)[1]["taskId"]
    assert a == b
    assert len(env.http.calls) == 1
    env.http.serve(FakeResponse(body=BODY))
    assert env.sync(a)[1]["task"]["status"] == "success"


@pytest.mark.parametrize("status, df_code", [(404, 610), (500, 610), (403, 608)])
def test_origin_error_status(env: Env, status: int, df_code: int) -> None:
    env.register_peer()
    tid = env.register_task()[1]["taskId"]
    response = FakeResponse(code=status, phrase=b"Nope", body=b"<html>error page</html>")
    env.http.serve(response)
    assert response.delivered  # the error page is read and dropped
    code, data = env.sync(tid)
    assert code == 200
    task = data["task"]
    assert task["status"] == "failed"
    assert task["error"]["code"] == "SOURCE_ERROR"
    assert task["error"]["originStatus"] == status
    assert task["error"]["dfCode"] == df_code
    # a failed task has no seed to offer
    assert data["parents"] == []
    assert data["seedPieces"] == []
    code, view = env.get(f"/api/v1/tasks/{tid}")
    assert view["status"] == "failed"
    assert view["error"]["originStatus"] == status
    assert env.repo_files() == []
    assert env.node.seed_side(tid) is None


def test_failed_task_is_fetched_again(env: Env) -> None:
    env.register_peer()
    tid = env.register_task()[1]["taskId"]
    env.http.serve(FakeResponse(code=503, phrase=b"Busy"))
    assert env.get(f"/api/v1/tasks/{tid}")[1]["status"] == "failed"
    code, data = env.register_task()
    assert data["task"]["status"] == "running"
    assert "error" not in data["task"]
    assert len(env.http.calls) == 2
    env.http.serve(FakeResponse(body=BODY))
    code, data = env.sync(tid)
    assert data["task"]["status"] == "success"
    assert data["digests"] == piece_digests(BODY)
    assert data["seedPieces"]


def test_origin_unreachable(env: Env) -> None:
    env.register_peer()
    tid = env.register_task()[1]["taskId"]
    env.http.calls[0].d.errback(ConnectionRefusedError("connection refused"))
    task = env.get(f"/api/v1/tasks/{tid}")[1]
    assert task["status"] == "failed"
    assert task["error"]["code"] == "SOURCE_UNREACHABLE"
    assert task["error"]["dfCode"] == 607


def test_origin_silent_times_out(env: Env) -> None:
    env.register_peer()
    tid = env.register_task()[1]["taskId"]
    env.clock.advance(59)
    assert env.get(f"/api/v1/tasks/{tid}")[1]["status"] == "running"
    env.clock.advance(1)
    task = env.get(f"/api/v1/tasks/{tid}")[1]
    assert task["status"] == "failed"
    assert task["error"]["code"] == "SOURCE_UNREACHABLE"


def test_truncated_body(env: Env) -> None:
    env.register_peer()
    tid = env.register_task()[1]["taskId"]
    # the origin promises more than it sends, then ends the response
    env.http.serve(FakeResponse(body=BODY[: 3 * PIECE + 10], length=len(BODY)))
    code, data = env.sync(tid)
    task = data["task"]
    assert task["status"] == "failed"
    assert task["error"]["code"] == "SOURCE_TRUNCATED"
    assert task["sha256"] is None
    assert data["seedPieces"] == []
    assert env.repo_files() == []


def test_retry_after_truncation_offers_no_stale_seed_pieces(env: Env) -> None:
    """After a failed fetch the seed offers nothing until the retry stores pieces again."""
    env.register_peer()
    tid = env.register_task()[1]["taskId"]
    env.http.serve(FakeResponse(body=BODY[: 3 * PIECE + 10], length=len(BODY)))
    assert env.get(f"/api/v1/tasks/{tid}")[1]["status"] == "failed"
    # registering again retries the origin; it has not answered yet
    assert env.register_task()[1]["task"]["status"] == "running"
    code, data = env.sync(tid)
    assert code == 200
    assert data["seedPieces"] == []
    assert env.node.scheduler.tasks[tid].seed_sends == [0] * 6
    env.http.serve(FakeResponse(body=BODY))
    code, data = env.sync(tid)
    assert data["task"]["status"] == "success"
    assert data["seedPieces"]


def test_body_longer_than_content_length(env: Env) -> None:
    env.register_peer()
    tid = env.register_task()[1]["taskId"]
    env.http.serve(FakeResponse(body=BODY, length=2 * PIECE))
    task = env.get(f"/api/v1/tasks/{tid}")[1]
    assert task["status"] == "failed"
    assert task["error"]["code"] == "SOURCE_TOO_LONG"
    assert env.repo_files() == []


def test_digest_mismatch(env: Env) -> None:
    env.register_peer()
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    code, data = env.register_task(digest=wrong)
    assert code == 200
    tid = data["taskId"]
    env.http.serve(FakeResponse(body=BODY))
    task = env.get(f"/api/v1/tasks/{tid}")[1]
    assert task["status"] == "failed"
    assert task["error"]["code"] == "DIGEST_MISMATCH"
    assert task["sha256"] is None
    assert env.repo_files() == []


def test_digest_match(env: Env) -> None:
    env.register_peer()
    good = "sha256:" + hashlib.sha256(BODY).hexdigest().upper()
    tid = env.register_task(digest=good)[1]["taskId"]
    env.http.serve(FakeResponse(body=BODY))
    task = env.get(f"/api/v1/tasks/{tid}")[1]
    assert task["status"] == "success"
    assert task["sha256"] == hashlib.sha256(BODY).hexdigest()


def test_restart_reloads_completed_tasks(env: Env) -> None:
    env.register_peer()
    tid = env.register_task()[1]["taskId"]
    env.http.serve(FakeResponse(body=BODY))
    # a leftover data file without meta (a fetch cut by a crash) is removed on load
    stray = "b" * 64 + ".data"
    with open(os.path.join(env.home, "repo", stray), "wb") as f:
        f.write(b"partial")
    again = make_env(env.home)
    assert again.node.cdn.load() == 1
    assert again.repo_files() == [tid + ".data", tid + ".meta"]
    again.register_peer()
    code, data = again.register_task()
    assert data["task"]["status"] == "success"
    assert again.http.calls == []
    code, data = again.sync(tid)
    assert data["digests"] == piece_digests(BODY)
    assert data["seedPieces"]


# -- never a 500, always JSON -------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
peer_bodies = st.fixed_dictionaries(
    {},
    optional={
        "peerId": st.one_of(st.from_regex(r"\A[a-z0-9.:-]{1,10}\Z"), json_values),
        "ip": st.one_of(st.just("10.0.0.1"), json_values),
        "port": st.one_of(st.integers(-5, 70000), json_values),
        "hostname": json_values,
    },
)
task_bodies = st.fixed_dictionaries(
    {"peerId": st.just("peer-1")},
    optional={
        "url": st.one_of(st.just(URL), st.text(max_size=30), json_values),
        "digest": json_values,
        "identifier": json_values,
        "filter": json_values,
        "headers": json_values,
    },
)
sync_bodies = st.fixed_dictionaries(
    {"peerId": st.just("peer-1")},
    optional={
        "have": st.one_of(st.lists(st.integers(-2, 8), max_size=8), json_values),
        "failed": st.one_of(
            st.lists(st.fixed_dictionaries({"index": st.integers(-3, 8), "parent": st.text(max_size=8)}), max_size=3),
            json_values,
        ),
        "digestsFrom": st.one_of(st.integers(-2, 10), json_values),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_bodies_never_500(tmp_path: Any, data: st.DataObject) -> None:
    e = make_env(str(tmp_path))
    e.register_peer("peer-1")
    tid = task_id(URL)
    e.register_task()
    e.http.serve(FakeResponse(body=BODY))
    for path, bodies in (("/api/v1/peers", peer_bodies), ("/api/v1/tasks", task_bodies), (f"/api/v1/tasks/{tid}/sync", sync_bodies)):
        body = data.draw(bodies, label=path)
        code, _ = e.post(path, body)  # post() checks the JSON error shape
        assert code in (200, 400, 404), (path, body)


def test_pieces_are_served_while_the_origin_fetch_runs(env: Env) -> None:
    """The seed publishes each piece (digest, HAVE) as soon as it is on disk, before the body ends."""
    body = bytes(range(256)) * (PIECE * 5 // 256 + 1)
    body = body[: PIECE * 5]
    env.register_peer()
    code, data = env.register_task()
    tid = data["taskId"]
    # the origin answers with headers and the first two and a half pieces only
    transport = FakeTransport()
    task = env.node.cdn.tasks[tid]
    holder: list[Any] = []

    class Partial(FakeResponse):
        def deliverBody(self, protocol: Any) -> None:
            protocol.makeConnection(transport)
            protocol.dataReceived(self.body[: PIECE * 2 + PIECE // 2])
            holder.append(protocol)

    env.http.serve(Partial(body=body))
    code, data = env.sync(tid)
    assert data["task"]["status"] == "running"
    assert data["task"]["piecesReady"] == 2
    assert data["digests"] == [hashlib.sha256(body[i * PIECE:(i + 1) * PIECE]).hexdigest() for i in range(2)]
    seed = env.node.seed_side(tid)
    assert sorted(seed.local_bitmap()) == [0, 1]
    assert result(seed.read_piece(1)) == body[PIECE:2 * PIECE]
    # the rest arrives: the task completes with all five
    holder[0].dataReceived(body[PIECE * 2 + PIECE // 2:])
    holder[0].connectionLost(Failure(ResponseDone()))
    code, data = env.sync(tid)
    assert data["task"]["status"] == "success"
    assert data["task"]["sha256"] is None  # no digest given: no whole-file hash
    assert task.origin_bytes == len(body)



def test_the_seed_sends_even_the_first_piece_from_its_file(env: Env) -> None:
    """A connection opens the data file: no request is answered from a piece-sized copy in memory while it opens."""

    class Conn:
        def send_digests(self, first: int, digests: list[bytes]) -> None:
            pass

    env.register_peer()
    code, data = env.register_task()
    env.http.serve(FakeResponse(body=BODY))
    code, data = env.sync(data["taskId"])
    assert data["task"]["status"] == "success"
    seed = env.node.seed_side(data["task"]["taskId"])
    seed.attached(Conn())
    found = seed.piece_file(0)
    assert found is not None
    fd, offset, size = found
    assert (offset, size) == (0, PIECE) and os.pread(fd, size, offset) == BODY[:PIECE]

# -- the body check (one place, from openapi.yaml) ----------------------------------------


@pytest.mark.parametrize(
    "path", ["/api/v1/peers", "/api/v1/peers/p/heartbeat", "/api/v1/tasks", f"/api/v1/tasks/{'0' * 64}/sync", "/api/v1/preheats"]
)
def test_every_body_is_checked_before_its_handler(env: Env, path: str) -> None:
    code, data = env.post(path, raw=b"[]")
    assert code == 400 and error_code(data) == "BAD_JSON"
    assert env.node.scheduler.peers == {} and env.http.calls == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
body_fields = st.fixed_dictionaries(
    {}, optional={k: json_values for k in ("peerId", "ip", "port", "url", "have", "failed", "want", "banned", "headers", "filter", "type")}
)


@given(body=body_fields)
@settings(max_examples=300, deadline=None)
def test_the_body_check_answers_400_or_passes(body: dict) -> None:
    from dragonfly.core.httpapi import ApiError
    from dragonfly.supernode.api import _SPEC, SCHEMAS

    for name in ("PeerRegistration", "TaskRegistration", "SyncRequest", "PreheatRequest"):
        try:
            SCHEMAS.check(body, _SPEC["components"]["schemas"][name])
        except ApiError as e:
            assert e.status == 400 and e.code in ("MISSING_FIELD", "BAD_FIELD", "BAD_PEER_ID", "BAD_INPUT"), e.code

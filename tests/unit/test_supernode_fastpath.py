"""
The fast path of syncs and heartbeats (L{dragonfly.supernode.fastpath})
against the Klein routes: two SuperNodes built alike get the same requests,
one through C{api.resource()} (the fast path), one through
C{api.klein_resource()} (Klein alone); every answer must be the same status,
headers and body bytes (only the framing differs: the fast path sends a
Content-Length, Klein a chunked body).  Also the sync answer's cached task
JSON against C{task.to_json()}.
"""

from __future__ import annotations

import json
import random
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from dragonfly.core.bitmap import Bitmap
from dragonfly.core.ids import task_id
from dragonfly.supernode.api import SupernodeApi, TaskJson, _sync_json, sync_answer
from dragonfly.supernode.cdn import Cdn, CdnTask, TaskError
from dragonfly.supernode.fastpath import FastPath
from dragonfly.supernode.node import SuperNode
from dragonfly.supernode.scheduler import Scheduler

from .test_supernode_api import BASE, BODY, PIECE, URL, FakeHttp, FakeResponse, SyncPool, result

ADMIN, CLUSTER = "admin-token-123", "cluster-token-456"
TID = task_id(URL)
#: framing and the clock's headers: the only ones allowed to differ
FRAMING = {b"content-length", b"transfer-encoding", b"date"}


class Counting(Resource):
    """A leaf resource that counts the requests it passes on."""

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.requests = 0

    def render(self, request: Any) -> Any:
        self.requests += 1
        return self.inner.render(request)


class Side:
    """One SuperNode and a client of it, through the fast path or through Klein alone."""

    def __init__(self, home: str, fast: bool, **api_kwargs: Any) -> None:
        self.clock = Clock()
        self.http = FakeHttp()
        self.node = SuperNode(
            lambda track: Cdn(home, self.http, SyncPool(), self.clock, piece_size=PIECE, on_new_task=track),
            Scheduler(rng=random.Random(0)), self.clock, "10.0.0.9", 8001,
        )
        self.api = SupernodeApi(self.node, process_metrics=False, **api_kwargs)
        if fast:
            root = self.api.resource()
            assert isinstance(root, FastPath)
            self.klein = root._fallback = Counting(root._fallback)
        else:
            root = self.api.klein_resource()
        self.stub = StubTreq(root)

    def send(self, method: str, path: str, raw: bytes | None, token: str | None) -> tuple[int, list, bytes]:
        headers = {b"content-type": [b"application/json"]}
        if token is not None:
            headers[b"authorization"] = [f"Bearer {token}".encode()]
        d = self.stub.request(method, BASE + path, data=raw, headers=headers)
        self.stub.flush()
        response = result(d)
        body = result(response.content())
        kept = sorted((k.lower(), tuple(v)) for k, v in response.headers.getAllRawHeaders() if k.lower() not in FRAMING)
        return response.code, kept, body


class Pair:
    def __init__(self, tmp_path: Any, **api_kwargs: Any) -> None:
        (tmp_path / "fast").mkdir()
        (tmp_path / "klein").mkdir()
        self.fast = Side(str(tmp_path / "fast"), True, **api_kwargs)
        self.klein = Side(str(tmp_path / "klein"), False, **api_kwargs)
        self.token = api_kwargs.get("cluster_token")

    def both(self, method: str, path: str, body: Any = None, raw: bytes | None = None, token: Any = "default") -> tuple[int, Any]:
        """The same request to both sides: the same answer from each, returned as (status, JSON)."""
        if raw is None and body is not None:
            raw = json.dumps(body).encode()
        if token == "default":
            token = self.token
        a = self.fast.send(method, path, raw, token)
        b = self.klein.send(method, path, raw, token)
        assert a == b
        return a[0], json.loads(a[2])

    def setup_task(self) -> None:
        for n in (1, 2, 3):
            assert self.both("POST", "/api/v1/peers", {"peerId": f"peer-{n}", "ip": "10.0.0.1", "port": 65000 + n})[0] == 200
        assert self.both("POST", "/api/v1/tasks", {"peerId": "peer-1", "url": URL})[0] == 200
        for side in (self.fast, self.klein):
            side.http.serve(FakeResponse(body=BODY))
        for n in (2, 3):
            assert self.both("POST", "/api/v1/tasks", {"peerId": f"peer-{n}", "url": URL})[0] == 200


def sync_path(tid: str = TID) -> str:
    return f"/api/v1/tasks/{tid}/sync"


def test_same_answers_open(tmp_path: Any) -> None:
    pair = Pair(tmp_path)
    # before anything is registered
    assert pair.both("POST", "/api/v1/peers/ghost/heartbeat", {})[1]["error"]["code"] == "PEER_UNKNOWN"
    assert pair.both("POST", sync_path(), {"peerId": "peer-1"})[1]["error"]["code"] == "TASK_UNKNOWN"
    pair.setup_task()
    before = pair.fast.klein.requests
    cases: list[tuple[Any, ...]] = [
        # (path, body or raw bytes, expected status, expected code)
        ("/api/v1/peers/peer-1/heartbeat", {}, 200, None),
        ("/api/v1/peers/peer-1/heartbeat", None, 200, None),  # no body: {}
        ("/api/v1/peers/peer-1/heartbeat", b"[]", 400, "BAD_JSON"),
        ("/api/v1/peers/ghost/heartbeat", {}, 404, "PEER_UNKNOWN"),
        (sync_path(), {"peerId": "peer-1", "have": [0, 1, 2]}, 200, None),
        (sync_path(), {"peerId": "peer-2", "have": [3], "failed": [{"index": 0, "parent": "peer-1"}]}, 200, None),
        (sync_path(), {"peerId": "peer-3", "starving": True, "want": 4, "peerBytes": 1000}, 200, None),
        (sync_path(), {"peerId": "peer-2", "digestsFrom": 4}, 200, None),
        (sync_path(), {"peerId": "ghost"}, 404, "PEER_UNKNOWN"),
        (sync_path("0" * 64), {"peerId": "peer-1"}, 404, "TASK_UNKNOWN"),
        (sync_path(), {"peerId": "peer-1", "version": "0123456789abcdef"}, 409, "TASK_CHANGED"),
        (sync_path(), {"peerId": "peer-1", "have": [6]}, 400, "BAD_FIELD"),
        (sync_path(), {"peerId": "peer-1", "have": ["0"]}, 400, "BAD_FIELD"),
        (sync_path(), {"peerId": "peer-1", "peerBytes": -1}, 400, "BAD_FIELD"),
        (sync_path(), {"have": [1]}, 400, "MISSING_FIELD"),
        (sync_path(), {"peerId": "bad id"}, 400, "BAD_PEER_ID"),
        (sync_path(), b'{"peerId": ', 400, "BAD_JSON"),
        (sync_path(), b"\xff\xfe{}", 400, "BAD_JSON"),
        (sync_path(), b'"peer-1"', 400, "BAD_JSON"),
        (sync_path(), b" " * ((1 << 20) + 1), 413, "BODY_TOO_LARGE"),
        (sync_path() + "?x=1", {"peerId": "peer-1"}, 200, None),
    ]
    for path, body, status, code in cases:
        raw = body if isinstance(body, bytes) else None
        got, data = pair.both("POST", path, None if raw is not None else body, raw)
        assert got == status, (path, body, data)
        if code is not None:
            assert data["error"]["code"] == code
    # every one of those was answered by the fast path
    assert pair.fast.klein.requests == before


def test_same_answers_fall_through(tmp_path: Any) -> None:
    pair = Pair(tmp_path)
    pair.setup_task()
    before = pair.fast.klein.requests
    cases = [
        ("POST", "/api/v1/peers/bad%20id/heartbeat", 400, "BAD_PEER_ID"),
        ("POST", "/api/v1/peers/" + "x" * 65 + "/heartbeat", 400, "BAD_PEER_ID"),
        ("POST", "/api/v1/peers/peer%2D1/heartbeat", 200, None),  # percent-decoded by Klein
        ("POST", "/api/v1/tasks/not-a-task-id/sync", 400, "BAD_TASK_ID"),
        ("POST", "/api/v1/tasks/" + "A" * 64 + "/sync", 400, "BAD_TASK_ID"),
        ("GET", sync_path(), 405, "METHOD_NOT_ALLOWED"),
        ("PUT", "/api/v1/peers/peer-1/heartbeat", 405, "METHOD_NOT_ALLOWED"),
        ("POST", sync_path() + "/", 404, "NOT_FOUND"),
        ("POST", "/api/v2/tasks/" + TID + "/sync", 404, "NOT_FOUND"),
        ("POST", "/api/v1/tasks/" + TID + "/syncs", 404, "NOT_FOUND"),
    ]
    for method, path, status, code in cases:
        got, data = pair.both(method, path, {"peerId": "peer-1"})
        assert got == status, (method, path, data)
        if code is not None:
            assert data["error"]["code"] == code
    assert pair.fast.klein.requests == before + len(cases)


def test_same_answers_with_tokens(tmp_path: Any) -> None:
    pair = Pair(tmp_path, admin_token=ADMIN, cluster_token=CLUSTER)
    pair.setup_task()
    before = pair.fast.klein.requests
    for token, status in [(None, 401), ("wrong-token-000", 401), (CLUSTER, 200), (ADMIN, 200)]:
        code, data = pair.both("POST", sync_path(), {"peerId": "peer-1"}, token=token)
        assert code == status
        code, data = pair.both("POST", "/api/v1/peers/peer-1/heartbeat", {}, token=token)
        assert code == status
        if status == 401:
            assert data["error"]["code"] == "UNAUTHORIZED"
    # authorisation comes first: a wrong token with an unknown task or a bad body is still a 401
    assert pair.both("POST", sync_path("0" * 64), raw=b"{", token=None)[0] == 401
    assert pair.fast.klein.requests == before


def test_same_answer_on_an_internal_error(tmp_path: Any, monkeypatch: Any) -> None:
    pair = Pair(tmp_path)
    pair.setup_task()

    def broken(task_id: str, report: Any) -> Any:
        raise RuntimeError("the scheduler broke")

    for side in (pair.fast, pair.klein):
        monkeypatch.setattr(side.node, "sync", broken)
    code, data = pair.both("POST", sync_path(), {"peerId": "peer-1"})
    assert code == 500 and data["error"] == {"code": "INTERNAL", "message": "the scheduler broke"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=False) | st.sampled_from(["peer-1", "peer-2", "x y", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["index", "parent"]), inner, max_size=2),
    max_leaves=6,
)
sync_bodies = st.fixed_dictionaries(
    {},
    optional={
        "peerId": st.sampled_from(["peer-1", "peer-2", "peer-3", "ghost", "bad id", 7]),
        "have": st.lists(st.integers(-1, 7), max_size=4) | json_values,
        "failed": st.lists(st.fixed_dictionaries({"index": st.integers(-1, 7), "parent": st.sampled_from(["peer-1", "x y"])}), max_size=2) | json_values,
        "digestsFrom": st.integers(-1, 8) | json_values,
        "starving": st.booleans() | json_values,
        "want": st.integers(-1, 7) | json_values,
        "banned": st.lists(st.sampled_from(["peer-1", "peer-2"]), max_size=2) | json_values,
        "peerBytes": st.integers(-1, 1 << 20) | json_values,
        "extra": json_values,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=st.lists(sync_bodies | json_values, min_size=1, max_size=6))
def test_same_answers_for_any_sync_bodies(tmp_path_factory: Any, bodies: list[Any]) -> None:
    pair = Pair(tmp_path_factory.mktemp("pair"))
    pair.setup_task()
    for body in bodies:
        pair.both("POST", sync_path(), raw=json.dumps(body).encode())
        pair.both("POST", "/api/v1/peers/peer-2/heartbeat", raw=json.dumps(body).encode())


# -- the task's JSON, kept per task ------------------------------------------------------


def a_task() -> CdnTask:
    task = CdnTask(TID, URL, "/nowhere/data", "/nowhere/meta")
    task.status, task.length, task.piece_size, task.piece_count = "success", 5000, 1024, 5
    task.available = Bitmap(5)
    task.available.set(0)
    task.validators = {"etag": '"a"', "lastModified": None, "length": 5000}
    return task


#: a changed value for every field to_json may show
CHANGES: dict[str, Any] = {
    "task_id": "f" * 64, "url": URL + "?v=2", "status": "failed", "length": 6000, "piece_size": 2048,
    "piece_count": 3, "sha256": "ab" * 32, "content_type": "text/plain", "error": TaskError("SOURCE_ERROR", "gone"),
    "origin_bytes": 77, "seed_bytes": 88, "validators": {"etag": '"b"', "length": 5000},
}


def test_task_json_follows_every_change() -> None:
    cache = TaskJson()
    task = a_task()
    assert cache(task) == json.dumps(task.to_json()).encode()
    assert cache(task) is cache(task)  # kept while nothing changed
    for name, value in CHANGES.items():
        setattr(task, name, value)
        assert cache(task) == json.dumps(task.to_json()).encode(), name
    # changed in place
    assert task.available is not None
    task.available.set(1)
    assert cache(task) == json.dumps(task.to_json()).encode()
    task.validators["etag"] = '"c"'
    assert cache(task) == json.dumps(task.to_json()).encode()
    assert task.error is not None
    task.error.message = "gone again"
    assert cache(task) == json.dumps(task.to_json()).encode()


def test_task_json_covers_every_field_to_json_reads() -> None:
    """A field of CdnTask that its JSON shows must be in the cache's key (and in CHANGES here)."""
    for f in attrs.fields(CdnTask):
        if f.name in CHANGES or f.name == "available":  # available: changed in place, above
            continue
        task = a_task()
        before = task.to_json()
        current = getattr(task, f.name)
        other: Any = {"x": 1} if isinstance(current, dict) else ["x"] if isinstance(current, list) else 12345
        setattr(task, f.name, other)
        assert task.to_json() == before, f"CdnTask.to_json shows {f.name}: add it to api._task_key and CHANGES"


@pytest.mark.parametrize("digests_from", [0, 3, 5])
def test_sync_answer_is_json_dumps(tmp_path: Any, digests_from: int) -> None:
    pair = Pair(tmp_path)
    pair.setup_task()
    from dragonfly.protocol.supernode_api import SyncReport

    node = pair.fast.node
    result_ = node.sync(TID, SyncReport("peer-1", have=(0, 1), digests_from=digests_from))
    assert sync_answer(result_, TaskJson()(result_.task)) == json.dumps(_sync_json(result_)).encode()

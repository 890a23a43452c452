"""
The SuperNode dashboard: C{GET /api/v1/dashboard}, the traffic history kept
on the injected clock, the C{peerBytes} a peer reports in sync, and the
page and files served at C{/ui} (through StubTreq, a fake clock, no sockets).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest

from dragonfly.core.bitmap import Bitmap
from dragonfly.supernode.api import MAX_PEER_BYTES
from dragonfly.supernode.dashboard import HISTORY_SAMPLES, SAMPLE_INTERVAL, TrafficHistory

from .test_supernode_api import BASE, BODY, URL, Env, FakeResponse, env, error_code, result  # noqa: F401 (env: the fixture)

PIECES = 6  # BODY is 5 pieces and a short one


def bitmap_pieces(b64: str | None, count: int) -> list[int]:
    assert b64 is not None
    return list(Bitmap.from_bytes(count, base64.b64decode(b64)))


def swarm_of_two(env: Env) -> str:
    """Two peers in one task whose origin fetch is done; the task id."""
    env.register_peer("peer-1")
    env.register_peer("peer-2", port=65002)
    tid = env.register_task("peer-1")[1]["taskId"]
    env.register_task("peer-2")
    env.http.serve(FakeResponse(body=BODY))
    return tid


def fetch(env: Env, path: str) -> tuple[int, dict[str, str], bytes]:
    d = env.stub.get(BASE + path, allow_redirects=False)
    env.stub.flush()
    response = result(d)
    headers = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
    return response.code, headers, result(response.content())


# -- the JSON --------------------------------------------------------------------------


def test_empty_supernode(env: Env) -> None:
    code, data = env.get("/api/v1/dashboard")
    assert code == 200
    assert data == {
        "now": 0.0,
        "sampleInterval": SAMPLE_INTERVAL,
        "totals": {"originBytes": 0, "seedBytes": 0, "peerBytes": 0},
        "traffic": [],
        "taskCount": 0,
        "tasks": [],
        "peers": [],
    }


def test_tasks_members_and_bitmaps(env: Env) -> None:
    tid = swarm_of_two(env)
    env.clock.advance(3)
    assert env.sync(tid, "peer-1", have=[0, 1, 5])[0] == 200
    env.clock.advance(1)
    assert env.sync(tid, "peer-2", have=list(range(PIECES)))[0] == 200

    code, data = env.get("/api/v1/dashboard")
    assert code == 200
    assert data["now"] == 4.0
    assert data["taskCount"] == 1
    (task,) = data["tasks"]
    assert task["taskId"] == tid
    assert task["url"] == URL
    assert task["status"] == "success"
    assert task["pieceCount"] == PIECES and task["piecesReady"] == PIECES
    assert task["originBytes"] == len(BODY)
    assert bitmap_pieces(task["seedBitmap"], PIECES) == list(range(PIECES))
    members = {m["peerId"]: m for m in task["members"]}
    assert list(members) == ["peer-1", "peer-2"]
    assert bitmap_pieces(members["peer-1"]["bitmap"], PIECES) == [0, 1, 5]
    assert members["peer-1"]["piecesDone"] == 3 and not members["peer-1"]["done"]
    assert members["peer-1"]["lastSync"] == 3.0
    assert bitmap_pieces(members["peer-2"]["bitmap"], PIECES) == list(range(PIECES))
    assert members["peer-2"]["piecesDone"] == PIECES and members["peer-2"]["done"]
    assert members["peer-2"]["parents"] == 1  # peer-1 (the seed is not a scheduler parent)
    # the same bytes the block protocol would carry: MSB first
    assert base64.b64decode(members["peer-1"]["bitmap"]) == bytes([0b11000100])

    peers = {p["peerId"]: p for p in data["peers"]}
    assert peers["peer-1"] == {
        "peerId": "peer-1", "ip": "10.0.0.1", "port": 65001, "hostname": "", "lastSeen": 3.0, "tasks": 1,
    }
    assert peers["peer-2"]["lastSeen"] == 4.0

    # a member that leaves leaves the dashboard; the peer stays registered
    env.request("DELETE", f"/api/v1/tasks/{tid}/peers/peer-1")
    data = env.get("/api/v1/dashboard")[1]
    assert [m["peerId"] for m in data["tasks"][0]["members"]] == ["peer-2"]
    assert {p["peerId"]: p["tasks"] for p in data["peers"]} == {"peer-1": 0, "peer-2": 1}


def test_task_before_its_length_is_known(env: Env) -> None:
    env.register_peer("peer-1")
    tid = env.register_task("peer-1")[1]["taskId"]
    (task,) = env.get("/api/v1/dashboard")[1]["tasks"]
    assert task["taskId"] == tid and task["status"] == "running"
    assert task["pieceCount"] is None
    assert task["seedBitmap"] is None
    assert task["members"] == [
        {"peerId": "peer-1", "piecesDone": 0, "done": False, "bitmap": None, "parents": 0, "seedPieces": 0, "lastSync": 0.0}
    ]


def test_peer_bytes_are_added_up(env: Env) -> None:
    tid = swarm_of_two(env)
    assert env.sync(tid, "peer-1", peerBytes=1000)[0] == 200
    assert env.sync(tid, "peer-2", peerBytes=3000)[0] == 200
    assert env.sync(tid, "peer-1", peerBytes=500)[0] == 200
    assert env.sync(tid, "peer-1")[0] == 200  # absent: nothing new
    assert env.sync(tid, "peer-1", peerBytes=None)[0] == 200
    data = env.get("/api/v1/dashboard")[1]
    assert data["totals"]["peerBytes"] == 4500
    assert data["tasks"][0]["peerBytes"] == 4500


def test_seed_bytes_are_counted(env: Env) -> None:
    tid = swarm_of_two(env)
    env.node.seed_side(tid).on_uploaded(None, 2 * 1024)
    data = env.get("/api/v1/dashboard")[1]
    assert data["totals"]["seedBytes"] == 2048
    assert data["tasks"][0]["seedBytes"] == 2048
    assert data["totals"]["originBytes"] == len(BODY)


@pytest.mark.parametrize("value", [-1, "10", 1.5, True, [1], MAX_PEER_BYTES + 1])
def test_bad_peer_bytes(env: Env, value: Any) -> None:
    tid = swarm_of_two(env)
    code, data = env.sync(tid, "peer-1", peerBytes=value, have=[0])
    assert code == 400 and error_code(data) == "BAD_FIELD"
    data = env.get("/api/v1/dashboard")[1]
    assert data["totals"]["peerBytes"] == 0
    # the whole report was refused
    assert data["tasks"][0]["members"][0]["piecesDone"] == 0


def test_peer_bytes_of_a_refused_sync_are_not_counted(env: Env) -> None:
    tid = swarm_of_two(env)
    code, data = env.sync(tid, "ghost", peerBytes=7000)
    assert code == 404 and error_code(data) == "PEER_UNKNOWN"
    code, data = env.sync("0" * 64, "peer-1", peerBytes=7000)
    assert code == 404 and error_code(data) == "TASK_UNKNOWN"
    assert env.get("/api/v1/dashboard")[1]["totals"]["peerBytes"] == 0


def test_newest_tasks_first_and_the_tasks_parameter(env: Env) -> None:
    env.register_peer("peer-1")
    first = env.register_task("peer-1")[1]["taskId"]
    second = env.register_task("peer-1", url=URL + "?v=2")[1]["taskId"]
    data = env.get("/api/v1/dashboard")[1]
    assert [t["taskId"] for t in data["tasks"]] == [second, first]
    data = env.get("/api/v1/dashboard?tasks=1")[1]
    assert [t["taskId"] for t in data["tasks"]] == [second]
    assert data["taskCount"] == 2
    data = env.get("/api/v1/dashboard?tasks=0")[1]
    assert data["tasks"] == [] and data["taskCount"] == 2


@pytest.mark.parametrize("query", ["tasks=-1", "tasks=201", "tasks=x", "tasks=", "tasks=1.5"])
def test_bad_tasks_parameter(env: Env, query: str) -> None:
    code, data = env.get("/api/v1/dashboard?" + query)
    assert code == 400 and error_code(data) == "BAD_QUERY"


# -- the traffic history ------------------------------------------------------------------


def test_traffic_is_sampled_on_the_clock(env: Env) -> None:
    sampler = env.node.traffic_sampler()
    sampler.startService()
    try:
        # TimerService samples at once, then every interval
        assert [s["t"] for s in env.get("/api/v1/dashboard")[1]["traffic"]] == [0.0]
        tid = swarm_of_two(env)  # the origin fetch: len(BODY) bytes
        env.clock.advance(1)
        assert env.sync(tid, "peer-1", peerBytes=4096)[0] == 200
        env.node.seed_side(tid).on_uploaded(None, 1024)
        env.clock.advance(1)
        env.clock.advance(0.5)  # between samples: nothing new
        traffic = env.get("/api/v1/dashboard")[1]["traffic"]
        assert traffic == [
            {"t": 0.0, "originBytes": 0, "seedBytes": 0, "peerBytes": 0},
            {"t": 1.0, "originBytes": len(BODY), "seedBytes": 0, "peerBytes": 0},
            {"t": 2.0, "originBytes": len(BODY), "seedBytes": 1024, "peerBytes": 4096},
        ]
    finally:
        sampler.stopService()
    env.clock.advance(5)
    assert len(env.get("/api/v1/dashboard")[1]["traffic"]) == 3


def test_traffic_history_is_a_bounded_ring(env: Env) -> None:
    sampler = env.node.traffic_sampler()
    sampler.startService()
    try:
        for _ in range(HISTORY_SAMPLES + 99):
            env.clock.advance(SAMPLE_INTERVAL)
    finally:
        sampler.stopService()
    traffic = env.get("/api/v1/dashboard")[1]["traffic"]
    # samples at 0, 1, ..., 399: the oldest 100 are gone
    assert len(traffic) == HISTORY_SAMPLES
    assert traffic[0]["t"] == 100.0 and traffic[-1]["t"] == 399.0


def test_traffic_history_needs_two_samples() -> None:
    with pytest.raises(ValueError):
        TrafficHistory(size=1)
    history = TrafficHistory(size=2)
    for t in range(5):
        history.add(float(t), t, 2 * t, 3 * t)
    assert history.to_json() == [
        {"t": 3.0, "originBytes": 3, "seedBytes": 6, "peerBytes": 9},
        {"t": 4.0, "originBytes": 4, "seedBytes": 8, "peerBytes": 12},
    ]


# -- the page --------------------------------------------------------------------------------


def test_root_redirects_to_the_dashboard(env: Env) -> None:
    code, headers, body = fetch(env, "/")
    assert code == 302
    assert headers["location"] == "ui"
    assert json.loads(body) == {"location": "ui"}


def test_page_and_its_files(env: Env) -> None:
    code, headers, page = fetch(env, "/ui")
    assert code == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    html = page.decode("utf-8")
    # everything the page loads comes from this SuperNode, relative to it
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "ui/dashboard.js" in refs and "ui/dashboard.css" in refs and "api/v1/dashboard" in refs
    for ref in refs:
        assert not re.match(r"\w+://|//", ref), ref
    types = {"ui/dashboard.js": "text/javascript", "ui/dashboard.css": "text/css"}
    for ref, ctype in types.items():
        code, headers, body = fetch(env, "/" + ref)
        assert code == 200, ref
        assert headers["content-type"].startswith(ctype)
        assert len(body) > 1000
    # the page polls the JSON endpoint
    assert b'fetch("api/v1/dashboard"' in fetch(env, "/ui/dashboard.js")[2]


@pytest.mark.parametrize("name", ["index.html", "nope.js", "..%2Fapi.py", "dashboard.js.map"])
def test_unknown_files_are_404(env: Env, name: str) -> None:
    code, headers, body = fetch(env, "/ui/" + name)
    assert code == 404
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "NOT_FOUND"

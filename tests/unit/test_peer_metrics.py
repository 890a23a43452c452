"""
A dfpeer's C{/metrics} and task logs, without sockets: the local API through
L{treq.testing.StubTreq}, the SuperNode and the origin as fakes, pieces
handed to the task as a block connection would.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs

from dragonfly.core.ids import task_id
from dragonfly.peer.daemon import PeerDaemon
from dragonfly.peer.lifecycle import State
from dragonfly.peer.localapi import LocalApi
from dragonfly.peer.task import PeerTask

from .test_supernode_api import BODY, FakeResponse, SyncPool, result
from .test_supernode_metrics import StepTimer

API = "http://dfpeer.test"
URL = "http://origin.test/files/blob.bin"
P = "dragonfly_dfpeer_"


class FakeHttp:
    """The SuperNode refuses connections; the origin answers C{response}."""

    def __init__(self, response: FakeResponse) -> None:
        self.response = response
        self.gets: list[str] = []

    def request(self, method: str, url: str, **kwargs: Any) -> defer.Deferred:
        return defer.fail(ConnectionRefusedError("no supernode here"))

    def get(self, url: str, headers: Any = None, **kwargs: Any) -> defer.Deferred:
        self.gets.append(url)
        return defer.succeed(self.response)


class Peer:
    def __init__(self, home: str, response: FakeResponse | None = None) -> None:
        self.reactor = MemoryReactorClock()
        self.http = FakeHttp(response or FakeResponse(body=BODY))
        self.daemon = PeerDaemon(self.reactor, home, ["supernode.test:8002"], "10.0.0.5", SyncPool(), self.http)
        self.daemon.listening(40001)
        self.stub = StubTreq(LocalApi(self.daemon, timer=StepTimer(0.01)).resource())

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        d = self.stub.request(method, API + path, json=body) if body is not None else self.stub.request(method, API + path)
        self.stub.flush()
        response = result(d)
        return response.code, json.loads(result(response.content()))

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        d = self.stub.get(API + "/metrics")
        self.stub.flush()
        response = result(d)
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        out = {}
        for family in text_string_to_metric_families(result(response.content()).decode()):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def test_back_to_source_download(tmp_path: Any) -> None:
    peer = Peer(str(tmp_path))
    m = peer.scrape()
    assert value(m, P + "tasks", status="running") == 0
    assert value(m, P + "download_traffic_bytes_total", type="back_to_source") == 0
    code, data = peer.call("POST", "/api/v1/downloads", {"url": URL})
    assert code == 200, data
    peer.reactor.advance(3.0)  # the download "took" 3 s
    task = peer.daemon.tasks[task_id(URL)]
    assert task.status == "success"
    assert peer.http.gets == [URL]
    m = peer.scrape()
    assert value(m, P + "download_traffic_bytes_total", type="back_to_source") == len(BODY)
    assert value(m, P + "download_traffic_bytes_total", type="supernode") == 0
    assert value(m, P + "download_traffic_bytes_total", type="remote_peer") == 0
    assert value(m, P + "back_to_source_total", reason="supernode_unreachable") == 1
    assert value(m, P + "downloads_total", result="success") == 1
    assert value(m, P + "downloads_total", result="failed") == 0
    assert value(m, P + "tasks", status="success") == 1
    assert value(m, P + "tasks", status="running") == 0
    assert value(m, P + "download_duration_seconds_count") == 1
    assert value(m, P + "http_requests_total", handler="start", code="200") == 1
    assert value(m, P + "http_requests_total", handler="metrics", code="200") == 1
    assert value(m, P + "http_request_duration_seconds_sum", handler="start") == pytest.approx(0.01)
    code, _ = peer.call("GET", "/api/v1/downloads/" + "0" * 64)
    assert code == 404
    assert value(peer.scrape(), P + "http_requests_total", handler="progress", code="404") == 1


def test_failed_download_counts_its_reason(tmp_path: Any) -> None:
    peer = Peer(str(tmp_path), FakeResponse(code=404, phrase=b"Not Found"))
    peer.call("POST", "/api/v1/downloads", {"url": URL})
    assert peer.daemon.tasks[task_id(URL)].status == "failed"
    m = peer.scrape()
    assert value(m, P + "downloads_total", result="failed") == 1
    assert value(m, P + "download_failures_total", reason="origin_error") == 1
    assert value(m, P + "download_failures_total", reason="other") == 0
    assert value(m, P + "download_duration_seconds_count") == 0
    assert value(m, P + "tasks", status="failed") == 1
    # --notbs: the swarm failed and the origin is off limits
    peer.call("POST", "/api/v1/downloads", {"url": URL + "?x", "notbs": True})
    m = peer.scrape()
    assert value(m, P + "download_failures_total", reason="p2p_failed") == 1
    assert value(m, P + "back_to_source_total", reason="supernode_unreachable") == 1


class FakeConn:
    def __init__(self, remote_id: str) -> None:
        self.remote_id = remote_id
        self.remote_have = None
        self.requested: dict[int, float] = {}
        self.closed = False
        self.initiator = True
        self.haves: list[int] = []

    def send_have(self, index: int) -> None:
        self.haves.append(index)

    def cancel(self, index: int) -> None:
        pass

    def abort(self, why: str, code: int = 0) -> None:
        self.closed = True


PIECE = 1024


def p2p_task(peer: Peer) -> tuple[PeerTask, list[bytes]]:
    """A running task of three pieces whose digests are known, ready for pieces."""
    body = BODY[: 3 * PIECE]
    pieces = [body[i : i + PIECE] for i in range(0, len(body), PIECE)]
    task = PeerTask(peer.daemon, task_id(URL), {"url": URL})
    peer.daemon.tasks[task.task_id] = task
    task.lifecycle.state = State.SIZING
    task._set_length(len(body), PIECE)
    for i, piece in enumerate(pieces):
        task.set_digest(i, hashlib.sha256(piece).digest())
    task._allocate()
    assert task.ready_for_io
    return task, pieces


def test_p2p_traffic_by_type_and_uploads(tmp_path: Any) -> None:
    peer = Peer(str(tmp_path))
    task, pieces = p2p_task(peer)
    seed, other = FakeConn("supernode"), FakeConn("peer-b")
    task.seed_conn = seed
    assert value(peer.scrape(), P + "tasks", status="running") == 1
    task.on_piece(seed, 0, bytearray(pieces[0]))
    task.on_piece(other, 1, bytearray(b"x" * PIECE))  # corrupt
    task.on_piece(other, 1, bytearray(pieces[1]))
    task.on_piece(seed, 1, bytearray(pieces[1]))  # an endgame duplicate
    task.on_uploaded(other, PIECE)
    m = peer.scrape()
    assert value(m, P + "download_traffic_bytes_total", type="supernode") == PIECE
    assert value(m, P + "download_traffic_bytes_total", type="remote_peer") == PIECE
    assert value(m, P + "discarded_bytes_total", reason="corrupt") == PIECE
    assert value(m, P + "discarded_bytes_total", reason="duplicate") == PIECE
    assert value(m, P + "upload_pieces_total") == 1
    assert value(m, P + "upload_bytes_total") == PIECE
    assert value(m, P + "downloads_total", result="success") == 0
    peer.reactor.advance(7.0)
    task.on_piece(other, 2, bytearray(pieces[2]))
    assert task.status == "success"
    m = peer.scrape()
    traffic = sum(value(m, P + "download_traffic_bytes_total", type=t) for t in ("back_to_source", "supernode", "remote_peer"))
    assert traffic == 3 * PIECE
    assert value(m, P + "downloads_total", result="success") == 1
    assert value(m, P + "download_duration_seconds_sum") == pytest.approx(7.0)
    assert value(m, P + "download_duration_seconds_bucket", le="5.0") == 0
    assert value(m, P + "download_duration_seconds_bucket", le="10.0") == 1
    assert value(m, P + "tasks", status="running") == 0


def test_a_second_bad_piece_bans_and_counts(tmp_path: Any) -> None:
    peer = Peer(str(tmp_path))
    task, _ = p2p_task(peer)
    liar = FakeConn("liar")
    liar.transport = None
    task.on_piece(liar, 0, bytearray(b"x" * PIECE))
    task.on_piece(liar, 1, bytearray(b"y" * PIECE))
    m = peer.scrape()
    assert value(m, P + "peer_bans_total", reason="corrupt") == 1
    assert value(m, P + "discarded_bytes_total", reason="corrupt") == 2 * PIECE


def test_unknown_label_values_are_refused(tmp_path: Any) -> None:
    peer = Peer(str(tmp_path))
    with pytest.raises(KeyError):
        peer.daemon.stats.count(peer.daemon.stats.traffic, "http://origin.test/some/url")


# -- logs ----------------------------------------------------------------------------


def task_events(events: Any, tid: str) -> list[dict]:
    return [e for e in events if e.get("taskId") == tid]


def test_task_events_carry_the_task_id_and_numbers(tmp_path: Any) -> None:
    from twisted.logger import formatEvent

    peer = Peer(str(tmp_path))
    with capturedLogs() as events:
        task, pieces = p2p_task(peer)
        seed = FakeConn("supernode")
        task.seed_conn = seed
        peer.reactor.advance(0.5)
        for i, piece in enumerate(pieces):
            task.on_piece(seed, i, bytearray(piece))
    mine = task_events(events, task.task_id)
    assert all(e["peerId"] == peer.daemon.peer_id for e in mine)
    assert all(task.task_id[:12] in formatEvent(e) for e in mine)
    (first,) = [e for e in mine if "first piece" in e["log_format"]]
    assert first["index"] == 0 and first["bytes"] == PIECE and first["seconds"] == pytest.approx(0.5)
    (done,) = [e for e in mine if e["log_format"].startswith("task {task}: complete")]
    assert done["bytes"] == 3 * PIECE and done["pieces"] == 3
    assert done["sn"] == 3 * PIECE and done["peers"] == 0


def test_failure_and_back_to_source_events(tmp_path: Any) -> None:
    peer = Peer(str(tmp_path), FakeResponse(code=503, phrase=b"Busy"))
    with capturedLogs() as events:
        peer.call("POST", "/api/v1/downloads", {"url": URL + "?token=secret"})
    tid = task_id(URL + "?token=secret")
    mine = task_events(events, tid)
    (bts,) = [e for e in mine if e.get("reason") == "supernode_unreachable"]
    assert "secret" not in json.dumps({k: v for k, v in bts.items() if isinstance(v, (str, int, float))})
    (failed,) = [e for e in mine if e.get("code") == "SOURCE_ERROR"]
    assert failed["log_level"].name == "warn"
    assert failed["seconds"] == 0 and failed["bytes"] == 0


def test_supernode_events_follow_the_task(tmp_path: Any) -> None:
    from .test_supernode_api import make_env

    env = make_env(str(tmp_path))
    tid = task_id("http://origin.test/files/blob.bin")
    with capturedLogs() as events:
        env.register_peer("peer-1")
        env.register_task("peer-1")
        env.clock.advance(2.0)
        env.http.serve(FakeResponse(body=BODY))
        env.sync(tid, "peer-1", have=list(range(6)))
    mine = task_events(events, tid)
    texts = [e["log_format"] for e in mine]
    assert any("registered by" in t for t in texts)
    assert any("joined" in t for t in texts)
    (first,) = [e for e in mine if "first piece ready" in e["log_format"]]
    assert first["seconds"] == pytest.approx(2.0)
    (complete,) = [e for e in mine if "origin fetch complete" in e["log_format"]]
    assert complete["bytes"] == len(BODY) and complete["pieces"] == 6
    (holds,) = [e for e in mine if "holds all" in e["log_format"]]
    assert holds["peerId"] == "peer-1" and holds["seconds"] == pytest.approx(2.0)
    assert all(e["task"] == tid[:12] for e in mine)


def test_a_metrics_only_port_serves_the_same_registry(tmp_path: Any) -> None:
    from dragonfly.core.metrics import metrics_only_root

    peer = Peer(str(tmp_path))
    api = LocalApi(peer.daemon, process_metrics=False)
    peer.daemon.stats.upload_pieces = 7
    stub = StubTreq(metrics_only_root(api.registry))
    d = stub.get("http://scrape.test/metrics")
    stub.flush()
    response = result(d)
    assert response.code == 200
    text = result(response.content()).decode()
    assert "dragonfly_dfpeer_upload_pieces_total 7.0" in text
    assert "process_" not in text
    for path in ("/", "/api/v1/tasks", "/healthz", "/metrics/x"):
        d = stub.get("http://scrape.test" + path)
        stub.flush()
        assert result(d).code == 404, path

"""
The SuperNode API served before Klein is in (C{api.resource(early=True)},
what the SuperNode's tap serves from its start): what a restarted
SuperNode's peers call first is answered on the fast path without loading
the rest; a request that needs the rest loads it and gets the answer Klein
gives; the requests answered before are counted in the metrics then.  Each
answer is held to a SuperNode built alike and served by Klein alone
(L{test_supernode_fastpath.Side}).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from dragonfly.protocol.supernode_api import PeerRegistration
from dragonfly.supernode.api import SupernodeApi
from dragonfly.supernode.fastpath import LOAD_STEPS, FastPath, load_in_steps

from .test_supernode_api import BODY, FakeResponse
from .test_supernode_fastpath import TID, URL, Side, result, sync_path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Request(DummyRequest):
    """A request as the fast path reads it: C{code} is the response code, as on twisted.web's."""

    @property
    def code(self) -> int:
        return int(self.responseCode or 200)


class EarlySide(Side):
    """A SuperNode served by C{api.resource(early=True)}, nothing loaded yet."""

    def __init__(self, home: str, **api_kwargs: Any) -> None:
        super().__init__(home, False, **api_kwargs)
        self.api = SupernodeApi(self.node, process_metrics=False, timer=lambda: 0.0, **api_kwargs)
        self.root = self.api.resource(early=True)
        assert isinstance(self.root, FastPath)
        self.stub = StubTreq(self.root)


class EarlyPair:
    def __init__(self, tmp_path: Any, **api_kwargs: Any) -> None:
        (tmp_path / "early").mkdir()
        (tmp_path / "klein").mkdir()
        self.early = EarlySide(str(tmp_path / "early"), **api_kwargs)
        self.klein = Side(str(tmp_path / "klein"), False, **api_kwargs)
        self.klein.api = SupernodeApi(self.klein.node, process_metrics=False, timer=lambda: 0.0, **api_kwargs)
        self.klein.stub = StubTreq(self.klein.api.klein_resource())

    def both(self, method: str, path: str, body: Any = None, raw: bytes | None = None, token: str | None = None) -> tuple[int, Any]:
        if raw is None and body is not None:
            raw = json.dumps(body).encode()
        a = self.early.send(method, path, raw, token)
        b = self.klein.send(method, path, raw, token)
        assert a == b
        return a[0], json.loads(a[2]) if a[2].startswith((b"{", b"[")) else a[2]

    def serve_origin(self) -> None:
        for side in (self.early, self.klein):
            side.http.serve(FakeResponse(body=BODY))


def restart_calls(pair: EarlyPair) -> None:
    """What a restarted SuperNode's peers send first, with a few refusals: the same answers from both."""
    assert pair.both("GET", "/healthz")[0] == 200
    assert pair.both("POST", sync_path(), {"peerId": "peer-1"})[1]["error"]["code"] == "TASK_UNKNOWN"
    assert pair.both("POST", "/api/v1/peers/peer-1/heartbeat", {})[1]["error"]["code"] == "PEER_UNKNOWN"
    for n in (1, 2):
        assert pair.both("POST", "/api/v1/peers", {"peerId": f"peer-{n}", "ip": "10.0.0.1", "port": 65000 + n})[0] == 200
    assert pair.both("POST", "/api/v1/peers", {"peerId": "bad id", "ip": "10.0.0.1", "port": 1})[1]["error"]["code"] == "BAD_PEER_ID"
    assert pair.both("POST", "/api/v1/peers", raw=b"{")[1]["error"]["code"] == "BAD_JSON"
    assert pair.both("POST", "/api/v1/tasks", {"peerId": "peer-1"})[1]["error"]["code"] == "MISSING_FIELD"
    assert pair.both("POST", "/api/v1/tasks", {"peerId": "ghost", "url": URL})[1]["error"]["code"] == "PEER_UNKNOWN"
    assert pair.both("POST", "/api/v1/tasks", {"peerId": "peer-1", "url": URL})[0] == 200
    pair.serve_origin()
    assert pair.both("POST", "/api/v1/tasks", {"peerId": "peer-2", "url": URL})[0] == 200
    assert pair.both("POST", sync_path(), {"peerId": "peer-1", "have": []})[0] == 200
    assert pair.both("POST", "/api/v1/peers/peer-2/heartbeat", {})[0] == 200
    assert pair.both("GET", "/healthz?verbose=1")[1] == {"ok": True, "tasks": 1, "peers": 2}


def again(pair: EarlyPair) -> None:
    """More of the same once the peers are back: the same answers from both."""
    assert pair.both("GET", "/healthz")[0] == 200
    assert pair.both("POST", sync_path(), {"peerId": "peer-2", "have": []})[0] == 200
    assert pair.both("POST", "/api/v1/peers/peer-1/heartbeat", {})[0] == 200
    assert pair.both("POST", "/api/v1/peers", {"peerId": "peer-3", "ip": "10.0.0.1", "port": 3})[0] == 200
    assert pair.both("POST", "/api/v1/tasks", {"peerId": "peer-3", "url": URL})[0] == 200


def test_what_a_restart_needs_is_answered_without_loading_the_rest(tmp_path: Any) -> None:
    pair = EarlyPair(tmp_path)
    restart_calls(pair)
    assert not pair.early.api.loaded
    assert pair.early.root._fallback is None


def test_with_tokens_the_early_answers_are_the_same(tmp_path: Any) -> None:
    pair = EarlyPair(tmp_path, admin_token="admin-token-123", cluster_token="cluster-token-456")
    for token, status in [(None, 401), ("wrong", 401), ("cluster-token-456", 200)]:
        assert pair.both("POST", "/api/v1/peers", {"peerId": "peer-1", "ip": "10.0.0.1", "port": 1}, token=token)[0] == status
        assert pair.both("POST", "/api/v1/tasks", {"peerId": "peer-1", "url": URL}, token=token)[0] == status
    assert pair.both("GET", "/healthz")[0] == 200  # open
    assert not pair.early.api.loaded


def test_a_request_needing_the_full_api_loads_it_and_gets_the_same_answer(tmp_path: Any) -> None:
    pair = EarlyPair(tmp_path)
    restart_calls(pair)
    assert not pair.early.api.loaded
    # held by nothing but the load itself: each gets Klein's answer
    cases = [
        ("GET", "/api/v1/tasks", 200),
        ("GET", f"/api/v1/tasks/{TID}", 200),
        ("GET", "/api/v1/peers", 200),
        ("POST", "/api/v1/tasks/not-a-task-id/sync", 400),  # an ill-formed id goes to Klein
        ("GET", "/healthz/", 404),
        ("HEAD", "/healthz", 200),
        ("PUT", "/api/v1/peers", 405),
        ("GET", "/nowhere", 404),
        ("DELETE", f"/api/v1/tasks/{TID}/peers/peer-2", 200),
    ]
    for method, path, status in cases:
        assert pair.both(method, path, {"peerId": "peer-1"})[0] == status, (method, path)
    assert pair.early.api.loaded
    assert pair.early.root._fallback is not None
    # and the fast path goes on as before
    again(pair)


def metric_lines(side: Side) -> list[str]:
    d = side.stub.get("http://supernode.test/metrics")
    side.stub.flush()
    text = result(result(d).text())
    return sorted(line for line in text.splitlines() if line.startswith("dragonfly_supernode_http_"))


def test_requests_answered_early_are_counted_once_loaded(tmp_path: Any) -> None:
    pair = EarlyPair(tmp_path)
    restart_calls(pair)
    assert len(pair.early.api.early) > 10
    early, klein = metric_lines(pair.early), metric_lines(pair.klein)
    assert early == klein
    assert any('register_task' in line and 'code="200"' in line and '_total' in line for line in early)
    assert pair.early.api.early == []
    # counted once: the same after more of the same
    again(pair)
    assert metric_lines(pair.early) == metric_lines(pair.klein)


def test_a_registration_whose_client_goes_away_is_cancelled_and_counted_aborted(tmp_path: Any, monkeypatch: Any) -> None:
    side = EarlySide(str(tmp_path))
    side.node.register_peer(PeerRegistration("peer-1", "10.0.0.1", 1))
    waiting: defer.Deferred[Any] = defer.Deferred()

    async def slow(*args: Any) -> Any:
        return await waiting

    monkeypatch.setattr(side.node, "register_task", slow)
    request = Request([b"api", b"v1", b"tasks"])
    request.method = b"POST"
    request.path = b"/api/v1/tasks"
    request.content = io.BytesIO(json.dumps({"peerId": "peer-1", "url": URL}).encode())
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
    side.root.render(request)
    assert request.written == [] and not request.finished
    request.processingFailed(Failure(ConnectionError("gone")))
    assert waiting.called  # cancelled
    assert request.written == []
    assert side.api.early == [("register_task", "aborted", 0.0)]


def test_a_registration_answers_when_its_handler_is_done(tmp_path: Any, monkeypatch: Any) -> None:
    side = EarlySide(str(tmp_path))
    waiting: defer.Deferred[Any] = defer.Deferred()

    async def slow(*args: Any) -> Any:
        return await waiting

    monkeypatch.setattr(side.node, "register_task", slow)
    request = Request([])
    request.method = b"POST"
    request.path = b"/api/v1/tasks"
    request.content = io.BytesIO(json.dumps({"peerId": "peer-1", "url": URL}).encode())
    side.root.render(request)
    assert not request.finished
    waiting.errback(RuntimeError("the resolver broke"))
    assert request.finished and request.responseCode == 500
    assert json.loads(b"".join(request.written)) == {"error": {"code": "INTERNAL", "message": "the resolver broke"}}
    assert request.responseHeaders.getRawHeaders(b"content-length") == [b"%d" % len(b"".join(request.written))]
    assert side.api.early == [("register_task", "500", 0.0)]


def test_load_in_steps_imports_a_module_a_turn_then_builds_the_rest(tmp_path: Any) -> None:
    side = EarlySide(str(tmp_path))
    clock = Clock()
    load_in_steps(clock, side.root, 1.0, steps=("json", "email.utils"), gap=0.01)
    clock.advance(0.99)
    assert clock.getDelayedCalls() and side.root._fallback is None
    clock.advance(0.01)  # json
    clock.advance(0.01)  # email.utils
    assert side.root._fallback is None and not side.api.loaded
    clock.advance(0.01)
    assert side.root._fallback is not None and side.api.loaded
    assert not clock.getDelayedCalls()
    assert set(LOAD_STEPS) >= {"klein", "prometheus_client"}


def test_load_in_steps_after_a_request_loaded_it_does_nothing_more(tmp_path: Any) -> None:
    side = EarlySide(str(tmp_path))
    side.root.fallback()
    built = side.root._fallback
    clock = Clock()
    load_in_steps(clock, side.root, 0.0, steps=(), gap=0.01)
    clock.advance(0.0)
    assert side.root._fallback is built


HEAVY = ("klein", "werkzeug", "prometheus_client", "treq", "twisted.application.internet")


def test_the_tap_serves_before_importing_klein_prometheus_treq() -> None:
    """makeService, as twistd calls it: none of the heavy modules imported until the reactor has run a while."""
    script = textwrap.dedent(f"""
        import os, sys, tempfile, time
        from dragonfly.core.tls import load_twisted_without_tls
        load_twisted_without_tls()
        from dragonfly.supernode import tap
        options = tap.Options()
        options.parseOptions(["--port", "0", "--block-port", "0", "--listen", "127.0.0.1",
                              "--home", tempfile.mkdtemp()])
        service = tap.makeService(options)
        service.startService()
        heavy = {HEAVY!r}
        print(sorted(m for m in heavy if m in sys.modules), flush=True)
        from twisted.internet import reactor, task
        start = time.monotonic()
        def check():
            if time.monotonic() - start < tap.FULL_API_AFTER:
                print("early", sorted(m for m in heavy if m in sys.modules), flush=True)
            elif all(m in sys.modules for m in heavy if m != "treq") or time.monotonic() - start > 30:
                print(sorted(m for m in heavy if m in sys.modules), flush=True)
                os._exit(0)
        task.LoopingCall(check).start(0.05)
        reactor.run()
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()
    assert out[0] == "[]", out
    # the reactor serves for a while with none of them
    assert out[1:-1] and set(out[1:-1]) == {"early []"}, out
    assert out[-1] == str(sorted(m for m in HEAVY if m != "treq")), out


"""
The real L{SupernodeClient} against the real L{SupernodeApi}, in memory:
requests go through L{treq.testing.StubTreq} (no sockets), time is a
L{Clock}, and the CDN's origin is the fake of L{test_supernode_api}.  Each
typed method is checked for what it sends and what it reads back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure

from dragonfly.core.ids import task_id
from dragonfly.peer.client import SupernodeClient, SupernodeError, SupernodeUnavailable
from dragonfly.protocol.supernode_api import (
    FailedPiece,
    Parent,
    PeerRegistration,
    SyncAnswer,
    SyncReport,
    TaskRequest,
)
from dragonfly.supernode import cdn as cdn_module
from dragonfly.supernode.api import SupernodeApi

from .test_supernode_api import BODY, PIECE, URL, Env, FakeResponse, make_env

NODE = "supernode.test:80"


@pytest.fixture
def env(tmp_path: Any) -> Env:
    return make_env(str(tmp_path))


def client(env: Env, stub: StubTreq | None = None, nodes: list[str] | None = None, **kw: Any) -> SupernodeClient:
    return SupernodeClient(stub or env.stub, nodes or [NODE], env.clock, **kw)


def run(env: Env, coro: Coroutine[Any, Any, Any], stub: StubTreq | None = None) -> Any:
    """Drive a client coroutine to its end: the stub answers when flushed."""
    d = defer.Deferred.fromCoroutine(coro)
    out: list[Any] = []
    d.addBoth(out.append)
    for _ in range(20):
        if out:
            break
        (stub or env.stub).flush()
    assert out, "the call did not finish"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def digests(body: bytes) -> tuple[str, ...]:
    return tuple(hashlib.sha256(body[i : i + PIECE]).hexdigest() for i in range(0, len(body), PIECE))


def test_register_list_heartbeat_leave(env: Env) -> None:
    c = client(env)
    reg = run(env, c.register_peer(PeerRegistration("peer-1", "10.0.0.1", 65001, "h1")))
    assert reg.peer_id == "peer-1" and reg.heartbeat_interval > 0
    env.clock.advance(7)
    run(env, c.heartbeat("peer-1"))
    [entry] = run(env, c.list_peers())
    assert (entry.peer_id, entry.ip, entry.port, entry.hostname, entry.last_seen) == ("peer-1", "10.0.0.1", 65001, "h1", 7.0)
    run(env, c.leave("peer-1"))
    assert run(env, c.list_peers()) == []
    with pytest.raises(SupernodeError) as e:
        run(env, c.heartbeat("peer-1"))
    assert (e.value.status, e.value.code) == (404, "PEER_UNKNOWN")


def test_register_refused_with_the_servers_code(env: Env) -> None:
    c = client(env)
    with pytest.raises(SupernodeError) as e:
        run(env, c.register_peer(PeerRegistration("supernode", "10.0.0.1", 1)))
    assert (e.value.status, e.value.code) == (400, "BAD_PEER_ID")
    with pytest.raises(SupernodeError) as e:
        run(env, c.register_peer(PeerRegistration("p", "10.0.0.1", 0)))
    assert e.value.code == "BAD_FIELD"
    assert env.node.scheduler.peers == {}


def test_task_and_sync_round_trip(env: Env, monkeypatch: Any) -> None:
    # the whole-file SHA-256 of a task with no digest, for the field's round trip
    monkeypatch.setattr(cdn_module, "FILE_SHA256_ALWAYS", True)
    c = client(env)
    run(env, c.register_peer(PeerRegistration("peer-1", "10.0.0.1", 65001)))
    run(env, c.register_peer(PeerRegistration("peer-2", "10.0.0.2", 65002)))
    req = TaskRequest("peer-1", URL + "?sig=1", headers={"Authorization": "Bearer t"}, filter=["sig"])
    reg = run(env, c.register_task(req))
    assert reg.task_id == task_id(URL + "?sig=1", filter_keys=["sig"]) == reg.task.task_id
    assert reg.task.status == "running"
    assert env.http.calls[0].url == URL + "?sig=1"
    assert env.http.calls[0].headers == {"Authorization": ["Bearer t"]}
    env.http.serve(FakeResponse(body=BODY))
    run(env, c.register_task(TaskRequest("peer-2", URL + "?sig=2", filter=["sig"])))

    answer = run(env, c.sync(reg.task_id, SyncReport("peer-1", have=[0, 1, 2])))
    assert isinstance(answer, SyncAnswer)
    assert answer.task.status == "success"
    assert answer.task.content_length == len(BODY)
    assert answer.task.piece_count == 6 and answer.task.piece_size == PIECE
    assert answer.task.sha256 == hashlib.sha256(BODY).hexdigest()
    assert answer.digests == digests(BODY) and answer.digests_from == 0
    assert answer.parents[0] == Parent("supernode", "10.0.0.9", 8001, seed=True)
    assert set(answer.seed_pieces) <= set(range(3, 6))
    assert answer.sync_interval > 0

    answer = run(env, c.sync(reg.task_id, SyncReport("peer-2", have=[5], digests_from=4, peer_bytes=PIECE)))
    assert answer.digests == digests(BODY)[4:] and answer.digests_from == 4
    assert Parent("peer-1", "10.0.0.1", 65001) in answer.parents
    assert not set(answer.seed_pieces) & {0, 1, 2, 5}
    assert env.node.peer_bytes == PIECE

    detail = run(env, c.get_task(reg.task_id))
    assert detail.availability == (1, 1, 1, 0, 0, 1)
    assert detail.peers == ("peer-1", "peer-2")
    assert [t.task_id for t in run(env, c.list_tasks())] == [reg.task_id]

    run(env, c.leave_task(reg.task_id, "peer-1"))
    assert run(env, c.get_task(reg.task_id)).availability == (0, 0, 0, 0, 0, 1)
    run(env, c.delete_task(reg.task_id))
    with pytest.raises(SupernodeError) as e:
        run(env, c.get_task(reg.task_id))
    assert (e.value.status, e.value.code) == (404, "TASK_UNKNOWN")


def test_sync_refusals(env: Env) -> None:
    c = client(env)
    run(env, c.register_peer(PeerRegistration("peer-1", "10.0.0.1", 65001)))
    tid = run(env, c.register_task(TaskRequest("peer-1", URL))).task_id
    env.http.serve(FakeResponse(body=BODY))
    cases = [
        (SyncReport("peer-1", have=[6]), 400, "BAD_FIELD"),
        (SyncReport("peer-1", failed=[FailedPiece(6, "x")]), 400, "BAD_FIELD"),
        (SyncReport("peer-1", want=6), 400, "BAD_FIELD"),
        (SyncReport("peer-1", version="not-it"), 409, "TASK_CHANGED"),
        (SyncReport("ghost"), 404, "PEER_UNKNOWN"),
    ]
    for report, status, code in cases:
        with pytest.raises(SupernodeError) as e:
            run(env, c.sync(tid, report))
        assert (e.value.status, e.value.code) == (status, code), report
    with pytest.raises(SupernodeError) as e:
        run(env, c.sync("0" * 64, SyncReport("peer-1")))
    assert (e.value.status, e.value.code) == (404, "TASK_UNKNOWN")


def test_cluster_token(env: Env) -> None:
    stub = StubTreq(SupernodeApi(env.node, cluster_token="cluster-secret").resource())
    with pytest.raises(SupernodeError) as e:
        run(env, client(env, stub).register_peer(PeerRegistration("p", "10.0.0.1", 1)), stub)
    assert (e.value.status, e.value.code) == (401, "UNAUTHORIZED")
    good = client(env, stub, token="cluster-secret")
    assert run(env, good.register_peer(PeerRegistration("p", "10.0.0.1", 1)), stub).peer_id == "p"


class Refusing:
    """An HTTP client for which one host refuses connections and another never answers."""

    def __init__(self, stub: StubTreq) -> None:
        self.stub = stub
        self.hosts: list[str] = []

    def request(self, method: str, url: str, **kw: Any) -> defer.Deferred:
        host = url.split("//", 1)[1].split("/", 1)[0]
        self.hosts.append(host)
        if host.startswith("down"):
            return defer.fail(ConnectionRefusedError())
        if host.startswith("silent"):
            return defer.Deferred()
        return self.stub.request(method, url, **kw)


def test_fails_over_and_sticks_to_the_node_that_answered(env: Env) -> None:
    http = Refusing(env.stub)
    c = SupernodeClient(http, ["down:1", NODE], env.clock)
    run(env, c.register_peer(PeerRegistration("p", "10.0.0.1", 1)))
    assert c.current == NODE
    run(env, c.heartbeat("p"))
    assert http.hosts == ["down:1", NODE, NODE]


def test_unavailable_after_the_timeout_on_the_clock(env: Env) -> None:
    c = SupernodeClient(Refusing(env.stub), ["silent:1", "down:2"], env.clock, timeout=3.0)
    d = defer.Deferred.fromCoroutine(c.heartbeat("p"))
    out: list[Any] = []
    d.addBoth(out.append)
    env.clock.advance(2.9)
    assert out == []
    env.clock.advance(0.2)
    assert len(out) == 1 and out[0].check(SupernodeUnavailable)


peer_ids = st.from_regex(r"\A[A-Za-z0-9._:-]{1,64}\Z")


@given(
    report=st.builds(
        SyncReport, peer_ids, st.lists(st.integers(0, 1000)),
        st.lists(st.builds(FailedPiece, st.integers(-1, 1000), peer_ids)), st.integers(0, 1000), st.booleans(),
        st.none() | st.integers(0, 1000), st.lists(peer_ids), st.integers(0, 1 << 50), st.none() | st.text(),
    )
)
def test_sync_report_json_round_trip(report: SyncReport) -> None:
    assert SyncReport.from_json(report.to_json()) == report


# -- a real dfpeer's session with the real SuperNode --------------------------------------


def test_a_dfpeers_session_register_heartbeat_register_again_leave(env: Env, tmp_path: Any) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from dragonfly.peer.daemon import PeerDaemon

    from .test_supernode_api import SyncPool

    daemon = PeerDaemon(
        MemoryReactorClock(), str(tmp_path / "peer"), [NODE], "10.0.0.7", SyncPool(), http=None,
        supernode_http=env.stub,
    )
    daemon.listening(40007)
    run(env, daemon.register())
    assert daemon.registered
    info = env.node.scheduler.peers[daemon.peer_id]
    assert (info.ip, info.port) == ("10.0.0.7", 40007)

    env.clock.advance(4)
    run(env, daemon.heartbeat())
    assert env.node.scheduler.peers[daemon.peer_id].last_seen == 4

    # the SuperNode forgot it (a restart, a TTL): the next heartbeat registers again
    env.node.remove_peer(daemon.peer_id)
    run(env, daemon.heartbeat())
    assert daemon.peer_id in env.node.scheduler.peers

    run(env, daemon.leave())
    assert env.node.scheduler.peers == {}

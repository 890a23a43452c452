"""
Several SuperNodes: which node each of a dfpeer's calls goes to.  No
sockets: a fake HTTP client stands for three SuperNodes that can be killed
and restarted, time is a L{Clock}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Coroutine
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from dragonfly.core import rendezvous
from dragonfly.core.ids import task_id
from dragonfly.core.nodes import parse_nodes
from dragonfly.peer.client import (
    NodeHealth,
    SupernodeClient,
    SupernodeError,
    SupernodeUnavailable,
)
from dragonfly.peer.session import TaskSession
from dragonfly.protocol.supernode_api import PeerRegistration, SyncReport

NODES = ["a:1", "b:1", "c:1"]


class Response:
    def __init__(self, code: int, body: dict[str, Any]) -> None:
        self.code = code
        self._raw = json.dumps(body).encode()

    def content(self) -> defer.Deferred:
        return defer.succeed(self._raw)


class FakeNode:
    """What one SuperNode remembers: its peers and, per task, the peers in its swarm."""

    def __init__(self) -> None:
        self.up = True
        self.peers: set[str] = set()
        self.swarms: dict[str, set[str]] = {}
        #: tasks in its cache: a sync of one joins its swarm (as the real node's does)
        self.cached: set[str] = set()
        #: registrations that offered a takeover (a tagged origin)
        self.takeovers: list[str] = []

    def restart(self) -> None:
        self.up = True
        self.peers.clear()
        self.swarms.clear()
        self.cached.clear()

    def handle(self, method: str, path: str, body: dict[str, Any]) -> Response:
        parts = path.strip("/").split("/")
        if path == "/healthz":
            return Response(200, {"ok": True})
        if parts[-1] == "peers" and method == "POST":
            self.peers.add(body["peerId"])
            return Response(200, {"peerId": body["peerId"], "heartbeatInterval": 10})
        if parts[-1] == "heartbeat":
            if parts[-2] not in self.peers:
                return Response(404, {"error": {"code": "PEER_UNKNOWN", "message": "who?"}})
            return Response(200, {})
        if parts[-1] == "tasks" and method == "POST":
            if body["peerId"] not in self.peers:
                return Response(404, {"error": {"code": "PEER_UNKNOWN", "message": "who?"}})
            tid = task_id(body["url"]) if body["url"].startswith("http") else body["url"]
            self.swarms.setdefault(tid, set()).add(body["peerId"])
            if body.get("takeover") is not None:
                self.takeovers.append(tid)
            return Response(200, {"taskId": tid, "task": {"taskId": tid, "status": "running"}})
        if parts[-1] == "sync":
            task = parts[-2]
            if task in self.cached:
                self.swarms.setdefault(task, set()).add(body["peerId"])
            if body["peerId"] not in self.swarms.get(task, ()):
                return Response(404, {"error": {"code": "TASK_UNKNOWN", "message": "which?"}})
            return Response(200, {"task": {"taskId": task, "status": "running"}, "syncInterval": 0.5})
        return Response(200, {})


class FakeHttp:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.nodes = {n: FakeNode() for n in NODES}
        self.log: list[tuple[float, str, str]] = []

    def request(self, method: str, url: str, data: bytes | None = None, headers: Any = None) -> defer.Deferred:
        host, path = url.removeprefix("http://").split("/", 1)
        self.log.append((self.clock.seconds(), host, "/" + path))
        node = self.nodes[host]
        if not node.up:
            return defer.fail(ConnectionRefusedError())
        return defer.succeed(node.handle(method, "/" + path, json.loads(data) if data else {}))

    def probes(self, host: str) -> list[float]:
        return [t for t, h, p in self.log if h == host and p == "/healthz"]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    out: list[Any] = []
    defer.Deferred.fromCoroutine(coro).addBoth(out.append)
    assert out, "the call did not finish"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, nodes: list[str] = NODES) -> tuple[FakeHttp, SupernodeClient]:
    http = FakeHttp(clock)
    return http, SupernodeClient(http, nodes, clock, probe_first=1.0, probe_cap=8.0)


def session(client: SupernodeClient, peer: str, task: str) -> TaskSession:
    async def register_peer() -> None:
        await client.register_peer(PeerRegistration(peer, "10.0.0.1", 1))

    return TaskSession(client, lambda: peer, register_peer, task, {"url": task})


def task_owned_by(node: str, nodes: list[str] = NODES) -> str:
    ring = rendezvous.parse_nodes(",".join(nodes))
    return next(f"task{i}" for i in range(1000) if rendezvous.owner(ring, f"task{i}").address == node)


def test_each_task_goes_to_its_owner(clock: Clock) -> None:
    http, client = make(clock)
    run(client.register_peer(PeerRegistration("p", "10.0.0.1", 1)))
    assert all("p" in n.peers for n in http.nodes.values())  # peer-level calls reach every node
    for node in NODES:
        tid = task_owned_by(node)
        s = session(client, "p", tid)
        n = len(http.log)
        run(s.register())
        run(s.sync(SyncReport("p")))
        assert [(h, p.rsplit("/", 1)[-1]) for _, h, p in http.log[n:]] == [(node, "tasks"), (node, "sync")]
        assert s.node == node == client.owner(tid)


def test_the_ranking_follows_the_weights(clock: Clock) -> None:
    _, client = make(clock, ["a:1=8", "b:1", "c:1"])
    owners = [client.owner(f"t{i}") for i in range(2000)]
    assert 0.7 < owners.count("a:1") / len(owners) < 0.9


def test_failover_pins_the_task_and_new_downloads_return_to_the_owner(clock: Clock) -> None:
    http, client = make(clock)
    tid = task_owned_by("a:1")
    second = rendezvous.rank(client.ring, tid)[1].address
    run(client.register_peer(PeerRegistration("p", "10.0.0.1", 1)))
    s = session(client, "p", tid)
    run(s.register())
    back: list[str] = []
    client.on_node_back.append(back.append)

    http.nodes["a:1"].up = False
    # the owner does not answer: the sync goes to the next node, which does
    # not know the task; the task registers there (as PeerTask does on TASK_UNKNOWN)
    with pytest.raises(SupernodeError) as e:
        run(s.sync(SyncReport("p")))
    assert e.value.code == "TASK_UNKNOWN"
    run(s.register())
    run(s.sync(SyncReport("p")))
    assert s.node == second and not client.alive("a:1")
    assert "p" in http.nodes[second].swarms[tid]

    # probes with back-off: 1, 2, 4, 8, 8 s apart while the owner stays down
    clock.pump([0.5] * 40)
    assert http.probes("a:1") == [1.0, 3.0, 7.0, 15.0]
    assert client.route(tid)[0] == second  # a down owner ranks last

    http.nodes["a:1"].restart()
    clock.pump([1.0] * 2)
    assert client.route(tid)[0] == second  # not probed yet
    clock.advance(1.0)
    assert http.probes("a:1")[-1] == 23.0 and client.alive("a:1") and back == ["a:1"]
    # the download in progress stays with the node its swarm moved to ...
    run(s.sync(SyncReport("p")))
    assert s.node == second and http.log[-1][1] == second
    # ... and a new download of the task registers with the owner again
    fresh = session(client, "q", tid)
    run(fresh.register())
    assert fresh.node == "a:1" and http.log[-1][1] == "a:1"
    # the owner that lost its memory learnt about q from the PEER_UNKNOWN retry
    assert "q" in http.nodes["a:1"].swarms[tid]
    # and the pinned session follows the ranking again once unpinned
    s.unpin()
    assert s.node == "a:1"


def test_no_probe_while_the_node_answers_and_no_double_probe(clock: Clock) -> None:
    http, client = make(clock)
    run(client.healthz())
    clock.advance(100)
    assert http.probes("a:1") == [0.0]  # only the call itself
    http.nodes["a:1"].up = False
    for _ in range(3):
        with pytest.raises(SupernodeUnavailable):
            run(client.call("GET", "/healthz", None, ["a:1"]))
    clock.advance(1.0)
    assert http.probes("a:1") == [0.0, 100.0, 100.0, 100.0, 101.0]
    client.stop()
    clock.advance(100)
    assert len(http.probes("a:1")) == 5


def test_a_node_answering_a_call_is_up_before_its_probe(clock: Clock) -> None:
    http, client = make(clock)
    http.nodes["b:1"].up = False
    run(client.register_peer(PeerRegistration("p", "10.0.0.1", 1)))
    assert not client.alive("b:1") and client.current == "a:1"
    http.nodes["b:1"].restart()
    run(client.call("GET", "/healthz", None, ["b:1"]))
    assert client.alive("b:1")


def test_heartbeat_goes_to_live_nodes_and_says_when_one_forgot_us(clock: Clock) -> None:
    http, client = make(clock)
    run(client.register_peer(PeerRegistration("p", "10.0.0.1", 1)))
    http.nodes["c:1"].up = False
    run(client.heartbeat("p"))  # a and b know p, c is down: fine
    n = len(http.log)
    run(client.heartbeat("p"))
    assert sorted(h for _, h, _ in http.log[n:]) == ["a:1", "b:1"]
    http.nodes["b:1"].restart()
    with pytest.raises(SupernodeError) as e:
        run(client.heartbeat("p"))
    assert e.value.code == "PEER_UNKNOWN"


def test_all_nodes_down_is_unavailable_then_recovers(clock: Clock) -> None:
    http, client = make(clock)
    for node in http.nodes.values():
        node.up = False
    s = session(client, "p", "t")
    with pytest.raises(SupernodeUnavailable):
        run(s.register())
    with pytest.raises(SupernodeUnavailable):
        run(client.heartbeat("p"))
    http.nodes["b:1"].up = True
    clock.advance(1.0)
    assert client.alive("b:1") and not client.alive("a:1")
    run(s.register())
    assert s.pinned == "b:1"


def test_node_health_backoff() -> None:
    h = NodeHealth(Clock(), first=0.5, cap=3.0)
    assert h.alive("x") and h.failed("x") == 0.5 and h.failed("x") is None
    assert [h.probe_failed("x") for _ in range(5)] == [1.0, 2.0, 3.0, 3.0, 3.0]
    assert h.answered("x") and h.alive("x") and not h.answered("x")


@pytest.mark.parametrize("text", ["a:1=x", "a:1=0", "a:1=-2", "a:1=1.5", "a:1=", "a:1,a:1"])
def test_an_unknown_weight_form_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match="supernode"):
        parse_nodes(text)


def test_weights_travel_with_the_addresses(clock: Clock) -> None:
    assert parse_nodes("a:1=3,b, c:2=1") == ["a:1=3", "b:8002", "c:2"]
    _, client = make(clock, parse_nodes("a:1=3,b:1"))
    assert client.nodes == ["a:1", "b:1"] and [n.weight for n in client.ring] == [3, 1]


def test_the_programs_refuse_a_bad_weight_at_startup(tmp_path: Any, capsys: Any) -> None:
    from twisted.python import usage

    from dragonfly.cli import dfget
    from dragonfly.daemon import tap as dfdaemon_tap
    from dragonfly.peer import tap as dfpeer_tap

    code = dfget.main(["-u", "http://origin/x", "-o", str(tmp_path / "out"), "--home", str(tmp_path / "h"),
                       "--supernode", "sn1:8002=two", "--no-progress"])
    err = capsys.readouterr().err
    assert code == dfget.EXIT_USAGE and "weight 'two'" in err and os.listdir(tmp_path) == []
    o = dfget.validate(dfget.build_parser().parse_args(["-u", "http://o/x", "-o", "x", "--supernode", "a:1=2,b:1"]))
    assert o["nodes"] == ["a:1=2", "b:1"]
    for options in (dfpeer_tap.Options(), dfdaemon_tap.Options()):
        with pytest.raises(usage.UsageError, match="weight '0'"):
            options.parseOptions(["--supernode", "a:1=0", "--home", str(tmp_path)])
    good = dfpeer_tap.Options()
    good.parseOptions(["--supernode", "127.0.0.1:1=3,127.0.0.1:2", "--home", str(tmp_path), "--ip", "127.0.0.1"])
    assert good["nodes"] == ["127.0.0.1:1=3", "127.0.0.1:2"]


def test_finished_tasks_follow_their_owner_both_ways(tmp_path: Any, clock: Clock) -> None:
    """A dfpeer's finished task announces itself to the first live node of its ranking, at each heartbeat."""
    from dragonfly.peer.daemon import PeerDaemon
    from dragonfly.peer.task import PeerTask
    from tests.unit.test_supernode_api import PIECE, SyncPool

    http = FakeHttp(clock)
    daemon = PeerDaemon(clock, str(tmp_path), NODES, "10.0.0.2", SyncPool(), http)
    daemon.listening(40000)
    url = next(u for u in (f"http://origin.test/{i}" for i in range(1000)) if daemon.client.owner(task_id(u)) == "a:1")
    tid = task_id(url)
    task = PeerTask(daemon, tid, {"url": url})
    # its pieces' digests came with tags (a cluster with a piece key): a node
    # that does not know the task is offered a takeover
    origin = {"etag": '"e"', "lastModified": None, "length": PIECE, "pieceSize": PIECE, "tag": "ab" * 16}
    task.restore({"length": PIECE, "pieceSize": PIECE, "digests": ["00" * 32], "lastAccess": 0.0,
                  "tags": ["cd" * 16], "origin": origin})
    daemon.tasks[tid] = task
    run(daemon.register())
    run(task.session.register())
    assert task.session.pinned == "a:1" and daemon.peer_id in http.nodes["a:1"].swarms[tid]
    heir = daemon.client.route(tid)[1]

    # the owner dies: the heartbeat notices, and the finished copy becomes a seed of the next node
    http.nodes["a:1"].up = False
    run(daemon.heartbeat())
    assert task.session.pinned == heir and daemon.peer_id in http.nodes[heir].swarms[tid]
    assert http.nodes[heir].takeovers == [tid]
    # the owner comes back with no memory: its probe finds it, the dfpeer registers there and announces the task
    http.nodes["a:1"].restart()
    clock.advance(1.0)
    assert daemon.peer_id in http.nodes["a:1"].peers
    assert task.session.pinned == "a:1" and daemon.peer_id in http.nodes["a:1"].swarms[tid]
    # steady state: a heartbeat moves nothing
    n = len(http.log)
    run(daemon.heartbeat())
    assert sorted(p.rsplit("/", 1)[-1] for _, _, p in http.log[n:]) == ["heartbeat"] * 3
    daemon.client.stop()


def test_an_untagged_finished_task_only_announces(tmp_path: Any, clock: Clock) -> None:
    """
    Without tags, a finished task moving to the next node is announced with
    one sync, never registered (a registration revalidates and may start an
    origin fetch): a node that does not know the task leaves it for a
    download to register; the next heartbeat tries again.
    """
    from dragonfly.peer.daemon import PeerDaemon
    from dragonfly.peer.task import PeerTask
    from tests.unit.test_supernode_api import PIECE, SyncPool

    http = FakeHttp(clock)
    daemon = PeerDaemon(clock, str(tmp_path), NODES, "10.0.0.2", SyncPool(), http)
    daemon.listening(40000)
    url = next(u for u in (f"http://origin.test/{i}" for i in range(1000)) if daemon.client.owner(task_id(u)) == "a:1")
    tid = task_id(url)
    task = PeerTask(daemon, tid, {"url": url})
    task.restore({"length": PIECE, "pieceSize": PIECE, "digests": ["00" * 32], "lastAccess": 0.0})
    daemon.tasks[tid] = task
    run(daemon.register())
    run(task.session.register())
    heir = daemon.client.route(tid)[1]
    http.nodes["a:1"].up = False
    n = len(http.log)
    run(daemon.heartbeat())
    to_heir = [p for _, h, p in http.log[n:] if h == heir]
    assert f"/api/v1/tasks/{tid}/sync" in to_heir and "/api/v1/tasks" not in to_heir
    assert tid not in http.nodes[heir].swarms and task.session.pinned == "a:1"
    # a download registered it there: the next heartbeat's announce joins its swarm
    http.nodes[heir].cached.add(tid)
    run(daemon.heartbeat())
    assert task.session.pinned == heir and daemon.peer_id in http.nodes[heir].swarms[tid]
    assert http.nodes[heir].takeovers == []
    daemon.client.stop()

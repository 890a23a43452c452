"""
Finding or starting a host's dfpeer (L{dragonfly.peer.launch}) on a
reactor, through dfdaemon's L{PeerLink}: a fake reactor records the
spawned command and a fake clock times the waits; no process, no socket.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from dragonfly.daemon.peerlink import PeerLink
from dragonfly.peer import launch


class FakeProcess:
    def __init__(self, proto: Any, argv: list[str]) -> None:
        self.proto = proto
        self.argv = argv
        self.stdin_closed = False
        self.signals: list[str] = []

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def exit(self, code: int, stderr: bytes = b"") -> None:
        if stderr:
            self.proto.errReceived(stderr)
        reason = ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code)
        self.proto.processEnded(Failure(reason))


class FakeReactor(Clock):
    """A clock that spawns fake processes."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: Any = None, **kw: Any) -> FakeProcess:
        process = FakeProcess(proto, list(args))
        self.spawned.append(process)
        proto.makeConnection(process)
        return process


class FakeResponse:
    def __init__(self, code: int) -> None:
        self.code = code

    def content(self) -> defer.Deferred:
        return defer.succeed(b"{}")


class FakeHttp:
    """Answers GET /healthz for the APIs in C{alive}; refuses the rest."""

    def __init__(self) -> None:
        self.alive: set[str] = set()
        self.asked: list[str] = []

    def get(self, url: str, **kw: Any) -> defer.Deferred:
        self.asked.append(url)
        api = url.rsplit("/healthz", 1)[0]
        if api in self.alive:
            return defer.succeed(FakeResponse(200))
        return defer.fail(ConnectionRefusedError())


def publish(home: str, api: str) -> None:
    with open(os.path.join(home, "peer.json"), "w") as f:
        json.dump({"api": api}, f)


def outcome(d: defer.Deferred) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


@pytest.fixture
def world(tmp_path: Any) -> tuple[FakeReactor, FakeHttp, str]:
    return FakeReactor(), FakeHttp(), str(tmp_path / "home")


def test_a_running_dfpeer_is_used_and_nothing_spawned(world: Any) -> None:
    reactor, http, home = world
    os.makedirs(home)
    publish(home, "http://127.0.0.1:5000")
    http.alive.add("http://127.0.0.1:5000")
    link = PeerLink(home, ["sn:8002"], reactor, http)
    assert outcome(defer.Deferred.fromCoroutine(link.api())) == ["http://127.0.0.1:5000"]
    assert reactor.spawned == []


def test_none_running_starts_one_for_every_asker_at_once(world: Any) -> None:
    reactor, http, home = world
    os.makedirs(home)
    publish(home, "http://127.0.0.1:1")  # stale: nothing answers there
    with open(os.path.join(home, "dfpeer.pid"), "w") as f:
        f.write("99999")
    link = PeerLink(home, ["sn:8002"], reactor, http, extra=["--cluster-token-file", "/t"])
    first = outcome(defer.Deferred.fromCoroutine(link.api()))
    second = outcome(defer.Deferred.fromCoroutine(link.api()))
    [process] = reactor.spawned
    assert process.argv[-9:] == [
        "dfpeer", "--home", home, "--supernode", "sn:8002", "--idle-exit", "0.0", "--cluster-token-file", "/t",
    ]
    assert "--pidfile" in process.argv and process.stdin_closed
    # the stale files are gone before twistd runs
    assert not os.path.exists(os.path.join(home, "peer.json"))
    assert not os.path.exists(os.path.join(home, "dfpeer.pid"))
    process.exit(0)
    reactor.advance(launch.POLL_INTERVAL)
    assert first == second == []
    publish(home, "http://127.0.0.1:6000")
    http.alive.add("http://127.0.0.1:6000")
    reactor.advance(launch.POLL_INTERVAL)
    assert first == second == ["http://127.0.0.1:6000"]
    assert len(reactor.spawned) == 1


def test_twistd_failing_is_an_error_with_its_words(world: Any) -> None:
    reactor, http, home = world
    link = PeerLink(home, None, reactor, http)
    out = outcome(defer.Deferred.fromCoroutine(link.api()))
    reactor.spawned[0].exit(1, b"Another twistd server is running\n")
    assert len(out) == 1 and out[0].check(RuntimeError)
    assert "Another twistd server is running" in str(out[0].value)
    # the next asker tries again
    outcome(defer.Deferred.fromCoroutine(link.api()))
    assert len(reactor.spawned) == 2


def test_a_dfpeer_that_never_answers_times_out_on_the_clock(world: Any) -> None:
    reactor, http, home = world
    link = PeerLink(home, None, reactor, http)
    out = outcome(defer.Deferred.fromCoroutine(link.api()))
    reactor.spawned[0].exit(0)
    reactor.pump([launch.POLL_INTERVAL] * int(launch.START_TIMEOUT / launch.POLL_INTERVAL - 2))
    assert out == []
    reactor.pump([launch.POLL_INTERVAL] * 4)
    assert len(out) == 1 and out[0].check(RuntimeError) and "did not come up" in str(out[0].value)


def test_twistd_that_hangs_is_killed(world: Any) -> None:
    reactor, http, home = world
    link = PeerLink(home, None, reactor, http)
    out = outcome(defer.Deferred.fromCoroutine(link.api()))
    reactor.advance(launch.SPAWN_TIMEOUT)
    assert reactor.spawned[0].signals == ["KILL"]
    assert len(out) == 1 and out[0].check(RuntimeError)
    reactor.spawned[0].exit(9)  # the kill lands later: ignored


def test_without_start_no_process(world: Any) -> None:
    reactor, http, home = world
    link = PeerLink(home, None, reactor, http, start=False)
    out = outcome(defer.Deferred.fromCoroutine(link.api()))
    assert out[0].check(RuntimeError) and reactor.spawned == []


def test_warm_starts_the_dfpeer_before_any_request_and_requests_share_it(world: Any) -> None:
    """dfdaemon's start-up: the dfpeer is started then, not inside the first pull."""
    reactor, http, home = world
    link = PeerLink(home, ["sn:8002"], reactor, http)
    warmed = outcome(link.warm())
    [process] = reactor.spawned
    # a request while the dfpeer starts waits for the same start
    asked = outcome(defer.Deferred.fromCoroutine(link.api()))
    process.exit(0)
    publish(home, "http://127.0.0.1:6000")
    http.alive.add("http://127.0.0.1:6000")
    reactor.advance(launch.POLL_INTERVAL)
    assert warmed == asked == ["http://127.0.0.1:6000"]
    # later requests ask nothing more
    before = len(http.asked)
    assert outcome(defer.Deferred.fromCoroutine(link.api())) == ["http://127.0.0.1:6000"]
    assert len(reactor.spawned) == 1 and len(http.asked) == before


def test_a_failed_warm_is_not_an_error_and_the_next_request_tries_again(world: Any) -> None:
    reactor, http, home = world
    link = PeerLink(home, None, reactor, http)
    warmed = outcome(link.warm())
    reactor.spawned[0].exit(1, b"cannot start\n")
    assert warmed == [None]
    outcome(defer.Deferred.fromCoroutine(link.api()))
    assert len(reactor.spawned) == 2
    # without --start, warm only looks
    quiet = PeerLink(home + "-2", None, reactor, http, start=False)
    assert outcome(quiet.warm()) == [None] and len(reactor.spawned) == 2


def test_the_dfdaemon_service_warms_its_peer_link_once_listening(tmp_path: Any) -> None:
    from twisted.internet.address import IPv4Address

    from dragonfly.daemon.tap import DaemonService

    warmed: list[str] = []
    published: list[dict[str, Any]] = []

    class Link:
        def warm(self) -> defer.Deferred:
            warmed.append("warm")
            return defer.succeed(None)

    class Port:
        def getHost(self) -> IPv4Address:
            return IPv4Address("TCP", "127.0.0.1", 1234)

    async def listen(endpoint: Any, factory: Any) -> Port:
        assert warmed == []  # not before the port is bound
        return Port()

    svc = DaemonService(Clock(), None, None, str(tmp_path / "d.json"), Link())  # type: ignore[arg-type]
    svc.listen = listen  # type: ignore[assignment,method-assign]
    svc.publish = published.append  # type: ignore[method-assign]
    outcome(defer.Deferred.fromCoroutine(svc._start()))
    assert published == [{"port": 1234, "host": "127.0.0.1"}] and warmed == ["warm"]


def test_the_blocking_driver_runs_the_same_procedure(tmp_path: Any) -> None:
    """dfget's driver: a procedure that never waits ends in one step."""

    class Io:
        def __init__(self) -> None:
            self.t = 0.0
            self.spawned: list[list[str]] = []

        async def healthy(self, api: str) -> bool:
            return api == "http://x:1"

        async def spawn(self, argv: list[str]) -> tuple[int, bytes]:
            self.spawned.append(argv)
            return 0, b""

        async def sleep(self, seconds: float) -> None:
            self.t += seconds
            if self.t >= 1.0:
                publish(str(tmp_path), "http://x:1")

        def now(self) -> float:
            return self.t

    io = Io()
    assert launch.run_blocking(launch.find_running(str(tmp_path), io)) is None
    assert launch.run_blocking(launch.find_or_start(str(tmp_path), io, None, 5.0)) == "http://x:1"
    assert len(io.spawned) == 1 and io.spawned[0][-2:] == ["--idle-exit", "5.0"]
    with pytest.raises(launch.LaunchError):
        launch.run_blocking(launch.find_or_start(str(tmp_path / "other"), io, None, 5.0, may_start=False))

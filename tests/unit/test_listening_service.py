"""
L{ListeningService}: a daemon whose ports cannot be bound stops its reactor
and exits non-zero, also when the bind failed before C{twistd} ran the
reactor (a reactor not running yet cannot be stopped: it raises).
"""

import os

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.error import CannotListenError, ReactorNotRunning

from dragonfly.core.service import ListeningService


class Reactor:
    """The parts of a reactor the service uses, strict as the real one about stop()."""

    def __init__(self, running):
        self.running = running
        self.stopped = False
        self.when_running = []
        self.later = []

    def stop(self):
        if not self.running:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")
        self.stopped = True

    def callWhenRunning(self, f, *args):
        self.when_running.append((f, args))

    def callLater(self, delay, f, *args):
        self.later.append((delay, f, args))

    def run(self):
        self.running = True
        for f, args in self.when_running:
            f(*args)


class Endpoint:
    def __init__(self, result):
        self.result = result

    def listen(self, factory):
        return self.result


class Port:
    def getHost(self):
        return type("Host", (), {"port": 1234})()

    def stopListening(self):
        return succeed(None)


class Service(ListeningService):
    what = "test"

    def __init__(self, reactor, path, endpoint, **kw):
        super().__init__(reactor, path, **kw)
        self.endpoint = endpoint

    async def _start(self):
        await self.listen(self.endpoint, object())
        self.publish({"port": 1234})


def taken():
    return fail(CannotListenError("127.0.0.1", 8002, OSError(98, "Address already in use")))


@pytest.mark.parametrize("running", [False, True])
def test_a_failed_bind_stops_the_reactor_and_exits_non_zero(tmp_path, running):
    reactor, statuses = Reactor(running), []
    service = Service(reactor, str(tmp_path / "info.json"), Endpoint(taken()), exit_status=statuses.append)
    service.startService()
    if not running:
        assert not reactor.stopped  # twistd has not run its reactor yet
        reactor.run()
    assert reactor.stopped
    assert statuses == [1]
    assert not (tmp_path / "info.json").exists()


def test_a_shut_down_that_hangs_after_a_failed_start_ends_in_an_exit(tmp_path):
    reactor, statuses, now = Reactor(False), [], []
    service = Service(reactor, str(tmp_path / "info.json"), Endpoint(taken()), exit_status=statuses.append,
                      exit_now=now.append)
    service.startService()
    reactor.run()
    [(delay, f, args)] = reactor.later
    assert delay == service.FAILED_STOP_GRACE and now == []
    f(*args)  # the shut-down has not finished by then
    assert now == [1]


def test_a_service_that_starts_neither_stops_nor_exits(tmp_path):
    reactor, statuses = Reactor(False), []
    service = Service(reactor, str(tmp_path / "info.json"), Endpoint(succeed(Port())), exit_status=statuses.append)
    service.startService()
    reactor.run()
    assert not reactor.stopped and statuses == [] and reactor.later == []
    assert (tmp_path / "info.json").exists()
    service.stopService()
    assert not (tmp_path / "info.json").exists()


def test_an_unexpected_start_error_exits_non_zero_too(tmp_path):
    reactor, statuses = Reactor(True), []
    service = Service(reactor, str(tmp_path / "info.json"), Endpoint(fail(RuntimeError("boom"))),
                      exit_status=statuses.append)
    service.startService()
    assert reactor.stopped and statuses == [1]
    assert os.listdir(tmp_path) == []

"""
Finding a host's dfpeer, or starting one: what dfget and dfdaemon share.

A dfpeer publishes its local API in C{<home>/peer.json}; it is running if
that API answers C{GET /healthz}.  When none is, one is started in the
background with C{twistd dfpeer --home HOME ...} (twistd daemonizes: the
command ends once the daemon is forked) and awaited until its API answers.

The procedure is written once (L{find_running}, L{find_or_start}) over a
small I/O interface with two implementations:

  - L{BlockingIO}, for the dfget command, which has no reactor: urllib,
    C{subprocess.run} and C{time.sleep}; driven by L{run_blocking};
  - L{ReactorIO}, for a daemon (dfdaemon): a treq client, the reactor's
    C{spawnProcess} and timers; nothing blocks the reactor and no pool
    thread waits.

This module imports nothing from Twisted at load time: dfget's start-up
stays fast (see docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from ..core.defaults import DEFAULT_NODE

#: seconds to wait for a started dfpeer's API to answer
START_TIMEOUT = 20.0
#: seconds for twistd itself to fork the daemon and exit
SPAWN_TIMEOUT = 30.0
#: seconds between looks at a starting dfpeer
POLL_INTERVAL = 0.1
#: seconds a running dfpeer has to answer GET /healthz
HEALTH_TIMEOUT = 2.0

T = TypeVar("T")


class LaunchError(Exception):
    """No dfpeer could be found or started; C{message} says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LaunchIO(Protocol):
    """The I/O the procedure needs."""

    async def healthy(self, api: str) -> bool:
        """Whether C{api}'s C{GET /healthz} answers 200 within L{HEALTH_TIMEOUT}."""

    async def spawn(self, argv: list[str]) -> tuple[int, bytes]:
        """Run C{argv} to its end: its exit code and standard error."""

    async def sleep(self, seconds: float) -> None:
        """Wait."""

    def now(self) -> float:
        """Monotonic seconds."""


# -- the procedure ---------------------------------------------------------------------


def info_path(home: str) -> str:
    return os.path.join(home, "peer.json")


def read_api(home: str) -> str | None:
    """The local API URL C{<home>/peer.json} names, or None (no file, or not ours)."""
    try:
        with open(info_path(home)) as f:
            api = json.load(f)["api"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return api if isinstance(api, str) else None


def twistd_command() -> list[str]:
    """twistd beside this Python, else on the PATH, else as a module."""
    exe = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(exe):
        return [exe]
    import shutil

    found = shutil.which("twistd")
    return [found] if found else [sys.executable, "-m", "twisted.scripts.twistd"]


def dfpeer_command(home: str, nodes: list[str] | None, idle: float, extra: list[str] | None = None) -> list[str]:
    """The command that starts a background dfpeer for C{home}."""
    return twistd_command() + [
        "--pidfile", os.path.join(home, "dfpeer.pid"),
        "--logfile", os.path.join(home, "dfpeer.log"),
        "dfpeer", "--home", home, "--supernode", ",".join(nodes or [DEFAULT_NODE]),
        "--idle-exit", str(idle), *(extra or []),
    ]


def _prepare(home: str) -> None:
    """A fresh start: no stale peer.json to mistake for the new one, no stale pid file to stop twistd."""
    os.makedirs(home, exist_ok=True)
    for name in ("peer.json", "dfpeer.pid"):
        try:
            os.unlink(os.path.join(home, name))
        except FileNotFoundError:
            pass


async def find_running(home: str, io: LaunchIO) -> str | None:
    """The local API of the dfpeer running for C{home}, or None."""
    api = read_api(home)
    if api is not None and await io.healthy(api):
        return api
    return None


async def start(home: str, io: LaunchIO, nodes: list[str] | None, idle: float, extra: list[str] | None = None) -> str:
    """Start a dfpeer for C{home} in the background; its local API once it answers."""
    _prepare(home)
    code, err = await io.spawn(dfpeer_command(home, nodes, idle, extra))
    if code != 0:
        raise LaunchError(f"cannot start dfpeer: {err.decode(errors='replace').strip()[:300]}")
    deadline = io.now() + START_TIMEOUT
    while io.now() < deadline:
        api = await find_running(home, io)
        if api is not None:
            return api
        await io.sleep(POLL_INTERVAL)
    raise LaunchError(f"dfpeer did not come up (see {os.path.join(home, 'dfpeer.log')})")


async def find_or_start(
    home: str, io: LaunchIO, nodes: list[str] | None, idle: float, extra: list[str] | None = None,
    may_start: bool = True,
) -> str:
    """The running dfpeer's local API, or a new one's (L{LaunchError} if C{may_start} is false)."""
    api = await find_running(home, io)
    if api is not None:
        return api
    if not may_start:
        raise LaunchError(f"no dfpeer answers for {home}")
    return await start(home, io, nodes, idle, extra)


# -- without a reactor (the dfget command) ------------------------------------------------


class BlockingIO:
    """L{LaunchIO} that blocks: for a program with no reactor running."""

    async def healthy(self, api: str) -> bool:
        from ..core.localhttp import request

        try:
            status, _ = request(api, "GET", "/healthz", timeout=HEALTH_TIMEOUT)
        except (OSError, ValueError):
            return False
        return status == 200

    async def spawn(self, argv: list[str]) -> tuple[int, bytes]:
        import subprocess

        try:
            result = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=SPAWN_TIMEOUT
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise LaunchError(f"cannot start dfpeer: {e}") from None
        return result.returncode, result.stderr

    async def sleep(self, seconds: float) -> None:
        import time

        time.sleep(seconds)

    def now(self) -> float:
        import time

        return time.monotonic()


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run a procedure over L{BlockingIO}: it never suspends, so it ends in one step."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a blocking launch procedure waited on something asynchronous")


# -- on a reactor (dfdaemon) ----------------------------------------------------------------


class ReactorIO:
    """
    L{LaunchIO} on a reactor: C{http} is a treq C{HTTPClient} for the
    loopback API, the process is spawned with C{reactor.spawnProcess}.
    """

    def __init__(self, reactor: Any, http: Any) -> None:
        self.reactor = reactor
        self.http = http

    async def healthy(self, api: str) -> bool:
        try:
            d = self.http.get(api + "/healthz")
            d.addTimeout(HEALTH_TIMEOUT, self.reactor)
            response = await d
            body = response.content()
            body.addTimeout(HEALTH_TIMEOUT, self.reactor)
            await body
        except Exception:
            return False
        return bool(response.code == 200)

    async def spawn(self, argv: list[str]) -> tuple[int, bytes]:
        from twisted.internet.defer import Deferred
        from twisted.internet.error import ProcessDone
        from twisted.internet.protocol import ProcessProtocol

        ended: Deferred[int] = Deferred()
        err = bytearray()

        class Watch(ProcessProtocol):
            def connectionMade(self) -> None:
                transport: Any = self.transport
                if transport is not None:
                    transport.closeStdin()

            def errReceived(self, data: bytes) -> None:
                if len(err) < 4096:
                    err.extend(data)

            def processEnded(self, reason: Any) -> None:
                code = 0 if reason.check(ProcessDone) else (getattr(reason.value, "exitCode", None) or 1)
                if not ended.called:  # not timed out
                    ended.callback(code)

        try:
            transport = self.reactor.spawnProcess(Watch(), argv[0], argv, env=dict(os.environ))
        except OSError as e:
            raise LaunchError(f"cannot start dfpeer: {e}") from None

        def too_slow(_cancelled: Any, timeout: float) -> Any:
            try:
                transport.signalProcess("KILL")
            except Exception:  # it ended meanwhile
                pass
            raise LaunchError(f"twistd did not finish starting the dfpeer within {timeout:.0f}s")

        ended.addTimeout(SPAWN_TIMEOUT, self.reactor, onTimeoutCancel=too_slow)
        code = await ended
        return int(code), bytes(err)

    async def sleep(self, seconds: float) -> None:
        from twisted.internet.task import deferLater

        await deferLater(self.reactor, seconds)

    def now(self) -> float:
        return float(self.reactor.seconds())

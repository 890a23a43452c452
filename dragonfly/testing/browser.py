"""
A headless Chromium driven over the Chrome DevTools Protocol, for tests.

Chromium is started with C{--remote-debugging-pipe}: DevTools messages are
NUL-terminated JSON on the browser's file descriptors 3 (commands in) and
4 (answers and events out), so no websocket client is needed.  Blocking code
on purpose, like L{dragonfly.testing.swarm}: it drives a process.

    with Chromium() as browser:
        page = browser.new_page(1280, 900)
        page.navigate("http://127.0.0.1:8002/ui")
        page.evaluate("document.title")
        page.screenshot("out.png")

Chromium runs in its own process group (it forks a zygote, renderers and
utility processes); L{Chromium.close} kills that whole group, and only it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

CHROMIUM = "/usr/bin/chromium"

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]


def find_chromium() -> str | None:
    """The Chromium binary, or None when it is not installed."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    return shutil.which("chromium") or shutil.which("chromium-browser")


def group_alive(pgid: int) -> list[int]:
    """The processes of group C{pgid} that still run (zombies do not count)."""
    alive = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(name))
    return alive


class BrowserError(Exception):
    """A DevTools command failed, timed out, or the browser went away."""


class Chromium:
    """One headless Chromium with a fresh profile in a temp dir."""

    def __init__(self, binary: str | None = None, timeout: float = 20.0) -> None:
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError("chromium is not installed")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="dragonfly-chromium-")
        # Chromium reads commands on its fd 3 and writes on its fd 4: the ends
        # are first moved above 10 (so the dup2s below cannot clobber them)
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        child_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(out_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(cmd_r)
        os.close(out_w)

        def child_fds() -> None:  # in the child, between fork and exec
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)
            os.closerange(5, 1 << 16)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=child_fds,
            start_new_session=True,
        )
        os.close(child_r)
        os.close(child_w)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict[str, Any]] = []

    # -- the pipe ------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("timed out waiting for chromium")
            ready, _, _ = select.select([self._out_r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._out_r, 1 << 16)
            if not chunk:
                raise BrowserError(f"chromium closed its DevTools pipe (exit status {self.proc.poll()})")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Send one command and wait for its answer; events seen meanwhile go to C{events}."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._cmd_w, data):]
        except OSError as e:
            raise BrowserError(f"chromium is gone: {e}") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, session: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """The first event named C{method} (already seen or yet to come)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for k, ev in enumerate(self.events):
                if ev.get("method") == method and (session is None or ev.get("sessionId") == session):
                    del self.events[k]
                    return ev
            ev = self._read_message(deadline)
            if "method" in ev:
                self.events.append(ev)

    # -- pages ---------------------------------------------------------------------

    def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.call(f"{domain}.enable")
        page.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return page

    # -- the end -------------------------------------------------------------------

    def close(self) -> None:
        """Kill Chromium and every process it started, remove the profile."""
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout=3)
            except BrowserError:
                pass
        try:
            # its own session: the group holds only Chromium's processes
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        # the killed children are reaped by init: wait until none runs
        deadline = time.monotonic() + 10
        while group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for fd in (self._cmd_w, self._out_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Page:
    """One tab, attached with a flat DevTools session."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, self.session, timeout)

    def navigate(self, url: str, timeout: float = 20.0) -> None:
        """Load C{url} and wait for its load event."""
        reply = self.call("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise BrowserError(f"cannot load {url}: {reply['errorText']}")
        self.browser.wait_event("Page.loadEventFired", self.session, timeout)

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The JSON value of a JavaScript expression (promises are awaited)."""
        reply = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, timeout
        )
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error: {text}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.1) -> Any:
        """Evaluate C{expression} until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression!r} (last value {value!r})")
            time.sleep(interval)

    def screenshot(self, path: str, full_page: bool = True) -> bytes:
        """Save a PNG of the page (the whole page by default); its bytes."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        png = base64.b64decode(self.call("Page.captureScreenshot", params)["data"])
        with open(path, "wb") as f:
            f.write(png)
        return png

    def events(self, method: str) -> list[dict[str, Any]]:
        """The events named C{method} seen so far on this page (kept)."""
        return [e for e in self.browser.events if e.get("method") == method and e.get("sessionId") == self.session]

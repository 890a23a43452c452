"""
What a daemon loads at start-up counts in its RSS (docs/benchmarks.md,
"Memory"): modules only some configurations use are imported when used.
Each check runs in a fresh interpreter, where sys.modules starts empty.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.internet.defer import succeed
from twisted.web.client import Response
from twisted.web.http_headers import Headers

from dragonfly.core.webclient import LazyHttpClient


def loaded(code: str) -> list[str]:
    """The top-level packages among C{treq}, C{multipart} that C{code} leaves in sys.modules."""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'treq', 'multipart'}))"],
        capture_output=True, text=True, check=True,
    )
    return eval(out.stdout.strip().splitlines()[-1])  # a printed list of names


def test_dfpeer_starts_without_treq(tmp_path) -> None:
    """A dfpeer made by its tap has no treq until its first back-to-source fetch."""
    code = (
        "import sys\n"
        "from twisted.internet.testing import MemoryReactorClock\n"
        "from dragonfly.peer import tap\n"
        "o = tap.Options()\n"
        f"o.parseOptions(['--supernode', '127.0.0.1:8002', '--ip', '127.0.0.1', '--home', {str(tmp_path)!r}])\n"
        "top = tap.makeService(o, reactor=MemoryReactorClock())\n"
    )
    assert loaded(code) == []
    # the check sees treq once the origin client is made
    assert loaded(code + "[s for s in top if hasattr(s, 'daemon')][0].daemon.http.client()\n") == ["multipart", "treq"]


class _Agent:
    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes]] = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.requests.append((method, uri))
        return succeed(Response._construct((b"HTTP", 1, 1), 204, b"No Content", Headers(), None, None))


def test_lazy_client_makes_its_agent_once_on_first_request() -> None:
    agents: list[_Agent] = []

    def make() -> _Agent:
        agents.append(_Agent())
        return agents[-1]

    client = LazyHttpClient(make)
    assert agents == []
    answers = [client.get("http://origin.test/a", headers={"x-a": "1"}), client.request("HEAD", "http://origin.test/b")]
    assert [a.result.code for a in answers] == [204, 204]
    assert len(agents) == 1
    assert agents[0].requests == [(b"GET", b"http://origin.test/a"), (b"HEAD", b"http://origin.test/b")]

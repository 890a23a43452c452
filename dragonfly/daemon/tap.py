"""
C{twistd dfdaemon}: the registry mirror and HTTP(S) proxy.

Not built yet: it refuses to start with a clear message rather than pretend.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Registry mirror / HTTP(S) proxy that pulls image blobs through the swarm (not built yet)."
    optParameters = [
        ["port", "p", 65001, "Port to listen on.", int],
        ["registry", None, None, "Upstream registry URL."],
        ["home", None, None, "Work home shared with the host's dfpeer."],
    ]

    def postOptions(self) -> None:
        raise usage.UsageError("dfdaemon is not built yet in this version; use dfget or the dfpeer local API")


def makeService(options: Options) -> Any:  # pragma: no cover - postOptions refuses first
    raise SystemExit("dfdaemon is not built yet")

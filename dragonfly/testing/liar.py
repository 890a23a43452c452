"""
A dfpeer that lies, for fault tests: it downloads honestly, but every piece
it serves to others has its first byte flipped; with C{--silent} (first
argument) it accepts requests and never answers them.

    python -m dragonfly.testing.liar [--silent] --supernode HOST:PORT --home DIR [dfpeer options]
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.scripts.twistd import run

from ..peer import task as task_module


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 0xFF]) + data[1:] if data else data


def main() -> None:
    honest = task_module.PeerTask.read_piece
    args = sys.argv[1:]
    silent = args[:1] == ["--silent"]

    def lying_read(self: Any, index: int) -> Any:
        if silent:
            return Deferred()  # never fires: the request hangs
        return honest(self, index).addCallback(_flip)

    task_module.PeerTask.read_piece = lying_read  # type: ignore[method-assign]
    # no zero-copy uploads: every piece it serves goes through lying_read
    task_module.PeerTask.piece_file = lambda self, index: None  # type: ignore[method-assign,assignment]
    sys.argv = ["twistd", "-n", "--pidfile=", "dfpeer", *args[1 if silent else 0:]]
    run()


if __name__ == "__main__":
    main()

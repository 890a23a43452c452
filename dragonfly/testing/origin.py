"""
A plain HTTP origin that counts what it serves (for tests, the demo and the
benchmark's checks).

    python -m dragonfly.testing.origin --root DIR [--port 0] [--info FILE]

Serves the files of DIR with Content-Length, streaming them with a producer;
C{GET /_stats} answers C{{"requests": {path: n}, "bytesSent": n}}, where
C{bytesSent} counts every chunk as it is handed to a connection (so it can
be sampled during a transfer to measure its rate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols.basic import FileSender
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ..core.files import write_json_atomic


class BigChunkSender(FileSender):
    CHUNK_SIZE = 256 * 1024


class CountingOrigin(Resource):
    isLeaf = True

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = os.path.realpath(root)
        self.requests: dict[str, int] = {}
        self.bytes_sent = 0

    def render_GET(self, request: Any) -> Any:
        path = request.path.decode("utf-8", "replace")
        if path == "/_stats":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"requests": self.requests, "bytesSent": self.bytes_sent}).encode()
        self.requests[path] = self.requests.get(path, 0) + 1
        full = os.path.realpath(os.path.join(self.root, path.lstrip("/")))
        if not full.startswith(self.root + os.sep) or not os.path.isfile(full):
            request.setResponseCode(404)
            return b"not found\n"
        size = os.path.getsize(full)
        request.setHeader(b"content-length", str(size).encode())
        request.setHeader(b"content-type", b"application/octet-stream")
        f = open(full, "rb")

        def count(chunk: bytes) -> bytes:
            self.bytes_sent += len(chunk)
            return chunk

        d = BigChunkSender().beginFileTransfer(f, request, count)

        def done(last: Any) -> None:
            f.close()
            request.finish()

        def lost(failure: Any) -> None:
            f.close()

        d.addCallbacks(done, lost)
        return NOT_DONE_YET


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--interface", default="127.0.0.1")
    p.add_argument("--info", help="write {'port': N} here once listening")
    args = p.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    site = Site(CountingOrigin(args.root))
    site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(args.port, site, interface=args.interface)
    if args.info:
        write_json_atomic(args.info, {"port": port.getHost().port})
    reactor.run()


if __name__ == "__main__":
    main()

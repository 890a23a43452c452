"""
A plain HTTP origin that counts what it serves and can be told to misbehave
(for tests, the demo and the benchmark's checks).

    python -m dragonfly.testing.origin --root DIR [--port 0] [--info FILE]

Serves the files of DIR with Content-Length, an C{ETag} (size and mtime) and
C{Last-Modified}, streaming them with a producer; a matching C{If-None-Match}
or C{If-Modified-Since} answers 304.  A single C{Range: bytes=N-} or
C{bytes=N-M} answers 206 with C{Content-Range} (416 past the end), unless an
C{If-Range} names another version (neither the current ETag nor the current
Last-Modified): then the whole file, 200.  C{GET /_stats} answers
C{{"requests": {path: n}, "ranges": {path: n}, "bytesSent": n, "bytesOut": n,
"bytesByUri": {path?query: n}}} (C{bytesOut} by request target).
C{bytesOut} counts every chunk as it is handed to a connection, whatever
becomes of the response (so it can be sampled during a transfer to measure
its rate, and a cut response counts what it sent).  C{bytesSent} counts the
same for plain responses, but a paced one (a fault, or a range) only once it
ended, whole or cut by the fault, and not at all when the client went away.

Faults: C{POST /_fault} with C{{"path": "/f.bin", "mode": MODE, "times": N}}
makes the next N requests for that path (every one when N is 0) misbehave:

  - C{status}: answer C{"status"} (e.g. 404, 500) with no file;
  - C{reset}: send the headers and C{"cut"} bytes (default half), then reset the connection;
  - C{short}: send the headers and C{"cut"} bytes, then close the connection cleanly;
  - C{slow}: send the whole file (or the range asked) at C{"rate"} bytes per second;
  - C{norange}: ignore C{Range} and send the whole file, 200.

C{POST /_fault} with C{{"path": ..., "mode": "none"}} clears the path's fault.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols.basic import FileSender
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ..core.files import write_json_atomic

MODES = ("none", "status", "reset", "short", "slow", "norange")


class BigChunkSender(FileSender):
    CHUNK_SIZE = 256 * 1024


class PacedSender:
    """Send C{limit} bytes of a file in 64 KiB chunks, at C{rate} bytes/s (0: as fast as the transport takes them)."""

    CHUNK = 64 * 1024

    def __init__(self, clock: Any, f: Any, request: Any, limit: int, rate: int, then: Any, count: Any = None) -> None:
        self.clock, self.f, self.request = clock, f, request
        self.count = count
        self.left, self.rate, self.then = limit, rate, then
        self.paused = False
        self.timer: Any = None
        self.stopped = False
        request.registerProducer(self, True)
        request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.clock.callLater(0, self._send)

    def _send(self) -> None:
        self.timer = None
        if self.stopped or self.paused:
            return
        if self.left <= 0:
            self.stopped = True
            self.request.unregisterProducer()
            self.then()
            return
        chunk = self.f.read(min(self.CHUNK, self.left))
        if not chunk:
            self.left = 0
        else:
            self.left -= len(chunk)
            if self.count is not None:
                self.count(len(chunk))
            self.request.write(chunk)
        self.timer = self.clock.callLater(len(chunk) / self.rate if self.rate and chunk else 0, self._send)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused and not self.stopped:
            self.paused = False
            if self.timer is None:
                self._send()

    def stopProducing(self) -> None:
        self.stopped = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()


class CountingOrigin(Resource):
    isLeaf = True

    def __init__(self, root: str, clock: Any = reactor) -> None:
        super().__init__()
        self.root = os.path.realpath(root)
        self.clock = clock
        self.requests: dict[str, int] = {}
        self.not_modified: dict[str, int] = {}
        self.bytes_sent = 0
        self.bytes_out = 0
        #: bytesOut by request target (path and query): which URL the bytes were for
        self.bytes_by_uri: dict[str, int] = {}
        self.ranges: dict[str, int] = {}
        self.faults: dict[str, dict[str, Any]] = {}

    def render_POST(self, request: Any) -> Any:
        if request.path != b"/_fault":
            request.setResponseCode(405)
            return b"method not allowed\n"
        spec = json.loads(request.content.read())
        if spec.get("mode") not in MODES:
            request.setResponseCode(400)
            return b"unknown mode\n"
        if spec["mode"] == "none":
            self.faults.pop(spec["path"], None)
        else:
            self.faults[spec["path"]] = {"times": 0, **spec}
        request.setHeader(b"content-type", b"application/json")
        return b"{}"

    def _fault(self, path: str) -> dict[str, Any] | None:
        fault = self.faults.get(path)
        if fault is None:
            return None
        if fault["times"]:
            fault["times"] -= 1
            if fault["times"] == 0:
                del self.faults[path]
        return fault

    def render_HEAD(self, request: Any) -> Any:
        return self.render_GET(request)

    def render_GET(self, request: Any) -> Any:
        path = request.path.decode("utf-8", "replace")
        if path == "/_stats":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(
                {"requests": self.requests, "notModified": self.not_modified, "ranges": self.ranges, "bytesSent": self.bytes_sent,
                 "bytesOut": self.bytes_out, "bytesByUri": self.bytes_by_uri}
            ).encode()
        fault = self._fault(path)
        if not (fault is None and _is_file(self.root, path) and _not_modified_path(request, self.root, path)):
            self.requests[path] = self.requests.get(path, 0) + 1
        if fault is not None and fault["mode"] == "status":
            request.setResponseCode(int(fault.get("status", 500)))
            return b"fault injected\n"
        full = os.path.realpath(os.path.join(self.root, path.lstrip("/")))
        if not full.startswith(self.root + os.sep) or not os.path.isfile(full):
            request.setResponseCode(404)
            return b"not found\n"
        st = os.stat(full)
        size = st.st_size
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'.encode()
        request.setHeader(b"etag", etag)
        request.setHeader(b"last-modified", formatdate(st.st_mtime, usegmt=True).encode())
        if _not_modified(request, etag, st.st_mtime):
            self.not_modified[path] = self.not_modified.get(path, 0) + 1
            request.setResponseCode(304)
            return b""
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"content-type", b"application/octet-stream")
        span: tuple[int, int] | str | None = None
        if fault is None or fault["mode"] != "norange":
            span = _range(request, size, etag, st.st_mtime)
        if span == "unsatisfiable":
            request.setResponseCode(416)
            request.setHeader(b"content-range", f"bytes */{size}".encode())
            return b""
        first, count = 0, size
        if isinstance(span, tuple):
            first, last = span
            count = last - first + 1
            self.ranges[path] = self.ranges.get(path, 0) + 1
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {first}-{last}/{size}".encode())
        request.setHeader(b"content-length", str(count).encode())
        if request.method == b"HEAD":
            return b""
        f = open(full, "rb")
        f.seek(first)
        if fault is not None and fault["mode"] != "norange":
            return self._send_faulty(request, f, first, count, fault)
        if count != size:
            return self._send_faulty(request, f, first, count, {"mode": "slow", "rate": 0})

        uri = request.uri.decode("utf-8", "replace")

        def counted(chunk: bytes) -> bytes:
            self.bytes_sent += len(chunk)
            self.bytes_out += len(chunk)
            self.bytes_by_uri[uri] = self.bytes_by_uri.get(uri, 0) + len(chunk)
            return chunk

        d = BigChunkSender().beginFileTransfer(f, request, counted)

        def done(last: Any) -> None:
            f.close()
            request.finish()

        def lost(failure: Any) -> None:
            f.close()

        d.addCallbacks(done, lost)
        return NOT_DONE_YET

    def _send_faulty(self, request: Any, f: Any, first: int, size: int, fault: dict[str, Any]) -> Any:
        mode = fault["mode"]
        limit = size if mode == "slow" else min(size, int(fault.get("cut", size // 2)))
        rate = int(fault.get("rate", 0)) if mode == "slow" else 0

        uri = request.uri.decode("utf-8", "replace")

        def count(n: int) -> None:
            self.bytes_out += n
            self.bytes_by_uri[uri] = self.bytes_by_uri.get(uri, 0) + n

        def then() -> None:
            self.bytes_sent += f.tell() - first
            f.close()
            if mode == "slow":
                request.finish()
            elif mode == "reset":
                request.channel.transport.abortConnection()
            else:  # short: a clean close with the body cut
                request.channel.transport.loseConnection()

        PacedSender(self.clock, f, request, limit, rate, then, count)
        request.notifyFinish().addErrback(lambda _: f.close())
        return NOT_DONE_YET


def _is_file(root: str, path: str) -> bool:
    full = os.path.realpath(os.path.join(root, path.lstrip("/")))
    return full.startswith(root + os.sep) and os.path.isfile(full)


def _not_modified_path(request: Any, root: str, path: str) -> bool:
    st = os.stat(os.path.realpath(os.path.join(root, path.lstrip("/"))))
    return _not_modified(request, f'"{st.st_size:x}-{st.st_mtime_ns:x}"'.encode(), st.st_mtime)


def _range(request: Any, size: int, etag: bytes, mtime: float) -> tuple[int, int] | str | None:
    """
    The one byte range asked for, as C{(first, last)}; C{"unsatisfiable"}
    past the end; None for the whole file (no Range, one we do not serve, or
    an C{If-Range} naming another version).
    """
    value = request.getHeader(b"range")
    if value is None:
        return None
    if_range = request.getHeader(b"if-range")
    if if_range is not None and if_range != etag and if_range != formatdate(mtime, usegmt=True).encode():
        return None
    unit, _, spec = value.partition(b"=")
    if unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    start, dash, end = spec.strip().partition(b"-")
    if not dash or not start.isdigit() or (end and not end.isdigit()):
        return None
    first = int(start)
    if first >= size:
        return "unsatisfiable"
    last = min(int(end), size - 1) if end else size - 1
    if last < first:
        return None
    return first, last


def _not_modified(request: Any, etag: bytes, mtime: float) -> bool:
    inm = request.getHeader(b"if-none-match")
    if inm is not None:
        return etag in [t.strip() for t in inm.split(b",")]
    ims = request.getHeader(b"if-modified-since")
    if ims is not None:
        try:
            return int(mtime) <= parsedate_to_datetime(ims.decode() if isinstance(ims, bytes) else ims).timestamp()
        except (TypeError, ValueError):
            return False
    return False


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
    r: Any = reactor  # the global reactor's module-level type has none of its interfaces
    port = r.listenTCP(args.port, site, interface=args.interface)
    if args.info:
        write_json_atomic(args.info, {"port": port.getHost().port})
    r.run()


if __name__ == "__main__":
    main()

"""
A minimal blocking HTTP/1.0 client for a dfpeer's loopback API, for the
dfget command: a socket, one request, read to the end.  No http.client or
urllib.request (and the email package they load): dfget's start-up is the
time a user waits before any byte moves.

HTTP/1.0, so the server answers without chunking and closes the connection
when done (twisted.web does), even for a long-polled answer.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


class NotListening(ConnectionError):
    """Nothing accepted the connection: no server there (a stale address)."""


def request(
    base: str, method: str, path: str, body: bytes | None = None, timeout: float = 10.0,
    connect_timeout: float | None = None,
) -> tuple[int, bytes]:
    """
    C{method base+path} with a JSON C{body}: the status and the body of the
    answer.  L{NotListening} when the connection cannot be made (within
    C{connect_timeout}), L{ConnectionError} for an answer cut short,
    L{OSError} (a timeout) otherwise.
    """
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout or timeout)
    except OSError as e:
        raise NotListening(f"cannot connect to {base}: {e}") from None
    try:
        sock.settimeout(timeout)
        data = body or b""
        head = (
            f"{method} {path} HTTP/1.0\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        sock.sendall(head.encode("latin-1") + data)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    finally:
        sock.close()
    return parse_response(b"".join(chunks))


def parse_response(raw: bytes) -> tuple[int, bytes]:
    """An HTTP/1.x answer read to its end: its status and body (checked against Content-Length)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status_line = lines[0].split(None, 2)
    if not sep or len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
        raise ConnectionError("not a complete HTTP answer")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            if not value.strip().isdigit() or len(body) != int(value):
                raise ConnectionError("the answer was cut short")
    return int(status_line[1]), body

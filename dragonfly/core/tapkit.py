"""
What the three C{twistd} plugins (supernode, dfpeer, dfdaemon) share when
they read their options and build their services.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.python import usage
from twisted.web.server import Site

from .gc import check_watermarks, parse_watermark
from .ids import BadInput
from .units import parse_duration


class QuietSite(Site):
    """
    A Site without a line in the log per request (peers sync twice a second),
    and without twisted.web's parsing of POST bodies as forms: our APIs speak
    JSON, and the form check (the Content-Type parsed by the email package)
    was 14 % of the SuperNode's CPU under sync load (docs/scale.md).
    """

    def __init__(self, resource: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(resource, *args, parsePOSTFormSubmission=False, **kwargs)  # type: ignore[no-untyped-call]
        except TypeError:  # a Twisted without the switch
            super().__init__(resource, *args, **kwargs)  # type: ignore[no-untyped-call]

    def log(self, request: Any) -> None:
        """Log nothing per request."""
        pass


def read_token(value: str | None, path: str | None, name: str) -> str | None:
    """
    The bearer token of C{--NAME-token} or C{--NAME-token-file} (not both),
    at least 8 printable characters without spaces, or None when neither is given.
    """
    if value and path:
        raise usage.UsageError(f"give --{name}-token or --{name}-token-file, not both")
    if path:
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError as e:
            raise usage.UsageError(f"--{name}-token-file: {e.strerror}: {path}") from None
        if not value:
            raise usage.UsageError(f"--{name}-token-file {path} is empty")
    if value is not None and (len(value) < 8 or any(c.isspace() or not c.isprintable() for c in value)):
        raise usage.UsageError(f"the {name} token must be at least 8 printable characters without spaces")
    return value or None


def parse_gc_options(options: usage.Options) -> None:
    """Parse the GC flags shared by supernode and dfpeer in place."""
    for name in ("gc-interval", "task-expire"):
        try:
            options[name] = parse_duration(options[name])
        except BadInput as e:
            raise usage.UsageError(f"--{name}: {e}") from None
        if options[name] <= 0:
            raise usage.UsageError(f"--{name} must be positive")
    try:
        options["gc-disk-high"] = parse_watermark(options["gc-disk-high"])
        options["gc-disk-low"] = parse_watermark(options["gc-disk-low"])
        check_watermarks(options["gc-disk-high"], options["gc-disk-low"])
    except BadInput as e:
        raise usage.UsageError(f"--gc-disk-high/--gc-disk-low: {e}") from None


def detect_ip(target: str | None) -> str:
    """
    The address other hosts reach us at: the source address of the route to
    C{target} (no packet is sent: connect() on UDP only picks a route), or the
    host name's address when there is no target.
    """
    try:
        if target:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.connect((socket.gethostbyname(target), 9))
                return str(s.getsockname()[0])
            finally:
                s.close()
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"

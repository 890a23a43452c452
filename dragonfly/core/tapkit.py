"""
What the three C{twistd} plugins (supernode, dfpeer, dfdaemon) share when
they read their options and build their services.

Light on imports: a plugin's options module imports this before it can
bind its ports (a restarted SuperNode binds them before it imports the
rest, see L{dragonfly.supernode.tap.bind_early}), so C{QuietSite}
(twisted.web.server) and the GC watermarks are imported when first used.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from twisted.python import usage

from .ids import BadInput
from .units import parse_duration

if TYPE_CHECKING:
    from .quietsite import QuietSite as QuietSite


def __getattr__(name: str) -> Any:
    """C{QuietSite}, imported on first use (L{dragonfly.core.quietsite})."""
    if name == "QuietSite":
        from .quietsite import QuietSite

        return QuietSite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from .gc import check_watermarks, parse_watermark

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

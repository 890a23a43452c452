"""Rates and durations in the syntax Dragonfly users know (C{20M}, C{5m})."""

from __future__ import annotations

import math
import re

from .ids import BadInput

_RATE = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[KMGkmg]?)(?:i?[Bb])?(?:/s)?\Z")
_RATE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SIZE = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[KMGkmg]?)(?:i?[Bb])?\Z")
_DURATION = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h)?\Z")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_bytes(text: str, pattern: re.Pattern[str], kind: str, form: str) -> int:
    m = pattern.match(str(text).strip())
    if m is None:
        raise BadInput(f"{kind} {text!r} is not of the form {form}")
    value = float(m.group("n")) * _RATE_UNITS[m.group("unit").lower()]
    if not math.isfinite(value):
        raise BadInput(f"{kind} {text!r} is too large")
    return int(value)


def parse_rate(text: str) -> int:
    """C{N}, C{NK}, C{NM}, C{NG} (bytes per second, powers of 1024) to an int."""
    return _parse_bytes(text, _RATE, "rate", "20M (N, NK, NM or NG bytes/s)")


def parse_size(text: str) -> int:
    """C{N}, C{NK}, C{NM}, C{NG} (bytes, powers of 1024) to an int: a buffer's size, say."""
    return _parse_bytes(text, _SIZE, "size", "64K (N, NK, NM or NG bytes)")


def parse_duration(text: str) -> float:
    """C{300}, C{300s}, C{5m}, C{1h}, C{500ms} to seconds."""
    m = _DURATION.match(str(text).strip())
    if m is None:
        raise BadInput(f"duration {text!r} is not of the form 30s, 5m or 1h")
    value = float(m.group("n")) * _DURATION_UNITS[m.group("unit")]
    if not math.isfinite(value):
        raise BadInput(f"duration {text!r} is too large")
    return value


def human_bytes(n: float) -> str:
    """A short human form: C{1.5 MiB}."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

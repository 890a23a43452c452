"""
Structured logs: one download can be followed across the SuperNode and every
dfpeer by its task id.

Every event about a task carries the fields C{taskId} (all 64 hex digits) and
C{task} (its first 12, which the text shows as C{task 0123456789ab: ...});
events about a peer carry C{peerId}.  Numbers are fields too (C{bytes},
C{pieces}, C{seconds}, ...), so a JSON log can be filtered and summed.

The text log (C{twistd -n ...} or C{--logfile}) is the usual one:
C{grep 0123456789ab *.log} follows a task.  For JSON, one object per line with
every field, start a program with C{twistd --logger=dragonfly.core.logs.json_stdout}
(or C{dragonfly.core.logs.json_stderr}).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from zope.interface import provider

SHORT = 12


def short(task_id: str) -> str:
    """The prefix of a task id shown in log text."""
    return task_id[:SHORT]


def task_log(logger: Logger, level: LogLevel, task_id: str, fmt: str, **fields: Any) -> None:
    """Emit C{"task <short id>: " + fmt} with C{taskId} and C{task} among the fields."""
    logger.emit(level, "task {task}: " + fmt, task=short(task_id), taskId=task_id, **fields)


def safe_url(url: str) -> str:
    """C{url} without its query (signatures and tokens stay out of logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<bad url>"
    query = "..." if parts.query else ""
    netloc = parts.netloc.rpartition("@")[2]  # no user:password either
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def event_record(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able record of a log event: time, level, namespace, text and every public field."""
    record: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    for key, value in event.items():
        if not key.startswith("log_") and key not in record and key not in ("format", "message", "isError", "system", "time"):
            record[key] = _plain(value)
    return record


def json_lines_observer(stream: IO[str]) -> Callable[[dict[str, Any]], None]:
    """A log observer writing one JSON object per event and line to C{stream}."""

    def observe(event: dict[str, Any]) -> None:
        stream.write(json.dumps(event_record(event), separators=(",", ":")) + "\n")
        stream.flush()

    provider(ILogObserver)(observe)  # marks the function itself
    return observe


def json_stdout() -> Callable[[dict[str, Any]], None]:
    """For C{twistd --logger=dragonfly.core.logs.json_stdout}."""
    return json_lines_observer(sys.stdout)


def json_stderr() -> Callable[[dict[str, Any]], None]:
    """For C{twistd --logger=dragonfly.core.logs.json_stderr}."""
    return json_lines_observer(sys.stderr)

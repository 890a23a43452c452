"""
How a download on a dfpeer ends other than by finishing in the swarm: it
fails (L{TaskFailed}, with a stable code), or it leaves the swarm for the
origin (L{BackToSource}); and the whole-file digest a request may name
(L{wanted_sha256}, L{check_sha256}), checked at the end either way.

Shared by the task (L{dragonfly.peer.task}), its SuperNode conversation
(L{dragonfly.peer.syncer}) and its way back to the origin
(L{dragonfly.peer.source}); it imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..core.ids import BadInput, parse_digest

#: a task's log: C{(level, format, **fields)}, with the task's id and our peer id added
TaskLog = Callable[..., None]


class TaskFailed(Exception):
    """A download failed; C{code} is stable, C{message} for humans."""

    def __init__(self, code: str, message: str, origin_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.origin_status = origin_status


class BackToSource(Exception):
    """Leave the swarm for the origin (C{reason}: one of L{dragonfly.peer.metrics.BACK_TO_SOURCE})."""

    def __init__(self, why: str, reason: str) -> None:
        super().__init__(why)
        self.why, self.reason = why, reason


def wanted_sha256(request: Mapping[str, Any]) -> str | None:
    """The whole-file SHA-256 the request names (C{--digest sha256:...}), if any."""
    digest = request.get("digest")
    if not digest:
        return None
    try:
        algo, value = parse_digest(digest)
    except BadInput:
        return None
    return value if algo == "sha256" else None


def check_sha256(sha: str, want: str, what: str = "content") -> None:
    """Raise C{DIGEST_MISMATCH} unless C{sha} is C{want} (C{what}: the bytes' name in the message)."""
    if sha != want:
        raise TaskFailed("DIGEST_MISMATCH", f"{what} has sha256:{sha}, expected sha256:{want}")

"""
A dfpeer's piece store: one preallocated file per task under C{<home>/data},
and a JSON meta file written when the task completes, so a restarted dfpeer
keeps serving it.

It is a L{dragonfly.core.store.TaskStore}: every file operation runs in the
worker pool.  Pieces are verified against the SuperNode's SHA-256 and written
at their offsets in one pool call; a piece whose bytes do not match is never
written, so nothing unverified is ever served.  Its reload (L{TaskStore.reload},
the routine the CDN's cache uses too) drops half-written data: the dfpeer does
not resume a download across a restart.
"""

from __future__ import annotations

import os
from typing import Any

from ..core.store import Pool, TaskStore


class PieceStore(TaskStore):
    """The dfpeer's L{TaskStore}: C{<home>/data}, C{.json} metas naming their task, nothing parked."""

    def __init__(self, home: str, pool: Pool, clock: Any = None) -> None:
        super().__init__(os.path.join(home, "data"), pool, meta_suffix=".json", clock=clock)

    def load_finished(self) -> list[dict[str, Any]]:
        """L{reload}'s routine, blocking (for tools and tests; the dfpeer calls L{reload})."""
        return self.load_now()

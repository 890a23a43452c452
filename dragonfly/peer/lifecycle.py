"""
The states of one download on a dfpeer, and the moves between them.

    NEW -> REGISTERING -> SIZING -> ALLOCATING -> DOWNLOADING -> (VERIFYING) -> DONE
                  \\           \\           \\            \\             \\
                   +-----------+-----------+------------+-------------+--> BACK_TO_SOURCE -> DONE
    any state but DONE -> FAILED;  NEW -> DONE (a finished task restored after a restart)

  - REGISTERING: asking the SuperNode for the task;
  - SIZING: registered, syncing until the SuperNode knows the length;
  - ALLOCATING: the task's file is being created in the pool;
  - DOWNLOADING: pieces move over block connections;
  - VERIFYING: every piece is in, the whole file is checked against the
    digest the request named (C{--digest});
  - BACK_TO_SOURCE: fetching the whole file from the origin;
  - DONE and FAILED are final.

The local API and the metrics keep the four C{status} words of the JSON
view: L{Lifecycle.status}.
"""

from __future__ import annotations

from enum import Enum


class State(Enum):
    NEW = "new"
    REGISTERING = "registering"
    SIZING = "sizing"
    ALLOCATING = "allocating"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    BACK_TO_SOURCE = "back-to-source"
    DONE = "done"
    FAILED = "failed"


_ACTIVE = (State.REGISTERING, State.SIZING, State.ALLOCATING, State.DOWNLOADING, State.VERIFYING, State.BACK_TO_SOURCE)

MOVES: dict[State, frozenset[State]] = {
    State.NEW: frozenset({State.REGISTERING, State.DONE, State.FAILED}),
    State.REGISTERING: frozenset({State.SIZING, State.BACK_TO_SOURCE, State.FAILED}),
    State.SIZING: frozenset({State.ALLOCATING, State.BACK_TO_SOURCE, State.FAILED}),
    State.ALLOCATING: frozenset({State.DOWNLOADING, State.VERIFYING, State.DONE, State.BACK_TO_SOURCE, State.FAILED}),
    State.DOWNLOADING: frozenset({State.VERIFYING, State.DONE, State.BACK_TO_SOURCE, State.FAILED}),
    State.VERIFYING: frozenset({State.DONE, State.BACK_TO_SOURCE, State.FAILED}),
    State.BACK_TO_SOURCE: frozenset({State.DONE, State.FAILED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
}

_STATUS = {State.NEW: "waiting", State.DONE: "success", State.FAILED: "failed"}


class BadMove(Exception):
    """A move the lifecycle does not allow (a bug)."""


class Lifecycle:
    """The current L{State} of one download; L{move} checks each move against L{MOVES}."""

    def __init__(self, state: State = State.NEW) -> None:
        self.state = state

    def move(self, to: State) -> None:
        if to not in MOVES[self.state]:
            raise BadMove(f"{self.state.value} -> {to.value}")
        self.state = to

    def can(self, to: State) -> bool:
        return to in MOVES[self.state]

    @property
    def active(self) -> bool:
        """Started and not ended."""
        return self.state in _ACTIVE

    @property
    def ended(self) -> bool:
        return self.state in (State.DONE, State.FAILED)

    @property
    def transferring(self) -> bool:
        """The file exists and pieces may move (DOWNLOADING, or VERIFYING the whole)."""
        return self.state in (State.DOWNLOADING, State.VERIFYING)

    @property
    def status(self) -> str:
        """The JSON view's word: waiting, running, success or failed."""
        return _STATUS.get(self.state, "running")

"""
A bounded history of traffic counters: the SuperNode samples its origin,
seed and peer-to-peer byte totals every L{SAMPLE_INTERVAL} seconds into a
ring of L{HISTORY_SAMPLES}; the dashboard turns consecutive samples into rates.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from attrs import define, field

#: seconds between traffic samples
SAMPLE_INTERVAL = 1.0
#: samples kept: five minutes at one a second
HISTORY_SAMPLES = 300


@define(frozen=True)
class TrafficSample:
    """The SuperNode's traffic counters at time C{t} (cumulative bytes)."""

    t: float
    origin: int
    seed: int
    peer: int

    def to_json(self) -> dict[str, Any]:
        """The sample as the dashboard's JSON."""
        return {"t": self.t, "originBytes": self.origin, "seedBytes": self.seed, "peerBytes": self.peer}


@define
class TrafficHistory:
    """The last C{size} samples, oldest first: memory stays bounded however long it runs."""

    size: int = HISTORY_SAMPLES
    samples: deque[TrafficSample] = field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.size < 2:
            raise ValueError("a traffic history needs at least two samples to show a rate")
        self.samples = deque(maxlen=self.size)

    def add(self, t: float, origin: int, seed: int, peer: int) -> None:
        """Record the cumulative byte counters at time C{t}; the oldest sample drops out when full."""
        self.samples.append(TrafficSample(t, origin, seed, peer))

    def to_json(self) -> list[dict[str, Any]]:
        """The samples as the dashboard's JSON, oldest first."""
        return [s.to_json() for s in self.samples]

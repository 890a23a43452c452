"""
Histogram buckets and L{Distribution}: a histogram's numbers kept without
prometheus_client, so that domain objects (the SuperNode, the CDN, a peer's
tasks) count without importing it; L{dragonfly.core.metrics} turns them
into metric families when Prometheus scrapes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

#: buckets for durations from milliseconds to minutes (downloads, long polls)
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: buckets for fast in-memory work (a scheduling decision)
FAST_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Distribution:
    """
    A histogram's numbers without prometheus_client: counts per upper bound,
    the count and the sum of the observed values.
    """

    def __init__(self, bounds: Sequence[float] = SECONDS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation of C{value}."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, observations <= le) for each bound and +Inf, as Prometheus wants them."""
        out, total = [], 0
        for bound, n in zip([*map(_float_str, self.bounds), "+Inf"], self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


def _float_str(v: float) -> str:
    return repr(float(v))

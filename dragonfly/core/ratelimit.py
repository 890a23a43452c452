"""
Rate limits in bytes per second (C{dfget --locallimit 20M}, C{--totallimit},
C{dfpeer --upload-limit}), as token buckets on an injected clock.
"""

from __future__ import annotations

from typing import Any


class TokenBucket:
    """
    Allows C{rate} bytes per second on average and bursts of C{burst} bytes.

    L{reserve} never refuses: it takes the bytes (the bucket may go into
    debt) and says how long the caller must wait before moving them, so a
    transfer paced by it runs at C{rate} however the bytes are split.
    """

    def __init__(self, rate: float, clock: Any, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate / 16, 64 * 1024))
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock.seconds()

    def reserve(self, nbytes: int) -> float:
        """Take C{nbytes}; return the seconds to wait before sending them (0: at once)."""
        now = self._clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def delay_for(buckets: list[TokenBucket | None], nbytes: int) -> float:
    """Reserve C{nbytes} in every bucket given; the longest wait wins."""
    return max((b.reserve(nbytes) for b in buckets if b is not None), default=0.0)

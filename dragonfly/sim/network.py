"""
A fluid network: hosts with an upload and a download capacity, and flows
between them whose rates are the max-min fair share of those capacities.

Between two changes of the set of flows every rate is constant, so the
simulator moves time on by steps and asks L{FluidNetwork.advance} which flows
finished (and when, exactly) within each step.  Rates are recomputed only
when the set of flows changed.

Max-min fairness by progressive filling: every flow starts at rate 0; all
unfrozen flows grow at the same speed until some link (a host's uplink or
downlink) is full; the flows through that link are frozen at the rate
reached; repeat.  Done with a heap of links keyed by their fair share
(remaining capacity / unfrozen flows), O(flows log links).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from attrs import define, field


@define(eq=False)
class Host:
    """A host's link: capacities in bytes/s, one-way latency to any other host in seconds."""

    name: str
    up: float
    down: float
    latency: float = 0.0
    # flows leaving and entering this host
    # (dicts, not sets: a run must not depend on the objects' addresses)
    out: dict[Flow, None] = field(factory=dict)
    into: dict[Flow, None] = field(factory=dict)
    bytes_up: float = 0.0
    bytes_down: float = 0.0


@define(eq=False)
class Flow:
    """C{size} bytes from C{src} to C{dst}; C{tag} is the caller's."""

    src: Host
    dst: Host
    size: float
    tag: Any = None
    done: float = 0.0
    rate: float = 0.0
    #: seconds the flow ran before the network's clock caught up with it (it
    #: started within a step): credited at its rate on the next advance
    lag: float = 0.0

    @property
    def remaining(self) -> float:
        return self.size - self.done


@define
class FluidNetwork:
    """The flows in progress and their max-min fair rates."""

    flows: dict[Flow, None] = field(factory=dict)
    dirty: bool = False
    #: rate recomputations done (for the simulator's statistics)
    allocations: int = 0

    def start(self, flow: Flow) -> Flow:
        self.flows[flow] = None
        flow.src.out[flow] = None
        flow.dst.into[flow] = None
        self.dirty = True
        return flow

    def stop(self, flow: Flow) -> None:
        if flow in self.flows:
            del self.flows[flow]
            del flow.src.out[flow]
            del flow.dst.into[flow]
            self.dirty = True

    def allocate(self) -> None:
        """Give every flow its max-min fair rate."""
        self.dirty = False
        self.allocations += 1
        # links: a host's uplink is 2k, its downlink 2k+1 (k its place here);
        # remaining capacity and unfrozen flows per link
        place: dict[Host, int] = {}
        hosts: list[Host] = []
        cap: list[float] = []
        left: list[int] = []
        for f in self.flows:
            f.rate = -1.0
            for h in (f.src, f.dst):
                if h not in place:
                    place[h] = len(hosts)
                    hosts.append(h)
                    cap += (h.up, h.down)
                    left += (0, 0)
            left[2 * place[f.src]] += 1
            left[2 * place[f.dst] + 1] += 1
        heap = [(cap[k] / n, k) for k, n in enumerate(left) if n]
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            share, k = pop(heap)
            n = left[k]
            if n == 0:
                continue
            current = cap[k] / n
            if current > share * (1 + 1e-12) + 1e-9:
                push(heap, (current, k))  # stale entry
                continue
            host = hosts[k >> 1]
            if k & 1:
                for f in host.into:
                    if f.rate < 0.0:
                        f.rate = current
                        o = 2 * place[f.src]
                        cap[o] = max(0.0, cap[o] - current)
                        left[o] -= 1
                        if left[o]:
                            push(heap, (cap[o] / left[o], o))
            else:
                for f in host.out:
                    if f.rate < 0.0:
                        f.rate = current
                        o = 2 * place[f.dst] + 1
                        cap[o] = max(0.0, cap[o] - current)
                        left[o] -= 1
                        if left[o]:
                            push(heap, (cap[o] / left[o], o))
            left[k] = 0

    def next_completion(self) -> float:
        """Seconds until the first flow finishes at the current rates (inf: none)."""
        if self.dirty:
            self.allocate()
        best = float("inf")
        for f in self.flows:
            if f.rate > 0:
                t = f.remaining / f.rate - f.lag
                best = min(best, t)
        return best

    def advance(self, dt: float) -> list[tuple[float, Flow]]:
        """
        Move every flow on by C{dt} seconds at its current rate; the flows
        that finished, each with the seconds into the step it finished at,
        in that order (they are removed).  A flow with a C{lag} moves on by
        that much more (at 0 s at the earliest, if it finished within its lag).
        """
        if self.dirty:
            self.allocate()
        finished: list[tuple[float, Flow]] = []
        for f in self.flows:
            if f.rate <= 0:
                continue
            moved = f.rate * (dt + f.lag)
            if moved >= f.remaining - 1e-6:
                at = max(0.0, f.remaining / f.rate - f.lag)
                moved = f.remaining
                finished.append((at, f))
            f.lag = 0.0
            f.done += moved
            f.src.bytes_up += moved
            f.dst.bytes_down += moved
        for _, f in finished:
            self.stop(f)
        finished.sort(key=lambda x: x[0])
        return finished

    def stop_all(self, flows: Iterable[Flow]) -> None:
        for f in list(flows):
            self.stop(f)

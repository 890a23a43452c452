"""
The fluid network of L{dragonfly.sim.network} on numpy arrays, for swarms of
thousands of peers (tens of thousands of flows at once).

The same model and the same API (C{start}, C{stop}, C{allocate},
C{next_completion}, C{advance}, C{stop_all}): the flows' numbers live in
arrays indexed by a slot, so a step costs a few array operations instead of
a Python loop over every flow.  The tests check that both networks give the
same rates.

Max-min fairness without a heap: a link is a I{bottleneck} when its fair
share (remaining capacity / unfrozen flows) is no larger than the share of
every other link its flows cross.  Such a link saturates at exactly that
share in progressive filling (a share only grows as flows elsewhere freeze
below it), so every bottleneck's flows are frozen at its share at once, the
capacities are charged, and the rounds repeat until every flow is frozen.
Each round costs O(flows) array operations; rounds are few (the distinct
levels of a chain of bottlenecks), not one per link.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .network import Flow, Host


class FastNetwork:
    """The flows in progress and their max-min fair rates (numpy)."""

    def __init__(self) -> None:
        self.flows: dict[Flow, None] = {}
        self.dirty = False
        self.allocations = 0
        self._hosts: list[Host] = []
        self._host_id: dict[Host, int] = {}
        self._cap = np.zeros(0)  # per link: host k's uplink 2k, downlink 2k+1
        self._moved = np.zeros(0)  # bytes through each link so far (see credit)
        n = 1024
        self._flow: list[Flow | None] = [None] * n
        self._free: list[int] = list(range(n - 1, -1, -1))
        self._alive = np.zeros(n, dtype=bool)
        self._up = np.zeros(n, dtype=np.int64)  # link ids
        self._down = np.zeros(n, dtype=np.int64)
        self._size = np.zeros(n)
        self._done = np.zeros(n)
        self._rate = np.zeros(n)
        self._lag = np.zeros(n)
        self._top = 0  # slots at or above are all free
        self._slot: dict[Flow, int] = {}

    # -- hosts and slots ------------------------------------------------------------------

    def _host(self, h: Host) -> int:
        k = self._host_id.get(h)
        if k is None:
            k = self._host_id[h] = len(self._hosts)
            self._hosts.append(h)
            self._cap = np.append(self._cap, [h.up, h.down])
        return k

    def _grow(self) -> None:
        n = len(self._flow)
        self._flow.extend([None] * n)
        self._free.extend(range(2 * n - 1, n - 1, -1))
        for name in ("_alive", "_up", "_down", "_size", "_done", "_rate", "_lag"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros(n, dtype=a.dtype)]))

    def start(self, flow: Flow) -> Flow:
        if not self._free:
            self._grow()
        # the lowest free slots first keep the arrays' live part short
        s = self._free.pop()
        self._flow[s] = flow
        self._slot[flow] = s
        self.flows[flow] = None
        self._alive[s] = True
        self._up[s] = 2 * self._host(flow.src)
        self._down[s] = 2 * self._host(flow.dst) + 1
        self._size[s] = flow.size
        self._done[s] = flow.done
        self._rate[s] = 0.0
        self._lag[s] = flow.lag
        self._top = max(self._top, s + 1)
        flow.src.out[flow] = None
        flow.dst.into[flow] = None
        self.dirty = True
        return flow

    def stop(self, flow: Flow) -> None:
        s = self._slot.pop(flow, None)
        if s is None:
            return
        flow.done = float(self._done[s])
        flow.rate = float(self._rate[s])
        flow.lag = float(self._lag[s])
        del self.flows[flow]
        del flow.src.out[flow]
        del flow.dst.into[flow]
        self._alive[s] = False
        self._rate[s] = 0.0
        self._flow[s] = None
        self._free.append(s)
        if s + 1 == self._top:
            while self._top and not self._alive[self._top - 1]:
                self._top -= 1
        self.dirty = True

    def stop_all(self, flows: Iterable[Flow]) -> None:
        for f in list(flows):
            self.stop(f)

    def rate(self, flow: Flow) -> float:
        """The current rate of a flow in progress."""
        return float(self._rate[self._slot[flow]])

    def sync(self) -> None:
        """Copy every flow's numbers onto its object (for tests and views)."""
        for f, s in self._slot.items():
            f.done = float(self._done[s])
            f.rate = float(self._rate[s])
            f.lag = float(self._lag[s])

    # -- rates ------------------------------------------------------------------------------

    def allocate(self) -> None:
        """Give every flow its max-min fair rate."""
        self.dirty = False
        self.allocations += 1
        top = self._top
        live = np.flatnonzero(self._alive[:top])
        rate = self._rate
        rate[:top] = 0.0
        if not len(live):
            return
        links = len(self._cap)
        up = self._up[live]
        down = self._down[live]
        cap = self._cap.copy()
        frozen_rate = np.zeros(len(live))
        active = np.ones(len(live), dtype=bool)
        idx = np.arange(len(live))
        while idx.size:
            u, d = up[idx], down[idx]
            n = np.bincount(u, minlength=links) + np.bincount(d, minlength=links)
            with np.errstate(divide="ignore", invalid="ignore"):
                share = np.where(n > 0, np.maximum(cap, 0.0) / np.maximum(n, 1), np.inf)
            su, sd = share[u], share[d]
            m = np.minimum(su, sd)
            # the smallest share among each link's flows' links
            low = np.full(links, np.inf)
            np.minimum.at(low, u, m)
            np.minimum.at(low, d, m)
            bottleneck = share <= low * (1 + 1e-12) + 1e-9
            hit = bottleneck[u] | bottleneck[d]
            if not hit.any():  # cannot happen (the smallest share is a bottleneck); be safe
                hit = m <= m.min() * (1 + 1e-12) + 1e-9
            r = np.where(bottleneck[u], su, np.inf)
            r = np.minimum(r, np.where(bottleneck[d], sd, np.inf))
            r = np.where(hit, r, 0.0)
            fi = idx[hit]
            fr = r[hit]
            frozen_rate[fi] = fr
            active[fi] = False
            cap -= np.bincount(u[hit], weights=fr, minlength=links)
            cap -= np.bincount(d[hit], weights=fr, minlength=links)
            idx = idx[~hit]
        rate[live] = frozen_rate

    def next_completion(self) -> float:
        """Seconds until the first flow finishes at the current rates (inf: none)."""
        if self.dirty:
            self.allocate()
        top = self._top
        r = self._rate[:top]
        moving = r > 0
        if not moving.any():
            return float("inf")
        t = (self._size[:top][moving] - self._done[:top][moving]) / r[moving] - self._lag[:top][moving]
        return float(t.min())

    def advance(self, dt: float) -> list[tuple[float, Flow]]:
        """As L{dragonfly.sim.network.FluidNetwork.advance}."""
        if self.dirty:
            self.allocate()
        top = self._top
        r = self._rate[:top]
        moving = np.flatnonzero(r > 0)
        if not len(moving):
            return []
        rate = r[moving]
        lag = self._lag[moving]
        left = self._size[moving] - self._done[moving]
        moved = rate * (dt + lag)
        fin = moved >= left - 1e-6
        moved = np.where(fin, left, moved)
        self._done[moving] += moved
        self._lag[moving] = 0.0
        links = len(self._cap)
        if len(self._moved) < links:
            self._moved = np.concatenate([self._moved, np.zeros(links - len(self._moved))])
        self._moved += np.bincount(self._up[moving], weights=moved, minlength=links)
        self._moved += np.bincount(self._down[moving], weights=moved, minlength=links)
        finished: list[tuple[float, Flow]] = []
        if fin.any():
            slots = moving[fin]
            at = np.maximum(0.0, left[fin] / rate[fin] - lag[fin])
            for s, a in zip(slots.tolist(), at.tolist(), strict=True):
                f = self._flow[s]
                assert f is not None
                finished.append((a, f))
            for _, f in finished:
                self.stop(f)
            finished.sort(key=lambda x: x[0])
        return finished

    def credit(self) -> None:
        """Add the bytes moved so far onto the hosts' C{bytes_up} and C{bytes_down}."""
        m = self._moved.tolist()
        m += [0.0] * (2 * len(self._hosts) - len(m))
        for k, h in enumerate(self._hosts):
            h.bytes_up += m[2 * k]
            h.bytes_down += m[2 * k + 1]
        self._moved = np.zeros(len(self._moved))

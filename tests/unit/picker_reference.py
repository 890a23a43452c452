"""
A brute-force piece picker: the rules of L{dragonfly.peer.picker.Picker}
written the plain way, to check the fast one against.

This is the picker as it was before its bit sets (commit ef0577b), with
two changes: ties are broken by the same per-piece random priority (a
permutation drawn from C{rng} at construction, as the fast one does) instead
of a random order kept in buckets, and every choice is recounted from
scratch (availability from the neighbours' bitfields, the wanted pieces from
the piece states) instead of read from incremental state.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

from dragonfly.core.bitmap import Bitmap

K = TypeVar("K", bound=Hashable)

#: defaults (the dfpeer's)
ENDGAME_PIECES = 4
ENDGAME_AFTER = 1.0
STREAM_WINDOW = 4
#: seconds of data a neighbour may have in flight to us (its rate times this, in pieces)
TARGET_LATENCY = 1.0
#: a piece out at a neighbour is asked again from a faster one when that one
#: would deliver it this many times sooner than the first is expected to
RESCUE_FACTOR = 2.0
#: the weight of the history in a neighbour's delivery rate (per piece received)
RATE_DECAY = 0.7
#: the in-flight limit may grow to this many times C{limit} by the bandwidth-delay
#: rule (the neighbours' rates x C{TARGET_LATENCY}); 1: C{limit} holds (the dfpeer's --in-flight)
MAX_GROW = 1.0


class ReferencePicker(Generic[K]):
    """
    The piece states of one download and its neighbours' bitfields.

    @param count: the number of pieces.
    @param rng: the source of randomness (ties, the order neighbours are served in).
    @param have: the bitmap of pieces held, shared with the caller (the
        picker sets bits in it on L{stored}); a new empty one when omitted.
    """

    def __init__(
        self,
        count: int,
        rng: random.Random | None = None,
        have: Bitmap | None = None,
        endgame_pieces: int = ENDGAME_PIECES,
        endgame_after: float = ENDGAME_AFTER,
        stream_window: int = STREAM_WINDOW,
        target_latency: float = TARGET_LATENCY,
        rescue_factor: float = RESCUE_FACTOR,
        rate_decay: float = RATE_DECAY,
        max_grow: float = MAX_GROW,
    ) -> None:
        self.count = count
        self.rng = rng if rng is not None else random.Random()
        self.have_bits = have if have is not None else Bitmap(count)
        if self.have_bits.count != count:
            raise ValueError("have bitmap of another size")
        self.endgame_pieces = endgame_pieces
        self.endgame_after = endgame_after
        self.stream_window = stream_window
        self.target_latency = target_latency
        self.rescue_factor = rescue_factor
        self.rate_decay = rate_decay
        self.max_grow = max_grow
        #: the first piece an in-order reader waits for (None: nobody reads in order)
        self.stream_from: int | None = None
        #: the seed allowance: the pieces we may ask from the seed now
        self.seed_allowed: set[int] = set()
        #: how many non-seed neighbours hold each piece
        self.avail = [0] * count
        #: piece -> [(neighbour, time asked)], first asked first (dict order: first pending first)
        self.pending: dict[int, list[tuple[K, float]]] = {}
        self.verifying: set[int] = set()
        self._known = [False] * count
        # neighbour -> its bitfield (None until received); insertion order
        self._remote: dict[K, Bitmap | None] = {}
        # neighbour -> {piece: time asked}, in the order asked
        self._out: dict[K, dict[int, float]] = {}
        self._seed: K | None = None
        self._in_flight = 0  # requests out to non-seed neighbours
        # neighbour -> [bytes, busy seconds] (decayed), and when its last piece came
        self._meter: dict[K, list[float]] = {}
        self._last_done: dict[K, float] = {}
        # wanted pieces by availability; _pos[i] its index in its bucket, or -1
        self._buckets: list[list[int]] = [[]]
        self._pos = [-1] * count
        self._by_prio = list(range(count))
        self.rng.shuffle(self._by_prio)
        self.prio = [0] * count
        for p, i in enumerate(self._by_prio):
            self.prio[i] = p

    # -- piece states --------------------------------------------------------------

    def wanted(self, index: int) -> bool:
        """Missing, not asked for, not being checked, and its digest is known."""
        return (
            self._known[index] and index not in self.have_bits and index not in self.pending
            and index not in self.verifying
        )

    @property
    def missing(self) -> int:
        return self.count - len(self.have_bits)

    def digest_known(self, index: int) -> None:
        """The digest of C{index} is known: it may be asked for."""
        if 0 <= index < self.count and not self._known[index]:
            self._known[index] = True
            self._refresh(index)

    def stored(self, index: int) -> None:
        """C{index} was verified and written."""
        self.verifying.discard(index)
        self.have_bits.set(index)
        self._refresh(index)

    def unverified(self, index: int) -> None:
        """The check of C{index} ended without storing it (failed, or the store failed): wanted again."""
        self.verifying.discard(index)
        self._refresh(index)

    # -- neighbours ------------------------------------------------------------------

    def add(self, key: K, seed: bool = False) -> None:
        """A neighbour attached (before its bitfield)."""
        if key in self._remote:
            return
        self._remote[key] = None
        self._out[key] = {}
        if seed:
            self._seed = key

    @property
    def seed(self) -> K | None:
        return self._seed

    def neighbours(self) -> Iterator[K]:
        return iter(self._remote)

    def remote(self, key: K) -> Bitmap | None:
        """The picker's copy of the bitfield of C{key} (None before it came)."""
        return self._remote.get(key)

    def outstanding(self, key: K) -> dict[int, float]:
        """The requests out to C{key}: piece -> time asked."""
        return self._out.get(key, {})

    @property
    def in_flight(self) -> int:
        """Requests out to neighbours other than the seed."""
        return self._in_flight

    def bitfield(self, key: K, bitmap: Bitmap) -> None:
        """The bitfield of C{key} arrived (copied)."""
        if key not in self._remote or self._remote[key] is not None:
            return
        self._remote[key] = bitmap.copy()
        if key != self._seed:
            for i in bitmap:
                self._bump(i, 1)

    def have(self, key: K, index: int) -> None:
        """C{key} announced C{index} (HAVE)."""
        remote = self._remote.get(key)
        if remote is None or index in remote:
            return
        remote.set(index)
        if key != self._seed:
            self._bump(index, 1)

    def lost(self, key: K, index: int) -> None:
        """C{key} does not hold C{index} after all (it rejected it, or sent bad bytes): believe it less."""
        remote = self._remote.get(key)
        if remote is None or index not in remote or key == self._seed:
            return
        remote.clear(index)
        self._bump(index, -1)

    def remove(self, key: K) -> list[int]:
        """C{key} left: forget its bitfield; the pieces that were out to it (no longer pending there)."""
        if key not in self._remote:
            return []
        remote = self._remote.pop(key)
        out = self._out.pop(key)
        self._meter.pop(key, None)
        self._last_done.pop(key, None)
        if key == self._seed:
            self._seed = None
        else:
            self._in_flight -= len(out)
            if remote is not None:
                for i in remote:
                    self._bump(i, -1)
        lost = list(out)
        for i in lost:
            self._unpend(i, key)
        return lost

    # -- requests ----------------------------------------------------------------------

    def request(self, key: K, index: int, now: float) -> None:
        """Record that C{index} was asked from C{key} (L{fill} does this itself)."""
        out = self._out[key]
        if index in out:
            return
        out[index] = now
        if key != self._seed:
            self._in_flight += 1
        self.pending.setdefault(index, []).append((key, now))
        self._refresh(index)

    def rejected(self, key: K, index: int) -> None:
        """C{key} refused C{index}: it is wanted again, and C{key} is believed to lack it."""
        self._drop(key, index)
        self.lost(key, index)

    def cancelled(self, key: K, index: int) -> None:
        """A request was withdrawn (by the caller) without an answer."""
        self._drop(key, index)

    def received(self, key: K, index: int, now: float | None = None, size: int | None = None) -> list[K]:
        """
        C{index} arrived from C{key}: it is no longer pending anywhere.
        Returns the other neighbours it was asked from, to cancel there.
        With C{now} and C{size} (its bytes) it counts in C{key}'s rate.
        """
        if now is not None and size is not None:
            asked = self._out.get(key, {}).get(index)
            if asked is not None:
                self._measure(key, now, asked, size)
        holders = self.pending.pop(index, [])
        others = []
        for k, _ in holders:
            out = self._out.get(k)
            if out is not None and out.pop(index, None) is not None and k != self._seed:
                self._in_flight -= 1
            if k != key:
                others.append(k)
        # a piece not pending here (answered after its request was dropped)
        out = self._out.get(key)
        if out is not None and out.pop(index, None) is not None and key != self._seed:
            self._in_flight -= 1
        self._refresh(index)
        return others

    def verify(self, index: int) -> bool:
        """
        C{index} is to be checked: False when it need not be (held, or being
        checked already: a duplicate from the endgame, or too late).
        """
        if index in self.have_bits or index in self.verifying or not self._known[index]:
            return False
        self.verifying.add(index)
        self._refresh(index)
        return True

    def corrupt(self, key: K, index: int) -> None:
        """
        C{index} from C{key} failed its digest: wanted again, and C{key} is
        believed to lack it; its rate is forgotten (bad bytes are no speed),
        so it gets no more than C{per_conn} requests until it delivers again.
        """
        self._meter.pop(key, None)
        self._last_done.pop(key, None)
        self.unverified(index)
        self.lost(key, index)

    # -- choosing ------------------------------------------------------------------------

    def choose(self, key: K, now: float) -> int | None:
        """The piece to ask from C{key} next, or None (not recorded: see L{request})."""
        remote = self._remote.get(key)
        if remote is None:
            return None
        if key == self._seed:
            return self._choose_seed(remote)
        best = self._in_window(remote, range(self._window_start(), self._window_end()))
        if best is not None:
            return best
        avail = self.recount()
        best = min(
            ((avail[i], self.prio[i], i) for i in range(self.count) if i in remote and self.wanted(i)),
            default=None,
        )
        if best is not None:
            return best[2]
        return self._endgame(key, remote, now)

    def recount(self) -> list[int]:
        """How many non-seed neighbours hold each piece, counted from their bitfields."""
        avail = [0] * self.count
        for k, r in self._remote.items():
            if r is not None and k != self._seed:
                for i in r:
                    avail[i] += 1
        return avail

    def fill(
        self, now: float, per_conn: int, limit: int, usable: Callable[[K], bool] | None = None,
        piece_bytes: int | None = None,
    ) -> list[tuple[K, int]]:
        """
        The requests to send now, recorded as pending: the seed allowance
        first, apart from the budget; then, while the non-seed neighbours have
        fewer than C{limit} out in all, one more request to a neighbour with
        a free slot.  C{usable} may rule a neighbour out (a closed connection).

        Without C{piece_bytes}: one request per neighbour per round (in
        random order), C{per_conn} at most per neighbour.  With it: each
        request to the neighbour that would deliver it soonest, up to its
        bandwidth-delay budget, then the rescues (see the module's doc).
        """
        asked: list[tuple[K, int]] = []
        seed = self._seed
        if seed is not None and self._remote.get(seed) is not None and (usable is None or usable(seed)):
            out = self._out[seed]
            while len(out) < max(per_conn, len(self.seed_allowed)):
                index = self.choose(seed, now)
                if index is None:
                    break
                self.request(seed, index, now)
                asked.append((seed, index))
        keys = [
            k for k, r in self._remote.items()
            if k != seed and r is not None and (usable is None or usable(k))
        ]
        if piece_bytes is None or piece_bytes <= 0:
            self.rng.shuffle(keys)
            keys = [k for k in keys if len(self._out[k]) < per_conn]
            progress = True
            while progress and self._in_flight < limit:
                progress = False
                # one request per neighbour per round spreads the load
                for k in keys:
                    if self._in_flight >= limit or len(self._out[k]) >= per_conn:
                        continue
                    index = self.choose(k, now)
                    if index is None:
                        continue
                    self.request(k, index, now)
                    asked.append((k, index))
                    progress = True
            return asked
        self._fill_by_rate(now, per_conn, limit, keys, piece_bytes, asked)
        return asked

    def rate(self, key: K, now: float | None = None, piece_bytes: int | None = None) -> float | None:
        """
        The delivery rate of C{key} in bytes/s (None before its first piece).
        With C{now}: no more than its oldest request out shows (nothing of it
        came for t seconds: at most a piece per t), which also gives a rate
        to a neighbour not measured yet when C{piece_bytes} is known.
        """
        m = self._meter.get(key)
        rate = m[0] / m[1] if m is not None and m[1] > 0 else None
        out = self._out.get(key)
        if now is None or not out:
            return rate
        piece = piece_bytes if piece_bytes else (m[2] if m is not None else None)
        waited = now - max(min(out.values()), self._last_done.get(key, -math.inf))
        if piece is None or waited <= 0:
            return rate
        cap = piece / waited
        return cap if rate is None or cap < rate else rate

    def budget(self, key: K, per_conn: int, limit: int, piece_bytes: int, rate: float | None) -> int:
        """Requests C{key} may have out: max(C{per_conn}, rate x target latency / piece), at most C{limit}."""
        if rate is None:
            return per_conn
        return max(per_conn, min(limit, int(rate * self.target_latency / piece_bytes)))

    def _fill_by_rate(
        self, now: float, per_conn: int, limit: int, keys: list[K], piece_bytes: int, asked: list[tuple[K, int]],
    ) -> None:
        rates: dict[K, float | None] = {}
        caps: dict[K, int] = {}
        for k in keys:
            measured = self.rate(k)
            caps[k] = self.budget(k, per_conn, limit, piece_bytes, measured)
            rates[k] = self.rate(k, now, piece_bytes) if self._out[k] else measured
        if self.max_grow > 1:
            # bandwidth-delay for the whole download: what the neighbours deliver x target latency
            total = sum(m[0] / m[1] for k in keys if (m := self._meter.get(k)) is not None and m[1] > 0)
            limit = max(limit, min(int(self.max_grow * limit), int(total * self.target_latency / piece_bytes)))
        known = [r for r in rates.values() if r is not None and r > 0]
        prior = max(known) if known else 1.0
        speed = {k: (r if r is not None and r > 0 else prior) for k, r in rates.items()}
        # earliest finish first: (requests out + 1) x piece / rate (ties: the order they attached)
        heap = []
        if self._in_flight < limit:
            heap = [((len(self._out[k]) + 1) / speed[k], n, k) for n, k in enumerate(keys) if len(self._out[k]) < caps[k]]
            heapq.heapify(heap)
        else:
            heap = [(0.0, n, k) for n, k in enumerate(keys) if len(self._out[k]) < caps[k]]
        idle: list[tuple[int, K]] = []
        while heap and self._in_flight < limit:
            _, n, k = heapq.heappop(heap)
            index = self.choose(k, now)
            if index is None:
                idle.append((n, k))
                continue
            self.request(k, index, now)
            asked.append((k, index))
            if len(self._out[k]) < caps[k]:
                heapq.heappush(heap, ((len(self._out[k]) + 1) / speed[k], n, k))
        # rescues: a neighbour with a slot and nothing new to give takes over a slow one's piece
        idle.extend((n, k) for _, n, k in heap)
        if not idle or not self.pending or self._in_flight >= 2 * limit:
            return
        late = self._late(now, speed, piece_bytes)
        if not late:
            return
        idle.sort(key=lambda nk: -speed[nk[1]])
        for _, k in idle:
            remote = self._remote[k]
            if remote is None or k not in self._meter:
                continue  # not measured: not known to be faster
            while late and self._in_flight < 2 * limit and len(self._out[k]) < caps[k]:
                threshold = self.rescue_factor * (len(self._out[k]) + 1) * piece_bytes / speed[k]
                pick = None
                for j, (left, i, other) in enumerate(late):
                    if left <= threshold:
                        break  # latest first: none further on is late enough either
                    if other != k and i in remote:
                        pick = j
                        break
                if pick is None:
                    break
                _, i, _ = late.pop(pick)
                self.request(k, i, now)
                asked.append((k, i))

    def _late(self, now: float, speed: dict[K, float], piece_bytes: int) -> list[tuple[float, int, K]]:
        """The pieces out at one non-seed neighbour: (seconds until it is expected to finish them, piece, it), latest first."""
        late = []
        for i, holders in self.pending.items():
            if len(holders) != 1 or i in self.verifying:
                continue
            other, asked_at = holders[0]
            if other == self._seed:
                continue
            r = speed.get(other)
            if r is None:
                r = self.rate(other, now, piece_bytes)
                if r is None:
                    continue
                speed[other] = r
            # when the other is expected to finish it: its queue up to it, at its rate
            out = self._out[other]
            ahead = sum(1 for t in out.values() if t <= asked_at)
            start = max(asked_at, self._last_done.get(other, -math.inf))
            left = start + ahead * piece_bytes / r - now
            if left > 0:
                late.append((left, i, other))
        late.sort(key=lambda x: -x[0])
        return late

    def _measure(self, key: K, now: float, asked: float, size: int) -> None:
        start = max(asked, self._last_done.get(key, -math.inf))
        self._last_done[key] = now
        busy = now - start
        if busy <= 0:
            busy = 1e-6
        m = self._meter.get(key)
        if m is None:
            self._meter[key] = [float(size), busy, float(size)]
            return
        d = self.rate_decay
        m[0] = m[0] * d + size
        m[1] = m[1] * d + busy
        m[2] = max(m[2], float(size))

    def offer(self, key: K, index: int, now: float, per_conn: int, limit: int) -> bool:
        """
        After C{key}'s HAVE of C{index}: ask it for that piece right away if
        it is wanted and within the limits (only this neighbour's choice can
        change, and a piece just announced is among the rarest anyway).
        Recorded as pending when True.
        """
        if key == self._seed or key not in self._out or not self.wanted(index):
            return False
        if len(self._out[key]) >= per_conn or self._in_flight >= limit:
            return False
        self.request(key, index, now)
        return True

    def starving(self) -> bool:
        """Nothing to fetch from any neighbour but the seed."""
        if self.have_bits.complete:
            return False
        seed = self._seed
        if any(self._out[k] for k, r in self._remote.items() if k != seed and r is not None):
            return False
        return not any(
            r is not None and k != seed and any(self.wanted(i) for i in r) for k, r in self._remote.items()
        )

    # -- internals -------------------------------------------------------------------------

    def _window_start(self) -> int:
        return self.stream_from if self.stream_from is not None else 0

    def _window_end(self) -> int:
        if self.stream_from is None:
            return 0
        return min(self.count, max(0, self.stream_from + self.stream_window))

    def _in_window(self, remote: Bitmap, candidates: Iterable[int]) -> int | None:
        """The rarest wanted piece of C{candidates} C{remote} holds, ties in order."""
        best: int | None = None
        best_key: tuple[int, int] | None = None
        for i in candidates:
            if i < 0 or i not in remote or not self.wanted(i):
                continue
            k = (self.recount()[i], i)
            if best_key is None or k < best_key:
                best, best_key = i, k
        return best

    def _far(self, index: int) -> bool:
        s = self.stream_from
        return s is None or not s <= index < s + self.stream_window

    def _choose_seed(self, remote: Bitmap) -> int | None:
        best: int | None = None
        best_key: tuple[bool, int, int] | None = None
        for i in self.seed_allowed:
            if not 0 <= i < self.count or i not in remote or not self.wanted(i):
                continue
            k = (self._far(i), self.recount()[i], self.prio[i])
            if best_key is None or k < best_key:
                best, best_key = i, k
        return best

    def _endgame(self, key: K, remote: Bitmap, now: float) -> int | None:
        """Only the last few pieces, all already asked for: a second holder for one out a while."""
        missing = self.missing
        if missing > self.endgame_pieces or missing > len(self.pending) + len(self.verifying):
            return None
        for i, holders in self.pending.items():
            if (
                len(holders) == 1 and holders[0][0] != key and i in remote and i not in self.verifying
                and now - holders[0][1] >= self.endgame_after
            ):
                return i
        return None

    def _drop(self, key: K, index: int) -> None:
        out = self._out.get(key)
        if out is not None and out.pop(index, None) is not None and key != self._seed:
            self._in_flight -= 1
        self._unpend(index, key)

    def _unpend(self, index: int, key: K) -> None:
        holders = self.pending.get(index)
        if holders is None:
            return
        holders[:] = [h for h in holders if h[0] != key]
        if not holders:
            del self.pending[index]
        self._refresh(index)

    def _bump(self, index: int, delta: int) -> None:
        inside = self._pos[index] >= 0
        if inside:
            self._take(index)
        self.avail[index] += delta
        if inside:
            self._put(index)

    def _refresh(self, index: int) -> None:
        want = self.wanted(index)
        inside = self._pos[index] >= 0
        if want and not inside:
            self._put(index)
        elif inside and not want:
            self._take(index)

    def _put(self, index: int) -> None:
        b = max(0, self.avail[index])
        while len(self._buckets) <= b:
            self._buckets.append([])
        bucket = self._buckets[b]
        bucket.append(index)
        self._pos[index] = len(bucket) - 1

    def _take(self, index: int) -> None:
        bucket = self._buckets[max(0, self.avail[index])]
        p = self._pos[index]
        last = bucket.pop()
        if last != index:
            bucket[p] = last
            self._pos[last] = p
        self._pos[index] = -1

    def buckets(self) -> dict[int, set[int]]:
        """The wanted pieces by availability (for tests and the simulator's views)."""
        return {b: set(items) for b, items in enumerate(self._buckets) if items}

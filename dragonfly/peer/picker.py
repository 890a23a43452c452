"""
Which piece to ask from whom: the dfpeer's piece picker, with no I/O.

The picker holds one download's piece states and what each neighbour holds,
and answers which piece to ask from which neighbour.  Time (C{now}) and
randomness (C{rng}) are passed in; it never touches a socket, a file or a
reactor, so the dfpeer (L{dragonfly.peer.task}) and the swarm simulator
both drive it.

Neighbours are opaque hashable keys (the dfpeer uses its connections).  One
neighbour may be I{the seed} (the SuperNode's CDN): from it only the pieces
of the seed allowance are asked, its requests stay outside the in-flight
budget, and its bitfield does not count in the availability.

A piece is I{wanted} when it is missing, not requested, not being verified,
and its digest is known.  The rules (unchanged from the dfpeer's):

  - rarest-first: among the wanted pieces a neighbour holds, the one the
    fewest (non-seed) neighbours hold, ties at random;
  - the stream window: the C{stream_window} pieces from C{stream_from} (an
    in-order reader's next pieces) go before any other, the rarest first and
    ties in order;
  - the seed allowance: from the seed, only pieces of C{seed_allowed}, up to
    C{max(per_conn, len(seed_allowed))} at once;
  - endgame: when at most C{ENDGAME_PIECES} pieces are missing and all of
    them are requested or being verified, a neighbour with nothing else to
    give may be asked for a piece that has been out to one other neighbour
    for C{ENDGAME_AFTER} seconds; the first copy in wins and the others are
    to be cancelled (L{Picker.received} names them);
  - starving: nothing to fetch from any neighbour but the seed (the
    SuperNode may then send a second copy).

When the caller passes C{piece_bytes} to L{Picker.fill} (and C{now} and
C{size} to L{Picker.received}), the picker also weighs its neighbours by
speed (BitTorrent's and Dragonfly 2's ideas, see REFERENCE.md):

  - delivery rate: each neighbour's bytes/s over the time it was busy
    sending to us (a piece's time counts from its request or the previous
    piece from that neighbour, whichever is later), decayed by
    C{RATE_DECAY} per piece; a neighbour with a request out longer than its
    rate explains is believed no faster than that request shows;
  - earliest finish first: each request goes to the usable neighbour that
    would deliver a new piece soonest, (its requests out + 1) x piece /
    rate, so the fast holders take the rarest pieces first and a slow one
    is asked only while no faster one has a slot; a neighbour not measured
    yet counts as fast as the fastest one known;
  - bandwidth-delay: a neighbour may have max(C{per_conn}, rate x
    C{TARGET_LATENCY} / piece) requests out;
  - rescue (an endgame at any time): a neighbour with a free slot and no
    wanted piece to give asks again for a piece out at one other neighbour
    when it would deliver it C{RESCUE_FACTOR} times sooner than that one is
    expected to; the first copy in wins and the other is cancelled.  Rescues
    may take the in-flight count up to twice C{limit} (the duplicates are
    short-lived).

Availability is kept incrementally, in integer bit sets: each picker draws
a random priority per piece (a permutation, once), and every set of pieces
(a neighbour's bitfield, the wanted pieces, the wanted pieces of each
availability count) is an int whose bit C{p} stands for the piece of
priority C{p}.  A HAVE, a bitfield, a lost neighbour or a request moves one
bit; choosing a piece for a neighbour is an AND of its bitfield with the
rarest levels and the lowest set bit of the first that is not empty: the
rarest wanted piece it holds, ties broken by the random priority (the same
rule as C{min((avail[i], priority[i]))} over every piece, which the tests
check against a brute-force picker).  No call scans every piece or keeps a
per-piece list in random order.  All a neighbour's state (its bitfield, its
requests out, its rate) is one record, L{Neighbour}: a fill reads one object
per neighbour (the swarm simulator runs thousands of pickers, and each
object read is likely a cache miss there).

Usage::

    p = Picker(count, rng=random.Random())
    p.digest_known(i)                 # for each digest learnt
    p.add(key, seed=False)            # a neighbour attached
    p.bitfield(key, bitmap)           # its bitfield (copied)
    p.have(key, i)                    # its HAVE
    for key, i in p.fill(now, per_conn, limit):
        send REQUEST i to key         # already recorded as requested
    others = p.received(key, i)       # the piece arrived: cancel it at others
    if p.verify(i): ...               # False: a duplicate, drop it; else check it
    p.stored(i) / p.corrupt(key, i)   # verified and written / failed its digest
    p.rejected(key, i)                # REJECT: ask elsewhere
    lost = p.remove(key)              # the neighbour left; its requests are wanted again
    p.offer(key, i, now, per_conn, limit)   # after a HAVE: ask it at once if worth it
    p.heard(p.record(key), i, now, per_conn, limit)   # have() and offer() on a record kept per neighbour
    p.seed_allowed = {...}; p.stream_from = i; p.starving()

Requests chosen by L{Picker.fill} and L{Picker.offer} are recorded as
pending at once; the caller sends them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

from ..core.bitmap import Bitmap

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
#: the least pieces in flight, whatever the in-flight bytes (the dfpeer's)
MIN_IN_FLIGHT = 4
#: the in-flight limit grows to one piece per neighbour within this many bytes (L{neighbour_limit});
#: 0, off: the simulator's 1,000 peers with 1 MiB pieces lost at the median with it (docs/benchmarks.md)
NEIGHBOUR_BYTES = 0


def _first(entry: tuple[float, int, object]) -> float:
    return entry[0]


class Neighbour(Generic[K]):
    """
    One neighbour's state in a picker, in one record: what it holds, its
    requests out, its delivery rate.  (Kept apart in several dictionaries
    keyed by the neighbour, each fill read three or four of them per
    neighbour; at thousands of simulated pickers every one is a cache miss.)
    """

    __slots__ = (
        "key", "bits", "out", "oldest", "measured", "rate", "sent", "busy", "largest", "last_done", "cap", "speed",
        "stamp", "finish", "place", "newest",
    )

    def __init__(self, key: K) -> None:
        self.key = key
        #: its bitfield as bits by priority (None until received)
        self.bits: int | None = None
        #: piece -> time asked, in the order asked; the earliest and the latest of those times (none out: inf, -inf)
        self.out: dict[int, float] = {}
        self.oldest = math.inf
        self.newest = -math.inf
        #: a rate is measured: bytes / busy seconds, both decayed per piece, and the largest piece
        self.measured = False
        self.rate = 0.0
        self.sent = 0.0
        self.busy = 0.0
        self.largest = 0.0
        #: when its last piece came (-inf: none since it was measured afresh)
        self.last_done = -math.inf
        #: the rate rules' working values of one fill (C{stamp}): its budget and its speed; when it
        #: would deliver one more piece and its place in the neighbours (the order of the rate rules' heap)
        self.cap = 0
        self.speed = 0.0
        self.stamp = 0
        self.finish = 0.0
        self.place = 0

    def take(self, index: int) -> bool:
        """C{index} is no longer out to it; False when it was not."""
        asked = self.out.pop(index, None)
        if asked is None:
            return False
        if asked <= self.oldest or asked >= self.newest:
            oldest = math.inf
            newest = -math.inf
            for t in self.out.values():
                if t < oldest:
                    oldest = t
                if t > newest:
                    newest = t
            self.oldest = oldest
            self.newest = newest
        return True


def _speed(nb: Neighbour[K]) -> float:
    return nb.speed


def _before(a: Neighbour[K], b: Neighbour[K]) -> bool:
    return a.finish < b.finish or (a.finish == b.finish and a.place < b.place)


# The neighbours by (C{finish}, C{place}) in a heap: heapq's algorithm, step for
# step (the same order of the array, which the rescues read), on the records'
# own fields instead of a tuple per entry compared as objects.


def _heapify(items: list[Neighbour[K]]) -> None:
    i = len(items) // 2 - 1
    while i >= 0:
        _siftup(items, i)
        i -= 1


def _heappush(items: list[Neighbour[K]], nb: Neighbour[K]) -> None:
    items.append(nb)
    _siftdown(items, 0, len(items) - 1)


def _heappop(items: list[Neighbour[K]]) -> Neighbour[K]:
    last = items.pop()
    if items:
        top = items[0]
        items[0] = last
        _siftup(items, 0)
        return top
    return last


def _siftdown(items: list[Neighbour[K]], start: int, pos: int) -> None:
    new = items[pos]
    while pos > start:
        parent_pos = (pos - 1) >> 1
        parent = items[parent_pos]
        if _before(new, parent):
            items[pos] = parent
            pos = parent_pos
            continue
        break
    items[pos] = new


def _siftup(items: list[Neighbour[K]], pos: int) -> None:
    end = len(items)
    start = pos
    new = items[pos]
    child = 2 * pos + 1
    while child < end:
        right = child + 1
        if right < end and not _before(items[child], items[right]):
            child = right
        items[pos] = items[child]
        pos = child
        child = 2 * pos + 1
    items[pos] = new
    _siftdown(items, start, pos)


def in_flight_limit(
    in_flight_bytes: int, piece_bytes: int, link_rate: float | None = None, link_time: float = 0.0,
    least: int = MIN_IN_FLIGHT,
) -> int:
    """
    The C{limit} to pass to L{Picker.fill}: C{in_flight_bytes} in pieces (at
    least C{least}), or, when the host's downlink rate is known
    (C{link_rate}, bytes/s) and C{link_time} > 0, what that link carries in
    C{link_time} seconds when that is more.  A peer of a fast link then has
    more requests out: each request gets a share of its uploader's uplink
    (shared with that uploader's other requesters), so a fixed count caps
    every peer at about the same rate whatever its link; on a link no faster
    than the in-flight bytes per C{link_time} the limit is unchanged.
    """
    pieces = max(least, in_flight_bytes // max(1, piece_bytes))
    if link_rate is not None and link_time > 0 and piece_bytes > 0:
        pieces = max(pieces, int(link_rate * link_time / piece_bytes))
    return pieces


def neighbour_limit(limit: int, neighbours: int, piece_bytes: int, most_bytes: int) -> int:
    """
    C{limit} (from L{in_flight_limit}) raised to one piece per neighbour
    (C{neighbours}: the non-seed ones), as long as that many pieces fit in
    C{most_bytes} (0: never raised).  With fewer pieces out than neighbours
    some neighbours are asked nothing at any moment: an uploader whose every
    downloader spent its few requests elsewhere idles while it holds pieces
    they want, and each piece's round trip (a request waits behind its
    downloader's own uploads in that host's queue) is added per piece to
    the few that are out.  N = 10 dfpeers (9 neighbours each, 6 pieces of
    1 MiB out) carried 62 of their 80 Mbit/s once the seed was done
    (docs/benchmarks.md); the simulator with 10 to 20 ms links gives 1.32
    to 1.39 x F/B at N = 10 with 6 and 1.20 to 1.22 with 9, but its 1,000
    peers of mixed links with 1 MiB pieces finished later at the median
    (1.11 -> 1.22) and sooner at the 99th percentile (1.66 -> 1.46): off by
    default (L{NEIGHBOUR_BYTES}).
    """
    if neighbours <= limit or most_bytes <= 0 or piece_bytes <= 0:
        return limit
    return max(limit, min(neighbours, most_bytes // piece_bytes))


class Picker(Generic[K]):
    """
    The piece states of one download and its neighbours' bitfields.

    @param count: the number of pieces.
    @param rng: the source of randomness (the pieces' priorities, drawn
        once here, which break ties; the order neighbours are served in).
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
        #: the pieces by priority (ties go to the lowest), and each piece's priority
        self._by_prio = list(range(count))
        self.rng.shuffle(self._by_prio)
        self.prio = [0] * count
        for p, i in enumerate(self._by_prio):
            self.prio[i] = p
        # neighbour -> its record, in the order they attached
        self._nb: dict[K, Neighbour[K]] = {}
        self._seed: K | None = None
        self._seed_nb: Neighbour[K] | None = None
        # the non-seed neighbours whose bitfield came, in the order they attached (None: to recount)
        self._ready: list[Neighbour[K]] | None = None
        self._in_flight = 0  # requests out to non-seed neighbours
        # the fills of the rate rules so far (a record's working values are of the fill of its stamp)
        self._fills = 0
        # the wanted pieces (bits by priority), and they by availability
        self._want = 0
        self._levels: list[int] = [0]
        # per piece, whether it is in _want (a list read where the bit test made a new 512-bit int)
        self._in_want = [False] * count

    # -- piece states --------------------------------------------------------------

    def wanted(self, index: int) -> bool:
        """Missing, not asked for, not being checked, and its digest is known."""
        # (the bitmap last: its test is a Python call, the others a list, a dict and a set)
        return (
            self._known[index] and index not in self.pending and index not in self.verifying
            and index not in self.have_bits
        )

    @property
    def missing(self) -> int:
        return self.count - len(self.have_bits)

    def digest_known(self, index: int) -> None:
        """The digest of C{index} is known: it may be asked for."""
        if 0 <= index < self.count and not self._known[index]:
            self._known[index] = True
            self._refresh(index)

    def digests_known(self, indexes: Iterable[int]) -> None:
        """L{digest_known} for each of C{indexes} (the same state; one pass, for a whole piece list)."""
        known = self._known
        prio = self.prio
        avail = self.avail
        count = self.count
        in_want = self._in_want
        pending, verifying, have = self.pending, self.verifying, self.have_bits
        # (wanted(), inline: with no piece held yet, as when a download starts, no bitmap call per piece)
        none_held = len(have) == 0
        # each level's new bits set in bytes, made ints once (an int per piece grew a 512-bit int each time)
        nbytes = (count + 7) >> 3
        by_level: dict[int, bytearray] = {}
        for index in indexes:
            if 0 <= index < count and not known[index]:
                known[index] = True
                if index not in pending and index not in verifying and (none_held or index not in have):
                    in_want[index] = True
                    p = prio[index]
                    b = max(0, avail[index])
                    mask = by_level.get(b)
                    if mask is None:
                        mask = by_level[b] = bytearray(nbytes)
                    mask[p >> 3] |= 1 << (p & 7)
        if by_level:
            levels = self._levels
            want = self._want
            for b, mask in by_level.items():
                bits = int.from_bytes(mask, "little")
                want |= bits
                while len(levels) <= b:
                    levels.append(0)
                levels[b] |= bits
            self._want = want

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
        if key in self._nb:
            return
        nb = self._nb[key] = Neighbour(key)
        self._ready = None
        if seed:
            self._seed = key
            self._seed_nb = nb

    @property
    def seed(self) -> K | None:
        return self._seed

    def neighbours(self) -> Iterator[K]:
        return iter(self._nb)

    def remote(self, key: K) -> Bitmap | None:
        """A copy of the picker's view of the bitfield of C{key} (None before it came)."""
        nb = self._nb.get(key)
        bits = None if nb is None else nb.bits
        if bits is None:
            return None
        out = Bitmap(self.count)
        by_prio = self._by_prio
        while bits:
            low = bits & -bits
            out.set(by_prio[low.bit_length() - 1])
            bits ^= low
        return out

    def holds(self, key: K, index: int) -> bool:
        """Whether C{key} is believed to hold C{index} (False before its bitfield)."""
        nb = self._nb.get(key)
        bits = None if nb is None else nb.bits
        return bits is not None and 0 <= index < self.count and bits >> self.prio[index] & 1 == 1

    def outstanding(self, key: K) -> dict[int, float]:
        """The requests out to C{key}: piece -> time asked."""
        nb = self._nb.get(key)
        return {} if nb is None else nb.out

    @property
    def in_flight(self) -> int:
        """Requests out to neighbours other than the seed."""
        return self._in_flight

    def bitfield(self, key: K, bitmap: Bitmap) -> None:
        """The bitfield of C{key} arrived (copied)."""
        nb = self._nb.get(key)
        if nb is None or nb.bits is not None:
            return
        prio = self.prio
        bits = 0
        counted = nb is not self._seed_nb
        for i in bitmap:
            bits |= 1 << prio[i]
            if counted:
                self._bump(i, 1)
        nb.bits = bits
        self._ready = None

    def have(self, key: K, index: int) -> None:
        """C{key} announced C{index} (HAVE)."""
        nb = self._nb.get(key)
        if nb is not None:
            self._have(nb, index)

    def record(self, key: K) -> Neighbour[K] | None:
        """
        The record of C{key} (None: not attached), for a caller that keeps
        one per neighbour (L{heard}); it is of no use after L{remove}.
        """
        return self._nb.get(key)

    def heard(self, nb: Neighbour[K], index: int, now: float, per_conn: int, limit: int) -> bool:
        """
        L{have} and then L{offer} of C{index} from the neighbour of the record
        C{nb} (L{record}), in one call and without looking the neighbour up:
        the simulator's HAVE (at thousands of pickers the lookup is a cache miss).
        """
        self._have(nb, index)
        return self._offer(nb, index, now, per_conn, limit)

    def _have(self, nb: Neighbour[K], index: int) -> None:
        remote = nb.bits
        if remote is None:
            return
        if not 0 <= index < self.count:
            raise IndexError(f"piece index {index} is outside 0..{self.count - 1}")
        bit = 1 << self.prio[index]
        bits = remote | bit
        if bits == remote:
            return  # held already
        nb.bits = bits
        if nb is not self._seed_nb:
            # _bump(index, 1), inline: HAVEs are the most frequent call
            avail = self.avail
            a = avail[index]
            avail[index] = a + 1
            if self._in_want[index]:
                levels = self._levels
                levels[a if a > 0 else 0] ^= bit
                if a + 1 >= len(levels):
                    levels.append(0)
                levels[a + 1 if a >= 0 else 0] |= bit

    def lost(self, key: K, index: int) -> None:
        """C{key} does not hold C{index} after all (it rejected it, or sent bad bytes): believe it less."""
        nb = self._nb.get(key)
        if nb is None or nb.bits is None or nb is self._seed_nb or not 0 <= index < self.count:
            return
        remote = nb.bits
        bit = 1 << self.prio[index]
        if not remote & bit:
            return
        nb.bits = remote ^ bit
        self._bump(index, -1)

    def remove(self, key: K) -> list[int]:
        """C{key} left: forget its bitfield; the pieces that were out to it (no longer pending there)."""
        nb = self._nb.pop(key, None)
        if nb is None:
            return []
        remote = nb.bits
        self._ready = None
        out = nb.out
        if nb is self._seed_nb:
            self._seed = None
            self._seed_nb = None
        else:
            self._in_flight -= len(out)
            by_prio = self._by_prio
            while remote:
                low = remote & -remote
                self._bump(by_prio[low.bit_length() - 1], -1)
                remote ^= low
        lost = list(out)
        for i in lost:
            self._unpend(i, key)
        return lost

    # -- requests ----------------------------------------------------------------------

    def request(self, key: K, index: int, now: float) -> None:
        """Record that C{index} was asked from C{key} (L{fill} does this itself)."""
        self._request(self._nb[key], index, now)

    def _request(self, nb: Neighbour[K], index: int, now: float) -> None:
        out = nb.out
        if index in out:
            return
        out[index] = now
        if now < nb.oldest:
            nb.oldest = now
        if now > nb.newest:
            nb.newest = now
        key = nb.key
        if nb is not self._seed_nb:
            self._in_flight += 1
        holders = self.pending.get(index)
        if holders is None:
            self.pending[index] = [(key, now)]
            if self._in_want[index]:
                # no longer wanted (asked for)
                self._in_want[index] = False
                bit = 1 << self.prio[index]
                self._want ^= bit
                self._levels[max(0, self.avail[index])] ^= bit
        else:
            holders.append((key, now))

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
        nbs = self._nb
        nb = nbs.get(key)
        if now is not None and size is not None and nb is not None:
            asked = nb.out.get(index)
            if asked is not None:
                self._measure(nb, now, asked, size)
        holders = self.pending.pop(index, [])
        others = []
        seed = self._seed_nb
        for k, _ in holders:
            other = nbs.get(k)
            if other is not None and other.take(index) and other is not seed:
                self._in_flight -= 1
            if k != key:
                others.append(k)
        # a piece not pending here (answered after its request was dropped)
        if nb is not None and nb.take(index) and nb is not seed:
            self._in_flight -= 1
        self._refresh(index)
        return others

    def verify(self, index: int) -> bool:
        """
        C{index} is to be checked: False when it need not be (held, or being
        checked already: a duplicate from the endgame, or too late).
        """
        if index in self.verifying or not self._known[index] or index in self.have_bits:
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
        nb = self._nb.get(key)
        if nb is not None:
            nb.measured = False
            nb.rate = nb.sent = nb.busy = nb.largest = 0.0
            nb.last_done = -math.inf
        self.unverified(index)
        self.lost(key, index)

    # -- choosing ------------------------------------------------------------------------

    def choose(self, key: K, now: float) -> int | None:
        """The piece to ask from C{key} next, or None (not recorded: see L{request})."""
        nb = self._nb.get(key)
        if nb is None:
            return None
        return self._choose(nb, now)

    def _choose(self, nb: Neighbour[K], now: float) -> int | None:
        remote = nb.bits
        if remote is None:
            return None
        if nb is self._seed_nb:
            return self._choose_seed(remote)
        if self.stream_from is not None:
            best = self._in_window(remote, range(self._window_start(), self._window_end()))
            if best is not None:
                return best
        cand = remote & self._want
        if cand:
            # every wanted piece it holds has an availability of 1 or more
            # (by index: a slice would copy the list and touch every level's int)
            levels = self._levels
            for b in range(1, len(levels)):
                m = levels[b] & cand
                if m:
                    return self._by_prio[(m & -m).bit_length() - 1]
        return self._endgame(nb.key, remote, now)

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
        snb = self._seed_nb
        if seed is not None and snb is not None and snb.bits is not None and (usable is None or usable(seed)):
            out = snb.out
            while len(out) < max(per_conn, len(self.seed_allowed)):
                index = self._choose(snb, now)
                if index is None:
                    break
                self._request(snb, index, now)
                asked.append((seed, index))
        if usable is None and piece_bytes is not None and piece_bytes > 0:
            # the rate rules only read the list: the one kept between changes of the neighbours
            ready = self._ready
            if ready is None:
                ready = self._ready = [nb for nb in self._nb.values() if nb is not snb and nb.bits is not None]
            self._fill_by_rate(now, per_conn, limit, ready, piece_bytes, asked)
            return asked
        nbs = [
            nb for nb in self._nb.values()
            if nb is not snb and nb.bits is not None and (usable is None or usable(nb.key))
        ]
        if piece_bytes is None or piece_bytes <= 0:
            self.rng.shuffle(nbs)
            nbs = [nb for nb in nbs if len(nb.out) < per_conn]
            progress = True
            while progress and self._in_flight < limit:
                progress = False
                # one request per neighbour per round spreads the load
                for nb in nbs:
                    if self._in_flight >= limit or len(nb.out) >= per_conn:
                        continue
                    index = self._choose(nb, now)
                    if index is None:
                        continue
                    self._request(nb, index, now)
                    asked.append((nb.key, index))
                    progress = True
            return asked
        self._fill_by_rate(now, per_conn, limit, nbs, piece_bytes, asked)
        return asked

    def rate(self, key: K, now: float | None = None, piece_bytes: int | None = None) -> float | None:
        """
        The delivery rate of C{key} in bytes/s (None before its first piece).
        With C{now}: no more than its oldest request out shows (nothing of it
        came for t seconds: at most a piece per t), which also gives a rate
        to a neighbour not measured yet when C{piece_bytes} is known.
        """
        nb = self._nb.get(key)
        if nb is None:
            return None
        return self._rate_of(nb, now, piece_bytes)

    def _rate_of(self, nb: Neighbour[K], now: float | None, piece_bytes: int | None) -> float | None:
        rate = nb.rate if nb.measured else None
        if now is None or not nb.out:
            return rate
        piece = piece_bytes if piece_bytes else (nb.largest if nb.measured else None)
        waited = now - max(nb.oldest, nb.last_done)
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
        self, now: float, per_conn: int, limit: int, ready: list[Neighbour[K]], piece_bytes: int,
        asked: list[tuple[K, int]],
    ) -> None:
        # rate(), budget() and the speeds, inline: this runs on every piece and HAVE.  Each
        # neighbour's budget and speed go on its record (C{cap}, C{speed}), stamped with this fill
        self._fills += 1
        stamp = self._fills
        latency = self.target_latency
        # those with a free slot under their budget (max(per_conn, rate x latency / piece), at most limit)
        free: list[Neighbour[K]] = []
        unknown: list[Neighbour[K]] = []
        prior = 0.0
        top = limit if limit > per_conn else per_conn
        n = 0
        for nb in ready:
            o = len(nb.out)
            known = nb.measured
            r = nb.rate
            if not known:
                cap = per_conn
            else:
                c = int(r * latency / piece_bytes)
                cap = top if c >= limit else (c if c > per_conn else per_conn)
            if o < cap:
                nb.cap = cap
                nb.place = n
                free.append(nb)
            n += 1
            nb.stamp = stamp
            if o:
                # no faster than its oldest request out shows
                waited = now - max(nb.oldest, nb.last_done)
                if waited > 0:
                    c2 = piece_bytes / waited
                    if not known or c2 < r:
                        r = c2
                        known = True
            if known and r > 0:
                nb.speed = r
                if r > prior:
                    prior = r
            else:
                unknown.append(nb)
        if self.max_grow > 1:
            # bandwidth-delay for the whole download: what the neighbours deliver x target latency
            total = sum(nb.rate for nb in ready if nb.measured)
            limit = max(limit, min(int(self.max_grow * limit), int(total * latency / piece_bytes)))
        # unmeasured neighbours count as the fastest known
        if unknown:
            if prior <= 0:
                prior = 1.0
            for nb in unknown:
                nb.speed = prior
        idle: list[Neighbour[K]]
        if self._in_flight < limit:
            # earliest finish first: (requests out + 1) x piece / rate (ties: the order they attached)
            for nb in free:
                nb.finish = (len(nb.out) + 1) / nb.speed
            heap = free
            _heapify(heap)
            idle = []
            # no endgame this call: a neighbour holding no wanted piece has nothing (choose's answer, cheaper)
            quick = self.missing > self.endgame_pieces
            while heap and self._in_flight < limit:
                nb = _heappop(heap)
                if quick and not nb.bits & self._want:  # type: ignore[operator]
                    idle.append(nb)
                    continue
                index = self._choose(nb, now)
                if index is None:
                    idle.append(nb)
                    continue
                self._request(nb, index, now)
                asked.append((nb.key, index))
                o = len(nb.out)
                if o < nb.cap:
                    nb.finish = (o + 1) / nb.speed
                    _heappush(heap, nb)
            idle.extend(heap)
        else:
            idle = free
        # rescues: a neighbour with a slot and nothing new to give takes over a slow one's piece
        if not idle or not self.pending or self._in_flight >= 2 * limit:
            return
        # only a measured one may rescue, and only a piece later than its threshold
        factor = self.rescue_factor
        rescuers = [nb for nb in idle if nb.measured]
        if not rescuers:
            return
        # (the same expression as each threshold below: pieces at or under it are never taken)
        lowest = math.inf
        for nb in rescuers:
            t = factor * (len(nb.out) + 1) * piece_bytes / nb.speed
            if t < lowest:
                lowest = t
        late = self._late(now, stamp, piece_bytes, lowest)
        if not late:
            return
        # the fastest first (stable: ties in the order of idle)
        rescuers.sort(key=_speed, reverse=True)
        prio = self.prio
        for nb in rescuers:
            bits = nb.bits
            if bits is None:
                continue
            out = nb.out
            while late and self._in_flight < 2 * limit and len(out) < nb.cap:
                threshold = self.rescue_factor * (len(out) + 1) * piece_bytes / nb.speed
                pick = None
                for j, (left, i, other) in enumerate(late):
                    if left <= threshold:
                        break  # latest first: none further on is late enough either
                    if other is not nb and bits >> prio[i] & 1:
                        pick = j
                        break
                if pick is None:
                    break
                _, i, _ = late.pop(pick)
                self._request(nb, i, now)
                asked.append((nb.key, i))

    def _speed_for(self, nb: Neighbour[K], now: float, stamp: int, piece_bytes: int) -> float | None:
        """C{nb}'s speed of the fill C{stamp} when it has one, else its L{rate} (then kept for it)."""
        if nb.stamp == stamp:
            return nb.speed
        rate = self._rate_of(nb, now, piece_bytes)
        if rate is not None:
            nb.speed = rate
            nb.stamp = stamp
        return rate

    def _late(
        self, now: float, stamp: int, piece_bytes: int, over: float = -math.inf,
    ) -> list[tuple[float, int, Neighbour[K]]]:
        """
        The pieces out at one non-seed neighbour: (seconds until it is
        expected to finish them, piece, it), latest first; only those expected
        more than C{over} seconds from now.  A neighbour's speed is the one of
        the fill C{stamp} when it has one, else its L{rate} (then kept for it).
        """
        late: list[tuple[float, int, Neighbour[K]]] = []
        seed = self._seed_nb
        nbs = self._nb
        # first a bound per neighbour, from the records alone: its whole queue after its latest
        # request (no piece of it is expected later, the sums below being no larger); most
        # calls end here, without reading every pending piece's holders
        for other in nbs.values():
            out = other.out
            if not out or other is seed:
                continue
            r = self._speed_for(other, now, stamp, piece_bytes)
            if r is None:
                continue
            if r <= 0 or max(other.newest, other.last_done) + len(out) * piece_bytes / r - now > over:
                break
        else:
            return late
        verifying = self.verifying
        for i, holders in self.pending.items():
            if len(holders) != 1 or i in verifying:
                continue
            key, asked_at = holders[0]
            other = nbs[key]
            if other is seed:
                continue
            r = self._speed_for(other, now, stamp, piece_bytes)
            if r is None:
                continue
            # when the other is expected to finish it: its queue up to it, at its rate
            out = other.out
            start = max(asked_at, other.last_done)
            if start + len(out) * piece_bytes / r - now <= over:
                continue  # not even with all its queue ahead of it (the count below is no more)
            ahead = 0
            for t in out.values():
                if t <= asked_at:
                    ahead += 1
            left = start + ahead * piece_bytes / r - now
            if left > 0 and left > over:
                late.append((left, i, other))
        late.sort(key=_first, reverse=True)  # (stable, as a sort by -left)
        return late

    def _measure(self, nb: Neighbour[K], now: float, asked: float, size: int) -> None:
        start = max(asked, nb.last_done)
        nb.last_done = now
        busy = now - start
        if busy <= 0:
            busy = 1e-6
        if not nb.measured:
            nb.measured = True
            nb.sent = float(size)
            nb.busy = busy
            nb.largest = float(size)
        else:
            d = self.rate_decay
            nb.sent = nb.sent * d + size
            nb.busy = nb.busy * d + busy
            nb.largest = max(nb.largest, float(size))
        nb.rate = nb.sent / nb.busy

    def offer(self, key: K, index: int, now: float, per_conn: int, limit: int) -> bool:
        """
        After C{key}'s HAVE of C{index}: ask it for that piece right away if
        it is wanted and within the limits (only this neighbour's choice can
        change, and a piece just announced is among the rarest anyway).
        Recorded as pending when True.
        """
        if self._in_flight >= limit:
            return False
        nb = self._nb.get(key)
        return nb is not None and self._offer(nb, index, now, per_conn, limit)

    def _offer(self, nb: Neighbour[K], index: int, now: float, per_conn: int, limit: int) -> bool:
        if (
            self._in_flight >= limit or nb is self._seed_nb or len(nb.out) >= per_conn or not self._in_want[index]
            or not self.wanted(index)
        ):
            return False
        self._request(nb, index, now)
        return True

    def starving(self) -> bool:
        """Nothing to fetch from any neighbour but the seed."""
        if self.have_bits.complete:
            return False
        seed = self._seed_nb
        if self._in_flight and any(nb.out for nb in self._nb.values() if nb is not seed and nb.bits is not None):
            return False
        # every wanted piece a non-seed neighbour holds has an availability of 1 or more
        return not self._want & ~self._levels[0]

    # -- internals -------------------------------------------------------------------------

    def _window_start(self) -> int:
        return self.stream_from if self.stream_from is not None else 0

    def _window_end(self) -> int:
        if self.stream_from is None:
            return 0
        return min(self.count, max(0, self.stream_from + self.stream_window))

    def _in_window(self, remote: int, candidates: Iterable[int]) -> int | None:
        """
        The rarest wanted piece of C{candidates} C{remote} holds, ties in
        order: a neighbour that holds the whole window sends it in the order
        the reader takes it, so the stream is not left waiting for one piece
        while later ones are held.
        """
        best: int | None = None
        best_key: tuple[int, int] | None = None
        prio = self.prio
        for i in candidates:
            if i < 0 or not remote >> prio[i] & 1 or not self.wanted(i):
                continue
            k = (self.avail[i], i)
            if best_key is None or k < best_key:
                best, best_key = i, k
        return best

    def _far(self, index: int) -> bool:
        s = self.stream_from
        return s is None or not s <= index < s + self.stream_window

    def _choose_seed(self, remote: int) -> int | None:
        best: int | None = None
        best_key: tuple[bool, int, int] | None = None
        prio = self.prio
        # (the wanted bits first: most of the allowance is usually held or asked for already)
        in_want = self._in_want
        for i in self.seed_allowed:
            if not 0 <= i < self.count or not in_want[i] or not remote >> prio[i] & 1 or not self.wanted(i):
                continue
            k = (self._far(i), self.avail[i], prio[i])
            if best_key is None or k < best_key:
                best, best_key = i, k
        return best

    def _endgame(self, key: K, remote: int, now: float) -> int | None:
        """Only the last few pieces, all already asked for: a second holder for one out a while."""
        missing = self.missing
        if missing > self.endgame_pieces or missing > len(self.pending) + len(self.verifying):
            return None
        prio = self.prio
        for i, holders in self.pending.items():
            if (
                len(holders) == 1 and holders[0][0] != key and remote >> prio[i] & 1 and i not in self.verifying
                and now - holders[0][1] >= self.endgame_after
            ):
                return i
        return None

    def _drop(self, key: K, index: int) -> None:
        nb = self._nb.get(key)
        if nb is not None and nb.take(index) and nb is not self._seed_nb:
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
        a = self.avail[index]
        self.avail[index] = a + delta
        if self._in_want[index]:
            bit = 1 << self.prio[index]
            levels = self._levels
            levels[max(0, a)] ^= bit
            b = max(0, a + delta)
            while len(levels) <= b:
                levels.append(0)
            levels[b] |= bit

    def _refresh(self, index: int) -> None:
        inside = self._in_want[index]
        if self.wanted(index):
            if not inside:
                self._in_want[index] = True
                bit = 1 << self.prio[index]
                self._want |= bit
                b = max(0, self.avail[index])
                levels = self._levels
                while len(levels) <= b:
                    levels.append(0)
                levels[b] |= bit
        elif inside:
            self._in_want[index] = False
            bit = 1 << self.prio[index]
            self._want ^= bit
            self._levels[max(0, self.avail[index])] ^= bit

    def buckets(self) -> dict[int, set[int]]:
        """The wanted pieces by availability (for tests and the simulator's views)."""
        out: dict[int, set[int]] = {}
        by_prio = self._by_prio
        for b, bits in enumerate(self._levels):
            items = set()
            while bits:
                low = bits & -bits
                items.add(by_prio[low.bit_length() - 1])
                bits ^= low
            if items:
                out[b] = items
        return out

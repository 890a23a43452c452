"""
The scheduler: who fetches which pieces from whom.

A pure module: no sockets, no reactor.  Every call takes C{now} (seconds), so
tests drive it with a fake clock and a simulator can drive thousands of peers.

The SuperNode is not in the per-piece path.  Each peer calls L{Scheduler.sync}
every half second or so with the pieces it finished and the failures it saw
since its last call, and gets back:

  - a few I{parents}: other peers of the task to connect to.  Connections are
    symmetric, so a peer also serves the peers that picked it.  Peers then learn
    exactly what each neighbour holds from bitfield/have frames and choose
    pieces rarest-first themselves;
  - its I{seed allowance}: the pieces it may fetch from the SuperNode's seed.
    The seed hands out each piece once before it hands out any piece twice
    (super-seeding), and never a piece that one of the peer's parents holds or
    is already fetching from the seed, so the origin's copy spreads through
    the swarm instead of being sent again and again by the seed.

Failures are local first (the peer re-requests elsewhere at once); the
scheduler counts them per pair of peers and blocks a bad parent for a while.

A sync costs the same in a swarm of ten peers or ten thousand: the swarm keeps
incremental indexes (the children of each parent, the number of peers still
downloading, a bit set of the pieces with no copy out at all, each member's
pieces as an integer bit set, the outstanding allowances by expiry), parents
are topped up from a random sample of the members, and a sync returns early
when the seed has nothing the peer could take.  Bit sets are Python integers
in the wire order of L{Bitmap} (piece 0 is the most significant bit of
C{width} bits), so one is made from a bitmap's bytes in one call.
"""

from __future__ import annotations

import heapq
import os
import random
from collections.abc import Iterable, Iterator
from itertools import count as _counter

from attrs import define, field
from twisted.logger import Logger, LogLevel

from ..core.bitmap import Bitmap
from ..core.ids import SEED_ID as SEED_ID  # re-exported for the SuperNode and its tap
from ..core.logs import task_log

log = Logger()

#: why a peer left the scheduler: it said so, it missed its heartbeats, or
#: other peers could not reach it
DROP_REASONS = ("left", "expired", "unreachable")
#: the highest piece index kept from a report made before the length is known
MAX_EARLY = 1 << 22


@define
class PeerInfo:
    """A registered dfpeer: where other peers reach its block port."""

    peer_id: str
    ip: str
    port: int
    hostname: str = ""
    last_seen: float = 0.0


@define
class Assignment:
    """A piece a peer may fetch from the seed, until C{expires}."""

    index: int
    expires: float


@define
class Member:
    """One peer's part in one task."""

    peer_id: str
    parents: list[str] = field(factory=list)
    seed: dict[int, Assignment] = field(factory=dict)
    last_sync: float = 0.0
    joined: float = 0.0
    done: bool = False
    # failures this peer saw, by parent id
    failures: dict[str, int] = field(factory=dict)
    # parent id -> blocked until
    blocked: dict[str, float] = field(factory=dict)
    # the pieces it holds as a bit set (see the module docstring)
    have_bits: int = 0
    # pieces reported while the task's length was unknown (a SuperNode
    # restarted before its CDN knew the length again): taken once it is
    early: set[int] = field(factory=set)
    # the task's pieces (None while its length is unknown: no bitmap yet)
    count: int | None = None
    # registered, its file not made yet (it refuses block connections for
    # the task): named to nobody as a parent until a sync says it is ready
    preparing: bool = False
    # the last L{have} made, and the bit set it was made from
    _view: Bitmap | None = field(default=None, init=False, repr=False, eq=False)
    _view_of: int = field(default=-1, init=False, repr=False, eq=False)

    @property
    def have(self) -> Bitmap | None:
        """
        The pieces it holds as a L{Bitmap} (None while the length is not
        known), made from C{have_bits} when read: a view, not to be changed.
        """
        if self.count is None:
            return None
        if self._view is None or self._view_of is not self.have_bits:
            self._view = Bitmap.from_bytes(self.count, self.have_bits.to_bytes((self.count + 7) >> 3, "big"))
            self._view_of = self.have_bits
        return self._view


@define
class TaskSwarm:
    """What the scheduler knows of one task's swarm."""

    task_id: str
    piece_count: int | None = None
    # pieces the seed can serve (the CDN has them verified)
    seed_has: Bitmap | None = None
    members: dict[str, Member] = field(factory=dict)
    # copies of each piece the seed has handed out so far
    seed_sends: list[int] = field(factory=list)
    # holders per piece, kept in step with the members' bit sets, as bit
    # slices: bit i of planes[k] is bit k of piece i's count of holders, so a
    # member's report adds its new pieces' bit set in a few big-int
    # operations (a ripple carry) whatever the number of pieces
    planes: list[int] = field(factory=list)
    # seed allowances outstanding over all members
    seed_out: int = 0
    # when a peer last registered, reported or synced for this task
    last_touch: float = 0.0
    # -- incremental indexes (kept in step by the Scheduler) --
    # bits of a piece bit set: 8 * ceil(piece_count / 8)
    width: int = 0
    # pieces with no copy out (seed_sends + holders == 0), as a bit set
    fresh: int = 0
    # members that are not done
    downloading: int = 0
    # parent id -> the members that have it among their parents
    children: dict[str, set[str]] = field(factory=dict)
    # the member ids in a list (for sampling) and each one's place in it
    order: list[str] = field(factory=list)
    slot: dict[str, int] = field(factory=dict)
    # (expires, n, peer id, assignment) for every allowance handed out; an
    # entry whose allowance was reported or withdrawn since is skipped
    expiries: list[tuple[float, int, str, Assignment]] = field(factory=list)
    # C{seed_has} as a bit set, and the bitmap and its length it was made from
    seed_bits: int = 0
    _seed_of: Bitmap | None = field(default=None, repr=False, eq=False)
    _seed_len: int = field(default=-1, repr=False, eq=False)

    @property
    def holders(self) -> list[int]:
        """Holders per piece (a recount from C{planes}: for views and tests)."""
        out = [0] * (self.piece_count or 0)
        for k, plane in enumerate(self.planes):
            for i in self.indices(plane):
                out[i] += 1 << k
        return out

    def holder_count(self, index: int) -> int:
        """The members holding piece C{index}."""
        shift = self.width - 1 - index
        return sum(((plane >> shift) & 1) << k for k, plane in enumerate(self.planes))

    def has_holder(self, index: int) -> bool:
        """Some member holds piece C{index}."""
        shift = self.width - 1 - index
        return any((plane >> shift) & 1 for plane in self.planes)

    def held(self) -> int:
        """The pieces some member holds, as a bit set."""
        out = 0
        for plane in self.planes:
            out |= plane
        return out

    def add_holders(self, bits: int) -> None:
        """One more holder of each piece of C{bits}."""
        planes = self.planes
        k = 0
        while bits:
            if k == len(planes):
                planes.append(bits)
                return
            plane = planes[k]
            planes[k] = plane ^ bits
            bits &= plane  # the carry
            k += 1

    def drop_holders(self, bits: int) -> None:
        """One holder fewer of each piece of C{bits} (each has one at least)."""
        planes = self.planes
        k = 0
        while bits:
            plane = planes[k]
            planes[k] = plane ^ bits
            bits &= ~plane  # the borrow
            k += 1
        while planes and not planes[-1]:
            planes.pop()

    def seed_bit_set(self) -> int:
        """C{seed_has} as a bit set (0 without it); the seed only gains pieces (or a new bitmap)."""
        seed_has = self.seed_has
        if seed_has is None:
            return 0
        if self._seed_of is not seed_has or self._seed_len != len(seed_has):
            self.seed_bits = self.bits_of(seed_has)
            self._seed_of = seed_has
            self._seed_len = len(seed_has)
        return self.seed_bits

    def bits_from(self, indices: Iterable[int]) -> int:
        """The pieces C{indices} as a bit set (those out of range left out)."""
        count = self.piece_count or 0
        buf = bytearray(self.width >> 3)
        for i in indices:
            if 0 <= i < count:
                buf[i >> 3] |= 0x80 >> (i & 7)
        return int.from_bytes(buf, "big")

    def bit(self, index: int) -> int:
        """The bit of piece C{index} in this swarm's bit sets."""
        return 1 << (self.width - 1 - index)

    def bits_of(self, bitmap: Bitmap) -> int:
        """C{bitmap} as a bit set."""
        return int.from_bytes(bitmap.to_bytes(), "big")

    def indices(self, bits: int) -> Iterator[int]:
        """The pieces of bit set C{bits}, in ascending order."""
        width = self.width
        while bits:
            top = bits.bit_length()
            yield width - top
            bits ^= 1 << (top - 1)


@define(frozen=True)
class Decision:
    """The answer to one L{Scheduler.sync}."""

    parents: list[PeerInfo]
    seed_pieces: list[int]


class UnknownPeer(KeyError):
    """The peer id is not registered (it should register again)."""


class UnknownTask(KeyError):
    """The task id is not known to the scheduler."""


@define
class Scheduler:
    """
    Soft state of every swarm.

    @ivar max_parents: parents handed to each peer.
    @ivar seed_window: seed pieces a peer may have outstanding at once.  In a
        swarm of a few peers the seed's slots would sit idle, so a peer may
        have up to C{small_window} out there (see L{_window}).
    @ivar small_window: the largest seed window in a small swarm (1: none larger).
    @ivar seed_slots: seed pieces outstanding over the whole swarm: few, so
        each one arrives quickly and spreads, instead of all crawling at once.
    @ivar assign_ttl: seconds after which an unreported seed allowance lapses.
    @ivar block_after: failures from one parent before it is blocked.
    @ivar block_for: seconds a bad parent stays blocked for one child.
    @ivar peer_ttl: seconds without a call before a peer is dropped.
    @ivar dead_after: peers reporting a broken connection to a peer before it
        is dropped at once.
    @ivar parent_sample: members looked at when a peer's parents are topped
        up: all of them in a swarm this small, else a random sample of this
        many (a sync must not cost more in a larger swarm).
    @ivar fill_degree: a peer that fewer than C{max_parents} peers chose as
        a parent is given that many more parents, so that its neighbours
        (parents and children) number about 2 x C{max_parents} like the
        others' (the last peers of a flash crowd are chosen by almost
        nobody: parents are kept); those extra parents are the sampled
        members with the fewest children, once it has been a member for
        C{fill_after} seconds.  Off by default (tried in the simulator).
    """

    max_parents: int = 8
    seed_window: int = 1
    small_window: int = 4
    seed_slots: int = 16
    assign_ttl: float = 10.0
    block_after: int = 2
    block_for: float = 30.0
    peer_ttl: float = 60.0
    dead_after: int = 2
    parent_sample: int = 32
    fill_degree: bool = False
    fill_after: float = 1.0
    #: name no preparing member as a parent (see L{Member.preparing}); DRAGONFLY_NAME_PREPARING=1: as before (A/B rounds)
    skip_preparing: bool = os.environ.get("DRAGONFLY_NAME_PREPARING") != "1"
    rng: random.Random = field(factory=random.Random)
    peers: dict[str, PeerInfo] = field(factory=dict)
    tasks: dict[str, TaskSwarm] = field(factory=dict)
    # peer id -> the peers that reported its connection failing
    unreachable: dict[str, set[str]] = field(factory=dict)
    # totals for /metrics: parents blocked for a child, peers dropped by reason
    blocks: int = 0
    drops: dict[str, int] = field(factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    # orders the allowances of one expiry time in the swarms' heaps
    _seq: Iterator[int] = field(factory=_counter, init=False, repr=False, eq=False)

    # -- peers -------------------------------------------------------------

    def register_peer(self, info: PeerInfo, now: float) -> None:
        """Add or refresh a peer (a re-registration after a restart keeps its tasks)."""
        info.last_seen = now
        self.unreachable.pop(info.peer_id, None)
        self.peers[info.peer_id] = info

    def touch(self, peer_id: str, now: float) -> None:
        """A heartbeat: the peer is alive."""
        peer = self.peers.get(peer_id)
        if peer is None:
            raise UnknownPeer(peer_id)
        peer.last_seen = now

    def remove_peer(self, peer_id: str, reason: str = "left") -> None:
        """The peer left (or died): forget it everywhere."""
        if self.peers.pop(peer_id, None) is not None:
            self.drops[reason] = self.drops.get(reason, 0) + 1
            log.emit(
                LogLevel.info if reason == "left" else LogLevel.warn,
                "peer {peerId} dropped: {reason}", peerId=peer_id, reason=reason,
            )
        self.unreachable.pop(peer_id, None)
        for swarm in self.tasks.values():
            self._drop_member(swarm, peer_id)

    def expire(self, now: float) -> list[str]:
        """Drop peers not heard from within C{peer_ttl}; return their ids."""
        dead = [p.peer_id for p in self.peers.values() if now - p.last_seen > self.peer_ttl]
        for peer_id in dead:
            self.remove_peer(peer_id, "expired")
        return dead

    # -- tasks -------------------------------------------------------------

    def task(self, task_id: str) -> TaskSwarm:
        """The swarm of C{task_id}, made on first use."""
        swarm = self.tasks.get(task_id)
        if swarm is None:
            swarm = self.tasks[task_id] = TaskSwarm(task_id)
        return swarm

    def forget_task(self, task_id: str) -> None:
        self.tasks.pop(task_id, None)

    def expire_tasks(self, now: float, ttl: float) -> list[str]:
        """
        Drop the swarms no peer has registered, reported or synced for within
        C{ttl} seconds (a downloading peer syncs twice a second, so only idle
        swarms go); return their ids.  The CDN's cached file is not touched.
        """
        idle = [t.task_id for t in self.tasks.values() if now - t.last_touch > ttl]
        for task_id in idle:
            del self.tasks[task_id]
        return idle

    def set_piece_count(self, task_id: str, count: int) -> None:
        """The CDN learnt the task's length: size every bitmap."""
        swarm = self.task(task_id)
        if swarm.piece_count == count:
            return
        swarm.piece_count = count
        swarm.seed_has = Bitmap(count)
        swarm.seed_sends = [0] * count
        swarm.planes = []
        swarm.width = 8 * ((count + 7) >> 3)
        swarm.fresh = ((1 << count) - 1) << (swarm.width - count)
        for member in swarm.members.values():
            member.count = count
            member.have_bits = 0
            member.seed.clear()
        swarm.seed_out = 0
        swarm.expiries.clear()
        for member in swarm.members.values():
            early, member.early = member.early, set()
            self._take_bits(swarm, member, swarm.bits_from(early))

    def seed_piece_ready(self, task_id: str, index: int) -> None:
        """The CDN verified piece C{index}: the seed can serve it."""
        swarm = self.task(task_id)
        if swarm.seed_has is not None:
            swarm.seed_has.set(index)

    def seed_lost(self, task_id: str) -> None:
        """The CDN task failed (its data is gone): the seed serves nothing until pieces are ready again."""
        swarm = self.tasks.get(task_id)
        if swarm is None or swarm.seed_has is None:
            return
        swarm.seed_has = Bitmap(swarm.seed_has.count)
        for member in swarm.members.values():
            for index in member.seed:
                self._add_sends(swarm, index, -1)
            member.seed.clear()
        swarm.seed_out = 0
        swarm.expiries.clear()

    def join(self, task_id: str, peer_id: str, now: float, preparing: bool = False) -> Member:
        """
        Peer C{peer_id} takes part in C{task_id}; C{preparing}: it has just
        registered and cannot serve the task yet (see L{Member.preparing}).
        """
        if peer_id not in self.peers:
            raise UnknownPeer(peer_id)
        swarm = self.task(task_id)
        swarm.last_touch = now
        member = swarm.members.get(peer_id)
        if member is None:
            member = swarm.members[peer_id] = Member(peer_id, joined=now)
            swarm.slot[peer_id] = len(swarm.order)
            swarm.order.append(peer_id)
            swarm.downloading += 1
            task_log(log, LogLevel.info, task_id, "peer {peerId} joined ({peers} peers)", peerId=peer_id, peers=len(swarm.members))
            member.count = swarm.piece_count
        member.last_sync = now
        if preparing:
            member.preparing = True
        return member

    def leave(self, task_id: str, peer_id: str) -> None:
        swarm = self.tasks.get(task_id)
        if swarm is not None:
            self._drop_member(swarm, peer_id)

    def _drop_member(self, swarm: TaskSwarm, peer_id: str) -> None:
        member = swarm.members.pop(peer_id, None)
        if member is None:
            return
        # out of the sampling list: the last id takes its place
        place = swarm.slot.pop(peer_id)
        last = swarm.order.pop()
        if last != peer_id:
            swarm.order[place] = last
            swarm.slot[last] = place
        if not member.done:
            swarm.downloading -= 1
        if member.have_bits:
            swarm.drop_holders(member.have_bits)
            # the pieces nobody holds now: fresh unless the seed has one out
            for i in swarm.indices(member.have_bits & ~swarm.held()):
                self._recheck(swarm, i)
        for a in member.seed.values():
            self._add_sends(swarm, a.index, -1)
        swarm.seed_out -= len(member.seed)
        member.seed.clear()
        for p in member.parents:
            kids = swarm.children.get(p)
            if kids is not None:
                kids.discard(peer_id)
                if not kids:
                    del swarm.children[p]
        for child in swarm.children.pop(peer_id, ()):
            other = swarm.members.get(child)
            if other is not None and peer_id in other.parents:
                other.parents.remove(peer_id)

    # -- index upkeep ------------------------------------------------------------

    def _recheck(self, swarm: TaskSwarm, index: int) -> None:
        """Piece C{index}'s copies changed: keep C{fresh} in step."""
        if swarm.seed_sends[index] == 0 and not swarm.has_holder(index):
            swarm.fresh |= swarm.bit(index)
        else:
            swarm.fresh &= ~swarm.bit(index)

    def _add_sends(self, swarm: TaskSwarm, index: int, delta: int) -> None:
        swarm.seed_sends[index] += delta
        self._recheck(swarm, index)

    def _unparent(self, swarm: TaskSwarm, member: Member, parent: str) -> None:
        """C{parent} is no longer one of C{member}'s parents."""
        if parent in member.parents:
            member.parents.remove(parent)
            kids = swarm.children.get(parent)
            if kids is not None:
                kids.discard(member.peer_id)
                if not kids:
                    del swarm.children[parent]

    def _take_bits(self, swarm: TaskSwarm, member: Member, bits: int, now: float | None = None) -> None:
        """
        C{member} holds the pieces of bit set C{bits} (its length is known):
        a few big-int operations whatever the number of pieces, and a look at
        each of its (few) seed allowances.
        """
        added = bits & ~member.have_bits
        if added:
            member.have_bits |= added
            swarm.add_holders(added)
            # each now has a holder: a copy out (what _recheck would find)
            swarm.fresh &= ~added
            seed = member.seed
            if seed:
                top = swarm.width - 1
                for i in [i for i in seed if added >> (top - i) & 1]:
                    # the allowance became a real copy: seed_sends keeps it
                    del seed[i]
                    swarm.seed_out -= 1
        complete = member.have_bits.bit_count() == member.count
        if complete and not member.done:
            task_log(
                log, LogLevel.info, swarm.task_id, "peer {peerId} holds all {pieces} pieces, {seconds:.2f}s after joining",
                peerId=member.peer_id, pieces=member.count,
                seconds=(now if now is not None else member.last_sync) - member.joined,
            )
        self._set_done(swarm, member, complete)

    def _set_done(self, swarm: TaskSwarm, member: Member, done: bool) -> None:
        if done != member.done:
            swarm.downloading += -1 if done else 1
            member.done = done

    # -- the per-peer call ---------------------------------------------------

    def report(
        self,
        task_id: str,
        peer_id: str,
        now: float,
        have: Iterable[int] = (),
        failed: Iterable[tuple[int, str]] = (),
        bitmap: Bitmap | None = None,
        banned: Iterable[str] = (),
        preparing: bool = False,
    ) -> None:
        """
        Take a peer's batch: pieces it verified (C{have}, or a whole C{bitmap}
        when it re-announces after a restart) and C{(piece, parent id)} failures;
        C{preparing}: it cannot serve the task yet (its file is being made).
        """
        if task_id not in self.tasks:
            raise UnknownTask(task_id)
        swarm = self.tasks[task_id]
        swarm.last_touch = now
        member = swarm.members.get(peer_id)
        if member is None:
            member = self.join(task_id, peer_id, now)
        member.preparing = preparing
        self.peers[peer_id].last_seen = now
        if member.count is None:
            # the length is not known yet (a restarted SuperNode whose CDN has
            # not learnt it again): a peer re-announces what it holds only
            # once, so keep it for set_piece_count
            member.early.update(i for i in have if 0 <= i < MAX_EARLY)
        else:
            bits = swarm.bits_from(have)
            if bitmap is not None and bitmap.count == member.count:
                bits |= swarm.bits_of(bitmap)
            self._take_bits(swarm, member, bits, now)
        for parent in banned:
            # the peer will not talk to it (bad pieces, silence): it must not
            # count as a neighbour that holds pieces for this peer
            if member.blocked.get(parent, 0.0) <= now:
                task_log(log, LogLevel.info, task_id, "peer {peerId} banned {parent}", peerId=peer_id, parent=parent)
            member.blocked[parent] = now + self.block_for
            self._unparent(swarm, member, parent)
        for index, parent in failed:
            if parent == SEED_ID:
                a = member.seed.pop(index, None)
                if a is not None:
                    self._add_sends(swarm, index, -1)
                    swarm.seed_out -= 1
                continue
            if index == -1 and parent in self.peers:
                # the connection failed or broke: when two peers say so the
                # peer is taken for dead, everywhere, at once (it registers
                # again with its next heartbeat if it was not)
                reporters = self.unreachable.setdefault(parent, set())
                reporters.add(peer_id)
                if len(reporters) >= self.dead_after:
                    task_log(
                        log, LogLevel.warn, task_id, "{n} peers cannot reach {parent}; taking it for dead",
                        n=len(reporters), parent=parent, peerId=peer_id,
                    )
                    self.remove_peer(parent, "unreachable")
                    continue
            n = member.failures.get(parent, 0) + 1
            member.failures[parent] = n
            if n >= self.block_after:
                task_log(
                    log, LogLevel.warn, task_id, "blocking parent {parent} for {peerId} for {seconds:.0f}s after {n} failures",
                    parent=parent, peerId=peer_id, seconds=self.block_for, n=n,
                )
                self.blocks += 1
                member.blocked[parent] = now + self.block_for
                member.failures[parent] = 0
                self._unparent(swarm, member, parent)

    #: pieces from C{want} on that go to the seed allowance first
    WANT_WINDOW = 4

    #: at most this many candidate pieces are enumerated and sorted by copies
    #: for a starving peer once every piece has a copy out
    STARVING_SCAN = 64

    def sync(
        self, task_id: str, peer_id: str, now: float, starving: bool = False, want: int | None = None
    ) -> Decision:
        """
        Choose parents and a seed allowance for C{peer_id}.

        @param starving: the peer has nothing to fetch from its neighbours.
            Only a starving peer is given a piece the seed already sent; the
            others get pieces nobody holds yet, so the seed sends each piece
            once and the swarm passes it on.
        @param want: the piece an in-order reader on the peer waits for
            (dfdaemon streaming a blob): it and the next few go first.
        """
        swarm = self.tasks.get(task_id)
        if swarm is None:
            raise UnknownTask(task_id)
        swarm.last_touch = now
        member = swarm.members.get(peer_id) or self.join(task_id, peer_id, now)
        member.last_sync = now
        self._expire_assignments(swarm, member, now)
        parents = self._choose_parents(swarm, member, now)
        seed = self._assign_seed(swarm, member, now, starving, want) if not member.done else []
        return Decision(parents=[self.peers[p] for p in parents], seed_pieces=seed)

    def _expire_assignments(self, swarm: TaskSwarm, member: Member, now: float) -> None:
        """
        Take back every allowance in the swarm whose time is up (a silent
        peer's too: it must not hold pieces or seed slots back), and lift
        C{member}'s blocks that ran out.
        """
        heap = swarm.expiries
        while heap and heap[0][0] <= now:
            _, _, holder, a = heapq.heappop(heap)
            other = swarm.members.get(holder)
            if other is not None and other.seed.get(a.index) is a:
                del other.seed[a.index]
                self._add_sends(swarm, a.index, -1)
                swarm.seed_out -= 1
        if member.blocked:
            for parent, until in list(member.blocked.items()):
                if until <= now:
                    del member.blocked[parent]

    def _choose_parents(self, swarm: TaskSwarm, member: Member, now: float) -> list[str]:
        me = member.peer_id
        want = self.max_parents
        if self.fill_degree and now - member.joined >= self.fill_after:
            # (not at its first syncs: then every peer is chosen by nobody yet)
            kids = swarm.children.get(me)
            want += max(0, self.max_parents - (len(kids) if kids else 0))
        for p in member.parents:
            if p not in swarm.members or p not in self.peers or p in member.blocked:
                break
        else:
            if len(member.parents) >= want:
                return list(member.parents)
        keep = [
            p for p in member.parents
            if p in swarm.members and p in self.peers and p not in member.blocked
        ]
        for p in member.parents:
            if p not in keep:
                self._unparent(swarm, member, p)
        need = want - len(keep)
        if need > 0:
            pool: list[str] = swarm.order
            if len(pool) > self.parent_sample:
                pool = self.rng.sample(pool, self.parent_sample)
            # (not one still preparing: it would refuse the connection)
            candidates = [
                p for p in pool
                if p != me and p not in keep and p not in member.blocked and p in self.peers
                and not (self.skip_preparing and swarm.members[p].preparing)
            ]
            children = swarm.children
            members = swarm.members

            def score(p: str) -> tuple[float, float, float]:
                # more pieces first, then fewer children served, then at random
                pieces = members[p].have_bits.bit_count()
                kids = children.get(p)
                return (-pieces, len(kids) if kids else 0, self.rng.random())

            candidates.sort(key=score)
            # the extra parents of fill_degree: the least chosen first, so
            # they do not all land on the peers with the most pieces
            usual = max(0, self.max_parents - len(keep))
            chosen = candidates[:usual]
            if need > usual:
                rest = candidates[usual:]
                rest.sort(key=lambda p: (len(children.get(p) or ()), self.rng.random()))
                chosen += rest[: need - usual]
            for p in chosen:
                keep.append(p)
                children.setdefault(p, set()).add(me)
        member.parents = keep
        return list(keep)

    def _assign_seed(
        self, swarm: TaskSwarm, member: Member, now: float, starving: bool, want: int | None = None
    ) -> list[int]:
        if member.count is None or swarm.seed_has is None:
            return []
        free = min(self._window(swarm) - len(member.seed), self.seed_slots - swarm.seed_out)
        if free <= 0:
            return sorted(member.seed)
        mine = member.have_bits
        for i in member.seed:
            mine |= swarm.bit(i)
        wanted = 0
        if want is not None:
            for i in range(max(want, 0), min(want + self.WANT_WINDOW, swarm.piece_count or 0)):
                wanted |= swarm.bit(i)
        # pieces the seed has and the peer neither holds nor is fetching
        base = swarm.seed_bit_set() & ~mine
        if not starving:
            base &= swarm.fresh | wanted
        if not base:
            return sorted(member.seed)  # the seed has nothing for it: no need to look further
        # neighbours: the parents we gave it and the peers that chose it
        nearby = 0
        for p in (*member.parents, *swarm.children.get(member.peer_id, ())):
            other = swarm.members.get(p)
            if other is None or p in member.blocked:
                continue
            nearby |= other.have_bits
            for i in other.seed:
                nearby |= swarm.bit(i)
        candidates = base & ~nearby
        chosen: list[int] = []
        if candidates & wanted:
            chosen += self._by_copies(swarm, list(swarm.indices(candidates & wanted)))[:free]
        rest = candidates & ~wanted
        if len(chosen) < free and rest & swarm.fresh:
            chosen += self._at_random(swarm, rest & swarm.fresh, free - len(chosen))
        if len(chosen) < free and starving and rest & ~swarm.fresh:
            chosen += self._by_copies(swarm, self._some(swarm, rest & ~swarm.fresh))[: free - len(chosen)]
        for i in chosen:
            a = member.seed[i] = Assignment(i, now + self.assign_ttl)
            heapq.heappush(swarm.expiries, (a.expires, next(self._seq), member.peer_id, a))
            self._add_sends(swarm, i, 1)
            swarm.seed_out += 1
        return sorted(member.seed)

    def _by_copies(self, swarm: TaskSwarm, pieces: list[int]) -> list[int]:
        """C{pieces}, fewest copies out first, ties at random."""
        return sorted(pieces, key=lambda i: (swarm.seed_sends[i] + swarm.holder_count(i), self.rng.random()))

    def _at_random(self, swarm: TaskSwarm, bits: int, n: int) -> list[int]:
        """
        Up to C{n} pieces of bit set C{bits} at random: uniformly among a few,
        else each the first piece at or after a random place (a bounded cost,
        whatever the number of pieces).
        """
        if bits.bit_count() <= self.STARVING_SCAN:
            pieces = list(swarm.indices(bits))
            return self.rng.sample(pieces, min(n, len(pieces)))
        width = swarm.width
        out: list[int] = []
        while bits and len(out) < n:
            start = self.rng.randrange(swarm.piece_count or 1)
            after = bits & ((1 << (width - start)) - 1)
            i = width - (after or bits).bit_length()
            out.append(i)
            bits &= ~swarm.bit(i)
        return out

    def _some(self, swarm: TaskSwarm, bits: int) -> list[int]:
        """At most C{STARVING_SCAN} pieces of C{bits}, from a random place on."""
        if bits.bit_count() > self.STARVING_SCAN:
            start = self.rng.randrange(swarm.piece_count or 1)
            low = (1 << (swarm.width - start)) - 1
            bits = (bits & low) or bits
        out = []
        for i in swarm.indices(bits):
            out.append(i)
            if len(out) == self.STARVING_SCAN:
                break
        return out

    def _window(self, swarm: TaskSwarm) -> int:
        """
        The seed window for a member of C{swarm}: C{seed_window}, or more when
        so few peers are downloading that they could not fill the seed's
        slots with it (a lone host pulling an image waits a sync round trip
        between seed pieces otherwise).  With four or more downloading peers
        at the defaults it is C{seed_window}: spreading the seed's pieces
        matters more there.
        """
        downloading = swarm.downloading
        if downloading * self.small_window > self.seed_slots:
            return self.seed_window
        spare = self.seed_slots // (max(downloading, 1) * self.small_window)
        return max(self.seed_window, min(self.small_window, spare))

    # -- views -------------------------------------------------------------

    def availability(self, task_id: str) -> list[int]:
        """Holders per piece (not counting the seed)."""
        swarm = self.tasks.get(task_id)
        return list(swarm.holders) if swarm is not None else []

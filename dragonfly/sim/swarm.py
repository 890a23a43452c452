"""
The swarm simulation: the real L{Scheduler} and the real L{Picker} on a
fluid network, with an injected clock.

Time is simulated; nothing sleeps and nothing touches a socket.  The loop
moves the clock by steps of at most C{dt} seconds (further at once when no
data moves): the network advances its flows (L{FluidNetwork.advance}), then
every event due is handled in time order (a sync answered, a connection
opened, a request reaching its uploader), then each peer whose neighbours'
holdings changed asks its picker for more requests.

What a peer does (the dfpeer's rules, simplified):

  - it syncs with the SuperNode every C{sync_interval} seconds (once
    settled, connected to the seed and a parent, not starving, a piece stored
    within the last second, the wait doubles up to C{max_sync}; starving cuts
    it short), and at once after a seed piece arrived, reporting the pieces it stored since its last
    sync and whether its picker is starving; the answer (parents, seed
    allowance) takes effect one round trip later;
  - it connects to each new parent (one round trip); both ends then know
    each other's bitfield, and every piece stored later is announced (HAVE)
    to every neighbour that lacks it: at once, or with C{have_delay} held up
    to that long (the dfpeer's HaveHold) and sent with the next one as one
    frame (HAVE_MANY), sooner with a request to it;
  - it asks pieces through L{Picker.fill} (C{per_conn} per neighbour,
    C{limit} in all, the seed apart); a request reaches the uploader after
    the one-way latency and its data flows from then on, at the max-min fair
    rate of the uploader's uplink and the downloader's downlink;
  - a finished peer stays and serves until the end.

The SuperNode's CDN fetches the file from the origin once, at C{origin_rate},
in order; a piece becomes ready for the seed when it is fully fetched.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from attrs import define, field

from ..core.bitmap import Bitmap
from ..core.pieces import TARGET_PIECES, swarm_piece_size
from ..core.rendezvous import Node, rank
from ..peer.neighbours import HAVE_DELAY, HaveHold
from ..peer.picker import NEIGHBOUR_BYTES, Neighbour, Picker, in_flight_limit, neighbour_limit
from ..peer.syncer import Syncer
from ..supernode.scheduler import PeerInfo, Scheduler
from .network import Flow, FluidNetwork, Host

if TYPE_CHECKING:
    from .fastnet import FastNetwork

TASK = "sim" + "0" * 61
#: the picker's key for the seed of the first node of the ranking (node k: -1 - k)
SEED = -1
#: what a node that takes a task over fetches from the origin: the whole
#: file (what the CDN does today), or only the pieces no peer it knows holds
TAKEOVER = ("full", "missing")
#: the scheduler's CPU is measured on one sync in this many
SYNC_SAMPLE = 8
#: simulated seconds between two full collections of the cyclic garbage collector (off in between)
GC_EVERY = 10.0

MBIT = 1e6 / 8


@define(frozen=True)
class LinkClass:
    """A kind of host link: Mbit/s down and up, one-way latency in ms, share of the peers."""

    down_mbit: float
    up_mbit: float
    latency_ms: float
    share: float


#: the default mix: mostly 1 Gbit/s hosts, some 10 Gbit/s, some asymmetric and slow ones
DEFAULT_LINKS = "1000/1000@0.5:0.6,10000/10000@0.2:0.1,1000/200@5:0.2,100/100@20:0.1"


def parse_links(text: str) -> list[LinkClass]:
    """C{down/up@latency_ms:share,...} (shares are normalised)."""
    out = []
    for part in text.split(","):
        try:
            speeds, rest = part.strip().split("@")
            down, up = speeds.split("/")
            latency, share = rest.split(":")
            out.append(LinkClass(float(down), float(up), float(latency), float(share)))
        except ValueError:
            raise ValueError(f"link class {part!r} is not down/up@latency_ms:share") from None
    total = sum(c.share for c in out)
    if not out or total <= 0 or any(c.down_mbit <= 0 or c.up_mbit <= 0 or c.share < 0 for c in out):
        raise ValueError(f"link mix {text!r} needs positive speeds and shares")
    return [LinkClass(c.down_mbit, c.up_mbit, c.latency_ms, c.share / total) for c in out]


@define(frozen=True)
class Config:
    peers: int = 100
    file_size: int = 1 << 30
    piece_size: int | None = None  # None: the SuperNode's auto rule
    #: pieces a file the auto rule aims at (the SuperNode's: L{TARGET_PIECES})
    target_pieces: int = TARGET_PIECES
    links: str = DEFAULT_LINKS
    seed_mbit: float = 2000.0  # the SuperNode's uplink (S)
    origin_mbit: float = 2000.0  # the CDN's fetch from the origin
    supernode_latency_ms: float = 0.5
    sync_interval: float = 0.5
    startup_sync: float = 0.05
    per_conn: int = 1
    in_flight_bytes: int = 6 << 20
    min_in_flight: int = 4
    arrival_spread: float = 0.0  # peers start uniformly within this many seconds
    dt: float = 0.005  # the shortest network step (see Flow.lag)
    seed: int = 1
    time_limit: float = 3600.0
    #: the picker without its rate rules (rarest-first in random neighbour order only)
    classic: bool = False
    #: SuperNodes; the task's owner is the first of its rendezvous ranking
    supernodes: int = 1
    #: the owner dies (SIGKILL) this many seconds in (None: never)
    kill_at: float | None = None
    #: what the next node fetches from the origin when it takes the task over (TAKEOVER)
    takeover: str = "full"
    #: the dfpeer's heartbeat: a finished peer moves to the next node at its next one
    heartbeat: float = 10.0
    #: the dfpeer's stall check, which also runs the picker: seconds between two
    check_interval: float = 1.0
    #: every HAVE runs the whole picker (before: the dfpeer only offers the piece
    #: to the neighbour that announced it, Picker.offer)
    fill_on_have: bool = False
    #: the network on numpy arrays (L{dragonfly.sim.fastnet}) when numpy is there
    fast_network: bool = True
    #: HAVEs to one neighbour are held this long and go as one frame (the dfpeer's Neighbours.have_delay)
    have_delay: float = HAVE_DELAY
    #: the longest wait between two syncs of a settled download (the dfpeer's Syncer.max_sync)
    max_sync: float = Syncer.max_sync
    #: the picker's in-flight limit may grow to this many times C{limit} by the
    #: neighbours' measured rates (L{Picker} C{max_grow}; 1: the limit holds, the dfpeer's)
    max_grow: float = 1.0
    #: a peer's in-flight limit is at least what its downlink carries in this
    #: many seconds (L{in_flight_limit}; 0: C{in_flight_bytes} for every peer, the dfpeer's)
    in_flight_time: float = 0.0
    #: the scheduler's C{fill_degree} (a peer few chose as a parent gets more parents)
    fill_degree: bool = False
    #: the in-flight limit grows to one piece per neighbour within this many bytes
    #: (L{neighbour_limit}, the dfpeer's Neighbours.NEIGHBOUR_BYTES; 0, the default: never)
    neighbour_bytes: int = NEIGHBOUR_BYTES


@define(eq=False)
class SimPeer:
    index: int
    peer_id: str
    host: Host
    picker: Picker[int]
    start: float
    #: its in-flight limit in pieces (L{in_flight_limit})
    limit: int = 4
    #: the limit before the neighbours' count raised it (L{neighbour_limit})
    base_limit: int = 4
    done_at: float | None = None
    reported: list[int] = field(factory=list)
    neighbours: set[int] = field(factory=set)
    #: per neighbour, in the order of C{neighbours}: its number, it, its picker, and this
    #: peer's record in that picker (what the HAVE fan-out reads, without a lookup)
    links: list[tuple[int, SimPeer, Picker[int], Neighbour[int]]] = field(factory=list)
    connecting: set[int] = field(factory=set)
    # (neighbour key, piece) -> flow or None while the request travels
    requests: dict[tuple[int, int], Flow | None] = field(factory=dict)
    next_sync: float = 0.0
    sync_pending: bool = False
    answers: int = 0
    final_sync_done: bool = False
    #: the node (its place in the task's ranking) this peer's task calls go to
    node: int = 0
    #: the picker's key of that node's seed (None: not connected to it)
    seed_key: int | None = None
    #: when the heartbeat ticks (seconds into each C{heartbeat})
    beat: float = 0.0
    #: neighbour -> the pieces whose HAVE is held for it (C{have_delay})
    held: dict[int, list[int]] = field(factory=dict)
    #: how long HAVEs are held (L{dragonfly.peer.neighbours.HaveHold}, the dfpeer's rule)
    hold: HaveHold = field(factory=lambda: HaveHold(HAVE_DELAY))
    #: when it last stored a piece; the wait of a settled download (0: not settled)
    last_store: float = -1e9
    rest: float = 0.0
    #: the pieces stored, one byte each (what its picker's have_bits says, cheaper to test)
    got: bytearray = field(factory=bytearray)
    #: for the diagnostics: pieces stored, from the seed, when the first, half and 90% were in
    stored: int = 0
    from_seed: int = 0
    marks: list[float] = field(factory=list)
    #: syncs, and those that said it was starving
    syncs: int = 0
    starving_syncs: int = 0


@define(eq=False)
class SimNode:
    """A SuperNode: its own scheduler, seed (the CDN's uplink) and origin fetch."""

    address: str
    scheduler: Scheduler
    seed_host: Host
    seed_has: Bitmap
    alive: bool = True
    #: the CDN fetch: started, and the next piece it looks at
    fetching: bool = False
    fetch_next: int = 0
    origin_bytes: float = 0.0
    #: peers that registered here after a failover, and when the last did
    moved: int = 0
    last_moved: float = 0.0


@define
class Result:
    peers: int
    file_size: int
    piece_size: int
    pieces: int
    completion: list[float]
    bounds: list[float]
    seed_copies: float
    origin_copies: float
    p2p_share: float
    syncs: int
    us_per_sync: float
    sim_s: float
    wall_s: float
    events: int
    #: the simulator's own CPU seconds (on a loaded machine far less than wall_s)
    cpu_s: float = 0.0
    #: per node, in the task's ranking: address, alive at the end, origin and seed copies, peers moved in
    nodes: list[dict[str, Any]] = field(factory=list)
    kill_at: float | None = None
    #: each peer's link class (down/up in Mbit/s)
    links: list[str] = field(factory=list)
    #: HAVEs announced, and the frames (HAVE or HAVE_MANY) that carried them
    haves: int = 0
    have_frames: int = 0
    #: per peer: when its first, half and 90% of the pieces were in (seconds after it
    #: started), pieces from the seed, neighbours at the end, share of its syncs starving
    peer_stats: list[dict[str, Any]] = field(factory=list)

    def slowest(self, k: int) -> list[dict[str, Any]]:
        """The C{k} peers furthest over their bound, with what they waited on."""
        ranked = sorted(range(len(self.completion)), key=lambda n: -self.completion[n] / self.bounds[n])
        out = []
        for n in ranked[:k]:
            d = {"peer": n, "link": self.links[n] if self.links else "", "over_bound": round(self.completion[n] / self.bounds[n], 3),
                 "done_s": round(self.completion[n], 3), "bound_s": round(self.bounds[n], 3)}
            if self.peer_stats:
                d |= self.peer_stats[n]
            out.append(d)
        return out

    def by_class(self) -> dict[str, dict[str, float]]:
        """Per link class: peers, and the median and largest completion over bound."""
        out: dict[str, list[float]] = {}
        for label, c, b in zip(self.links, self.completion, self.bounds, strict=False):
            out.setdefault(label, []).append(c / b)
        return {
            label: {"peers": len(r), "p50": round(sorted(r)[len(r) // 2], 3), "max": round(max(r), 3),
                    "bound_s": round(min(b for lb, b in zip(self.links, self.bounds, strict=False) if lb == label), 2)}
            for label, r in sorted(out.items())
        }

    def ratios(self) -> list[float]:
        return sorted(c / b for c, b in zip(self.completion, self.bounds, strict=False))

    def summary(self) -> dict[str, Any]:
        r = self.ratios()

        def q(p: float) -> float:
            return round(r[min(len(r) - 1, max(0, math.ceil(p * len(r)) - 1))], 4)

        return {
            "peers": self.peers, "file_bytes": self.file_size, "piece_bytes": self.piece_size, "pieces": self.pieces,
            "p50_over_bound": q(0.5), "p99_over_bound": q(0.99), "max_over_bound": round(r[-1], 4),
            "p50_s": round(sorted(self.completion)[len(r) // 2], 3), "last_s": round(max(self.completion), 3),
            "origin_copies": round(self.origin_copies, 3), "seed_copies": round(self.seed_copies, 3),
            "p2p_share": round(self.p2p_share, 4), "syncs": self.syncs, "us_per_sync": round(self.us_per_sync, 1),
            "haves": self.haves, "have_frames": self.have_frames,
            "events": self.events, "sim_s": round(self.sim_s, 3), "wall_s": round(self.wall_s, 2),
            "cpu_s": round(self.cpu_s, 2),
        } | ({"by_class": self.by_class()} if self.links else {}) | (
            {"supernodes": self.nodes, "kill_at": self.kill_at} if len(self.nodes) > 1 else {})


class Simulation:
    """
    One file, C{config.supernodes} SuperNodes, C{config.peers} peers arriving
    together (a flash crowd).  The task's calls go to the first live node of
    its rendezvous ranking (L{dragonfly.core.rendezvous.rank}), as the
    dfpeer's; with C{kill_at} the owner dies then and the peers move on.
    """

    def __init__(self, config: Config, progress: Callable[[str], None] | None = None) -> None:
        #: called with a line of progress about once a simulated second
        self.progress = progress
        self.c = config
        if config.supernodes < 1:
            raise ValueError("at least one supernode")
        if config.takeover not in TAKEOVER:
            raise ValueError(f"takeover is one of {', '.join(TAKEOVER)}")
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self.net: FluidNetwork | FastNetwork = FluidNetwork()
        if config.fast_network:
            try:
                from .fastnet import FastNetwork
            except ImportError:  # no numpy: the pure network
                pass
            else:
                self.net = FastNetwork()
        self.piece_size = config.piece_size or swarm_piece_size(config.file_size, config.target_pieces)
        self.count = -(-config.file_size // self.piece_size)
        # the nodes in the task's ranking: nodes[0] owns it
        ring = rank([Node(f"sn{k}:8002") for k in range(config.supernodes)], TASK)
        self.nodes: list[SimNode] = []
        for k, ref in enumerate(ring):
            scheduler = Scheduler(rng=random.Random(config.seed + 1 + k), fill_degree=config.fill_degree)
            scheduler.task(TASK)
            scheduler.set_piece_count(TASK, self.count)
            host = Host(f"seed-{ref.address}", up=config.seed_mbit * MBIT, down=math.inf,
                        latency=config.supernode_latency_ms / 1000)
            self.nodes.append(SimNode(ref.address, scheduler, host, Bitmap(self.count)))
        self.limit = max(config.min_in_flight, config.in_flight_bytes // self.piece_size)
        #: a peer's pieces stored when its first, half and 90% are in
        self._marks = (1, (self.count + 1) // 2, -(-9 * self.count // 10))
        #: HAVEs are held at all (HaveHold's clock runs)
        self._holding = config.have_delay > 0
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.events = 0
        self.haves = 0
        self.have_frames = 0
        self.dirty: set[int] = set()
        self.sync_cpu = 0.0
        self.syncs = 0
        self.timed_syncs = 0
        self.steps = 0
        self._clock = 0.0
        self.remaining = config.peers
        classes = parse_links(config.links)
        self.peers: list[SimPeer] = []
        #: per piece, one byte a peer: it holds the piece (the HAVE fan-out reads
        #: one array, not the neighbours' objects spread over the heap)
        self.has = [bytearray(config.peers) for _ in range(self.count)]
        # (no garbage to collect while the peers are made: the collector would rescan them as they grow)
        collecting = gc.isenabled()
        gc.disable()
        # one int object per piece number for every picker: its priority lists
        # hold the same numbers (each picker made its own objects above 256:
        # 14 KB a picker at 512 pieces, read on every HAVE)
        ints = list(range(self.count))
        try:
            for n in range(config.peers):
                cls = self._draw(classes)
                host = Host(f"p{n}", up=cls.up_mbit * MBIT, down=cls.down_mbit * MBIT, latency=cls.latency_ms / 1000)
                picker: Picker[int] = Picker(self.count, rng=random.Random(self.rng.random()), max_grow=config.max_grow)
                picker.prio = [ints[p] for p in picker.prio]
                picker._by_prio = [ints[i] for i in picker._by_prio]
                picker.digests_known(range(self.count))
                start = self.rng.uniform(0, config.arrival_spread) if config.arrival_spread else 0.0
                limit = in_flight_limit(config.in_flight_bytes, self.piece_size, host.down, config.in_flight_time,
                                        config.min_in_flight)
                peer = SimPeer(n, f"sim-{n}", host, picker, start, limit=limit, base_limit=limit, hold=HaveHold(self.c.have_delay),
                               got=bytearray(self.count))
                self.peers.append(peer)
                self.at(start, self._arrive, peer)
        finally:
            if collecting:
                gc.enable()
        if config.kill_at is not None:
            for peer in self.peers:
                peer.beat = self.rng.uniform(0, config.heartbeat)
            self.at(config.kill_at, self._kill, 0)
        # the owner's CDN fetches the file from the origin at once
        self._start_fetch(self.nodes[0])

    @property
    def scheduler(self) -> Scheduler:
        """The owner's scheduler."""
        return self.nodes[0].scheduler

    @property
    def seed_host(self) -> Host:
        return self.nodes[0].seed_host

    def _draw(self, classes: list[LinkClass]) -> LinkClass:
        x = self.rng.random()
        for c in classes:
            x -= c.share
            if x < 0:
                return c
        return classes[-1]

    # -- events -------------------------------------------------------------------------------

    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, fn, args))

    def latency(self, a: Host, b: Host) -> float:
        return a.latency + b.latency

    def host_of(self, key: int) -> Host:
        """The host behind a picker key: a peer, or (negative) a node's seed."""
        return self.nodes[-1 - key].seed_host if key < 0 else self.peers[key].host

    # -- the CDN ----------------------------------------------------------------------------------

    def _start_fetch(self, node: SimNode) -> None:
        """
        The node's CDN fetches the file from the origin, in order (a piece is
        ready when its last byte came).  A node taking the task over with
        C{takeover="missing"} waits a sync interval first: by then every
        downloading peer has said what it holds.
        """
        if not node.fetching:
            node.fetching = True
            if self.c.takeover == "missing" and node is not self.nodes[0]:
                self.at(self.now + self.c.sync_interval, self._fetch, node)
            else:
                self._fetch(node)

    def _fetch(self, node: SimNode) -> None:
        swarm = node.scheduler.tasks[TASK]
        i = node.fetch_next
        if self.c.takeover == "missing" and node is not self.nodes[0]:
            # a node that took the task over: only what no peer it knows holds
            held = swarm.held()
            while i < self.count and held >> (swarm.width - 1 - i) & 1:
                i += 1
        node.fetch_next = i + 1
        if i < self.count and node.alive:
            size = min(self.piece_size, self.c.file_size - i * self.piece_size)
            self.at(self.now + size / (self.c.origin_mbit * MBIT), self._seed_ready, node, i)

    def _seed_ready(self, node: SimNode, index: int) -> None:
        if not node.alive:
            return
        node.seed_has.set(index)
        node.scheduler.seed_piece_ready(TASK, index)
        node.origin_bytes += min(self.piece_size, self.c.file_size - index * self.piece_size)
        self._fetch(node)

    # -- the SuperNodes ---------------------------------------------------------------------------

    def _live(self, start: int = 0) -> int:
        for k in range(start, len(self.nodes)):
            if self.nodes[k].alive:
                return k
        raise RuntimeError("every supernode is down")

    def _kill(self, k: int) -> None:
        """Node C{k} dies: its seed connections break at once (each peer sees the reset)."""
        node = self.nodes[k]
        node.alive = False
        key = -1 - k
        for peer in self.peers:
            if peer.seed_key == key:
                self._drop_seed(peer)
            if peer.node == k and peer.final_sync_done:
                # finished: it moves at its next heartbeat
                wait = (peer.beat - self.now) % self.c.heartbeat
                self.at(self.now + wait, self._heartbeat, peer)

    def _drop_seed(self, peer: SimPeer) -> None:
        key = peer.seed_key
        if key is None:
            return
        peer.seed_key = None
        for (k, i), f in list(peer.requests.items()):
            if k == key:
                del peer.requests[(k, i)]
                if f is not None:
                    self.net.stop(f)
        peer.picker.remove(key)
        peer.picker.seed_allowed = set()
        self.dirty.add(peer.index)

    def _heartbeat(self, peer: SimPeer) -> None:
        if not self.nodes[peer.node].alive:
            self._failed(peer)

    def _failed(self, peer: SimPeer) -> None:
        """
        A call to the peer's node was refused (a round trip): the next live
        node of the ranking answers TASK_UNKNOWN (another), and the peer
        registers there saying all it holds.
        """
        node = self.nodes[peer.node]
        rtt = 2 * self.latency(peer.host, node.seed_host)
        peer.node = self._live(peer.node + 1)
        self.at(self.now + 2 * rtt, self._register, peer)

    def _register(self, peer: SimPeer) -> None:
        """The peer's registration (with its bitmap) reaches its node; then its sync."""
        node = self.nodes[peer.node]
        if not node.alive:
            self._failed(peer)
            return
        node.scheduler.register_peer(PeerInfo(peer.peer_id, "198.18.0.1", 65001), self.now)
        node.scheduler.join(TASK, peer.peer_id, self.now)
        node.scheduler.report(TASK, peer.peer_id, self.now, bitmap=peer.picker.have_bits.copy())
        peer.reported = []
        node.moved += 1
        node.last_moved = self.now
        self._start_fetch(node)
        if peer.done_at is not None:
            peer.final_sync_done = True
            return
        peer.final_sync_done = False
        self._sync(peer)

    # -- a peer -------------------------------------------------------------------------------------

    def _arrive(self, peer: SimPeer) -> None:
        peer.node = self._live()
        node = self.nodes[peer.node]
        node.scheduler.register_peer(PeerInfo(peer.peer_id, "198.18.0.1", 65001), self.now)
        node.scheduler.join(TASK, peer.peer_id, self.now)
        self._sync(peer)
        if not self.c.fill_on_have:
            self.at(self.now + self.c.check_interval, self._check, peer)

    def _sync(self, peer: SimPeer) -> None:
        """The peer's sync reaches the SuperNode now; the answer arrives a round trip later."""
        peer.sync_pending = False
        if peer.final_sync_done:
            return
        node = self.nodes[peer.node]
        if not node.alive:
            self._failed(peer)
            return
        starving = peer.picker.starving()
        peer.syncs += 1
        peer.starving_syncs += starving
        # CPU time (other processes on the machine do not count), of one sync
        # in SYNC_SAMPLE: reading a thread's clock is a system call, slow here
        timed = self.syncs % SYNC_SAMPLE == 0
        if timed:
            t0 = time.thread_time()
        if peer.reported:
            node.scheduler.report(TASK, peer.peer_id, self.now, have=peer.reported)
            peer.reported = []
        d = node.scheduler.sync(TASK, peer.peer_id, self.now, starving=starving)
        if timed:
            self.sync_cpu += time.thread_time() - t0
            self.timed_syncs += 1
        self.syncs += 1
        if peer.done_at is not None:
            peer.final_sync_done = True
            return
        back = self.now + 2 * self.latency(peer.host, node.seed_host)
        self.at(back, self._decision, peer, peer.node, [int(p.peer_id[4:]) for p in d.parents], d.seed_pieces)

    def _decision(self, peer: SimPeer, k: int, parents: list[int], seed_pieces: list[int]) -> None:
        if k == peer.node and self.nodes[k].alive:
            key = -1 - k
            if peer.seed_key is None:
                # the seed connection comes with the first answer of a node
                peer.seed_key = key
                peer.picker.add(key, seed=True)
                peer.picker.bitfield(key, Bitmap(self.count))
            holds = peer.picker.holds
            for i in seed_pieces:
                if not holds(key, i):
                    # the dfpeer runs its picker on a HAVE from the seed (an answer with nothing new: not)
                    peer.picker.have(key, i)
                    self.dirty.add(peer.index)
            peer.picker.seed_allowed = set(seed_pieces)
        for p in parents:
            if p not in peer.neighbours and p not in peer.connecting:
                other = self.peers[p]
                peer.connecting.add(p)
                other.connecting.add(peer.index)
                self.at(self.now + 2 * self.latency(peer.host, other.host), self._connected, peer, other)
        if self.c.fill_on_have:
            self.dirty.add(peer.index)
        peer.answers += 1
        # starting (the seed connection comes with the first answers): the dfpeer asks again soon
        interval = self.c.startup_sync if peer.answers < 2 else self.c.sync_interval
        if peer.answers < 2 or not self._settled(peer):
            peer.rest = 0.0
        else:
            peer.rest = min(max(self.c.max_sync, interval), 2 * max(interval, peer.rest))
            interval = peer.rest
        self._plan_sync(peer, self.now + interval)

    def _settled(self, peer: SimPeer) -> bool:
        """The dfpeer's Syncer._settled (a peer here never fails a piece nor has a reader waiting)."""
        return (peer.seed_key is not None and bool(peer.neighbours) and not peer.picker.starving()
                and self.now - peer.last_store < Syncer.FLOWING)

    def _plan_sync(self, peer: SimPeer, when: float) -> None:
        if peer.final_sync_done:
            return
        if not peer.sync_pending or when < peer.next_sync:
            peer.sync_pending = True
            peer.next_sync = when
            self.at(when, self._sync_due, peer, when)

    def _sync_due(self, peer: SimPeer, when: float) -> None:
        if peer.sync_pending and peer.next_sync == when:
            self.at(self.now + self.latency(peer.host, self.nodes[peer.node].seed_host), self._sync, peer)

    def _connected(self, a: SimPeer, b: SimPeer) -> None:
        a.connecting.discard(b.index)
        b.connecting.discard(a.index)
        if b.index in a.neighbours:
            return
        a.neighbours.add(b.index)
        b.neighbours.add(a.index)
        for p in (a, b):
            p.limit = neighbour_limit(p.base_limit, len(p.neighbours), self.piece_size, self.c.neighbour_bytes)
        a.picker.add(b.index)
        a.picker.bitfield(b.index, b.picker.have_bits)
        b.picker.add(a.index)
        b.picker.bitfield(a.index, a.picker.have_bits)
        for p in (a, b):
            p.links = [self._link(p, self.peers[n]) for n in p.neighbours]
        self.dirty.add(a.index)
        self.dirty.add(b.index)

    @staticmethod
    def _link(peer: SimPeer, other: SimPeer) -> tuple[int, SimPeer, Picker[int], Neighbour[int]]:
        nb = other.picker.record(peer.index)
        assert nb is not None
        return other.index, other, other.picker, nb

    def _fill(self, peer: SimPeer) -> None:
        if peer.done_at is not None:
            return
        picker = peer.picker
        # nothing the picker could add (its own checks, made cheap): rescues may go to twice the limit
        full = peer.limit if self.c.classic else int(2 * peer.limit * max(1.0, picker.max_grow))
        if picker.in_flight >= full and (peer.seed_key is None or len(picker.outstanding(peer.seed_key)) >= len(picker.seed_allowed)):
            return
        piece_bytes = None if self.c.classic else self.piece_size
        for key, index in peer.picker.fill(self.now, self.c.per_conn, peer.limit, piece_bytes=piece_bytes):
            self._ask(peer, key, index)
        if peer.rest and peer.sync_pending and picker.starving():
            self._plan_sync(peer, self.now)  # the dfpeer's Syncer.need: starving cuts the longer wait short

    def _ask(self, peer: SimPeer, key: int, index: int) -> None:
        """The picker chose C{index} from C{key}: the request travels (with the HAVEs held for C{key})."""
        if peer.held and peer.held.get(key):
            self._send_haves(peer, key)
        peer.requests[(key, index)] = None
        # at(now + latency(peer.host, host_of(key)), ...), inline: a request per piece
        src = self.nodes[-1 - key].seed_host if key < 0 else self.peers[key].host
        self._seq += 1
        heapq.heappush(self._events, (self.now + (peer.host.latency + src.latency), self._seq, self._request_arrives,
                                      (peer, key, index)))

    def _check(self, peer: SimPeer) -> None:
        """The dfpeer's stall check, once a second: it runs the picker (the endgame and the rescues wait for time)."""
        if peer.done_at is None:
            self.dirty.add(peer.index)
            self.at(self.now + self.c.check_interval, self._check, peer)

    def _request_arrives(self, peer: SimPeer, key: int, index: int) -> None:
        if (key, index) not in peer.requests:
            return  # cancelled on the way
        src = self.host_of(key)
        size = min(self.piece_size, self.c.file_size - index * self.piece_size)
        # it started at this event's time: the network catches up with it on its next step
        flow = Flow(src, peer.host, size, (peer, key, index), lag=self._clock - self.now)
        peer.requests[(key, index)] = self.net.start(flow)

    def _piece_arrived(self, flow: Flow) -> None:
        peer, key, index = flow.tag
        now = self.now
        requests = peer.requests
        requests.pop((key, index), None)
        picker = peer.picker
        for other in picker.received(key, index, now, int(flow.size)):
            f = requests.pop((other, index), None)
            if f is not None:
                self.net.stop(f)
        if picker.verify(index):
            picker.stored(index)
            peer.reported.append(index)
            peer.last_store = now
            # (a hold of 0 holds nothing: its clock is not needed)
            delay = peer.hold.stored(now) if self._holding else 0.0
            peer.got[index] = 1
            holders = self.has[index]
            holders[peer.index] = 1
            stored = peer.stored = peer.stored + 1
            if key < 0:
                peer.from_seed += 1
            if stored in self._marks:
                peer.marks.append(now - peer.start)
            if delay <= 0:
                self._announce(peer, index, holders)
            else:
                self._hold_haves(peer, index, holders, delay)
            if stored == self.count:  # (its have_bits complete: every piece is stored here)
                peer.done_at = self.now
                self.remaining -= 1
                self._plan_sync(peer, self.now)
            elif key < 0:
                self._plan_sync(peer, self.now)  # a finished seed piece: sync at once for the next
        self.dirty.add(peer.index)

    def _announce(self, peer: SimPeer, index: int, holders: bytearray) -> None:
        """
        C{peer} stored C{index}: its HAVE goes at once, one frame each, to every
        neighbour that lacks it (L{_haves_arrive} for one HAVE, inline: this is
        the run's most frequent step).  The dfpeer sends no HAVE to a neighbour
        that holds the piece, and a finished one holds all.
        """
        key = peer.index
        now = self.now
        per_conn = self.c.per_conn
        fill_on_have = self.c.fill_on_have
        sent = 0
        for n, other, picker, nb in peer.links:
            if holders[n]:
                continue
            sent += 1
            if fill_on_have:
                picker.have(key, index)
                self.dirty.add(n)
            elif picker.heard(nb, index, now, per_conn, other.limit):
                # have() and then the dfpeer's on_have: only this neighbour's choice can change (offer())
                self._ask(other, key, index)
        self.have_frames += sent
        self.haves += sent

    def _hold_haves(self, peer: SimPeer, index: int, holders: bytearray, delay: float) -> None:
        """C{peer} stored C{index}: its HAVEs are held C{delay} (the dfpeer's HaveHold)."""
        # the timers started now all end at now + delay: one event runs them in order
        timers: list[tuple[int, list[int]]] = []
        held_for = peer.held
        for n in peer.neighbours:
            if holders[n]:
                continue  # the dfpeer sends no HAVE to a neighbour that holds the piece (a finished one holds all)
            held = held_for.get(n)
            if held:
                held.append(index)
                self._send_haves(peer, n)  # the second completes the frame
            else:
                held = held_for[n] = [index]
                timers.append((n, held))
        if timers:
            self.at(self.now + delay, self._haves_due, peer, timers)

    def _haves_due(self, peer: SimPeer, timers: list[tuple[int, list[int]]]) -> None:
        """
        The hold timers started together end: each, in the order started,
        counted as an event of its own (the loop's flush follows each).
        """
        first = True
        for n, held in timers:
            if not first:
                self.events += 1
                if self.dirty:
                    self._flush()
            first = False
            if peer.held.get(n) is held and held:  # not sent since (the dfpeer cancels the timer)
                self._send_haves(peer, n)

    def _send_haves(self, peer: SimPeer, n: int) -> None:
        held, peer.held[n] = peer.held[n], []
        self._haves_arrive(peer, n, held)

    def _haves_arrive(self, peer: SimPeer, n: int, indexes: list[int]) -> None:
        """One frame of HAVEs from C{peer} reaches neighbour C{n} (no latency, as before batching)."""
        self.have_frames += 1
        self.haves += len(indexes)
        other = self.peers[n]
        if other.done_at is not None:
            return
        per_conn, limit, now = self.c.per_conn, other.limit, self.now
        fill_on_have = self.c.fill_on_have
        picker, got, key = other.picker, other.got, peer.index
        for index in indexes:
            if got[index]:
                continue
            picker.have(key, index)
            if fill_on_have:
                self.dirty.add(n)
            elif picker.offer(key, index, now, per_conn, limit):
                # the dfpeer's on_have: only this neighbour's choice can change
                self._ask(other, key, index)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> Result:
        wall = time.perf_counter()
        cpu = time.process_time()
        # the peers, pickers and bitmaps live to the end: keep the cyclic
        # collector from scanning them over and over (its pauses would land
        # in whatever is being timed, the scheduler's calls included)
        gc.collect()
        gc.freeze()
        # nor the run's own objects: its flows, events and requests are freed
        # by their counts (no cycle outlives its use); the collector, left on,
        # took 31% of a 10,000-peer run's CPU scanning the live ones.  A full
        # collection every GC_EVERY simulated seconds frees any cycle anyway.
        collecting = gc.isenabled()
        gc.disable()
        try:
            remaining = self.remaining
            next_report = 0.0
            next_gc = GC_EVERY
            c = self.c
            heappop, heappush = heapq.heappop, heapq.heappush
            # the pieces the last step completed, in time order: (when, seq, flow).
            # They skip the event heap (a third of its pushes and pops) and are
            # merged with it by (when, seq), the order the heap would give.
            arrivals: list[tuple[float, int, Flow]] = []
            while remaining:
                if self.now > c.time_limit:
                    raise RuntimeError(f"not finished after {c.time_limit}s of simulated time")
                # every event due, at its own time (never later than a quantum)
                # (events are handled at their own time, up to a step after the
                # network's clock passed it; flows they start catch up: Flow.lag)
                clock = self._clock = self.now
                events = self._events  # (the list is never replaced)
                ai, na = 0, len(arrivals)
                while True:
                    if ai < na and arrivals[ai][0] <= clock:
                        when, seq, flow = arrivals[ai]
                        e = events[0] if events else None
                        if e is None or e[0] > when or (e[0] == when and e[1] > seq):
                            ai += 1
                            self.events += 1
                            self.now = when
                            self._piece_arrived(flow)
                            if self.dirty:
                                self._flush()
                            continue
                    elif not events or events[0][0] > clock:
                        break
                    when, _, fn, args = heappop(events)
                    self.events += 1
                    self.now = when
                    fn(*args)
                    if self.dirty:
                        self._flush()
                for a in arrivals[ai:]:  # (due after the clock: rounding at the step's end)
                    heappush(events, (a[0], a[1], self._piece_arrived, (a[2],)))
                self.now = clock
                # then the network, to the next completion or event (at least a quantum)
                next_event = self._events[0][0] - self.now if self._events else math.inf
                step = max(c.dt, min(self.net.next_completion(), next_event))
                if step == math.inf:
                    raise RuntimeError("the swarm is stuck: no flow and no event")
                base = self.now
                arrivals = []
                for at, flow in self.net.advance(step):
                    self._seq += 1
                    arrivals.append((base + at, self._seq, flow))
                self.now = base + step
                self.steps += 1
                remaining = self.remaining
                if self.now >= next_gc:
                    next_gc = self.now + GC_EVERY
                    gc.collect()
                if self.progress is not None and self.now >= next_report:
                    next_report = self.now + 1.0
                    self.progress(
                        f"t={self.now:7.2f}s done {len(self.peers) - remaining}/{len(self.peers)} "
                        f"flows {len(self.net.flows)} wall {time.perf_counter() - wall:7.1f}s cpu {time.process_time() - cpu:7.1f}s"
                    )
        finally:
            if collecting:
                gc.enable()
        if not isinstance(self.net, FluidNetwork):
            self.net.credit()
        seed_bytes = sum(node.seed_host.bytes_up for node in self.nodes)
        origin_bytes = sum(node.origin_bytes for node in self.nodes)
        total_down = sum(p.host.bytes_down for p in self.peers)
        s = c.seed_mbit * MBIT
        uploads = sum(p.host.up for p in self.peers)
        f = c.file_size
        n = len(self.peers)
        bounds = [max(f / p.host.down, f / s, n * f / (s + uploads)) for p in self.peers]
        return Result(
            peers=n, file_size=f, piece_size=self.piece_size, pieces=self.count,
            completion=[(p.done_at or 0.0) - p.start for p in self.peers], bounds=bounds,
            seed_copies=seed_bytes / f, origin_copies=origin_bytes / f,
            p2p_share=1 - seed_bytes / total_down if total_down else 0.0,
            syncs=self.syncs, us_per_sync=1e6 * self.sync_cpu / max(1, self.timed_syncs),
            haves=self.haves, have_frames=self.have_frames,
            sim_s=self.now, wall_s=time.perf_counter() - wall, events=self.events, cpu_s=time.process_time() - cpu,
            nodes=[
                {"address": node.address, "alive": node.alive, "origin_copies": round(node.origin_bytes / f, 3),
                 "seed_copies": round(node.seed_host.bytes_up / f, 3), "peers_moved_in": node.moved,
                 "last_moved_in_s": round(node.last_moved, 3)}
                for node in self.nodes
            ],
            kill_at=c.kill_at,
            links=[f"{p.host.down / MBIT:g}/{p.host.up / MBIT:g}" for p in self.peers],
            peer_stats=[
                {"first_half_90pct_s": [round(t, 3) for t in p.marks], "from_seed": p.from_seed,
                 "neighbours": len(p.neighbours), "starving_syncs": f"{p.starving_syncs}/{p.syncs}"}
                for p in self.peers
            ],
        )

    def _flush(self) -> None:
        while self.dirty:
            dirty, self.dirty = self.dirty, set()
            for n in dirty:
                self._fill(self.peers[n])

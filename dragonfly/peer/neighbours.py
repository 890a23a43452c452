"""
The block connections of one download: the side the block protocol talks to
(L{dragonfly.protocol.block}'s TaskSide), for the task (L{dragonfly.peer.task})
whose pieces they carry.

It opens a connection to each parent the SuperNode names (and to the seed),
accepts the peers that chose us, feeds their bitfields and HAVEs to the
picker (L{dragonfly.peer.picker}) and sends the requests it chooses, hands
each arrived piece to the task to verify and store, and bans a neighbour that
stalls or sends pieces that fail their SHA-256.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel

from ..core.bitmap import Bitmap
from ..core.ids import SEED_ID
from ..core.pieces import piece_span
from ..core.ratelimit import TokenBucket
from ..protocol import frames as F
from ..protocol.supernode_api import Parent
from .picker import NEIGHBOUR_BYTES, in_flight_limit, neighbour_limit

if TYPE_CHECKING:
    from .task import PeerTask

log = Logger()


#: the longest a dfpeer holds its HAVEs (see L{HaveHold}); 0: it does not
#: hold them.  Held up to 0.2 s (1.5 piece times), each hop of a piece through
#: the swarm waited that long to be announced: the simulator's 1,000-peer run
#: (2 MiB pieces) had its median 1 Gbit/s peer at half the file 0.12 s later
#: and p50 1.076 over its bound against 1.064 without (docs/scale.md), and
#: holding saved no CPU in the real swarm's A/B rounds (docs/bench/swarm-profile.md)
HAVE_DELAY = 0.0
#: a HAVE is held this many times the recent gap between stored pieces (DRAGONFLY_HAVE_GAPS: A/B rounds)
HAVE_GAPS = float(os.environ.get("DRAGONFLY_HAVE_GAPS", "1.5"))
#: one picker fill per batch of frames read together, and none for a seed HAVE outside the seed
#: allowance (L{Neighbours.hold_fills}); DRAGONFLY_BATCH_FILLS=0 fills after every event (A/B rounds)
BATCH_FILLS = os.environ.get("DRAGONFLY_BATCH_FILLS", "1") != "0"
#: a download whose pieces arrive fast keeps at least what arrives in this many seconds in flight
#: (L{ArrivalRate}, L{Neighbours.limits}), up to L{RATE_MOST_BYTES}: with two pieces of 8 MiB and
#: one request at a time, the uploader idled while each request crossed and its piece was read
#: (docs/benchmarks.md); DRAGONFLY_RATE_IN_FLIGHT_MS=0: off (A/B rounds)
RATE_TIME = max(0.0, float(os.environ.get("DRAGONFLY_RATE_IN_FLIGHT_MS", "50"))) / 1000
#: the most bytes of pieces L{RATE_TIME} may keep in flight (DRAGONFLY_RATE_IN_FLIGHT_MOST_MIB)
RATE_MOST_BYTES = int(os.environ.get("DRAGONFLY_RATE_IN_FLIGHT_MOST_MIB", "24")) << 20
#: and the most pieces it adds to the floor (DRAGONFLY_RATE_IN_FLIGHT_MORE)
RATE_MORE = int(os.environ.get("DRAGONFLY_RATE_IN_FLIGHT_MORE", "1"))


class ArrivalRate:
    """
    The rate a download's pieces arrive at, in bytes/s: the moving averages
    (weight L{WEIGHT} per piece) of a piece's bytes and of the time since the
    piece before it arrived, from whichever neighbour; None before two pieces.
    A pause (no piece for a while) shows at once as a long gap: the rate
    falls with it and rises again over a few pieces.
    """

    WEIGHT = 0.25

    def __init__(self) -> None:
        self._last: float | None = None
        self._bytes = 0.0
        self._gap: float | None = None

    def arrived(self, now: float, nbytes: int) -> None:
        if self._last is not None:
            gap = max(0.0, now - self._last)
            if self._gap is None:
                self._gap, self._bytes = gap, float(nbytes)
            else:
                self._gap += (gap - self._gap) * self.WEIGHT
                self._bytes += (nbytes - self._bytes) * self.WEIGHT
        self._last = now

    @property
    def rate(self) -> float | None:
        if self._gap is None:
            return None
        return self._bytes / self._gap if self._gap > 0 else float("inf")


def rate_pieces(rate: float | None, piece_bytes: int, seconds: float, most_bytes: int) -> int:
    """
    The pieces a download arriving at C{rate} bytes/s receives in C{seconds},
    rounded up, and no more than fit in C{most_bytes} (0 when the rate is
    not known or the rule is off).  80 Mbit/s with 1 MiB pieces in 0.05 s:
    one piece, under every floor; 700 MB/s with 8 MiB pieces: five, three
    within 24 MiB.
    """
    if rate is None or seconds <= 0 or piece_bytes <= 0 or most_bytes <= 0:
        return 0
    most = most_bytes // piece_bytes
    if rate * seconds >= most * piece_bytes:
        return most
    return min(most, -(-int(rate * seconds) // piece_bytes))


class HaveHold:
    """
    How long to hold the HAVEs of a piece just stored, so that they go to each
    neighbour in one frame with the next piece's, sent when that one is
    stored (no wake-up of its own): L{HAVE_GAPS} (1.5) times the recent time
    between two stored pieces (a moving average), at most C{cap}; nothing
    before two pieces are stored.  On a fast link a HAVE is held about a
    piece's time, never the whole C{cap}.  (Three gaps and 0.5 s sent 11 to
    21 % fewer HAVE frames in the simulator's 64 MiB swarm, N = 10 to 40,
    with the same times, but no CPU saving showed in an A/B round:
    docs/bench/swarm-profile.md.)
    """

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self._last: float | None = None
        self._gap: float | None = None

    def stored(self, now: float) -> float:
        """A piece was stored at C{now}: how long to hold its HAVEs."""
        if self._last is not None:
            gap = now - self._last
            self._gap = gap if self._gap is None else self._gap + (gap - self._gap) / 4
        self._last = now
        if self._gap is None or self.cap <= 0:
            return 0.0
        return min(self.cap, HAVE_GAPS * self._gap)


class Neighbours:
    """
    @param task: the download (its piece states, its picker, its store).
    """

    #: a neighbour whose pieces failed their SHA-256 this often is banned
    BAN_AFTER = 2
    BAN_FOR = 60.0
    #: pieces in flight for one task at the least (see dfpeer --in-flight): 4,
    #: or as many as fit in MIN_IN_FLIGHT_BYTES, and never under 2.  Each is a
    #: piece-sized buffer while it arrives and is verified and written, so with
    #: large pieces this is most of a dfpeer's memory (4 of 15 MiB were 60 MiB).
    #: DRAGONFLY_MIN_IN_FLIGHT_MIB overrides the 16 MiB (A/B rounds; 1000: 4 pieces whatever their size)
    MIN_IN_FLIGHT = 4
    MIN_IN_FLIGHT_BYTES = int(os.environ.get("DRAGONFLY_MIN_IN_FLIGHT_MIB", "16")) << 20
    #: the in-flight limit grows to one piece per neighbour within this many bytes
    #: (L{neighbour_limit}); 0, off, unless DRAGONFLY_NEIGHBOUR_MIB names the MiB (A/B rounds: 16)
    NEIGHBOUR_BYTES = int(os.environ.get("DRAGONFLY_NEIGHBOUR_MIB", NEIGHBOUR_BYTES >> 20)) << 20
    #: with --link-rate: at least what the downlink carries in this many seconds is in flight
    #: (the simulator's --in-flight-time; 0.05 s closed the 10 Gbit/s tail at 1,000 peers)
    LINK_TIME = 0.05
    #: the measured-rate floor (L{rate_pieces}): what arrives in RATE_TIME seconds, at most RATE_MOST_BYTES
    RATE_TIME = RATE_TIME
    RATE_MOST_BYTES = RATE_MOST_BYTES
    RATE_MORE = RATE_MORE
    #: a connection with requests out and no bytes for this long is abandoned
    stall_timeout = 5.0

    accepts_pieces = True
    #: the longest a connection that speaks version 2 holds our HAVEs to send
    #: them as one frame (HAVE_MANY; sooner with any other frame): see
    #: L{HaveHold} and docs/bench/swarm-profile.md.  DRAGONFLY_HAVE_DELAY overrides it (A/B rounds).
    max_have_delay = float(os.environ.get("DRAGONFLY_HAVE_DELAY", HAVE_DELAY))
    #: the highest block-protocol version we offer (DRAGONFLY_BLOCK_VERSION=1: behave as a version-1 peer)
    block_version = int(os.environ.get("DRAGONFLY_BLOCK_VERSION", F.MAX_PROTOCOL_VERSION))

    def __init__(self, task: PeerTask) -> None:
        self.task = task
        self.daemon = task.daemon
        self.clock = task.clock
        self.conns: set[Any] = set()
        self.seed_conn: Any = None
        self._seed_proto: Any = None
        self._connecting: set[str] = set()
        self._bad_from: dict[str, int] = {}
        self._banned: dict[str, float] = {}
        self._hold = HaveHold(self.max_have_delay)
        #: how fast the pieces arrive (L{limits}: a fast download keeps more in flight)
        self.arrivals = ArrivalRate()
        self._holding = 0  # L{hold_fills} depth
        self._fill_due = False  # a fill was asked for while held
        self._limits_key: tuple[Any, ...] | None = None  # what L{limits} was worked out from
        self._limits = (1, self.MIN_IN_FLIGHT)
        #: how long the connections hold the HAVEs of the last piece stored (L{HaveHold})
        self.have_delay = 0.0

    # -- opening ------------------------------------------------------------------

    def connect(self, parent: Parent) -> None:
        """Open a connection to C{parent} (a SuperNode C{parents} entry) unless we have one."""
        remote = parent.peer_id
        if remote == self.daemon.peer_id or remote in self._connecting:
            return
        if any(c.remote_id == remote for c in self.conns) or self.is_banned(remote):
            return
        seed = self._seed_proto
        if parent.seed and seed is not None and seed.transport is not None and not seed.closed:
            # connected, not attached yet (its handshake): a second one would
            # take its place as the seed's and the first would be refused DIGESTS
            return
        self._connecting.add(remote)
        endpoint = self.daemon.endpoint(parent.ip, parent.port)
        proto = self.daemon.block_factory.client(self, self.task.task_id, remote)
        if parent.seed:
            # only the connection we opened to the seed the SuperNode named
            # may send DIGESTS; a peer calling itself "supernode" may not
            self._seed_proto = proto
        d = self.daemon.block_factory.connect(endpoint, proto)

        def failed(f: Any) -> None:
            self._connecting.discard(remote)
            self.task._log(LogLevel.info, "cannot reach parent {parent}: {why}", parent=remote, why=f.getErrorMessage())
            if remote != SEED_ID:
                self.task.report_failure(-1, remote)

        d.addCallbacks(lambda _: self._connecting.discard(remote), failed)

    def close(self) -> None:
        """Close every connection (gracefully: uploads under way finish)."""
        for conn in list(self.conns):
            conn.transport.loseConnection()

    def abort(self, why: str, code: int) -> None:
        """Cut every connection now."""
        for conn in list(self.conns):
            conn.abort(why, code)

    # -- bans -----------------------------------------------------------------------

    def is_banned(self, remote: str | None) -> bool:
        until = self._banned.get(remote or "")
        return until is not None and until > self.clock.seconds()

    def banned(self) -> list[str]:
        """The neighbours banned now (the sync tells the scheduler)."""
        return [p for p in self._banned if self.is_banned(p)]

    def _ban(self, conn: Any, reason: str, why: str, code: int) -> None:
        """Stop talking to C{conn} now and not again for L{BAN_FOR}, whatever the scheduler decides."""
        self.daemon.stats.count(self.daemon.stats.bans, reason)
        self._banned[conn.remote_id or "?"] = self.clock.seconds() + self.BAN_FOR
        conn.abort(why, code)
        self.detached(conn, reason)

    def bad_piece(self, conn: Any, index: int) -> None:
        """Piece C{index} from C{conn} failed its SHA-256: believe it less, ban a repeat offender."""
        picker = self.task.picker
        if picker is not None:
            picker.corrupt(conn, index)
        self._believe_less(conn, index)
        remote = conn.remote_id or "?"
        self._bad_from[remote] = self._bad_from.get(remote, 0) + 1
        if self._bad_from[remote] >= self.BAN_AFTER and conn is not self.seed_conn:
            # failure is local first: stop talking to it now, whatever
            # the scheduler decides for the others
            self.task._log(
                LogLevel.warn, "banning {remote} for {t:.0f}s after {n} bad pieces",
                remote=remote, t=self.BAN_FOR, n=self._bad_from[remote], reason="corrupt",
            )
            self._ban(conn, "corrupt", "sent pieces that fail their SHA-256", 403)

    def _believe_less(self, conn: Any, index: int) -> None:
        """C{conn} said it had C{index} and did not (or sent it wrong): let its HAVE count again."""
        if conn.remote_have is not None and index in conn.remote_have and conn is not self.seed_conn:
            conn.remote_have.clear(index)

    def check_stalls(self) -> None:
        """Abandon the connections with requests out and no bytes for L{stall_timeout}; ask again."""
        now = self.clock.seconds()
        for conn in list(self.conns):
            if not conn.requested:
                continue
            since = max(conn.last_rx, min(conn.requested.values()))
            if now - since > self.stall_timeout:
                self.task._log(
                    LogLevel.info, "{remote} sent nothing for {t:.1f}s with {n} requests out; abandoning it",
                    remote=conn.remote_id, t=now - since, n=len(conn.requested), reason="stalled",
                )
                # useless for now: do not reconnect to it for a while
                self._ban(conn, "stalled", "stalled", 408)
        # the endgame waits for requests to age: look again once a second
        self.fill()

    # -- requests -------------------------------------------------------------------

    def limits(self) -> tuple[int, int]:
        """(requests per connection, pieces in flight for the whole task)."""
        daemon = self.daemon
        size = self.task.piece_size or (4 << 20)
        link_rate = getattr(daemon, "link_rate", None)
        # the non-seed neighbours (the seed connection is among the connections when attached)
        neighbours = len(self.conns) - (self.seed_conn is not None)
        # asked on every HAVE: worked out again only when what it depends on changed
        # what arrives in RATE_TIME at the measured rate, when the pieces come that fast
        by_rate = rate_pieces(self.arrivals.rate, size, self.RATE_TIME, self.RATE_MOST_BYTES)
        key = (size, daemon.in_flight_bytes, daemon.per_connection, link_rate, self.MIN_IN_FLIGHT_BYTES, neighbours,
               self.NEIGHBOUR_BYTES, by_rate, self.RATE_MORE)
        if key == self._limits_key:
            return self._limits
        least = max(2, min(self.MIN_IN_FLIGHT, self.MIN_IN_FLIGHT_BYTES // size))
        # (one piece more than the floor at most: with 8 MiB pieces a request then waits at the uploader)
        least = max(least, min(by_rate, least + self.RATE_MORE))
        # a host that knows its downlink (--link-rate) keeps what it carries in LINK_TIME out
        # when that is more: a fixed count caps a fast link at its requests' shares of uplinks
        limit = in_flight_limit(daemon.in_flight_bytes, size, link_rate, self.LINK_TIME, least)
        # and one piece per neighbour, within NEIGHBOUR_BYTES (no uploader left unasked)
        limit = neighbour_limit(limit, neighbours, size, self.NEIGHBOUR_BYTES)
        self._limits_key, self._limits = key, (daemon.per_connection, limit)
        return self._limits

    def budget(self, picker: Any) -> tuple[int, int]:
        """
        L{limits} less the pieces received and still being verified and
        written: they hold their buffers, so they count against the budget
        (a disk slower than the network slows the requests instead of
        filling memory), for a fill and for a HAVE's request alike.
        """
        per_conn, limit = self.limits()
        return per_conn, max(0, limit - len(picker.verifying))

    def hold_fills(self) -> None:
        """
        The frames of one read are being handled: their fills wait for
        L{release_fills} and become one (in the same reactor turn, so no
        request goes out later; the picker sees all of their news at once).
        The seed sends DIGESTS and HAVE for each piece it publishes, and a
        fill walks every neighbour (docs/bench/swarm-profile.md).
        """
        if BATCH_FILLS:
            self._holding += 1

    def release_fills(self) -> None:
        """End of a L{hold_fills}: the fill asked for meanwhile, once."""
        if not self._holding:
            return
        self._holding -= 1
        if not self._holding and self._fill_due:
            self._fill_due = False
            self.fill()

    def fill(self) -> None:
        """Send the requests the picker chooses (a few per connection, a bounded number for the task)."""
        if self._holding:
            self._fill_due = True
            return
        picker = self.task.picker
        if picker is None or not self.task.downloading:
            return
        per_conn, limit = self.budget(picker)
        now = self.clock.seconds()
        # with the piece size the picker weighs the neighbours by their measured rates
        piece_bytes = self.task.piece_size or None
        trace = getattr(self.daemon, "trace", False)
        for conn, index in picker.fill(now, per_conn, limit, usable=_open, piece_bytes=piece_bytes):
            conn.request(index, now)
            if trace:
                self._trace_request(conn, index, now, picker, limit)
        syncer = self.task.syncer
        if syncer.resting and picker.starving():
            syncer.need()  # no parent has a piece we need: ask the SuperNode now, not after its longer wait

    def stored(self, conn: Any, index: int) -> None:
        """Piece C{index} (from C{conn}) is verified and written: tell who lacks it."""
        self.have_delay = self._hold.stored(self.clock.seconds())
        for c in list(self.conns):
            # a neighbour that holds the piece has no use for our HAVE
            if c.remote_have is None or index not in c.remote_have:
                c.send_have(index)

    def connected(self) -> bool:
        """The seed and at least one other neighbour are connected (the syncer may wait longer)."""
        seed = self.seed_conn
        return seed is not None and not seed.closed and any(c is not seed and not c.closed for c in self.conns)

    def uploading(self) -> bool:
        return any(c.uploading for c in self.conns)

    # -- the block connection's side (TaskSide) -------------------------------------

    def local_bitmap(self) -> Bitmap | None:
        return self.task.have

    def piece_length(self, index: int) -> int | None:
        t = self.task
        if t.length is None or not 0 <= index < (t.count or 0):
            return None
        return piece_span(index, t.length, t.piece_size)[1]

    def read_piece(self, index: int) -> Deferred:
        return self.task.read_piece(index)

    def piece_file(self, index: int) -> tuple[int, int, int] | None:
        return self.task.piece_file(index)

    def warm_piece(self, index: int) -> Deferred[int] | None:
        return self.task.warm_piece(index)

    def attached(self, conn: Any) -> None:
        t = self.task
        if t.have is None or not t.ready_for_io:
            conn.abort("task not ready yet", 503)
            return
        if self.is_banned(conn.remote_id):
            conn.abort("banned: sent pieces that failed their SHA-256", 403)
            return
        self.conns.add(conn)
        if conn is self._seed_proto:
            self.seed_conn = conn
        if t.picker is not None:
            t.picker.add(conn, seed=conn is self.seed_conn)

    def detached(self, conn: Any, reason: str) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        seed_lost = conn is self.seed_conn
        if seed_lost:
            self.seed_conn = None
        self.task.pieces.drop_parts(conn)
        picker = self.task.picker
        lost = picker.remove(conn) if picker is not None else []
        if self.task.lifecycle.active:
            if lost:
                self.task._log(
                    LogLevel.info, "lost {remote} ({why}) with {n} pieces in flight",
                    remote=conn.remote_id, why=reason, n=len(lost),
                )
            if conn.remote_id and conn.remote_id != SEED_ID and (lost or conn.initiator):
                # -1: the connection itself broke (see the scheduler's dead_after)
                self.task.report_failure(-1, conn.remote_id)
            if seed_lost:
                self.task.seed_lost()
            self.fill()

    def on_bitfield(self, conn: Any) -> None:
        if self.task.picker is not None:
            self.task.picker.bitfield(conn, conn.remote_have)
        self.fill()

    def on_have(self, conn: Any, index: int) -> None:
        picker = self.task.picker
        if picker is None:
            return
        picker.have(conn, index)
        if conn is self.seed_conn:
            at = self.task.stream_from
            if at is not None and 0 <= index - at < picker.stream_window and index not in picker.seed_allowed:
                self.task.want_now()  # a piece an in-order reader waits for reached the seed: sync now
            if index in picker.seed_allowed or not BATCH_FILLS:
                # the seed is asked only for its allowance, and its HAVEs count for no other choice
                self.fill()
            return
        # HAVEs are the most frequent event: only this connection's choice can change
        if not self.task.downloading or conn.closed:
            return
        per_conn, limit = self.budget(picker)
        now = self.clock.seconds()
        if picker.offer(conn, index, now, per_conn, limit):
            conn.request(index, now)
            if getattr(self.daemon, "trace", False):
                self._trace_request(conn, index, now, picker, limit)

    def on_digests(self, conn: Any, first: int, digests: list[bytes]) -> None:
        if conn is not self.seed_conn:
            conn.abort("DIGESTS are accepted from the seed only")
            return
        self.task.pieces.set_digests(first, digests)
        self.fill()

    def on_reject(self, conn: Any, index: int, reason: int) -> None:
        if self.task.picker is not None:
            self.task.picker.rejected(conn, index)
        self._believe_less(conn, index)
        self.fill()

    def _trace_request(self, conn: Any, index: int, now: float, picker: Any, limit: int) -> None:
        log.info(
            "trace {task} request {index} to {remote} at {t:.3f}: {out} out there, {inflight} of {limit} in flight,"
            " {verifying} verifying", task=self.task.task_id[:12], index=index, remote=conn.remote_id, t=now,
            out=len(picker.outstanding(conn)), inflight=picker.in_flight, limit=limit, verifying=len(picker.verifying),
        )

    def on_piece(self, conn: Any, index: int, data: bytearray) -> None:
        picker = self.task.picker
        if getattr(self.daemon, "trace", False):
            log.info("trace {task} arrived {index} from {remote} at {t:.3f}", task=self.task.task_id[:12], index=index,
                     remote=conn.remote_id, t=self.clock.seconds())
        self.arrivals.arrived(self.clock.seconds(), len(data))
        if picker is not None:
            for other in picker.received(conn, index, self.clock.seconds(), len(data)):
                other.cancel(index)
        self.task.piece_arrived(conn, index, data, "supernode" if conn is self.seed_conn else "remote_peer")
        self.fill()

    def piece_part(self, conn: Any, index: int, buf: bytearray, filled: int) -> int:
        """Part of a large piece arrived (L{dragonfly.peer.pieces.TaskPieces.part})."""
        return self.task.pieces.part(conn, index, buf, filled)

    def piece_dropped(self, conn: Any, index: int, buf: bytearray) -> None:
        """A piece will not arrive whole into C{buf}: its buffer goes back to the pool."""
        self.task.pieces.dropped(conn, buf)

    def cancel_received(self, conn: Any, index: int, where: str) -> None:
        """C{conn}'s remote cancelled its request for C{index}: C{where} it was (queued, sending, sent)."""
        if getattr(self.daemon, "trace", False):
            log.info("trace {task} cancel {index} from {remote} at {t:.3f}: {where}, {queued} queued",
                     task=self.task.task_id[:12], index=index, remote=conn.remote_id, t=self.clock.seconds(),
                     where=where, queued=len(conn._queue))

    def cancelled_arrived(self, conn: Any, index: int, nbytes: int) -> None:
        """A piece we cancelled on C{conn} (it came from elsewhere) arrived from it all the same."""
        self.task.stats.count(self.task.stats.discarded, "cancelled", nbytes)
        if getattr(self.daemon, "trace", False):
            log.info("trace {task} cancelled {index} arrived from {remote} at {t:.3f}", task=self.task.task_id[:12],
                     index=index, remote=conn.remote_id, t=self.clock.seconds())

    def download_limits(self) -> list[TokenBucket | None]:
        return [self.task.local_limit, self.daemon.total_limit]

    def on_uploaded(self, conn: Any, nbytes: int) -> None:
        self.task.uploaded += nbytes
        stats = self.daemon.stats
        stats.upload_pieces += 1
        stats.upload_bytes += nbytes
        self.daemon.note_activity()


def _open(conn: Any) -> bool:
    return not conn.closed

"""
Tests for L{dragonfly.peer.task.PeerTask}: a download driven through fakes of
its roles (L{dragonfly.peer.interfaces}) and a L{task.Clock}; no sockets,
no files, no reactor.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from dragonfly.core.bitmap import Bitmap
from dragonfly.core.ids import SEED_ID, task_id
from dragonfly.peer.client import SupernodeError, SupernodeUnavailable
from dragonfly.peer.lifecycle import BadMove, Lifecycle, State
from dragonfly.peer.metrics import PeerStats
from dragonfly.peer.task import PeerTask, TaskFailed
from dragonfly.peer.wholehash import WholeHash, update_hash
from dragonfly.protocol.supernode_api import SyncAnswer, SyncReport, TaskRegistered

URL = "http://origin.test/file"
TID = task_id(URL)
PIECE = 16
BODY = bytes(range(256))[: 5 * PIECE - 3]  # five pieces, the last short
PIECES = [BODY[i : i + PIECE] for i in range(0, len(BODY), PIECE)]
DIGESTS = [hashlib.sha256(p).hexdigest() for p in PIECES]


# -- fakes ------------------------------------------------------------------------------


class FakeSession:
    """Answers register and sync from queues; records the sync bodies."""

    node = "sn.test:8002"

    def __init__(self) -> None:
        self.register_replies: list[Any] = []
        self.replies: list[Any] = []
        self.bodies: list[dict[str, Any]] = []
        self.peer_registrations = 0
        #: the answer once the queue is empty
        self.default: dict[str, Any] = {"task": {"status": "running"}, "syncInterval": 0.5}

    peer_id = "peer-under-test"

    async def register(self) -> TaskRegistered:
        reply = self.register_replies.pop(0) if self.register_replies else {"taskId": TID, "task": {"status": "running"}}
        if isinstance(reply, Exception):
            raise reply
        return TaskRegistered.from_json(reply)

    async def sync(self, report: SyncReport) -> SyncAnswer:
        # the whole report, every field present (the wire form leaves out defaults)
        self.bodies.append({
            "have": list(report.have), "failed": [f.to_json() for f in report.failed],
            "digestsFrom": report.digests_from, "starving": report.starving, "want": report.want,
            "banned": list(report.banned), "peerBytes": report.peer_bytes, "version": report.version,
        })
        reply = self.replies.pop(0) if self.replies else self.default
        if isinstance(reply, Exception):
            raise reply
        return SyncAnswer.from_json(reply)

    async def register_peer(self) -> None:
        self.peer_registrations += 1


class FakeStore:
    """The task's file in memory; every method answers at once."""

    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {}
        self.metas: dict[str, Any] = {}
        self.finished: list[str] = []
        self.removed: list[str] = []
        self.served: dict[str, int] = {}
        self.whole_reads = 0
        self.hash_jobs: list[tuple[int, int, bool]] = []

    def data_path(self, task_id: str) -> str:
        return f"/data/{task_id}.data"

    def prepare(self, task_id: str, length: int) -> defer.Deferred:
        self.files[task_id] = bytearray(length)
        return defer.succeed(None)

    def create(self, task_id: str) -> defer.Deferred:
        self.files[task_id] = bytearray()
        return defer.succeed(99)

    def write_verified(self, task_id: str, offset: int, data: bytearray, digest: bytes) -> defer.Deferred:
        if hashlib.sha256(data).digest() != digest:
            return defer.succeed(False)
        self.files[task_id][offset : offset + len(data)] = data
        return defer.succeed(True)

    def read(self, task_id: str, offset: int, size: int) -> defer.Deferred:
        return defer.succeed(bytes(self.files[task_id][offset : offset + size]))

    def sha256(self, task_id: str) -> defer.Deferred:
        self.whole_reads += 1
        return defer.succeed(hashlib.sha256(self.files[task_id]).hexdigest())

    def finish(self, task_id: str, meta: Any) -> defer.Deferred:
        self.finished.append(task_id)
        self.metas[task_id] = meta
        return defer.succeed(None)

    def remove(self, task_id: str) -> defer.Deferred:
        self.removed.append(task_id)
        self.files.pop(task_id, None)
        self.served.pop(task_id, None)
        return defer.succeed(None)

    def serve(self, task_id: str) -> defer.Deferred:
        self.served[task_id] = 7
        return defer.succeed(7)

    def served_fd(self, task_id: str) -> int | None:
        return self.served.get(task_id)

    def forget(self, task_id: str) -> defer.Deferred:
        self.served.pop(task_id, None)
        return defer.succeed(None)

    def run(self, task_id: str, f: Any, *args: Any) -> defer.Deferred:
        if f is update_hash:
            # the running whole-file hash: from the piece's buffer, or from the file in memory
            hasher, _, offset, size, data = args
            self.hash_jobs.append((offset, size, data is not None))
            hasher.update(data if data is not None else self.files[task_id][offset : offset + size])
            return defer.succeed(None)
        return defer.maybeDeferred(f, *args)


class FakeTransport:
    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn

    def loseConnection(self) -> None:
        self.conn.closed = True


class FakeConn:
    def __init__(self, remote_id: str, initiator: bool = True) -> None:
        self.remote_id = remote_id
        self.remote_have: Bitmap | None = None
        self.requested: dict[int, float] = {}
        self.closed = False
        self.initiator = initiator
        self.last_rx = 0.0
        self.uploading = False
        self.haves: list[int] = []
        self.cancelled: list[int] = []
        self.aborted: tuple[str, int] | None = None
        self.transport = FakeTransport(self)

    def request(self, index: int, now: float) -> None:
        self.requested[index] = now

    def cancel(self, index: int) -> None:
        self.requested.pop(index, None)
        self.cancelled.append(index)

    def abort(self, why: str, code: int = 0) -> None:
        self.closed = True
        self.aborted = (why, code)

    def send_have(self, index: int) -> None:
        self.haves.append(index)


class FakeConnections:
    def __init__(self) -> None:
        self.made: dict[str, FakeConn] = {}
        self.released = 0

    def client(self, side: Any, task_id: str, remote_id: str) -> FakeConn:
        conn = self.made[remote_id] = FakeConn(remote_id)
        return conn

    def connect(self, endpoint: Any, proto: Any) -> defer.Deferred:
        return defer.succeed(proto)

    def release(self, buf: bytearray) -> None:
        self.released += 1


class FakeHost:
    def __init__(self) -> None:
        self.peer_id = "me-10.0.0.1-4000"
        self.clock = Clock()
        self.trace = False
        self.store = FakeStore()
        self.block_factory = FakeConnections()
        self.stats = PeerStats()
        self.per_connection = 1
        self.in_flight_bytes = 4 * PIECE
        self.total_limit = None
        self.sessions: list[FakeSession] = []
        self.ended: list[PeerTask] = []
        self.source: Any = (len(BODY), hashlib.sha256(BODY).hexdigest())
        self.origin_body = BODY
        self.ranges: list[list[tuple[int, int]]] = []
        self.range_error: Exception | None = None
        self.ignores_range = False

    def session(self, task_id: str, request: dict[str, Any]) -> FakeSession:
        s = FakeSession()
        self.sessions.append(s)
        return s

    def endpoint(self, ip: str, port: int) -> tuple[str, int]:
        return (ip, port)

    async def fetch_from_source(self, task: PeerTask) -> tuple[int, str]:
        if isinstance(self.source, Exception):
            raise self.source
        task.traffic["back_to_source"] += self.source[0]
        return self.source

    async def fetch_pieces(self, task: PeerTask, runs: list[tuple[int, int]]) -> tuple[int, str] | None:
        """An origin that honours Range: every piece of C{runs} from C{self.origin_body}, recorded."""
        self.ranges.append(list(runs))
        if self.range_error is not None:
            error, self.range_error = self.range_error, None
            raise error
        if self.ignores_range:
            return await self.fetch_from_source(task)
        for first, last in runs:
            for i in range(first, last + 1):
                data = self.origin_body[i * PIECE : (i + 1) * PIECE]
                task.traffic["back_to_source"] += len(data)
                if not await task.source_piece(i, bytearray(data)):
                    from dragonfly.peer.source import SourceMismatch

                    raise SourceMismatch(f"piece {i}")
        return None

    def task_ended(self, task: PeerTask) -> None:
        self.ended.append(task)

    def note_activity(self) -> None:
        pass


def sized(parents: list[dict[str, Any]] | None = None, seed_pieces: list[int] | None = None, **task: Any) -> dict:
    return {
        "task": {"status": "success", "contentLength": len(BODY), "pieceCount": len(PIECES), "pieceSize": PIECE, **task},
        "digestsFrom": 0, "digests": DIGESTS,
        "parents": parents if parents is not None else [{"peerId": SEED_ID, "ip": "10.0.0.9", "port": 8001, "seed": True}],
        "seedPieces": seed_pieces if seed_pieces is not None else [0, 1],
        "syncInterval": 0.5,
    }


def make(request: dict[str, Any] | None = None, replies: list[Any] | None = None) -> tuple[FakeHost, PeerTask, FakeSession]:
    host = FakeHost()
    task = PeerTask(host, TID, request or {"url": URL})
    session = host.sessions[-1]
    session.replies = list(replies or [])
    for r in session.replies:
        if isinstance(r, dict) and "seedPieces" in r:
            # the SuperNode says the allowance at every sync
            session.default = {**session.default, "seedPieces": r["seedPieces"]}
    return host, task, session


def attach(task: PeerTask, conn: FakeConn, held: list[int] | range) -> None:
    side = task.neighbours
    side.attached(conn)
    conn.remote_have = Bitmap(len(PIECES))
    for i in held:
        conn.remote_have.set(i)
    side.on_bitfield(conn)


def deliver(task: PeerTask, conn: FakeConn, index: int, data: bytes | None = None) -> None:
    assert index in conn.requested, (index, conn.requested)
    del conn.requested[index]
    task.neighbours.on_piece(conn, index, bytearray(PIECES[index] if data is None else data))


# -- lifecycle ----------------------------------------------------------------------------


def test_lifecycle_moves_and_words() -> None:
    life = Lifecycle()
    assert life.status == "waiting" and not life.active
    life.move(State.REGISTERING)
    assert life.status == "running" and life.active
    with pytest.raises(BadMove):
        life.move(State.DOWNLOADING)
    for s in (State.SIZING, State.ALLOCATING, State.DOWNLOADING, State.VERIFYING, State.DONE):
        life.move(s)
    assert life.status == "success" and life.ended
    with pytest.raises(BadMove):
        life.move(State.FAILED)


# -- a download -----------------------------------------------------------------------------


def test_download_from_the_seed_and_a_peer() -> None:
    host, task, session = make(replies=[sized()])
    task.start()
    assert task.state is State.DOWNLOADING
    assert host.store.files[TID] == bytearray(len(BODY))
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    assert task.seed_conn is seed
    # the seed allowance only, at once
    assert sorted(seed.requested) == [0, 1]
    peer = FakeConn("peer-b", initiator=False)
    attach(task, peer, [2, 3, 4])
    assert len(peer.requested) == 1 and set(peer.requested) <= {2, 3, 4}
    deliver(task, seed, 0)
    deliver(task, seed, 1)
    assert peer.haves == [0, 1] and seed.haves == []
    while peer.requested:
        deliver(task, peer, next(iter(peer.requested)))
    assert task.state is State.DONE and task.status == "success"
    assert bytes(host.store.files[TID]) == BODY
    assert host.ended == [task]
    meta = host.store.metas[TID]
    assert meta["digests"] == DIGESTS and meta["length"] == len(BODY)
    view = task.to_json()
    assert view["piecesVerified"] and view["completedBytes"] == len(BODY)
    assert view["traffic"] == {"back_to_source": 0, "supernode": 2 * PIECE, "remote_peer": len(BODY) - 2 * PIECE}
    # one last sync reports the pieces and the peers' bytes
    host.clock.advance(0)
    reported = [i for b in session.bodies for i in b["have"]]
    assert sorted(reported) == [0, 1, 2, 3, 4]
    assert sum(b["peerBytes"] for b in session.bodies) == len(BODY) - 2 * PIECE


def test_wait_fires_when_done() -> None:
    host, task, _ = make(replies=[sized(seed_pieces=list(range(len(PIECES))))])
    ended: list[PeerTask] = []
    task.wait().addCallback(ended.append)
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    for i in sorted(seed.requested):
        deliver(task, seed, i)
    assert ended == [task]
    assert task.wait().result is task


def test_piece_file_only_for_verified_pieces() -> None:
    host, task, _ = make(replies=[sized()])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    assert task.piece_file(0) is None
    deliver(task, seed, 0)
    assert task.piece_file(0) == (7, 0, PIECE)
    assert task.piece_file(1) is None
    task.removed()
    assert task.piece_file(0) is None


def test_whole_file_digest_mismatch_fails_and_removes() -> None:
    host, task, _ = make({"url": URL, "digest": "sha256:" + "0" * 64}, replies=[sized(seed_pieces=[0, 1, 2, 3, 4])])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    for i in sorted(seed.requested):
        deliver(task, seed, i)
    assert task.state is State.FAILED
    assert task.error is not None and task.error.code == "DIGEST_MISMATCH"
    assert host.store.removed == [TID] and host.store.finished == []


def test_whole_file_digest_kept_running_whatever_the_order() -> None:
    want = hashlib.sha256(BODY).hexdigest()
    host, task, _ = make({"url": URL, "digest": "sha256:" + want}, replies=[sized(seed_pieces=[0, 1, 2, 3, 4])])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    for i in (3, 4, 1, 0, 2):
        deliver(task, seed, i)
    assert task.state is State.DONE and task.sha256 == want
    # never the whole file read again: 0 to 3 from their buffers (kept while within
    # MAX_HELD pieces of the prefix), 4 (too far ahead when stored) read back from the file
    assert WholeHash.MAX_HELD == 4
    assert host.store.whole_reads == 0
    assert host.store.hash_jobs == [(i * PIECE, PIECE, True) for i in range(4)] + [(4 * PIECE, len(PIECES[4]), False)]


def test_whole_file_digest_mismatch_in_any_order_fails_and_removes() -> None:
    host, task, _ = make({"url": URL, "digest": "sha256:" + "0" * 64}, replies=[sized(seed_pieces=[0, 1, 2, 3, 4])])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    for i in (4, 2, 0, 3, 1):
        deliver(task, seed, i)
    assert task.state is State.FAILED
    assert task.error is not None and task.error.code == "DIGEST_MISMATCH"
    assert hashlib.sha256(BODY).hexdigest() in task.error.message
    assert host.store.removed == [TID] and host.store.finished == []
    assert task.wholehash.prefix == 0  # dropped


def test_no_running_hash_without_a_requested_digest() -> None:
    host, task, _ = make(replies=[sized(seed_pieces=[0, 1, 2, 3, 4])])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    for i in sorted(seed.requested):
        deliver(task, seed, i)
    assert task.state is State.DONE and host.store.hash_jobs == []


def test_whole_file_digest_match() -> None:
    want = hashlib.sha256(BODY).hexdigest()
    host, task, _ = make({"url": URL, "digest": "sha256:" + want}, replies=[sized(seed_pieces=[0, 1, 2, 3, 4])])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    for i in sorted(seed.requested):
        deliver(task, seed, i)
    assert task.state is State.DONE and task.sha256 == want


def test_the_supernodes_sha256_equal_to_the_digest_spares_the_whole_file_hash() -> None:
    """Every piece matched the SuperNode's digests and its SHA-256 of those bytes is the digest asked for."""
    want = hashlib.sha256(BODY).hexdigest()
    host, task, _ = make({"url": URL, "digest": "sha256:" + want},
                         replies=[sized(seed_pieces=[0, 1, 2, 3, 4], sha256=want)])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    for i in (3, 4, 1, 0, 2):
        deliver(task, seed, i)
    assert task.state is State.DONE and task.sha256 == want
    assert host.store.files[TID] == BODY
    assert host.store.hash_jobs == [] and host.store.whole_reads == 0


def test_the_supernodes_sha256_arriving_during_the_download_stops_the_running_hash() -> None:
    """Ten hosts pulling a cold blob at once: the SuperNode's SHA-256 comes once its CDN has the blob."""
    want = hashlib.sha256(BODY).hexdigest()
    host, task, session = make({"url": URL, "digest": "sha256:" + want}, replies=[sized(seed_pieces=[0, 1, 2, 3, 4])])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    deliver(task, seed, 0)
    deliver(task, seed, 1)
    assert task.state is State.DOWNLOADING and len(host.store.hash_jobs) == 2
    session.default = {**sized(seed_pieces=[0, 1, 2, 3, 4], sha256=want), "parents": []}
    host.clock.advance(5)
    assert not task.wholehash.enabled
    for i in (4, 2, 3):
        deliver(task, seed, i)
    assert task.state is State.DONE and task.sha256 == want
    assert host.store.files[TID] == BODY
    assert len(host.store.hash_jobs) == 2 and host.store.whole_reads == 0


def test_the_supernodes_sha256_arriving_while_the_whole_file_is_hashed_lets_the_hash_finish() -> None:
    want = hashlib.sha256(BODY).hexdigest()
    host, task, session = make({"url": URL, "digest": "sha256:" + want}, replies=[sized(seed_pieces=[0, 1, 2, 3, 4])])
    pending: list[defer.Deferred] = []
    run = host.store.run

    def slow_hash(task_id: str, f: Any, *args: Any) -> defer.Deferred:
        if f is not update_hash:
            return run(task_id, f, *args)
        d: defer.Deferred = defer.Deferred()
        pending.append(d)
        return d.addCallback(lambda _: run(task_id, f, *args))

    host.store.run = slow_hash  # type: ignore[method-assign]
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    for i in sorted(seed.requested):
        deliver(task, seed, i)
    assert task.state is State.VERIFYING and pending
    # the CDN's fetch ends now: the next sync brings its SHA-256
    session.default = {**sized(seed_pieces=[0, 1, 2, 3, 4], sha256=want), "parents": []}
    host.clock.advance(5)
    while pending:
        pending.pop(0).callback(None)
    assert task.state is State.DONE and task.sha256 == want


def test_a_supernode_sha256_other_than_the_digest_still_fails_the_whole_file_check() -> None:
    want = hashlib.sha256(BODY).hexdigest()
    host, task, _ = make({"url": URL, "digest": "sha256:" + "0" * 64},
                         replies=[sized(seed_pieces=[0, 1, 2, 3, 4], sha256=want)])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    for i in sorted(seed.requested):
        deliver(task, seed, i)
    assert task.state is State.FAILED
    assert task.error is not None and task.error.code == "DIGEST_MISMATCH"
    assert host.store.removed == [TID] and host.store.finished == []


# -- faults ------------------------------------------------------------------------------------


def test_corrupt_pieces_are_asked_again_reported_and_the_sender_banned() -> None:
    host, task, session = make(replies=[sized(seed_pieces=[])])
    task.start()
    liar, honest = FakeConn("liar"), FakeConn("honest")
    attach(task, liar, range(len(PIECES)))
    (first,) = liar.requested
    deliver(task, liar, first, b"x" * len(PIECES[first]))
    assert task.bad_pieces == 1 and host.stats.discarded["corrupt"] == len(PIECES[first])
    assert first not in liar.remote_have  # type: ignore[operator]
    (second,) = liar.requested
    assert second != first
    deliver(task, liar, second, b"y" * len(PIECES[second]))
    assert liar.aborted is not None and liar.aborted[1] == 403
    assert host.stats.bans["corrupt"] == 1
    assert liar not in task.conns
    # its pieces go to an honest neighbour; the liar cannot come back for a while
    attach(task, honest, range(len(PIECES)))
    assert len(honest.requested) == 1
    again = FakeConn("liar")
    task.neighbours.attached(again)
    assert again.aborted is not None and again not in task.conns
    host.clock.advance(0.5)
    body = session.bodies[-1]
    assert {"index": first, "parent": "liar"} in body["failed"] and body["banned"] == ["liar"]


def test_a_stalled_neighbour_is_abandoned() -> None:
    host, task, _ = make(replies=[sized(seed_pieces=[])])
    task.start()
    slow, other = FakeConn("slow"), FakeConn("other")
    attach(task, slow, range(len(PIECES)))
    (index,) = slow.requested
    attach(task, other, [index])
    assert not other.requested  # the only piece it holds is out to slow
    host.clock.advance(6.0)
    assert slow.aborted == ("stalled", 408) and host.stats.bans["stalled"] == 1
    assert list(other.requested) == [index]


def test_endgame_asks_a_second_holder_and_cancels_the_loser() -> None:
    host, task, _ = make(replies=[sized(seed_pieces=[])])
    host.in_flight_bytes = 100 * PIECE
    host.per_connection = 8
    task.start()
    a, b = FakeConn("a"), FakeConn("b")
    attach(task, a, range(len(PIECES)))
    assert len(a.requested) == len(PIECES)
    for i in sorted(a.requested)[:2]:
        deliver(task, a, i)
    attach(task, b, range(len(PIECES)))
    assert not b.requested
    host.clock.advance(1.0)  # the stall checker looks again: the requests are old enough
    # every piece still out, each asked a second time
    assert set(b.requested) == set(a.requested) and len(b.requested) == 3
    dup = min(b.requested)
    deliver(task, b, dup)
    assert a.cancelled == [dup]
    assert dup not in a.requested


def test_supernode_unreachable_goes_back_to_source() -> None:
    host, task, session = make()
    session.register_replies = [SupernodeUnavailable("no supernode")]
    task.start()
    assert task.state is State.DONE
    assert task.to_json()["piecesVerified"] is False
    assert host.stats.back_to_source["supernode_unreachable"] == 1
    assert host.store.finished == [TID] and host.store.metas[TID] is None
    # one piece of the default size holds it all
    assert task.piece_file(0) == (7, 0, len(BODY))


def test_notbs_fails_instead() -> None:
    _, task, session = make({"url": URL, "notbs": True})
    session.register_replies = [SupernodeUnavailable("no supernode")]
    task.start()
    assert task.state is State.FAILED and task.error is not None and task.error.code == "P2P_FAILED"


def test_supernode_cannot_reach_the_origin() -> None:
    host, task, _ = make(replies=[{"task": {"status": "failed", "error": {"code": "SOURCE_UNREACHABLE"}}}])
    task.start()
    assert task.state is State.DONE and host.stats.back_to_source["supernode_cannot_reach_origin"] == 1


def test_origin_error_at_the_supernode_fails() -> None:
    reply = {"task": {"status": "failed", "error": {"code": "SOURCE_ERROR", "message": "404", "originStatus": 404}}}
    host, task, _ = make(replies=[reply])
    task.start()
    assert task.state is State.FAILED
    assert task.to_json()["error"] == {"code": "SOURCE_ERROR", "message": "404", "originStatus": 404}
    assert host.ended == [task]


def test_register_refused() -> None:
    _, task, session = make()
    session.register_replies = [SupernodeError(403, "FORBIDDEN", "no")]
    task.start()
    assert task.state is State.FAILED and task.error is not None and task.error.code == "FORBIDDEN"


def test_a_supernode_restart_re_announces_what_we_hold() -> None:
    host, task, session = make(replies=[sized()])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    deliver(task, seed, 0)
    session.replies = [SupernodeError(404, "PEER_UNKNOWN", "who?")]
    host.clock.advance(0.5)
    assert session.peer_registrations == 1
    host.clock.advance(0.1)
    assert 0 in session.bodies[-1]["have"]


def test_origin_changed_during_the_download() -> None:
    host, task, _ = make(replies=[sized(version="v1"), sized(version="v2")])
    task.start()
    host.clock.advance(0.5)
    assert task.state is State.FAILED and task.error is not None and task.error.code == "SOURCE_CHANGED"
    assert host.store.removed == [TID]


def test_lost_supernode_without_progress_goes_to_the_origin() -> None:
    host, task, _ = make(replies=[sized()] + [SupernodeUnavailable("gone")] * 100)
    task.start()
    for _ in range(25):
        host.clock.advance(1.0)
    assert task.state is State.DONE
    assert host.stats.back_to_source["supernode_lost"] == 1


def test_restore_serves_a_finished_task() -> None:
    host = FakeHost()
    task = PeerTask(host, TID, {"url": URL})
    task.restore({"length": len(BODY), "pieceSize": PIECE, "digests": DIGESTS, "lastAccess": 5.0})
    assert task.state is State.DONE and task.status == "success"
    assert task.have is not None and task.have.complete
    assert task.last_access == 5.0
    assert task.piece_file(4) == (7, 4 * PIECE, len(PIECES[4]))


def test_task_failed_is_an_exception_with_a_code() -> None:
    e = TaskFailed("X", "y", 500)
    assert (e.code, e.message, e.origin_status) == ("X", "y", 500)


def test_after_an_outage_the_next_sync_says_all_we_hold() -> None:
    host, task, session = make(replies=[sized()])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    deliver(task, seed, 0)  # a seed piece: reported at once
    assert session.bodies[-1]["have"] == [0]
    # the SuperNode restarts; its swarm may be rebuilt without us, and our
    # next sync then taken as a join: it must not miss piece 0
    session.replies = [SupernodeUnavailable("restarting")]
    deliver(task, seed, 1)
    assert session.bodies[-1]["have"] == [1]
    host.clock.advance(1.0)
    assert sorted(session.bodies[-1]["have"]) == [0, 1]


class FakeRequest:
    def __init__(self) -> None:
        self.body = bytearray()
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.body += data


def test_stream_in_order_while_downloading() -> None:
    from dragonfly.peer.stream import TaskStream

    host, task, _ = make(replies=[sized(seed_pieces=[])])
    request = FakeRequest()
    stream = TaskStream(task, request)
    ready = stream.ready()
    assert task.stream_from == 0
    task.start()
    assert ready.called
    done = stream.run()
    peer = FakeConn("peer")
    host.per_connection = 4
    attach(task, peer, range(len(PIECES)))
    # the stream window: the first pieces go first
    assert sorted(peer.requested) == [0, 1, 2, 3]
    deliver(task, peer, 1)
    assert request.body == b""  # piece 0 first
    deliver(task, peer, 0)
    assert bytes(request.body) == BODY[: 2 * PIECE]
    for i in (2, 3):
        deliver(task, peer, i)
    deliver(task, peer, 4)
    assert task.state is State.DONE and done.called
    assert bytes(request.body) == BODY
    assert task.stream_from is None


# -- back to source by piece --------------------------------------------------------------


def _half_then_lost(request: dict[str, Any] | None = None) -> tuple[FakeHost, PeerTask]:
    """Pieces 0 and 1 from the seed, then the SuperNode gone for good: the task goes to the origin."""
    host, task, session = make(request, replies=[sized()])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    deliver(task, seed, 0)
    deliver(task, seed, 1)
    session.default = SupernodeUnavailable("gone")  # type: ignore[assignment]
    session.replies = [SupernodeUnavailable("gone")] * 100
    for _ in range(25):
        host.clock.advance(1.0)
    return host, task


def test_back_to_source_fetches_only_the_missing_pieces() -> None:
    host, task = _half_then_lost({"url": URL, "digest": "sha256:" + hashlib.sha256(BODY).hexdigest()})
    assert task.state is State.DONE
    assert host.ranges == [[(2, 4)]]
    assert task.traffic["back_to_source"] == len(BODY) - 2 * PIECE
    assert bytes(host.store.files[TID]) == BODY
    # verified piece by piece and whole: saved with its digests (so announced again) and served
    assert task.to_json()["piecesVerified"] is True
    assert host.store.metas[TID]["digests"] == DIGESTS
    assert task.piece_file(4) == (7, 4 * PIECE, len(PIECES[4]))


def test_back_to_source_by_piece_continues_the_running_hash() -> None:
    host, task = _half_then_lost({"url": URL, "digest": "sha256:" + hashlib.sha256(BODY).hexdigest()})
    assert task.state is State.DONE and task.sha256 == hashlib.sha256(BODY).hexdigest()
    assert host.store.whole_reads == 0
    assert [job[:2] for job in host.store.hash_jobs] == [(i * PIECE, len(PIECES[i])) for i in range(len(PIECES))]


def test_back_to_source_of_the_whole_file_starts_the_hash_over() -> None:
    host = FakeHost()
    changed = bytes(len(BODY))
    host.origin_body = changed  # the origin changed under the SuperNode's digests
    host.source = (len(changed), hashlib.sha256(changed).hexdigest())
    prefixes: list[int] = []
    whole = host.fetch_from_source

    async def fetch_from_source(task: PeerTask) -> tuple[int, str]:
        prefixes.append(task.wholehash.prefix)  # pieces 0 and 1 were hashed; the new file starts over
        return await whole(task)

    host.fetch_from_source = fetch_from_source  # type: ignore[method-assign]
    _, task = _half_then_lost_on(host, {"url": URL, "digest": "sha256:" + hashlib.sha256(changed).hexdigest()})
    assert task.state is State.DONE and task.sha256 == hashlib.sha256(changed).hexdigest()
    assert prefixes == [0]


def test_back_to_source_whole_file_digest_mismatch_fails() -> None:
    host, task = _half_then_lost({"url": URL, "digest": "sha256:" + "0" * 64})
    assert task.state is State.FAILED and task.error is not None and task.error.code == "DIGEST_MISMATCH"
    assert host.store.removed == [TID]


def test_back_to_source_piece_of_another_version_fetches_the_whole_file() -> None:
    host = FakeHost()
    host.origin_body = bytes(len(BODY))  # the origin changed under the SuperNode's digests
    changed = bytes(len(BODY))
    host.source = (len(changed), hashlib.sha256(changed).hexdigest())
    _, task = _half_then_lost_on(host)
    assert task.state is State.DONE
    assert task.to_json()["piecesVerified"] is False
    assert host.store.metas[TID] is None  # never announced as the SuperNode's version
    assert task.sha256 == hashlib.sha256(changed).hexdigest()


def test_back_to_source_cut_answer_is_asked_again() -> None:
    host = FakeHost()
    host.range_error = TaskFailed("SOURCE_TRUNCATED", "cut")
    _, task = _half_then_lost_on(host)
    assert task.state is State.DONE
    assert host.ranges == [[(2, 4)], [(2, 4)]]
    assert bytes(host.store.files[TID]) == BODY


def test_back_to_source_origin_error_fails() -> None:
    host = FakeHost()
    host.range_error = TaskFailed("SOURCE_ERROR", "500", 500)
    _, task = _half_then_lost_on(host)
    assert task.state is State.FAILED and task.error is not None and task.error.origin_status == 500


def test_back_to_source_without_digests_fetches_the_whole_file() -> None:
    host, task, session = make(replies=[{**sized(), "digests": DIGESTS[:2]}])
    task.start()
    session.replies = [SupernodeUnavailable("gone")] * 100
    for _ in range(25):
        host.clock.advance(1.0)
    assert task.state is State.DONE and host.ranges == []
    assert task.to_json()["piecesVerified"] is False


def _half_then_lost_on(host: FakeHost, request: dict[str, Any] | None = None) -> tuple[FakeHost, PeerTask]:
    task = PeerTask(host, TID, request or {"url": URL})
    session = host.sessions[-1]
    session.replies = [sized()]
    session.default = {**session.default, "seedPieces": [0, 1]}
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    deliver(task, seed, 0)
    deliver(task, seed, 1)
    session.replies = [SupernodeUnavailable("gone")] * 100
    for _ in range(25):
        host.clock.advance(1.0)
    return host, task


def test_a_restarting_supernode_is_waited_for_instead_of_the_origin() -> None:
    host = FakeHost()
    host.supernode_seen = 0.0  # a SuperNode answered a moment ago
    task = PeerTask(host, TID, {"url": URL})
    session = host.sessions[-1]
    session.register_replies = [SupernodeUnavailable("restarting")] * 3
    session.replies = [sized()]
    task.start()
    assert task.state is State.REGISTERING
    for _ in range(3):
        host.clock.advance(1.0)
    assert task.state is State.DOWNLOADING
    assert host.stats.back_to_source.get("supernode_unreachable", 0) == 0


def test_a_supernode_gone_for_good_sends_a_new_task_to_the_origin() -> None:
    host = FakeHost()
    host.supernode_seen = 0.0
    task = PeerTask(host, TID, {"url": URL})
    host.sessions[-1].register_replies = [SupernodeUnavailable("gone")] * 100
    task.start()
    for _ in range(9):
        host.clock.advance(1.0)
    assert task.state is State.REGISTERING
    host.clock.advance(1.0)
    assert task.state is State.DONE and host.stats.back_to_source["supernode_unreachable"] == 1


# -- the parts stop with the task -----------------------------------------------------------


def test_nothing_keeps_ticking_once_the_task_ended() -> None:
    host, task, session = make(replies=[sized(seed_pieces=list(range(len(PIECES))))])
    task.start()
    host.clock.advance(1.0)  # the stall check runs while downloading
    assert host.clock.getDelayedCalls()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    for i in sorted(seed.requested):
        deliver(task, seed, i)
    assert task.state is State.DONE
    host.clock.advance(0)
    assert host.clock.getDelayedCalls() == []
    syncs = len(session.bodies)
    host.clock.advance(60.0)
    assert len(session.bodies) == syncs


def test_a_failed_task_stops_syncing_and_checking() -> None:
    host, task, session = make(replies=[sized()])
    task.start()
    session.replies = [SupernodeError(400, "BAD_REQUEST", "no")]
    host.clock.advance(0.5)
    assert task.state is State.FAILED and task.error is not None and task.error.code == "BAD_REQUEST"
    assert host.clock.getDelayedCalls() == []


def test_the_parts_attributes_are_read_only_through_the_task() -> None:
    host, task, _ = make(replies=[sized()])
    task.start()
    assert task.length == len(BODY) and task.count == len(PIECES) and task.piece_size == PIECE
    assert task.digests[0] == bytes.fromhex(DIGESTS[0]) and task.picker is not None
    with pytest.raises(AttributeError):
        task.length = 1
    task.stream_from = 2
    assert task.picker.stream_from == 2


def test_the_parents_named_while_the_file_is_made_are_connected_once_it_is() -> None:
    """The answer that sized the task named the seed: connected when the file is ready, not after another answer."""
    host, task, session = make(replies=[sized()])
    made: defer.Deferred = defer.Deferred()
    host.store.prepare = lambda task_id, length: made  # type: ignore[method-assign]
    session.default = {"task": {"status": "running"}, "syncInterval": 0.5}  # (names no parents)
    task.start()
    assert task.state is State.ALLOCATING and host.block_factory.made == {}
    answers = len(session.bodies)
    host.store.files[TID] = bytearray(len(BODY))
    made.callback(None)
    assert task.state is State.DOWNLOADING
    assert set(host.block_factory.made) == {SEED_ID}
    # (the kicked sync went out too; its answer named nobody)
    host.clock.advance(0)
    assert len(session.bodies) == answers + 1


def test_a_lost_seed_connection_syncs_at_once_and_finds_the_outage() -> None:
    host, task, session = make(replies=[sized()])
    task.start()
    seed = host.block_factory.made[SEED_ID]
    attach(task, seed, range(len(PIECES)))
    deliver(task, seed, 0)
    host.clock.advance(0)
    syncs = len(session.bodies)
    # a neighbour lost: no sync before the interval
    peer = FakeConn("peer-b", initiator=False)
    attach(task, peer, [2])
    task.neighbours.detached(peer, "gone")
    host.clock.advance(0)
    assert len(session.bodies) == syncs
    # the SuperNode dies: its seed's connection breaks, and the task asks at once
    session.replies = [SupernodeUnavailable("refused")] * 5
    task.neighbours.detached(seed, "Connection was closed cleanly.")
    host.clock.advance(0)
    assert len(session.bodies) == syncs + 1
    # then every 0.1 s (the outage cadence) until it answers again
    host.clock.advance(0.1)
    assert len(session.bodies) == syncs + 2


def test_lost_seed_connections_sync_at_most_once_a_second() -> None:
    host, task, session = make(replies=[sized()])
    task.start()
    host.clock.advance(0)
    syncs = len(session.bodies)
    for _ in range(3):
        seed = host.block_factory.made[SEED_ID]
        attach(task, seed, range(len(PIECES)))
        task.neighbours.detached(seed, "refused again")
        host.clock.advance(0.01)
    assert len(session.bodies) == syncs + 1
    host.clock.advance(1.0)
    attach(task, seed, range(len(PIECES)))
    task.neighbours.detached(seed, "lost")
    host.clock.advance(0)
    assert len(session.bodies) >= syncs + 2

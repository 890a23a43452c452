"""
Large pieces hashed and written part by part while they arrive
(dragonfly/core/partwrite.py, L{TaskPieces.part}, the connection's
C{piece_part} marks and the receiver's hold): what a piece in flight keeps
in memory is bounded by a few parts, whatever the piece's size, and no
part is ever written over a verified piece.

The store runs the real blocking functions on a file in C{tmp_path},
synchronously or when flushed; no reactor.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

from twisted.internet import defer

from dragonfly.core import partwrite
from dragonfly.core.partwrite import PART, WriteGuard, drop_pages, seal_part, write_guarded, write_part
from dragonfly.peer.metrics import PeerStats
from dragonfly.peer.pieces import NO_PART, TaskPieces
from dragonfly.protocol import frames as F
from dragonfly.protocol.receive import aligned

from .test_block_receive import Leech, Link
from .test_peer_pieces import Task

TID = "p" * 64
PIECE = 4 * PART + 12_345  # four whole parts and a short one
BODY = os.urandom(2 * PIECE)
PIECES = [BODY[:PIECE], BODY[PIECE:]]
DIGESTS = [hashlib.sha256(p).digest() for p in PIECES]


class FileStore:
    """A task file on disk, written by partwrite's functions; with C{hold}, jobs wait for L{flush}."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "wb") as f:
            f.truncate(len(BODY))
        self.hold = False
        self.jobs: list[tuple[defer.Deferred, Any, tuple[Any, ...]]] = []
        self.spans: list[tuple[int, int]] = []  # (start, end) of each part written, within its piece

    def _run(self, fn: Any, *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((d, fn, args))
        if not self.hold:
            self.flush()
        return d

    def flush(self) -> None:
        while self.jobs:
            d, fn, args = self.jobs.pop(0)
            try:
                result = fn(self.path, *args)
            except Exception as e:  # pragma: no cover - a bug in the test
                d.errback(e)
            else:
                d.callback(result)

    def write_verified(self, task_id: str, offset: int, data: Any, digest: bytes) -> defer.Deferred:
        raise AssertionError("a store that writes parts is always given a guard")

    def write_guarded(self, task_id: str, guard: Any, index: int, offset: int, data: Any, digest: bytes) -> defer.Deferred:
        return self._run(write_guarded, guard, index, offset, bytes(data), digest)

    def write_part(self, task_id: str, guard: Any, index: int, token: int, hasher: Any, buf: Any,
                   start: int, end: int, offset: int) -> defer.Deferred:
        self.spans.append((start, end))
        return self._run(write_part, guard, index, token, hasher, buf, start, end, offset)

    def seal_part(self, task_id: str, guard: Any, index: int, token: int, hasher: Any, buf: Any,
                  start: int, offset: int, digest: bytes) -> defer.Deferred:
        return self._run(seal_part, guard, index, token, hasher, buf, start, offset, digest)

    def content(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


class Conn:
    """A connection handle: records the holds of its reads."""

    def __init__(self) -> None:
        self.holds: list[bool] = []
        self.held = False

    def hold_reads(self, on: bool) -> None:
        self.holds.append(on)
        self.held = on


def make(tmp_path: Any) -> tuple[TaskPieces, FileStore, Task, list[Any]]:
    store = FileStore(str(tmp_path / "task"))
    task = Task()
    released: list[Any] = []
    pieces = TaskPieces(TID, store, PeerStats(), released.append, task, random.Random(1))  # type: ignore[arg-type]
    pieces.size(len(BODY), PIECE)
    for i, d in enumerate(DIGESTS):
        pieces.set_digest(i, d)
    return pieces, store, task, released


def arrive(pieces: TaskPieces, conn: Any, index: int, body: bytes, step: int = 1 << 20) -> Any:
    """Piece C{index} arrives into a pool-like buffer C{step} bytes at a time, the side told at its marks."""
    buf = aligned(len(body))
    mark = pieces.part(conn, index, buf, 0)
    filled = 0
    while filled < len(body):
        n = min(step, len(body) - filled)
        buf[filled:filled + n] = body[filled:filled + n]
        filled += n
        if filled >= mark and filled < len(body):
            mark = pieces.part(conn, index, buf, filled)
    pieces.arrived(conn, index, buf, "remote_peer")
    return buf


def fill_until_held(pieces: TaskPieces, conn: Conn, buf: Any) -> int:
    """Piece 0's bytes into C{buf} as far as each part mark asks, until the connection's reads are held; the bytes in."""
    mark = pieces.part(conn, 0, buf, 0)
    filled = 0
    while not conn.held:
        assert filled < PIECE - PART, "never held"
        filled = mark
        buf[:filled] = PIECES[0][:filled]
        mark = pieces.part(conn, 0, buf, filled)
    return filled


def test_a_large_piece_is_hashed_and_written_in_parts(tmp_path: Any) -> None:
    pieces, store, task, released = make(tmp_path)
    conn = Conn()
    buf = arrive(pieces, conn, 1, PIECES[1])
    assert store.spans and all(s % PART == 0 and e % PART == 0 for s, e in store.spans)
    assert store.spans[0][0] == 0 and store.spans[-1][1] == 4 * PART  # then the short tail, with the digest
    assert task.events == [("stored", conn, 1, PIECE)]
    assert pieces.have is not None and 1 in pieces.have
    assert store.content()[PIECE:] == PIECES[1]
    assert released == [buf] and not conn.holds


def test_the_parts_pages_go_back_to_the_system(tmp_path: Any) -> None:
    pieces, store, task, released = make(tmp_path)
    buf = arrive(pieces, Conn(), 0, PIECES[0])
    # MADV_DONTNEED on a private anonymous map: the pages read as zeros again
    assert bytes(buf) == bytes(PIECE)
    assert store.content()[:PIECE] == PIECES[0]


def test_a_corrupt_large_piece_is_not_held(tmp_path: Any) -> None:
    pieces, store, task, released = make(tmp_path)
    conn = Conn()
    bad = bytearray(PIECES[0])
    bad[PART + 7] ^= 1
    arrive(pieces, conn, 0, bytes(bad))
    assert task.events == [("corrupt", conn, 0, PIECE)]
    assert pieces.have is not None and 0 not in pieces.have
    # (asking again is the task's, through the picker)
    assert pieces.picker is not None
    pieces.picker.add(conn)
    pieces.picker.corrupt(conn, 0)
    # a good copy then takes the piece's turn and overwrites what the bad one wrote
    arrive(pieces, conn, 0, PIECES[0])
    assert task.events[-1] == ("stored", conn, 0, PIECE)
    assert store.content()[:PIECE] == PIECES[0]


def test_reads_are_held_while_parts_wait_for_the_disk(tmp_path: Any) -> None:
    pieces, store, task, released = make(tmp_path)
    store.hold = True
    conn = Conn()
    buf = aligned(PIECE)
    filled = fill_until_held(pieces, conn, buf)
    # held with no more than PARTS_AHEAD (and the part being filled) arrived and not written
    assert filled <= TaskPieces.PARTS_AHEAD + PART
    store.flush()
    assert not conn.held and conn.holds == [True, False]


def test_pieces_up_to_the_threshold_are_kept_whole(tmp_path: Any) -> None:
    pieces, store, task, released = make(tmp_path)
    assert pieces.part(Conn(), 0, bytearray(TaskPieces.PARTS_ABOVE), 0) == NO_PART


def test_one_copy_of_a_piece_writes_parts_at_a_time(tmp_path: Any) -> None:
    pieces, store, task, released = make(tmp_path)
    first, second = Conn(), Conn()
    assert pieces.part(first, 0, aligned(PIECE), 0) == PART
    assert pieces.part(second, 0, aligned(PIECE), 0) == NO_PART  # kept whole, verified, then written
    pieces.drop_parts(first)  # its connection went away
    assert pieces.part(second, 0, aligned(PIECE), 0) == PART


def test_part_state_stays_bounded(tmp_path: Any) -> None:
    pieces, store, task, released = make(tmp_path)
    conn = Conn()
    for _ in range(3):
        buf = aligned(PIECE)
        pieces.part(conn, 0, buf, 0)  # started, never finished: the connection moved on
    arrive(pieces, conn, 1, PIECES[1])
    assert pieces._parts == {}
    assert pieces._guard is not None and pieces._guard.owners == {}


# -- the guard ------------------------------------------------------------------------------


def _piece_file(tmp_path: Any) -> str:
    """A task file of one piece's length, empty."""
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.truncate(PIECE)
    return path


def test_no_part_is_written_over_a_sealed_piece(tmp_path: Any) -> None:
    path = _piece_file(tmp_path)
    guard = WriteGuard()
    token = guard.claim(0)
    assert token is not None and guard.claim(0) is None
    assert write_guarded(path, guard, 0, 0, PIECES[0], DIGESTS[0]) is True
    junk = aligned(PIECE)
    junk[:] = os.urandom(PIECE)
    write_part(path, guard, 0, token, hashlib.sha256(), junk, 0, PART, 0)
    assert seal_part(path, guard, 0, token, hashlib.sha256(), junk, PART, 0, DIGESTS[0]) is False
    with open(path, "rb") as f:
        assert f.read() == PIECES[0]
    guard.release(0, token)
    assert guard.claim(0) is None  # sealed: nobody writes parts of it any more


def test_a_copy_that_lost_its_turn_writes_nothing(tmp_path: Any) -> None:
    path = _piece_file(tmp_path)
    guard = WriteGuard()
    old = guard.claim(0)
    assert old is not None
    guard.release(0, old)
    new = guard.claim(0)
    assert new is not None and new != old
    buf = aligned(PIECE)
    buf[:] = PIECES[0]
    h = hashlib.sha256()
    write_part(path, guard, 0, old, h, buf, 0, PART, 0)
    with open(path, "rb") as f:
        assert f.read() == bytes(PIECE)


def _write_in_thread(path: str, guard: WriteGuard, index: int) -> Any:
    """write_guarded of piece C{index} of L{BODY} at its offset, in a thread of its own (started)."""
    import threading

    t = threading.Thread(target=write_guarded, args=(path, guard, index, index * PIECE, PIECES[index], DIGESTS[index]))
    t.start()
    return t


def test_pieces_are_written_under_their_own_locks(tmp_path: Any) -> None:
    # a write under way of one piece (its lock held) keeps another copy of
    # that piece waiting, not the writes of the file's other pieces
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.truncate(len(BODY))
    guard = WriteGuard(stripes=64)
    assert guard.lock_for(0) is not guard.lock_for(1) and guard.lock_for(0) is guard.lock_for(64)
    with guard.lock_for(0):
        other = _write_in_thread(path, guard, 1)
        other.join(10.0)
        assert not other.is_alive() and 1 in guard.sealed
        same = _write_in_thread(path, guard, 0)
        same.join(0.2)
        assert same.is_alive() and 0 not in guard.sealed
    same.join(10.0)
    assert not same.is_alive() and guard.sealed == {0, 1}
    with open(path, "rb") as f:
        assert f.read() == BODY


def test_one_stripe_is_one_lock_for_the_file(tmp_path: Any) -> None:
    # DRAGONFLY_GUARD_STRIPES=1, the comparison's old behaviour: every piece waits for any write
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.truncate(len(BODY))
    guard = WriteGuard(stripes=1)
    with guard.lock_for(0):
        other = _write_in_thread(path, guard, 1)
        other.join(0.2)
        assert other.is_alive() and not guard.sealed
    other.join(10.0)
    assert guard.sealed == {1}


def test_drop_pages_ignores_what_is_not_a_map() -> None:
    b = bytearray(b"x" * 10_000)
    drop_pages(b, 0, 4096)
    assert b == bytearray(b"x" * 10_000)
    assert partwrite.PART % 4096 == 0


# -- the connection's marks and the receiver's hold ------------------------------------------


class PartLeech(Leech):
    """A leech taking its pieces' parts: each at C{step} bytes, holding reads on request."""

    def __init__(self, step: int, hold_at: int | None = None) -> None:
        super().__init__()
        self.step = step
        self.hold_at = hold_at
        self.seen: list[int] = []
        self.link: Any = None

    def piece_part(self, conn: Any, index: int, buf: Any, filled: int) -> int:
        self.seen.append(filled)
        if self.hold_at is not None and filled >= self.hold_at:
            self.link.rx.hold(True)
        return filled - filled % self.step + self.step


def test_the_window_stops_at_each_mark_and_the_side_is_told() -> None:
    side = PartLeech(step=30_000)
    link = Link(side)
    side.link = link
    body = os.urandom(100_000)
    link.remote.sendall(F.piece_header(0, len(body)) + body)
    link.twisted_reads(1000)
    assert side.pieces and bytes(side.pieces[0][1]) == body
    assert side.seen[0] == 0 and side.seen[1:] == [30_000, 60_000, 90_000]


def test_a_hold_leaves_the_rest_in_the_socket_until_released() -> None:
    side = PartLeech(step=30_000, hold_at=30_000)
    link = Link(side)
    side.link = link
    body = os.urandom(100_000)
    frame = F.piece_header(0, len(body)) + body
    link.remote.sendall(frame)
    link.twisted_reads(1000)
    assert link.transport.state == "paused" and side.pieces == []
    assert link.conn._rx_off == 30_000  # nothing read past the mark that held
    side.hold_at = None
    link.rx.hold(False)
    assert link.transport.state == "producing"
    link.rx.read_into_piece(1 << 20)
    assert side.pieces and bytes(side.pieces[0][1]) == body


def test_a_hold_and_the_download_limits_pause_apart() -> None:
    from twisted.internet.task import Clock

    from dragonfly.core.ratelimit import TokenBucket

    clock = Clock()
    bucket = TokenBucket(100_000, clock, burst=0)
    link = Link(Leech(limits=[bucket]), clock=clock)
    assert link.rx.read_paused and link.transport.state == "paused"  # the handshake's bytes: in debt
    link.rx.hold(True)
    clock.advance(10.0)  # the pacing is over, the hold is not
    assert not link.rx.read_paused and link.transport.state == "paused"
    link.rx.hold(False)
    assert link.transport.state == "producing"
    # and the other way round: a hold let go while the pacing still pauses
    link.rx.read_paused = True
    link.transport.pauseProducing()
    link.rx.hold(True)
    link.rx.hold(False)
    assert link.transport.state == "paused"


def test_a_dropped_piece_gives_its_buffer_back_once_no_part_job_reads_it(tmp_path: Any) -> None:
    pieces, store, _task, released = make(tmp_path)
    store.hold = True
    conn = Conn()
    buf = aligned(PIECE)
    assert pieces.part(conn, 0, buf, 0) == PART
    buf[:2 * PART] = PIECES[0][:2 * PART]
    pieces.part(conn, 0, buf, 2 * PART)  # a part job is out, reading buf
    assert store.jobs
    pieces.dropped(conn, buf)  # cancelled while arriving, or the connection closed
    assert released == [] and not conn.held
    store.flush()
    assert released == [buf]
    # its claim went with it: another copy of the piece may write parts
    assert pieces.part(Conn(), 0, aligned(PIECE), 0) == PART


def test_a_dropped_whole_piece_gives_its_buffer_back_at_once(tmp_path: Any) -> None:
    pieces, _store, _task, released = make(tmp_path)
    buf = bytearray(TaskPieces.PARTS_ABOVE)
    assert pieces.part(Conn(), 1, buf, 0) == NO_PART
    pieces.dropped(Conn(), buf)
    assert released == [buf]

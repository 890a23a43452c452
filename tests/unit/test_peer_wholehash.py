"""
The running whole-file SHA-256 (L{dragonfly.peer.wholehash}): the digest is
the file's whatever order the pieces are stored in and whenever the pool
runs its jobs; one job at a time; buffers kept only until hashed; a reset
starts over; a failed job falls back to reading the whole file.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from dragonfly.core.bitmap import Bitmap
from dragonfly.core.pieces import piece_count, piece_span
from dragonfly.peer.wholehash import StartedOver, WholeHash, update_hash


class Pieces:
    def __init__(self, length: int, piece_size: int) -> None:
        self.length: int | None = length
        self.piece_size = piece_size
        self.count: int | None = piece_count(length, piece_size)
        self.have: Bitmap | None = Bitmap(self.count)


class Pool:
    """Jobs run only when the test says, one file per pool; never two jobs at once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.jobs: list[tuple[defer.Deferred, Any, int, int, Any]] = []
        self.most = 0
        self.fail_next = False
        self.file_reads = 0

    def update(self, hasher: Any, offset: int, size: int, data: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((d, hasher, offset, size, data))
        self.most = max(self.most, len(self.jobs))
        return d

    def run_one(self) -> bool:
        if not self.jobs:
            return False
        d, hasher, offset, size, data = self.jobs.pop(0)
        if self.fail_next:
            self.fail_next = False
            d.errback(OSError("gone"))
            return True
        if data is None:
            self.file_reads += size
        update_hash(hasher, self.path, offset, size, data)
        d.callback(None)
        return True

    def drain(self) -> None:
        while self.run_one():
            pass


class Owner:
    """Plays L{TaskPieces}: writes a piece, offers its buffer, and scribbles over the buffer once given back."""

    def __init__(self, path: str, body: bytes, pieces: Pieces, wh: WholeHash) -> None:
        self.path, self.body, self.pieces, self.wh = path, body, pieces, wh
        self.held = 0
        self.most_held = 0

    def store(self, index: int) -> None:
        assert self.pieces.length is not None and self.pieces.have is not None
        offset, size = piece_span(index, self.pieces.length, self.pieces.piece_size)
        buf = bytearray(self.body[offset : offset + size])
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(buf)
        held = self.wh.offer(index, buf)
        if held is None:
            buf[:] = bytes(len(buf))
        else:
            self.held += 1
            self.most_held = max(self.most_held, self.held)
            held.addCallback(self._given_back, buf)
        self.pieces.have.set(index)

    def _given_back(self, _: Any, buf: bytearray) -> None:
        self.held -= 1
        buf[:] = bytes(len(buf))  # a reused buffer: whatever was not hashed by now is lost


def setup(tmp_path: Any, length: int, piece_size: int, seed: int = 0) -> tuple[bytes, Pieces, Pool, WholeHash, Owner]:
    body = random.Random(seed).randbytes(length)
    path = str(tmp_path / f"task-{seed}-{length}-{piece_size}.data")
    with open(path, "wb") as f:
        f.truncate(length)
    pieces = Pieces(length, piece_size)
    pool = Pool(path)

    def whole() -> defer.Deferred:
        with open(path, "rb") as f:
            return defer.succeed(hashlib.sha256(f.read()).hexdigest())

    wh = WholeHash(pieces, pool.update, whole)
    return body, pieces, pool, wh, Owner(path, body, pieces, wh)


def finish(wh: WholeHash, pool: Pool) -> str:
    d = wh.finish()
    pool.drain()
    assert d.called
    result: str = d.result
    return result


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(0, 40_000),
    piece_size=st.sampled_from([1000, 4096, 7777]),
    order_seed=st.integers(0, 2**32 - 1),
    runs=st.lists(st.integers(0, 3), max_size=200),
)
def test_digest_is_the_files_in_any_order(tmp_path_factory: Any, length: int, piece_size: int, order_seed: int, runs: list[int]) -> None:
    tmp_path = tmp_path_factory.mktemp("wh")
    body, pieces, pool, wh, owner = setup(tmp_path, length, piece_size, order_seed % 1000)
    assert pieces.count is not None
    order = list(range(pieces.count))
    random.Random(order_seed).shuffle(order)
    for k, index in enumerate(order):
        owner.store(index)
        # the pool runs some of the queued jobs between arrivals
        for _ in range(runs[k] if k < len(runs) else 1):
            pool.run_one()
        assert pool.most <= 1
        assert len(wh._held) <= WholeHash.MAX_HELD
    assert finish(wh, pool) == hashlib.sha256(body).hexdigest()
    assert pool.most <= 1
    assert owner.held == 0
    assert wh.from_buffers + wh.from_file == length


def test_in_order_pieces_are_hashed_from_their_buffers(tmp_path: Any) -> None:
    body, pieces, pool, wh, owner = setup(tmp_path, 10 * 1000 + 17, 1000)
    assert pieces.count is not None
    for i in range(pieces.count):
        owner.store(i)
        pool.run_one()
    d = wh.finish()
    assert d.called and d.result == hashlib.sha256(body).hexdigest()
    assert pool.file_reads == 0 and wh.from_buffers == len(body)


def test_only_the_rest_is_left_at_the_end(tmp_path: Any) -> None:
    """Pieces stored ahead of the prefix are read back while the download runs, not at the end."""
    body, pieces, pool, wh, owner = setup(tmp_path, 8 * 1000, 1000)
    for i in (3, 4, 5, 6, 1, 2, 0):
        owner.store(i)
        pool.drain()
    assert wh.prefix == 7 and not pool.jobs
    owner.store(7)
    d = wh.finish()
    assert len(pool.jobs) == 1 and pool.jobs[0][3] == 1000 and pool.jobs[0][4] is not None
    pool.drain()
    assert d.result == hashlib.sha256(body).hexdigest()


def test_buffers_are_kept_no_longer_than_hashed_and_at_most_max_held(tmp_path: Any) -> None:
    body, pieces, pool, wh, owner = setup(tmp_path, 20 * 1000, 1000)
    for i in range(20):
        owner.store(i)  # the pool runs nothing meanwhile
    assert owner.held <= WholeHash.MAX_HELD + 1  # the one being hashed, and those waiting
    assert finish(wh, pool) == hashlib.sha256(body).hexdigest()
    assert owner.held == 0


def test_a_failed_job_falls_back_to_the_whole_file(tmp_path: Any) -> None:
    body, pieces, pool, wh, owner = setup(tmp_path, 5 * 1000, 1000)
    owner.store(0)
    pool.fail_next = True
    pool.run_one()
    for i in range(1, 5):
        owner.store(i)
    assert owner.held == 0
    assert finish(wh, pool) == hashlib.sha256(body).hexdigest()


def test_a_mismatching_file_gives_its_own_digest(tmp_path: Any) -> None:
    """The hash is of the bytes stored, never a digest told: a changed byte shows."""
    body, pieces, pool, wh, owner = setup(tmp_path, 3 * 1000, 1000)
    owner.body = body[:1500] + b"X" + body[1501:]
    for i in (2, 0, 1):
        owner.store(i)
    assert finish(wh, pool) == hashlib.sha256(owner.body).hexdigest() != hashlib.sha256(body).hexdigest()


def test_reset_starts_over(tmp_path: Any) -> None:
    body, pieces, pool, wh, owner = setup(tmp_path, 6 * 1000, 1000)
    for i in (0, 1, 2):
        owner.store(i)
    pool.run_one()  # piece 0 hashed, piece 1 under way
    # a new version: new geometry and bytes, the old jobs still running
    new = os.urandom(5 * 700)
    wh.reset()
    with open(owner.path, "wb") as f:
        f.truncate(len(new))
    pieces.length, pieces.piece_size = len(new), 700
    pieces.count = piece_count(len(new), 700)
    pieces.have = Bitmap(pieces.count)
    owner.body = new
    # buffers kept for the old version given back, but the one the pool is hashing
    assert owner.held == 1
    pool.run_one()
    assert owner.held == 0
    for i in (4, 0, 3, 1, 2):
        owner.store(i)
    assert finish(wh, pool) == hashlib.sha256(new).hexdigest()


def test_disabled_reads_the_whole_file(tmp_path: Any) -> None:
    body, pieces, pool, wh, owner = setup(tmp_path, 3 * 1000, 1000)
    wh.enabled = False
    for i in range(3):
        owner.store(i)
    assert not pool.jobs and owner.held == 0
    assert finish(wh, pool) == hashlib.sha256(body).hexdigest()


def test_empty_file(tmp_path: Any) -> None:
    _, _, pool, wh, _ = setup(tmp_path, 0, 1000)
    assert finish(wh, pool) == hashlib.sha256(b"").hexdigest()


def test_update_hash_reads_spans_in_blocks(tmp_path: Any, monkeypatch: Any) -> None:
    import dragonfly.peer.wholehash as mod

    monkeypatch.setattr(mod, "READ_BLOCK", 1000)
    body = os.urandom(5555)
    path = tmp_path / "f"
    path.write_bytes(body)
    h = hashlib.sha256()
    update_hash(h, str(path), 123, 4000)
    assert h.hexdigest() == hashlib.sha256(body[123:4123]).hexdigest()


def test_a_reset_while_finishing_fails_the_wait(tmp_path: Any) -> None:
    body, pieces, pool, wh, owner = setup(tmp_path, 3 * 1000, 1000)
    for i in (2, 1, 0):
        owner.store(i)
    d = wh.finish()
    assert not d.called
    wh.reset()
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(StartedOver)
    pool.drain()
    assert owner.held == 0

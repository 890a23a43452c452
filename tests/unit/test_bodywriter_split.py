"""
The body writer's whole-file hash in a pool chain of its own, beside the
chunks' chain (L{dragonfly.core.bodywriter.ChunkedFileWriter}): whatever
order the pool finishes the two chains' jobs in, the file, the chunks'
digests (in order) and the whole-file SHA-256 are those of the body; C{done}
waits for the last whole-file job; both chains count against the backlog
that pauses the body.  No sockets, a fake clock, a pool run by hand.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from dragonfly.core import bodywriter
from dragonfly.core.bodywriter import ChunkedFileWriter, ResumePoint, rehash_prefix

from .test_supernode_api import FakeTransport

BODY = random.Random(5).randbytes(9 * 1000 + 123)


class HandPool:
    """A pool whose jobs wait until the test runs them, in any order."""

    def __init__(self) -> None:
        self.jobs: list[tuple[defer.Deferred[Any], Any, tuple[Any, ...]]] = []

    def run(self, f: Any, *a: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.jobs.append((d, f, a))
        return d

    def step(self, k: int) -> None:
        d, f, a = self.jobs.pop(k % len(self.jobs))
        d.callback(f(*a))


@pytest.fixture(autouse=True)
def split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodywriter, "CDN_SPLIT_HASH", True)


def digests(body: bytes, chunk: int) -> list[str]:
    return [hashlib.sha256(body[i : i + chunk]).hexdigest() for i in range(0, len(body), chunk)]


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    st.integers(1, len(BODY)),
    st.sampled_from([1000, 4096, 333]),
    st.lists(st.integers(1, 2500), max_size=12),
    st.lists(st.integers(0, 50), max_size=40),
    st.data(),
)
def test_any_order_of_the_two_chains_gives_the_body_and_its_hashes(
    tmp_path: Any, size: int, chunk: int, feeds: list[int], picks: list[int], data: Any
) -> None:
    body = BODY[:size]
    cut = data.draw(st.integers(0, size), label="resumed at")
    path = str(tmp_path / f"b-{size}-{chunk}-{cut}")
    with open(path, "wb") as f:
        f.write(body[:cut])
    start = rehash_prefix(path, cut, chunk) if cut else None
    fd = os.open(path, os.O_WRONLY)
    pool = HandPool()
    seen: list[tuple[int, str]] = []
    writer = ChunkedFileWriter(pool, Clock(), fd, chunk, size, on_chunk=lambda i, d: seen.append((i, d)), start=start)
    writer.MIN_BLOCK = 700  # blocks of a few hundred bytes, so that the chains interleave
    writer.BLOCK = 1500
    writer.makeConnection(FakeTransport())
    at = cut
    picks = list(picks)
    for n in feeds:
        writer.dataReceived(body[at : at + n])
        at = min(at + n, size)
        while picks and pool.jobs and picks[0] % 3:  # run some jobs between the reads, any of them
            pool.step(picks.pop(0))
        if picks:
            picks.pop(0)
    writer.dataReceived(body[at:])
    writer.connectionLost(Failure(ResponseDone()))
    out: list[Any] = []
    writer.done.addBoth(out.append)
    k = 0
    while pool.jobs:
        pool.step(picks[k % len(picks)] if picks else 0)
        k += 1
    assert out and out[0] == (size, hashlib.sha256(body).hexdigest())
    with open(path, "rb") as f:
        assert f.read() == body
    before = digests(body[: cut - cut % chunk], chunk)
    assert before + [d for _, d in seen] == digests(body, chunk)
    assert [i for i, _ in seen] == list(range(len(before), len(digests(body, chunk))))


def test_done_waits_for_the_whole_file_hash(tmp_path: Any) -> None:
    """Every chunk stored is not the end: C{done} fires with the whole-file hash once its last job ran."""
    fd = os.open(str(tmp_path / "w"), os.O_WRONLY | os.O_CREAT, 0o644)
    pool = HandPool()
    writer = ChunkedFileWriter(pool, Clock(), fd, 1000, len(BODY))
    writer.makeConnection(FakeTransport())
    writer.dataReceived(BODY)
    writer.connectionLost(Failure(ResponseDone()))
    out: list[Any] = []
    writer.done.addBoth(out.append)
    file_jobs = [j for j in pool.jobs if j[1] is bodywriter._hash_parts]
    assert file_jobs
    while len(pool.jobs) > len([j for j in pool.jobs if j[1] is bodywriter._hash_parts]):
        k = next(i for i, j in enumerate(pool.jobs) if j[1] is not bodywriter._hash_parts)
        pool.step(k)
    assert out == []  # the file is written and closed, its hash not yet taken
    while pool.jobs:
        pool.step(0)
    assert out == [(len(BODY), hashlib.sha256(BODY).hexdigest())]


def test_a_whole_file_hash_behind_pauses_the_body(tmp_path: Any) -> None:
    """The chunks' chain keeping up is not enough: the whole-file chain's backlog pauses the body too."""
    fd = os.open(str(tmp_path / "p"), os.O_WRONLY | os.O_CREAT, 0o644)
    pool = HandPool()
    writer = ChunkedFileWriter(pool, Clock(), fd, 1 << 20)
    t = FakeTransport()
    writer.makeConnection(t)
    block = b"y" * (1 << 20)
    for _ in range(ChunkedFileWriter.MAX_PENDING_BYTES >> 20):
        writer.dataReceived(block)
        # the chunks are written at once; the whole-file hash's first job stays waiting
        while any(j[1] is not bodywriter._hash_parts for j in pool.jobs):
            pool.step(next(i for i, j in enumerate(pool.jobs) if j[1] is not bodywriter._hash_parts))
    assert writer._pending == 0
    assert t.paused == 1
    resumed: list[int] = []
    t.resumeProducing = lambda: resumed.append(1)  # type: ignore[method-assign]
    while not resumed:
        pool.step(0)
    os.close(fd)


def test_a_failed_body_still_settles_with_its_error(tmp_path: Any) -> None:
    """A cut body fails C{done} with SOURCE_TRUNCATED once both chains are through, and keeps its bytes."""
    path = str(tmp_path / "c")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    pool = HandPool()
    writer = ChunkedFileWriter(pool, Clock(), fd, 1000, len(BODY))
    writer.makeConnection(FakeTransport())
    writer.dataReceived(BODY[:4321])
    writer.connectionLost(Failure(ConnectionError("reset")))
    out: list[Any] = []
    writer.done.addBoth(out.append)
    while pool.jobs:
        pool.step(len(pool.jobs) - 1)
    assert isinstance(out[0], Failure) and out[0].value.code == "SOURCE_TRUNCATED"
    with open(path, "rb") as f:
        assert f.read() == BODY[:4321]
    # what a resume would rebuild from the file is the same as the bytes sent
    point = rehash_prefix(path, 4321, 1000)
    assert point.file_hash.hexdigest() == hashlib.sha256(BODY[:4321]).hexdigest()
    assert isinstance(point, ResumePoint)


@pytest.mark.parametrize("split", [True, False])
def test_without_the_whole_file_hash(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, split: bool) -> None:
    """A side fetch's writer: the chunks' digests and the file as ever, no whole-file hash taken or given."""
    monkeypatch.setattr(bodywriter, "CDN_SPLIT_HASH", split)
    path = str(tmp_path / "s")
    with open(path, "wb") as f:
        f.write(b"\0" * 3000)
    fd = os.open(path, os.O_WRONLY)
    pool = HandPool()
    seen: list[tuple[int, str]] = []
    start = ResumePoint(3000)
    untouched = start.file_hash.hexdigest()
    writer = ChunkedFileWriter(pool, Clock(), fd, 1000, 7000, on_chunk=lambda i, d: seen.append((i, d)),
                               start=start, whole_hash=False)
    writer.makeConnection(FakeTransport())
    writer.dataReceived(BODY[3000:7000])
    writer.connectionLost(Failure(ResponseDone()))
    out: list[Any] = []
    writer.done.addBoth(out.append)
    assert all(j[1] is not bodywriter._hash_parts for j in pool.jobs)
    while pool.jobs:
        pool.step(0)
    assert out == [(7000, "")]
    assert start.file_hash.hexdigest() == untouched
    assert seen == [(i, hashlib.sha256(BODY[i * 1000 : (i + 1) * 1000]).hexdigest()) for i in range(3, 7)]
    with open(path, "rb") as f:
        assert f.read()[3000:] == BODY[3000:7000]

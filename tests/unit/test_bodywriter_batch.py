"""
The body writer's blocks go to the pool in batches
(L{dragonfly.core.bodywriter.ChunkedFileWriter}): while a pool job runs, the
blocks that arrive queue up, and the next job takes all of them, so a busy
pool costs one hand-off per batch, not per block.  Whatever the reads and
the moments the pool finishes, the file, the chunks' digests (published in
order, each once its bytes are written) and the whole-file SHA-256 are the
body's; a failed write publishes nothing of its batch.  No sockets, a fake
clock, a pool run by hand.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from dragonfly.core import bodywriter
from dragonfly.core.bodywriter import BodyError, ChunkedFileWriter

from .test_bodywriter_split import HandPool, digests
from .test_supernode_api import FakeTransport

BODY = random.Random(11).randbytes(9 * 1000 + 321)


@pytest.fixture(autouse=True)
def one_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodywriter, "CDN_SPLIT_HASH", False)


def test_blocks_queued_while_the_pool_is_busy_go_in_one_job(tmp_path: Any) -> None:
    path = str(tmp_path / "b")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    pool = HandPool()
    seen: list[tuple[int, str]] = []
    writer = ChunkedFileWriter(pool, Clock(), fd, 1000, len(BODY), on_chunk=lambda i, d: seen.append((i, d)))
    writer.makeConnection(FakeTransport())
    for at in range(0, len(BODY), 400):
        writer.dataReceived(BODY[at : at + 400])
    writer.connectionLost(Failure(ResponseDone()))
    out: list[Any] = []
    writer.done.addBoth(out.append)
    # the first chunk's job is out; the other nine chunks wait for it, in the queue
    assert len(pool.jobs) == 1
    assert len(pool.jobs[0][2][2]) == 1
    pool.step(0)
    assert [i for i, _ in seen] == [0]
    assert len(pool.jobs) == 1 and len(pool.jobs[0][2][2]) == 9  # one job for them all
    assert writer._pending == len(BODY) - 1000
    pool.step(0)
    assert writer._pending == 0
    while pool.jobs:  # the close
        pool.step(0)
    assert seen == list(enumerate(digests(BODY, 1000)))
    assert out == [(len(BODY), hashlib.sha256(BODY).hexdigest())]
    with open(path, "rb") as f:
        assert f.read() == BODY


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    st.sampled_from([1000, 4096, 333]),
    st.lists(st.integers(1, 2500), max_size=12),
    st.lists(st.integers(0, 3), max_size=40),
    st.booleans(),
)
def test_any_reads_and_pool_timing_give_the_body_and_its_digests(
    tmp_path: Any, chunk: int, cuts: list[int], steps: list[int], whole: bool,
) -> None:
    path = str(tmp_path / f"h{random.random()}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    pool = HandPool()
    seen: list[tuple[int, str]] = []
    writer = ChunkedFileWriter(
        pool, Clock(), fd, chunk, len(BODY), on_chunk=lambda i, d: seen.append((i, d)), whole_hash=whole,
    )
    writer.BLOCK = 1500  # type: ignore[misc]
    writer.MIN_BLOCK = 700  # type: ignore[misc]
    writer.makeConnection(FakeTransport())
    at = 0
    for n in [*cuts, len(BODY)]:
        writer.dataReceived(BODY[at : at + n])
        at = min(at + n, len(BODY))
        for _ in range(steps.pop(0) if steps else 0):  # the pool finishes now and then
            if pool.jobs:
                pool.step(0)
        # every chunk published is on the file whole
        with open(path, "rb") as f:
            data = f.read()
        for i, d in seen:
            assert hashlib.sha256(data[i * chunk : (i + 1) * chunk]).hexdigest() == d
        if at == len(BODY):
            break
    writer.connectionLost(Failure(ResponseDone()))
    out: list[Any] = []
    writer.done.addBoth(out.append)
    while pool.jobs:
        pool.step(0)
    assert seen == list(enumerate(digests(BODY, chunk)))
    assert out == [(len(BODY), hashlib.sha256(BODY).hexdigest() if whole else "")]
    with open(path, "rb") as f:
        assert f.read() == BODY
    os.unlink(path)


def test_a_failed_write_publishes_nothing_of_its_batch(tmp_path: Any) -> None:
    path = str(tmp_path / "r")
    with open(path, "wb"):
        pass
    fd = os.open(path, os.O_RDONLY)  # every write fails
    pool = HandPool()
    seen: list[tuple[int, str]] = []
    writer = ChunkedFileWriter(pool, Clock(), fd, 1000, len(BODY), on_chunk=lambda i, d: seen.append((i, d)))
    t = FakeTransport()
    writer.makeConnection(t)
    writer.dataReceived(BODY[:3000])  # three chunks: the first alone, then two in one job
    pool.step(0)
    out: list[Any] = []
    writer.done.addBoth(out.append)
    writer.connectionLost(Failure(ResponseDone()))
    while pool.jobs:
        pool.step(0)
    assert seen == []
    assert isinstance(out[0], Failure) and out[0].check(BodyError)
    assert out[0].value.code == "STORE_FAILED"
    with open(path, "rb") as f:
        assert f.read() == b""

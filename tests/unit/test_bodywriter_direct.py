"""
AlignedWriter (dragonfly/core/bodywriter.py): a body written in order, its
whole pages with O_DIRECT and the rest through the page cache.  However the
bytes are cut into writes and wherever a piece ends (a flush), the file holds
exactly the bytes given, and its size never counts a byte not yet on it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from dragonfly.core import bodywriter
from dragonfly.core.bodywriter import AlignedWriter, ChunkedFileWriter, rehash_prefix
from dragonfly.core.files import DIRECT_ALIGN

from .test_supernode_api import FakeTransport, SyncPool

CAPACITY = 2 * DIRECT_ALIGN


def written(data: bytes, start: int, cuts: list[int], flushes: set[int], direct: bool = True,
            parts_per_write: int = 2) -> tuple[bytes, AlignedWriter, list[tuple[int, int]]]:
    """Write C{data} at C{start}, cut at C{cuts}; flush after the writes in C{flushes}; the file's bytes."""
    # on the disk (not a tmpfs, which refuses O_DIRECT)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        path = os.path.join(d, "task.data")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, start)
        w = AlignedWriter(fd, direct=direct, capacity=CAPACITY)
        bounds = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
        sizes = []
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            block = data[a:b]
            step = max(1, len(block) // parts_per_write)
            parts = [memoryview(block)[j:j + step] for j in range(0, len(block), step)]
            assert w.write(parts, start + a) == len(block)
            if i in flushes:
                w.flush()
                assert os.fstat(fd).st_size == start + b  # a flushed piece is on the file, whole
            size = os.fstat(fd).st_size
            sizes.append((size, start + b))
            with open(path, "rb") as f:
                f.seek(start)
                # what the size says is there, is there: the body's bytes, in order
                assert f.read(size - start) == data[:size - start]
        w.close()
        with open(path, "rb") as f:
            whole = f.read()
    return whole, w, sizes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    length=st.integers(0, 6 * DIRECT_ALIGN + 100),
    start=st.sampled_from([0, DIRECT_ALIGN, 3 * DIRECT_ALIGN + 17, 5]),
    cuts=st.lists(st.integers(1, 6 * DIRECT_ALIGN + 99), max_size=8),
    flushes=st.sets(st.integers(0, 8), max_size=4),
    parts=st.integers(1, 3),
)
def test_any_chunking_gives_the_same_file(length: int, start: int, cuts: list[int], flushes: set[int], parts: int) -> None:
    data = os.urandom(length)
    whole, w, sizes = written(data, start, cuts, flushes, parts_per_write=parts)
    assert whole == b"\0" * start + data
    # unflushed, at most a page's bytes wait in memory
    assert all(given - size < DIRECT_ALIGN for size, given in sizes)


def test_whole_pages_go_direct() -> None:
    data = os.urandom(5 * DIRECT_ALIGN + 10)
    whole, w, sizes = written(data, 0, [DIRECT_ALIGN + 3, 4 * DIRECT_ALIGN], set())
    assert whole == data
    assert w.direct  # the file system took O_DIRECT: the pages went that way
    # after each write, only the part of a page waits
    assert sizes == [(DIRECT_ALIGN, DIRECT_ALIGN + 3), (4 * DIRECT_ALIGN, 4 * DIRECT_ALIGN), (5 * DIRECT_ALIGN, len(data))]


def test_refused_direct_falls_back_to_the_page_cache(monkeypatch: Any) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, *args: Any, **kw: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "no O_DIRECT here")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(bodywriter.os, "open", no_direct)
    data = os.urandom(3 * DIRECT_ALIGN + 7)
    whole, w, _ = written(data, 0, [100, 2 * DIRECT_ALIGN], set())
    assert whole == data and not w.direct


def test_refused_direct_write_midway_keeps_every_byte(monkeypatch: Any) -> None:
    calls = []

    def refuse_second(fd: int, view: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:
            return 0  # EINVAL: the caller writes through the page cache
        return bodywriter._pwrite_direct.__wrapped__(fd, view, offset)  # type: ignore[attr-defined]

    import functools

    real = bodywriter._pwrite_direct
    monkeypatch.setattr(bodywriter, "_pwrite_direct", functools.wraps(real)(refuse_second))
    data = os.urandom(7 * DIRECT_ALIGN + 5)
    whole, w, _ = written(data, 0, [3 * DIRECT_ALIGN + 1], set(), parts_per_write=3)
    assert whole == data and not w.direct and len(calls) >= 2


@pytest.mark.parametrize("direct", [True, False])
def test_off_and_on_give_the_same_file(direct: bool) -> None:
    data = os.urandom(4 * DIRECT_ALIGN + 999)
    whole, w, _ = written(data, 11, [5, 4000, 9000], {1}, direct=direct)
    assert whole == b"\0" * 11 + data


# -- the CDN's body writer with DRAGONFLY_CDN_DIRECT_WRITES=1 ------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 5 * 2 * DIRECT_ALIGN + 50),
    chunk=st.sampled_from([2 * DIRECT_ALIGN, 333]),
    cut=st.integers(0, 12 * DIRECT_ALIGN),
    feeds=st.lists(st.integers(1, 3 * DIRECT_ALIGN), max_size=10),
)
def test_chunked_writer_direct_gives_the_same_file_and_digests(size: int, chunk: int, cut: int, feeds: list[int]) -> None:
    """Resumed anywhere and fed in any pieces: the file, the digests, and each piece on the file when published."""
    body = bytes(random_bytes(size))
    cut = min(cut, size)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        path = os.path.join(d, "task.data")
        with open(path, "wb") as f:
            f.write(body[:cut])
        point = rehash_prefix(path, cut, chunk)
        fd = os.open(path, os.O_WRONLY)
        seen: list[tuple[int, str]] = []

        def published(i: int, digest: str) -> None:
            # the piece is on the file, whole, before anyone hears of it
            end = min((i + 1) * chunk, size)
            with open(path, "rb") as f:
                f.seek(i * chunk)
                assert hashlib.sha256(f.read(end - i * chunk)).hexdigest() == digest
            seen.append((i, digest))

        writer = ChunkedFileWriter(SyncPool(), Clock(), fd, chunk, size, on_chunk=published, start=point, direct=True)
        writer.MIN_BLOCK = 1000  # small blocks: many writes, many partial pages
        writer.makeConnection(FakeTransport())
        at = cut
        for n in feeds:
            writer.dataReceived(body[at:at + n])
            at = min(size, at + n)
        writer.dataReceived(body[at:])
        writer.connectionLost(Failure(ResponseDone()))
        out: list[Any] = []
        writer.done.addBoth(out.append)
        assert out[0] == (size, hashlib.sha256(body).hexdigest())
        with open(path, "rb") as f:
            assert f.read() == body
    want = [hashlib.sha256(body[i:i + chunk]).hexdigest() for i in range(0, size, chunk)]
    assert point.digests + [dg for _, dg in seen] == want


def random_bytes(n: int) -> bytes:
    return os.urandom(n)

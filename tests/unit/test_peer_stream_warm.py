"""
The content stream reading its bytes into the page cache in the pool before
its sendfile (L{dragonfly.peer.stream.TaskStream._read_ahead}): a hand-fired
fake of the pool's read (each call a Deferred the test fires), the real
sendfile into a socketpair (L{test_peer_stream_zero_copy}'s fakes); and the
pool's side, L{dragonfly.core.files.warm_pages}, on a real file.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from dragonfly.core.files import DIRECT_ALIGN, warm_pages, write_direct
from dragonfly.peer import stream as stream_module

from .test_peer_stream_zero_copy import COUNT, PIECE, Host, Task


class HandWarm:
    """The pool's read-ahead: every call waits until the test fires it."""

    def __init__(self):
        self.calls: list[tuple[int, int, int]] = []
        self.exact: list[bool] = []
        self.pending: list[tuple[Deferred, int]] = []

    def __call__(self, fd, offset, size, exact):
        self.calls.append((fd, offset, size))
        self.exact.append(exact)
        d: Deferred = Deferred()
        self.pending.append((d, size))
        return d

    def fire(self):
        d, size = self.pending.pop(0)
        d.callback(size)

    def ranges(self):
        return [(offset, offset + size) for _, offset, size in self.calls]


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "data")


@pytest.fixture
def on(monkeypatch):
    monkeypatch.setattr(stream_module, "WARM", True)
    monkeypatch.setattr(stream_module, "WARM_STEP", PIECE)  # (a read per piece, unless a test says otherwise)
    monkeypatch.setattr(stream_module, "WARM_READS", 1)  # (one read at a time, unless a test says otherwise)


def test_the_stream_sends_only_what_the_pool_has_read(path, on):
    task = Task(path, range(COUNT))
    warm = HandWarm()
    host = Host(task, warm=warm)
    host.exchange()
    # the headers, and nothing of the body before the pool read it; one read at a time
    assert host.body() == b"" and host.stream.sent_zero_copy == 0
    assert warm.ranges() == [(0, PIECE)] and len(warm.pending) == 1
    warm.fire()
    host.exchange()
    assert host.body() == task.data[:PIECE]
    assert warm.ranges() == [(0, PIECE), (PIECE, 2 * PIECE)]
    while warm.pending:
        warm.fire()
        host.exchange()
    # each byte read ahead once, piece by piece, in order; all of it sent but the last byte
    assert warm.ranges() == [(i * PIECE, min((i + 1) * PIECE, len(task.data))) for i in range(COUNT)]
    assert host.body() == task.data[:-1] and task.reads == []
    assert not any(warm.exact)  # every piece held: the kernel may read ahead
    task.succeed()
    host.exchange()
    assert host.body() == task.data and host.done == [b""]
    assert host.stream.warm_waits >= 1
    host.close()


def test_reading_ahead_overlaps_the_sends_and_stops_at_its_limit(path, on, monkeypatch):
    monkeypatch.setattr(stream_module, "WARM_AHEAD", 3 * PIECE)
    task = Task(path, range(COUNT))
    warm = HandWarm()
    host = Host(task, sndbuf=4096, warm=warm)  # the client does not read yet
    while warm.pending:
        warm.fire()
        host.wire.flush()
    at = host.stream.offset
    assert 0 < at < len(task.data) - 1  # the socket is full
    # read ahead of the offset while the socket drains, but no further than WARM_AHEAD
    assert at + 3 * PIECE <= host.stream._warmed < at + 4 * PIECE
    task.changed()  # a piece stored meanwhile reads no more ahead
    assert not warm.pending
    task.succeed()
    while True:
        host.exchange()
        if not warm.pending:
            break
        warm.fire()
    assert host.body() == task.data and host.done == [b""]
    host.close()


def test_only_held_pieces_are_read_ahead(path, on):
    task = Task(path, [0, 1, 3])
    warm = HandWarm()
    host = Host(task, warm=warm)
    while warm.pending:
        warm.fire()
        host.exchange()
    assert warm.ranges() == [(0, PIECE), (PIECE, 2 * PIECE)]
    assert host.body() == task.data[:2 * PIECE]
    # piece 2 is not written yet: no kernel readahead into it
    assert warm.exact == [True, True]
    task.arrive(2)
    while warm.pending:
        warm.fire()
        host.exchange()
    assert warm.ranges()[2:4] == [(2 * PIECE, 3 * PIECE), (3 * PIECE, 4 * PIECE)]
    assert warm.exact[2:4] == [True, True]  # (piece 4 is not held)
    assert host.body() == task.data[:4 * PIECE]
    host.close()


def test_a_read_ahead_goes_on_through_the_next_held_pieces(path, on, monkeypatch):
    monkeypatch.setattr(stream_module, "WARM_STEP", 3 * PIECE)
    task = Task(path, [0, 1, 2, 3, 4, 6, 7])
    warm = HandWarm()
    host = Host(task, warm=warm)
    while warm.pending:
        warm.fire()
        host.exchange()
    # up to WARM_STEP a read, and never into a piece not held
    assert warm.ranges() == [(0, 3 * PIECE), (3 * PIECE, 5 * PIECE)]
    assert host.body() == task.data[:5 * PIECE]
    task.arrive(5)
    while warm.pending:
        warm.fire()
        host.exchange()
    assert warm.ranges()[2:] == [(5 * PIECE, len(task.data))]
    assert host.body() == task.data[:-1]
    host.close()


def test_a_range_reads_ahead_from_its_start_to_its_end(path, on):
    task = Task(path, range(COUNT))
    warm = HandWarm()
    start, end = PIECE + 100, 2 * PIECE + 200
    host = Host(task, warm=warm, span=(start, end))
    while warm.pending:
        warm.fire()
        host.exchange()
    assert warm.ranges() == [(start, start + PIECE), (start + PIECE, end)]  # (steps of WARM_STEP, across pieces)
    assert host.body() == task.data[start:end] and host.done == [b""]
    host.close()


def test_several_reads_ahead_are_under_way_and_count_in_the_files_order(path, on, monkeypatch):
    monkeypatch.setattr(stream_module, "WARM_READS", 3)
    monkeypatch.setattr(stream_module, "WARM_AHEAD", 4 * PIECE)
    task = Task(path, range(COUNT))
    warm = HandWarm()
    host = Host(task, warm=warm)
    host.exchange()
    # three reads at once, one after another in the file
    assert warm.ranges() == [(0, PIECE), (PIECE, 2 * PIECE), (2 * PIECE, 3 * PIECE)]
    # the second and third end first: nothing is sent before the first has
    d2, size2 = warm.pending.pop(1)
    d2.callback(size2)
    d3, size3 = warm.pending.pop(1)
    d3.callback(size3)
    host.exchange()
    assert host.body() == b"" and host.stream._warmed == 0
    # and no read starts past WARM_AHEAD of the offset meanwhile
    assert warm.ranges()[3:] == [(3 * PIECE, 4 * PIECE)] and len(warm.pending) == 2
    warm.fire()  # the first: all three are in
    host.exchange()
    assert host.body() == task.data[:3 * PIECE]
    while warm.pending:
        warm.fire()
        host.exchange()
    # each byte read ahead once, in order
    assert warm.ranges() == [(i * PIECE, min((i + 1) * PIECE, len(task.data))) for i in range(COUNT)]
    task.succeed()
    host.exchange()
    assert host.body() == task.data and host.done == [b""]
    host.close()


def test_a_failed_read_among_several_leaves_sendfile_to_read(path, on, monkeypatch):
    monkeypatch.setattr(stream_module, "WARM_READS", 3)
    task = Task(path, range(COUNT))
    warm = HandWarm()
    host = Host(task, warm=warm)
    host.exchange()
    assert len(warm.pending) == 3
    d, _ = warm.pending.pop(1)
    d.errback(OSError("no pool"))
    while warm.pending:  # the others end later: they change nothing
        warm.fire()
    task.succeed()
    host.exchange()
    assert host.body() == task.data and host.done == [b""]
    assert host.stream.sent_zero_copy == len(task.data) and len(warm.calls) == 3
    host.close()


def test_a_failed_read_ahead_leaves_sendfile_to_read(path, on):
    task = Task(path, range(COUNT))
    host = Host(task, warm=lambda fd, offset, size, exact: fail(OSError("no pool")))
    task.succeed()
    host.exchange()
    assert host.body() == task.data and host.done == [b""]
    assert host.stream.sent_zero_copy == len(task.data) and task.reads == []
    host.close()


def test_a_read_ahead_that_ends_after_the_stream_sends_nothing(path, on):
    task = Task(path, range(COUNT))
    warm = HandWarm()
    host = Host(task, warm=warm)
    host.stream.stopProducing()
    warm.fire()
    host.exchange()
    assert host.body() == b"" and host.stream.sent_zero_copy == 0 and not warm.pending
    host.close()


def test_reads_that_fire_at_once_stream_it_all(path, on):
    task = Task(path, range(COUNT))
    host = Host(task, warm=lambda fd, offset, size, exact: succeed(size))
    task.succeed()
    host.exchange()
    assert host.body() == task.data and host.done == [b""]
    assert host.stream.sent_zero_copy == len(task.data)
    host.close()


def test_the_knob_turns_reading_ahead_off(path, monkeypatch):
    monkeypatch.setattr(stream_module, "WARM", False)
    task = Task(path, range(COUNT))
    warm = HandWarm()
    host = Host(task, warm=warm)
    task.succeed()
    host.exchange()
    assert warm.calls == [] and host.body() == task.data
    host.close()


# -- the pool's side ------------------------------------------------------------------


def resident(path: str, offset: int, size: int) -> list[bool] | None:
    """Which pages of C{path} from C{offset} are in the page cache (mincore; None: cannot tell here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        # a private map, writable for ctypes' sake: mapping reads nothing, and nothing is written
        m = mmap.mmap(fd, offset + size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        buf = (ctypes.c_char * len(m)).from_buffer(m)
        try:
            mincore = ctypes.CDLL(None, use_errno=True).mincore
            rc = mincore(ctypes.c_void_p(ctypes.addressof(buf) + offset), ctypes.c_size_t(size), vec)
        finally:
            del buf
        return None if rc != 0 else [bool(v & 1) for v in vec]
    finally:
        m.close()


def test_warm_pages_reads_a_direct_write_into_the_page_cache_and_no_more(tmp_path):
    path = str(tmp_path / "data")
    size = 64 * DIRECT_ALIGN
    with open(path, "wb") as f:
        f.truncate(16 * size)
    data = os.urandom(4 * size)
    if write_direct(path, memoryview(data), 0) < len(data):
        pytest.skip("this file system takes no O_DIRECT")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        before = resident(path, 0, 16 * size)
        if before is None or any(before):
            pytest.skip("cannot see the page cache here")
        # sequential reads first: the kernel's readahead window grows on this descriptor
        assert warm_pages(fd, 0, size) == size and warm_pages(fd, size, size) == size
        assert warm_pages(fd, 2 * size, size) == size
        pages = size // mmap.PAGESIZE
        assert resident(path, 0, 16 * size) == [True] * 3 * pages + [False] * 13 * pages
        assert os.pread(fd, 3 * size, 0) == data[:3 * size]
    finally:
        os.close(fd)


def test_warm_pages_stops_at_the_end_of_the_file(tmp_path):
    path = str(tmp_path / "data")
    with open(path, "wb") as f:
        f.write(b"x" * 1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert warm_pages(fd, 200, 4096) == 800
        assert warm_pages(fd, 1000, 10) == 0
    finally:
        os.close(fd)

"""
What a CANCEL saves on the upload side, and the pool's read-ahead before a
zero-copy body (dragonfly/protocol/upload.py): an Uploader over a real
BlockConnection, the remote end a socketpair, a fake clock (the helpers of
test_block_upload).

 - the socket holds at most UPLOAD_LOWAT bytes not yet sent
   (TCP_NOTSENT_LOWAT), so the pieces behind a body stay in the queue;
 - a piece taken up but not begun (waiting for the upload limit, the pool's
   read, or a socket that takes nothing) is dropped by its CANCEL;
 - a body already begun still goes out whole (a PIECE's length is in its
   header: the frame cannot end early);
 - a zero-copy piece is read into the page cache (the side's warm_piece)
   before its header goes, and the next queued one while it goes.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from dragonfly.core.ratelimit import TokenBucket
from dragonfly.protocol import frames as F
from dragonfly.protocol import upload as U
from dragonfly.protocol.connection import BlockConnection, Upload
from dragonfly.protocol.upload import Uploader

from .test_block_upload import Host, Seed
from .test_connection import PIECE, Side, hello, make
from .test_supernode_api import env  # noqa: F401 (a fixture)


@pytest.fixture
def seed(tmp_path):
    s = Seed(str(tmp_path / "data"))
    yield s
    s.close()


def cancel(host: Host, index: int) -> None:
    host.run(host.conn.data_received(F.encode_cancel(index)))


def starts(host: Host) -> list[int]:
    return [e.index for e in host.events if isinstance(e, F.PieceStart)]


class Options:
    """A socket that records its options (and may refuse them)."""

    def __init__(self, refuse: bool = False) -> None:
        self.set: list[tuple[int, int, int]] = []
        self.refuse = refuse

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if self.refuse:
            raise OSError(95, "Operation not supported")
        self.set.append((level, option, value))


class Full:
    """A plain socket that takes nothing while C{full} (EAGAIN), as one holding UPLOAD_LOWAT unsent bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.full = True

    def send(self, data: bytes, *flags: int) -> int:
        if self.full:
            raise BlockingIOError(11, "full")
        return self.sock.send(data, *flags)

    def fileno(self) -> int:
        return self.sock.fileno() if not self.full else -1  # (no sendfile while full: EBADF would fall back)

    def setsockopt(self, *args: int) -> None:
        pass


# -- the kernel's share ----------------------------------------------------------------


def test_a_block_socket_holds_little_unsent():
    up = Uploader(BlockConnection.__new__(BlockConnection), lambda actions: None)
    sock = Options()
    up.attach(object(), sock)  # type: ignore[arg-type]
    assert sock.set == [(socket.IPPROTO_TCP, U.TCP_NOTSENT_LOWAT, U.UPLOAD_LOWAT)] and U.UPLOAD_LOWAT == 1 << 20


def test_a_socket_that_refuses_the_bound_still_sends(seed):
    up = Uploader(BlockConnection.__new__(BlockConnection), lambda actions: None)
    up.attach(object(), Options(refuse=True))  # type: ignore[arg-type]
    host = Host(seed)  # a socketpair (AF_UNIX): no TCP_NOTSENT_LOWAT there
    host.request(0, 1)
    host.exchange()
    assert [i for i, _ in host.pieces()] == [0, 1]


def test_no_bound_with_the_knob_off(monkeypatch):
    monkeypatch.setattr(U, "UPLOAD_LOWAT", 0)
    up = Uploader(BlockConnection.__new__(BlockConnection), lambda actions: None)
    sock = Options()
    up.attach(object(), sock)  # type: ignore[arg-type]
    assert sock.set == []


# -- CANCEL ----------------------------------------------------------------------------


def test_a_cancel_drops_a_queued_piece(seed):
    host = Host(seed)
    host.up.pause()
    host.request(0, 1, 2)
    cancel(host, 1)
    host.up.resume()
    host.exchange()
    assert [i for i, _ in host.pieces()] == [0, 2]


@pytest.mark.parametrize("direct", [True, False])
def test_a_cancel_drops_a_piece_waiting_for_the_upload_limit(seed, direct):
    """Taken up, its header not written (the limit holds it): its CANCEL drops it and the next one goes."""
    clock = Clock()
    host = Host(seed, clock=clock, limit=TokenBucket(seed.piece, clock, burst=seed.piece), direct=direct)
    host.request(0, 1, 2)
    host.exchange()
    assert starts(host) == [0] and host.conn.sending == 1  # 1 waits for the limit
    cancel(host, 1)
    assert host.up.withdrawn == 1 and host.conn.sending in (None, 2)
    clock.advance(5)
    host.exchange()
    assert host.pieces() == [(i, seed.expected(i)) for i in (0, 2)]
    assert seed.uploaded == [seed.piece] * 2 and host.up.bytes_out == 2 * seed.piece and not host.closes


def test_a_piece_asked_again_after_its_cancel_goes_out(seed):
    clock = Clock()
    host = Host(seed, clock=clock, limit=TokenBucket(seed.piece, clock, burst=seed.piece))
    host.request(0, 1)
    host.exchange()
    host.run(host.conn.data_received(F.encode_cancel(1) + F.encode_request(1)))  # in one read
    clock.advance(5)
    host.exchange()
    assert [i for i, _ in host.pieces()] == [0, 1] and host.up.withdrawn == 0


def test_a_cancel_drops_a_piece_the_socket_did_not_take(seed):
    """The socket takes nothing (its unsent bytes at the bound): the header is not written, the piece can still go."""
    host = Host(seed)
    full = Full(host.wire.sock)
    host.up.attach(host.wire, full)  # type: ignore[arg-type]
    host.request(0)
    assert host.conn.sending == 0 and not host.up.mid_body and host.wire.dataBuffer == b""
    assert host.wire.producerPaused  # waits for the socket
    cancel(host, 0)
    full.full = False
    host.exchange()
    assert host.pieces() == [] and host.up.withdrawn == 1 and host.conn.sending is None
    host.request(2)
    host.exchange()
    assert host.pieces() == [(2, seed.expected(2))]


def test_held_haves_go_out_when_the_socket_takes_no_header(seed):
    seed.have_delay = 0.1
    host = Host(seed, version=2)
    full = Full(host.wire.sock)
    host.up.attach(host.wire, full)  # type: ignore[arg-type]
    host.run(host.conn.send_have(3))
    host.request(0)
    assert host.wire.dataBuffer == F.encode_have(3)  # not lost with the header not written
    full.full = False
    host.exchange()
    assert host.events[0] == F.Have(3) and host.pieces() == [(0, seed.expected(0))]


def test_a_body_begun_still_goes_out_whole(tmp_path):
    """The header is on the wire: a PIECE cannot end early, the CANCEL comes too late for it."""
    seed = Seed(str(tmp_path / "big"), count=2, piece=4 << 20)
    try:
        host = Host(seed)
        host.request(0, 1)
        assert host.up.mid_body
        cancel(host, 0)
        cancel(host, 1)
        host.exchange()
        assert host.pieces() == [(0, seed.expected(0))] and host.up.withdrawn == 0
    finally:
        seed.close()


# -- reading ahead in the pool ------------------------------------------------------------


class Warming:
    """A side's warm_piece: each call a Deferred the test fires."""

    def __init__(self, seed: Seed) -> None:
        self.calls: list[int] = []
        self.pending: dict[int, Deferred] = {}
        seed.warm_piece = self

    def __call__(self, index: int) -> Deferred:
        self.calls.append(index)
        d: Deferred = Deferred()
        self.pending[index] = d
        return d

    def fire(self, index: int) -> None:
        self.pending.pop(index).callback(0)


def test_a_zero_copy_piece_waits_for_the_pool_then_goes(seed):
    warm = Warming(seed)
    host = Host(seed)
    host.request(0, 1)
    host.exchange()
    assert starts(host) == [] and warm.calls == [0] and host.up.warm_waits >= 1
    warm.fire(0)
    host.exchange()
    # piece 0 went out; piece 1 was read ahead while it went, and now waits for its read
    assert [i for i, _ in host.pieces()] == [0] and warm.calls == [0, 1]
    warm.fire(1)
    host.exchange()
    assert host.pieces() == [(i, seed.expected(i)) for i in (0, 1)] and seed.reads == []


def test_a_piece_read_ahead_goes_without_waiting(seed):
    warm = Warming(seed)
    host = Host(seed)
    host.up.pause()
    host.request(0, 1)
    host.up.resume()
    warm.fire(0)
    host.up.pause()  # the socket is busy with piece 0: piece 1 is read meanwhile
    host.exchange()
    warm.fire(1)
    host.up.resume()
    host.exchange()
    assert [i for i, _ in host.pieces()] == [0, 1] and warm.calls == [0, 1]


def test_a_cancel_drops_a_piece_waiting_for_the_pool(seed):
    warm = Warming(seed)
    host = Host(seed)
    host.request(0, 2)
    cancel(host, 0)
    assert host.up.withdrawn == 1 and warm.calls == [0, 2]
    warm.fire(0)
    warm.fire(2)
    host.exchange()
    assert host.pieces() == [(2, seed.expected(2))]


def test_a_failed_read_ahead_leaves_sendfile_to_read(seed):
    seed.warm_piece = lambda index: fail(OSError("no pool"))
    host = Host(seed)
    host.request(0, 1)
    host.exchange()
    assert host.pieces() == [(i, seed.expected(i)) for i in (0, 1)] and host.up.zero_copy


def test_no_read_ahead_with_the_knob_off(seed, monkeypatch):
    monkeypatch.setattr(U, "UPLOAD_WARM", False)
    warm = Warming(seed)
    host = Host(seed)
    host.request(0)
    host.exchange()
    assert host.pieces() == [(0, seed.expected(0))] and warm.calls == []


def test_a_warm_that_needs_nothing(seed):
    seed.warm_piece = lambda index: None
    host = Host(seed)
    host.request(0, 1)
    host.exchange()
    assert [i for i, _ in host.pieces()] == [0, 1]


def test_a_warm_already_done(seed):
    seed.warm_piece = lambda index: succeed(seed.piece)
    host = Host(seed)
    host.request(3, 1)
    host.exchange()
    assert [i for i, _ in host.pieces()] == [3, 1]


def test_a_request_arriving_mid_body_is_read_ahead(tmp_path):
    seed = Seed(str(tmp_path / "big"), count=2, piece=4 << 20)
    try:
        seed.warm_piece = lambda index: calls.append(index)  # None: nothing to wait for
        calls: list[int] = []
        host = Host(seed)
        host.request(0)
        assert host.up.mid_body and calls == [0]
        host.request(1)
        host.exchange()
        assert calls == [0, 1] and [i for i, _ in host.pieces()] == [0, 1]
    finally:
        seed.close()


# -- the rules: a CANCEL for the piece being sent, and the downloader's count ---------------


def test_a_cancel_marks_the_piece_taken_up_and_a_request_revives_it():
    conn, _, _ = make(server_side=Side())
    conn.connection_made()
    conn.data_received(hello())
    conn.data_received(F.encode_request(0) + F.encode_request(1))
    assert conn.next_upload() == 0
    assert conn.data_received(F.encode_cancel(0)) == [Upload()] and conn.withdrawn == 0
    conn.data_received(F.encode_request(0))
    assert conn.withdrawn is None and list(conn.queue) == [1]  # asked again: it goes after all
    conn.data_received(F.encode_cancel(0))
    assert conn.upload_withdrawn(0) == [Upload()]  # the next one may go
    assert conn.sending is None and conn.withdrawn is None and conn.next_upload() == 1
    assert conn.upload_done(1, PIECE) == []


class Counting:
    def __init__(self, base):
        self.base = base
        self.arrived: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(self.base, name)

    def cancelled_arrived(self, conn, index, nbytes):
        self.arrived.append((index, nbytes))


@pytest.mark.parametrize("when", ["before", "while"])
def test_a_cancelled_piece_arriving_is_counted(when):
    side = Counting(Side(held=()))
    conn, _, _ = make(side=side)
    conn.connection_made()
    conn.data_received(hello())
    conn.request(3, 0.0)
    if when == "before":
        conn.cancel(3)
    conn.data_received(F.piece_header(3, PIECE) + b"a")
    if when == "while":
        conn.cancel(3)
    assert side.arrived == []
    conn.data_received(b"a" * (PIECE - 1))
    assert side.arrived == [(3, PIECE)]
    conn.request(4, 0.0)
    conn.data_received(F.piece_header(4, PIECE) + b"b" * PIECE)
    assert side.arrived == [(3, PIECE)]  # a piece wanted is not counted


# -- the dfpeer's warm_piece: exact unless the kernel's readahead stays in held pieces -------------


@pytest.mark.parametrize("held, done, exact", [
    (range(40), False, False),  # every piece the readahead may reach is held
    ([0, 1, 2, 3], False, True),  # piece 4 and on are not written yet
    ([0, 1], True, False),  # a finished task (restored, say)
    ([38, 39], False, False),  # the last piece: nothing past it
])
def test_the_dfpeer_reads_exactly_the_piece_near_unwritten_blocks(held, done, exact):
    from types import SimpleNamespace

    from dragonfly.core.bitmap import Bitmap
    from dragonfly.peer.lifecycle import State
    from dragonfly.peer.task import PeerTask

    size = 1 << 20
    have = Bitmap(40)
    for i in held:
        have.set(i)
    calls = []
    index = held[-1] if held[-1] == 39 else held[0]
    task = SimpleNamespace(
        have=have, piece_size=size, length=40 * size, state=State.DONE if done else State.DOWNLOADING,
        piece_file=lambda i: (7, i * size, size),
        store=SimpleNamespace(warm=lambda *a: calls.append(a) or succeed(a[2])),
    )
    PeerTask.warm_piece(task, index)  # type: ignore[arg-type]
    assert calls == [(7, index * size, size, exact)]


def test_the_side_is_told_where_a_cancel_found_its_piece():
    told = []

    class Telling(Side):
        def cancel_received(self, conn, index, where):
            told.append((index, where))

    conn, _, _ = make(server_side=Telling())
    conn.connection_made()
    conn.data_received(hello())
    conn.data_received(F.encode_request(0) + F.encode_request(1))
    assert conn.next_upload() == 0
    conn.data_received(F.encode_cancel(1) + F.encode_cancel(0) + F.encode_cancel(2))
    assert told == [(1, "queued"), (0, "sending"), (2, "sent")]


# -- the seed's warm_piece: only when the CDN writes with O_DIRECT -------------------------


def test_the_seed_reads_ahead_only_what_o_direct_wrote(env, monkeypatch):
    import os

    from dragonfly.supernode import node as node_module

    from .test_supernode_api import BODY, FakeResponse, result
    from .test_supernode_api import PIECE as SN_PIECE

    class Conn:
        def send_digests(self, first, digests):
            pass

    env.register_peer()
    code, data = env.register_task()
    env.http.serve(FakeResponse(body=BODY))
    code, data = env.sync(data["taskId"])
    seed = env.node.seed_side(data["task"]["taskId"])
    seed.attached(Conn())
    assert seed.piece_file(1) is not None
    monkeypatch.setattr(node_module, "CDN_DIRECT_WRITES", False)
    assert seed.warm_piece(1) is None  # the page cache wrote it: nothing to read
    monkeypatch.setattr(node_module, "CDN_DIRECT_WRITES", True)
    assert result(seed.warm_piece(1)) == SN_PIECE
    assert os.pread(seed.piece_file(1)[0], 4, SN_PIECE) == BODY[SN_PIECE:SN_PIECE + 4]


# -- the dfpeer counts the cancelled pieces that arrived -----------------------------------


def test_the_dfpeer_counts_cancelled_bytes_that_arrived():
    from types import SimpleNamespace

    from twisted.internet.task import Clock

    from dragonfly.peer.metrics import PeerStats
    from dragonfly.peer.neighbours import Neighbours

    stats = PeerStats()
    daemon = SimpleNamespace(per_connection=1, in_flight_bytes=6 << 20, link_rate=None, trace=True)
    task = SimpleNamespace(daemon=daemon, clock=Clock(), task_id="t" * 64, piece_size=1 << 20, stats=stats)
    n = Neighbours(task)  # type: ignore[arg-type]
    conn = SimpleNamespace(remote_id="them", _queue=[])
    n.cancelled_arrived(conn, 3, 1 << 20)
    n.cancel_received(conn, 4, "queued")  # (a trace line only)
    assert stats.discarded == {"duplicate": 0, "corrupt": 0, "cancelled": 1 << 20}

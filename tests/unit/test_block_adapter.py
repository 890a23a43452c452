"""
BlockProtocol on Twisted's real TCP transport (tcp.Connection) over a local
socketpair, with a memory reactor: no network and no running reactor (the
test calls doRead/doWrite as the reactor would), but the transport's own
write buffer, producer handling and close, so the adapter takes its zero-copy
path (os.sendfile) and its recv_into reads just as in production.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from dragonfly.core.bitmap import Bitmap
from dragonfly.protocol import frames as F
from dragonfly.protocol.block import BlockFactory, BlockProtocol

TASK = hashlib.sha256(b"adapter").hexdigest()
PIECE = 2 << 20  # larger than the socketpair's buffers: bodies wait for the socket


class Side:
    """A TaskSide: the seed holds every piece in a file; a leech holds none and keeps what it gets."""

    def __init__(self, path=None, count=3, seed=False):
        self.accepts_pieces = not seed
        self.count = count
        self.bitmap = Bitmap(count)
        self.data = b""
        self.fd = None
        self.reads: list[int] = []
        self.read_result = None
        self.pieces: dict[int, bytes] = {}
        self.detached_why: list[str] = []
        if seed:
            self.data = os.urandom(PIECE * count)
            with open(path, "wb") as f:
                f.write(self.data)
            self.fd = os.open(path, os.O_RDONLY)
            self.send_fd = self.fd
            for i in range(count):
                self.bitmap.set(i)
            self.piece_file = lambda i: (self.send_fd, i * PIECE, PIECE)

    def expected(self, i):
        return self.data[i * PIECE:(i + 1) * PIECE]

    def local_bitmap(self):
        return self.bitmap

    def piece_length(self, index):
        return PIECE if 0 <= index < self.count else None

    def read_piece(self, index):
        self.reads.append(index)
        return self.read_result(index) if self.read_result else succeed(self.expected(index))

    def attached(self, conn): ...
    def on_bitfield(self, conn): ...
    def on_have(self, conn, index): ...
    def on_reject(self, conn, index, reason): ...
    def on_digests(self, conn, first, digests): ...
    def on_uploaded(self, conn, n): ...

    def detached(self, conn, reason):
        self.detached_why.append(reason)

    def on_piece(self, conn, index, data):
        self.pieces[index] = bytes(data)
        conn.factory.release(data)

    def download_limits(self):
        return []


class Connection(tcp.Connection):
    """Twisted's TCP transport on a socket we made (it names no peer by itself)."""

    def getPeer(self):
        return IPv4Address("TCP", "127.0.0.1", 1)

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 2)


def plug(proto: BlockProtocol, sock: socket.socket, reactor) -> Connection:
    sock.setblocking(False)
    t = Connection(sock, proto, reactor)
    t.connected = True  # as tcp.Server and tcp.Client set it
    proto.makeConnection(t)
    t.startReading()
    return t


def step(reactor, transports) -> bool:
    """Do what the reactor would once: write when writable, read when readable; whether anything moved."""
    moved = False
    for t in transports:
        if t.disconnected:
            continue
        why = None
        readable, writable, _ = select.select([t.socket], [t.socket], [], 0)
        if t in reactor.writers and writable:
            moved = True
            why = t.doWrite()
        if why is None and t in reactor.readers and readable:
            moved = True
            why = t.doRead()
        if why is not None:
            reactor.removeWriter(t)
            reactor.removeReader(t)
            t.connectionLost(Failure(why))
    return moved


def spin(reactor, transports):
    """Step until nothing moves."""
    for _ in range(10_000):
        if not step(reactor, transports):
            return
    raise AssertionError("still moving")


def test_zero_copy_pieces_and_held_frames_between_two_adapters(tmp_path):
    reactor = MemoryReactorClock()
    seed = Side(str(tmp_path / "data"), seed=True)
    leech = Side()
    srv_factory = BlockFactory("seed", lambda tid: seed if tid == TASK else None, clock=reactor)
    srv = srv_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    cli = BlockFactory("leech", lambda tid: None, clock=reactor).client(leech, TASK, "seed")
    a, b = socket.socketpair()
    ts = [plug(srv, a, reactor), plug(cli, b, reactor)]
    spin(reactor, ts)
    assert srv.ready and cli.ready
    cli.request(0, reactor.seconds())
    cli.request(2, reactor.seconds())
    spin(reactor, ts[1:])  # the requests go out
    spin(reactor, ts[:1])  # the seed starts the first body; the socket fills
    srv.send_have(1)  # a frame while a body is on the wire waits for its end
    spin(reactor, ts)
    assert leech.pieces == {0: seed.expected(0), 2: seed.expected(2)}
    assert seed.reads == []  # both bodies went with sendfile
    assert srv.bytes_out == 2 * PIECE and cli.requested == {} and not srv.uploading
    assert not srv.closed and not cli.closed
    os.close(seed.fd)


def test_a_short_file_falls_back_to_reads(tmp_path):
    reactor = MemoryReactorClock()
    seed = Side(str(tmp_path / "data"), seed=True)
    short = tmp_path / "short"
    short.write_bytes(seed.data[:PIECE + PIECE // 3])
    seed.send_fd = os.open(short, os.O_RDONLY)
    leech = Side()
    srv = BlockFactory("seed", lambda tid: seed, clock=reactor).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    cli = BlockFactory("leech", lambda tid: None, clock=reactor).client(leech, TASK, "seed")
    a, b = socket.socketpair()
    ts = [plug(srv, a, reactor), plug(cli, b, reactor)]
    spin(reactor, ts)
    for i in range(3):
        cli.request(i, reactor.seconds())
    spin(reactor, ts)
    assert leech.pieces == {i: seed.expected(i) for i in range(3)}
    assert seed.reads == [1, 2]  # cut in piece 1, then no more sendfile on this connection
    assert not srv.closed
    os.close(seed.fd)
    os.close(seed.send_fd)


def test_a_piece_that_cannot_be_finished_closes_without_another_byte(tmp_path):
    """The fallback read fails mid-body: the connection closes, and no ERROR frame is written into the body."""
    reactor = MemoryReactorClock()
    seed = Side(str(tmp_path / "data"), seed=True)
    short = tmp_path / "short"
    short.write_bytes(seed.data[:PIECE // 2])
    seed.send_fd = os.open(short, os.O_RDONLY)
    seed.read_result = lambda i: fail(OSError("disk gone"))
    srv = BlockFactory("seed", lambda tid: seed, clock=reactor).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    ours, remote = socket.socketpair()
    t = plug(srv, ours, reactor)
    remote.sendall(F.encode_hello(bytes.fromhex(TASK), "leech") + F.encode_request(0))
    got = bytearray()
    remote.setblocking(False)
    for _ in range(10_000):
        step(reactor, [t])
        try:
            data = remote.recv(1 << 20)
        except BlockingIOError:
            continue
        if not data:
            break  # closed
        got += data
    else:
        raise AssertionError("the seed never closed")
    assert srv.closed
    frames = F.FrameDecoder().feed(bytes(got))
    assert isinstance(frames[0], F.Hello)
    start = [i for i, e in enumerate(frames) if isinstance(e, F.PieceStart)]
    assert len(start) == 1
    body = b"".join(bytes(e.data) for e in frames[start[0] + 1:])
    assert body == seed.expected(0)[:PIECE // 2]  # the half sent, and not one byte after it
    os.close(seed.fd)
    os.close(seed.send_fd)

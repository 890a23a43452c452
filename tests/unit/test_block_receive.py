"""
The receive path (dragonfly/protocol/receive.py) on its own: a Receiver
over a real BlockConnection, reading from one end of a local socketpair (no
network, no reactor, a fake clock), as it does from a TCP socket: a piece
body goes straight into the piece's buffer, never a byte past it.
"""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
from twisted.internet.task import Clock

from dragonfly.core.bitmap import Bitmap
from dragonfly.core.ratelimit import TokenBucket
from dragonfly.protocol import frames as F
from dragonfly.protocol.connection import BlockConnection, Close, Send
from dragonfly.protocol.receive import RCVLOWAT_MAX, BufferPool, Receiver

TASK = hashlib.sha256(b"receive").hexdigest()
PIECE = 100_000


# -- the buffer pool -------------------------------------------------------------------------


def test_buffers_are_reused_by_size():
    pool = BufferPool()
    a = pool.take(10)
    assert len(a) == 10 and pool.take(10) is not a
    pool.give(a)
    assert pool.free(10) == 1
    assert pool.take(20) is not a and pool.take(10) is a
    assert pool.free(10) == 0


def test_the_pool_keeps_a_bounded_number_per_size():
    pool = BufferPool(keep=2)
    for _ in range(5):
        pool.give(bytearray(8))
    assert pool.free(8) == 2


# -- reading straight into a piece ---------------------------------------------------------------


class Leech:
    """A TaskSide downloading a task of 3 pieces; records the pieces it gets."""

    accepts_pieces = True

    def __init__(self, limits=()):
        self.bitmap = Bitmap(3)
        self.pieces: list[tuple[int, bytearray]] = []
        self.limits = list(limits)

    def local_bitmap(self):
        return self.bitmap

    def piece_length(self, index):
        return PIECE if 0 <= index < 3 else None

    def read_piece(self, index):
        raise AssertionError("a leech with nothing is never asked")

    def attached(self, conn): ...
    def detached(self, conn, reason): ...
    def on_bitfield(self, conn): ...
    def on_have(self, conn, index): ...
    def on_reject(self, conn, index, reason): ...
    def on_digests(self, conn, first, digests): ...
    def on_uploaded(self, conn, n): ...

    def on_piece(self, conn, index, data):
        self.pieces.append((index, data))

    def download_limits(self):
        return self.limits


class Transport:
    """What the Receiver uses of a transport: pausing its reads."""

    def __init__(self):
        self.state = "producing"

    def pauseProducing(self):
        self.state = "paused"

    def resumeProducing(self):
        self.state = "producing"


class Link:
    """A leech's connection after the handshake, with piece 0 requested; the seed writes to C{remote}."""

    def __init__(self, side, clock=None, direct=True):
        self.clock = clock or Clock()
        self.pool = BufferPool()
        self.lent: list[bytearray] = []
        self.conn = BlockConnection(self, "leech", lambda tid: None, side=side, task_id=TASK, remote_id="seed",
                                    buffer=self._lend, now=self.clock.seconds)
        self.ours, self.remote = socket.socketpair()
        self.ours.setblocking(False)
        self.transport = Transport()
        self.rx = Receiver(self.conn, self.run, self.clock)
        self.rx.attach(self.transport, self.ours if direct else None)
        self.sent = b""
        self.closes: list[Close] = []
        self.run(self.conn.connection_made())
        self.rx.data_received(F.encode_hello(bytes.fromhex(TASK), "seed") + F.encode_bitfield(Bitmap(3)))
        self.run(self.conn.request(0, 0.0))

    def _lend(self, size):
        buf = self.pool.take(size)
        self.lent.append(buf)
        return buf

    def run(self, actions):
        for a in actions:
            if isinstance(a, Send):
                self.sent += a.data
            elif isinstance(a, Close):
                self.closes.append(a)

    def twisted_reads(self, n):
        """What Twisted's doRead would hand to dataReceived: up to C{n} bytes."""
        self.rx.data_received(self.ours.recv(n))

    def left(self):
        """What is still in the socket."""
        try:
            return self.ours.recv(1 << 20)
        except BlockingIOError:
            return b""


def piece_frame(index=0, body=None):
    body = body if body is not None else os.urandom(PIECE)
    return F.piece_header(index, len(body)) + body, body


def test_a_body_is_read_into_its_buffer_and_not_a_byte_further():
    side = Leech()
    link = Link(side)
    frame, body = piece_frame()
    have = F.encode_have(2)
    link.remote.sendall(frame + have)
    link.twisted_reads(1000)  # the header and the body's first bytes
    assert side.pieces == [(0, body)]
    assert side.pieces[0][1] is link.lent[0]  # the pool's buffer, filled in place
    assert link.left() == have  # the next frame is left for the framer
    assert link.conn.requested == {} and not link.closes


def test_a_body_cut_in_two_reads():
    side = Leech()
    link = Link(side)
    frame, body = piece_frame()
    link.remote.sendall(frame[:60_000])
    link.twisted_reads(100)
    assert side.pieces == [] and link.left() == b""
    link.remote.sendall(frame[60_000:])
    link.twisted_reads(100)
    assert side.pieces == [(0, body)]


def test_rcvlowat_follows_the_body_still_to_come():
    link = Link(Leech())
    frame, _ = piece_frame()
    link.remote.sendall(frame[:50_000])
    link.twisted_reads(100)
    lowat = link.ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
    assert lowat == min(len(frame) - 50_000, RCVLOWAT_MAX)
    link.remote.sendall(frame[50_000:])
    link.twisted_reads(100)
    assert link.ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1


def test_a_cancelled_piece_goes_through_the_framer():
    side = Leech()
    link = Link(side)
    link.run(link.conn.cancel(0))
    frame, _ = piece_frame()
    link.remote.sendall(frame)
    link.twisted_reads(1000)
    rest = link.left()
    assert len(rest) == len(frame) - 1000  # nothing read into a buffer
    link.rx.data_received(rest)
    assert side.pieces == [] and not link.closes  # read and dropped


def test_without_a_socket_everything_goes_through_the_framer():
    side = Leech()
    link = Link(side, direct=False)
    frame, body = piece_frame()
    link.remote.sendall(frame)
    link.twisted_reads(1000)
    assert link.left() != b"" and side.pieces == []


def test_read_into_piece_stops_at_most():
    link = Link(Leech())
    frame, body = piece_frame()
    link.remote.sendall(frame[:20_000])
    link.rx.data_received(link.ours.recv(100))
    # everything in the socket was read (as much as the socket held)
    assert link.left() == b""
    link.remote.sendall(frame[20_000:])
    assert link.rx.read_into_piece(1000) == 1000
    assert len(link.left()) == len(frame) - 21_000


def test_a_download_limit_pauses_reading():
    clock = Clock()
    bucket = TokenBucket(100_000, clock, burst=0)
    side = Leech(limits=[bucket])
    link = Link(side, clock=clock)
    assert link.transport.state == "paused"  # the handshake's bytes took the bucket into debt
    clock.advance(1.0)
    assert link.transport.state == "producing"
    frame, body = piece_frame()
    link.remote.sendall(frame)
    link.twisted_reads(1000)
    assert link.transport.state == "paused" and side.pieces == [(0, body)]
    delays = sorted(c.getTime() - clock.seconds() for c in clock.getDelayedCalls())
    assert delays[-1] == pytest.approx(len(frame) / 100_000, rel=0.01)
    clock.advance(delays[-1])
    assert link.transport.state == "producing"


def test_nothing_is_read_while_paused():
    clock = Clock()
    bucket = TokenBucket(1000, clock, burst=0)
    link = Link(Leech(limits=[bucket]), clock=clock)
    assert link.rx.read_paused
    frame, _ = piece_frame()
    link.remote.sendall(frame)
    link.twisted_reads(1000)  # a read Twisted had under way
    assert len(link.left()) == len(frame) - 1000  # the body stays in the socket


def test_a_download_limit_caps_each_read(monkeypatch):
    monkeypatch.setattr("dragonfly.protocol.receive.PACED_READ", 10_000)
    clock = Clock()
    link = Link(Leech(limits=[TokenBucket(1 << 30, clock)]), clock=clock)
    frame, _ = piece_frame()
    link.remote.sendall(frame)
    link.twisted_reads(1000)
    assert len(link.left()) == len(frame) - 1000 - 10_000


def test_reads_are_not_capped_without_a_limit(monkeypatch):
    monkeypatch.setattr("dragonfly.protocol.receive.PACED_READ", 10_000)
    link = Link(Leech(limits=[None]))
    frame, _ = piece_frame()
    link.remote.sendall(frame)
    link.twisted_reads(1000)
    assert link.left() == b""


# -- the transport's doRead, taken on a plain socket ------------------------------------------------


class ReadingTransport(Transport):
    """A transport that reads like Twisted's tcp.Connection: C{doRead} recv()s 64 KiB for dataReceived."""

    def __init__(self, sock):
        super().__init__()
        self.sock = sock
        self.rx = None
        self.twisted_reads = 0
        self.TLS = False

    def doRead(self):
        self.twisted_reads += 1
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return None
        if not data:
            return "done"
        self.rx.data_received(data)
        return None


def reading_link(side=None):
    link = Link(side or Leech(), direct=False)
    transport = ReadingTransport(link.ours)
    link.transport = transport
    rx = link.rx = Receiver(link.conn, link.run, link.clock)
    transport.rx = rx
    rx.attach(transport, link.ours)
    return link, transport


def test_do_read_fills_a_body_without_twisteds_read():
    side = Leech()
    link, transport = reading_link(side)
    assert transport.doRead == link.rx.do_read
    frame, body = piece_frame()
    have = F.encode_have(2)
    link.remote.sendall(frame[:1000])
    transport.doRead()  # outside a body: Twisted reads (the header and the body's first bytes)
    assert transport.twisted_reads == 1
    link.remote.sendall(frame[1000:50_000])
    transport.doRead()  # inside the body: straight into the buffer, the socket found empty
    assert transport.twisted_reads == 1 and link.left() == b""
    link.remote.sendall(frame[50_000:] + have)
    assert transport.doRead() is None  # the body's end, then Twisted reads what follows
    assert transport.twisted_reads == 2
    assert side.pieces == [(0, body)] and side.pieces[0][1] is link.lent[0]
    assert link.conn.remote_have is not None and 2 in link.conn.remote_have
    assert not link.closes


def test_do_read_leaves_the_end_of_the_stream_to_twisted():
    link, transport = reading_link()
    frame, _ = piece_frame()
    link.remote.sendall(frame[:1000])
    transport.doRead()
    link.remote.close()
    assert transport.doRead() == "done"  # Twisted's read saw it
    assert transport.twisted_reads == 2


def test_do_read_leaves_a_cancelled_body_and_tls_to_twisted():
    link, transport = reading_link()
    link.run(link.conn.cancel(0))
    frame, _ = piece_frame()
    link.remote.sendall(frame[:1000])
    transport.doRead()
    link.remote.sendall(frame[1000:])
    transport.doRead()
    assert transport.twisted_reads == 2  # a discarded body goes through the framer
    link2, transport2 = reading_link()
    link2.remote.sendall(frame[:1000])
    transport2.doRead()
    transport2.TLS = True
    link2.remote.sendall(frame[1000:])
    transport2.doRead()
    assert transport2.twisted_reads == 2


def test_do_read_is_given_back_on_detach():
    link, transport = reading_link()
    link.rx.detach()
    assert transport.doRead == ReadingTransport.doRead.__get__(transport)


def test_bad_sizes_are_still_refused_from_the_header_with_do_read():
    link, transport = reading_link()
    body = os.urandom(PIECE + 1)
    link.remote.sendall(F.piece_header(0, len(body)) + body)
    transport.doRead()
    assert link.closes and link.closes[0].code == 400
    assert link.lent == []  # no buffer was ever lent for it

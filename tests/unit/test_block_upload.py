"""
The upload path (dragonfly/protocol/upload.py) on its own: an Uploader over
a real BlockConnection, writing to one end of a local socketpair (no network,
no reactor, a fake clock) so that its zero-copy bodies really go through
os.sendfile.  Every test decodes what came out of the other end and compares
it with the file, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from dragonfly.core.bitmap import Bitmap
from dragonfly.core.ratelimit import TokenBucket
from dragonfly.protocol import frames as F
from dragonfly.protocol.connection import BlockConnection, Close, Send, Upload
from dragonfly.protocol.upload import Uploader

TASK = hashlib.sha256(b"upload").hexdigest()


class Seed:
    """A TaskSide holding every piece of C{count} pieces of C{piece} bytes, in a file."""

    accepts_pieces = False

    def __init__(self, path, count=4, piece=1000, zero_copy=True):
        self.piece, self.count = piece, count
        self.data = os.urandom(piece * count)
        with open(path, "wb") as f:
            f.write(self.data)
        self.fd = os.open(path, os.O_RDONLY)
        self.send_fd = self.fd  # what piece_file hands out (a test may point it elsewhere)
        self.bitmap = Bitmap(count)
        for i in range(count):
            self.bitmap.set(i)
        self.reads: list[int] = []
        self.uploaded: list[int] = []
        self.read_result = None  # a test may make reads fail or come back short
        if zero_copy:
            self.piece_file = lambda i: (self.send_fd, i * piece, piece)

    def close(self):
        os.close(self.fd)

    def expected(self, index):
        return self.data[index * self.piece:(index + 1) * self.piece]

    def local_bitmap(self):
        return self.bitmap

    def piece_length(self, index):
        return self.piece if 0 <= index < self.count else None

    def read_piece(self, index):
        self.reads.append(index)
        if self.read_result is not None:
            return self.read_result(index)
        return succeed(self.expected(index))

    def attached(self, conn): ...
    def detached(self, conn, reason): ...
    def on_bitfield(self, conn): ...
    def on_have(self, conn, index): ...
    def on_piece(self, conn, index, data): ...
    def on_reject(self, conn, index, reason): ...
    def on_digests(self, conn, first, digests): ...

    def on_uploaded(self, conn, n):
        self.uploaded.append(n)

    def download_limits(self):
        return []


class Wire:
    """
    What the Uploader uses of a tcp.Connection: write() buffers as Twisted's
    FileDescriptor does, flush() is its doWrite (it resumes a paused producer
    once the buffer is empty).
    """

    def __init__(self, sock):
        self.sock = sock
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.producerPaused = False
        self.disconnecting = False
        self.producer = None

    def write(self, data):
        self.dataBuffer += bytes(data)

    def writeSequence(self, seq):
        self.dataBuffer += b"".join(bytes(s) for s in seq)

    def startWriting(self):
        pass

    def flush(self):
        if self.dataBuffer:
            try:
                n = self.sock.send(self.dataBuffer)
            except BlockingIOError:
                return
            self.dataBuffer = self.dataBuffer[n:]
        if not self.dataBuffer and self.producerPaused:
            self.producerPaused = False
            self.producer.resume()


class Host:
    """A seed's connection after the handshake: BlockConnection + Uploader, the remote end a socket."""

    def __init__(self, side, clock=None, limit=None, direct=True, version=None):
        self.clock = clock or Clock()
        self.side = side
        self.conn = BlockConnection(self, "seed", lambda tid: side, now=self.clock.seconds,
                                    **({"version": version} if version is not None else {}))
        ours, self.remote = socket.socketpair()
        ours.setblocking(False)
        self.remote.setblocking(False)
        self.wire = Wire(ours)
        self.up = Uploader(self.conn, self.run, self.clock, limit, name="test")
        self.wire.producer = self.up
        self.up.attach(self.wire, ours if direct else None)
        self.closes: list[Close] = []
        self.decoder = F.FrameDecoder()
        self.events: list = []
        self.run(self.conn.connection_made())
        if version is None:
            self.run(self.conn.data_received(F.encode_hello(bytes.fromhex(TASK), "leech")))
        else:
            hello = F.encode_hello(bytes.fromhex(TASK), "leech", version)
            self.run(self.conn.data_received(hello + F.encode_bitfield(Bitmap(side.count))))
        self.exchange()
        self.events.clear()

    def run(self, actions):
        for a in actions:
            if isinstance(a, Send):
                self.up.write(a.data)
            elif isinstance(a, Upload):
                self.up.pump()
            elif isinstance(a, Close):
                self.closes.append(a)

    def request(self, *indexes):
        self.run(self.conn.data_received(b"".join(F.encode_request(i) for i in indexes)))

    def exchange(self):
        """Move bytes until nothing moves: the transport's writes, its resumes, the remote's reads."""
        while True:
            self.wire.flush()
            try:
                data = self.remote.recv(1 << 20)
            except BlockingIOError:
                data = b""
            if not data:
                self.wire.flush()
                try:
                    data = self.remote.recv(1 << 20)
                except BlockingIOError:
                    return self.events
            self.events += self.decoder.feed(data)

    def pieces(self):
        """The pieces received whole, in order: (index, bytes)."""
        out, current = [], None
        for e in self.events:
            if isinstance(e, F.PieceStart):
                current = (e.index, bytearray())
            elif isinstance(e, F.PieceData):
                current[1].extend(e.data)
            elif isinstance(e, F.PieceEnd):
                out.append((current[0], bytes(current[1])))
                current = None
        return out


@pytest.fixture
def seed(tmp_path):
    s = Seed(str(tmp_path / "data"))
    yield s
    s.close()


def test_zero_copy_sends_the_file_without_reading_it(seed):
    host = Host(seed)
    host.request(0, 2, 3)
    host.exchange()
    assert host.pieces() == [(i, seed.expected(i)) for i in (0, 2, 3)]
    assert seed.reads == []  # every body came from the file
    assert seed.uploaded == [seed.piece] * 3 and host.up.bytes_out == 3 * seed.piece
    assert host.conn.sending is None and not host.closes


@pytest.mark.parametrize("direct", [True, False])
def test_held_haves_ride_in_front_of_a_piece(seed, direct):
    """A HAVE held for a HAVE_MANY frame goes out with the next piece's header, not on a timer of its own."""
    seed.have_delay = 0.1
    host = Host(seed, version=2, direct=direct)
    host.run(host.conn.send_have(1))
    assert host.exchange() == []  # held
    host.request(2)
    host.exchange()
    assert host.events[:2] == [F.Have(1), F.PieceStart(2, seed.piece)]
    assert host.pieces() == [(2, seed.expected(2))]
    assert host.conn.held_haves() == (b"", [])


def test_no_zero_copy_without_a_plain_socket(seed):
    host = Host(seed, direct=False)
    host.request(1)
    host.exchange()
    assert host.pieces() == [(1, seed.expected(1))] and seed.reads == [1]


@pytest.mark.parametrize("cut", [0, 1, 999])
def test_a_short_file_falls_back_to_reads_mid_body(tmp_path, seed, cut):
    """sendfile runs out of file C{cut} bytes into piece 1: the rest comes from read_piece, and so does piece 2."""
    short = tmp_path / "short"
    short.write_bytes(seed.data[:seed.piece + cut])
    seed.send_fd = os.open(short, os.O_RDONLY)
    try:
        host = Host(seed)
        host.request(0, 1, 2)
        host.exchange()
        assert host.pieces() == [(i, seed.expected(i)) for i in (0, 1, 2)]
        assert seed.reads == [1, 2] and not host.up.zero_copy
        assert not host.closes and host.up.bytes_out == 3 * seed.piece
    finally:
        os.close(seed.send_fd)


def test_a_failing_sendfile_falls_back_before_the_first_byte(seed):
    seed.send_fd = os.open(os.devnull, os.O_WRONLY)  # sendfile cannot read it
    try:
        host = Host(seed)
        host.request(3)
        host.exchange()
        assert host.pieces() == [(3, seed.expected(3))] and seed.reads == [3]
    finally:
        os.close(seed.send_fd)


@pytest.mark.parametrize("result", [
    lambda i: succeed(b"x" * 10),  # read back short
    lambda i: fail(OSError("disk gone")),
])
def test_a_failed_fallback_read_mid_body_closes_the_connection(tmp_path, seed, result):
    short = tmp_path / "short"
    short.write_bytes(seed.data[:seed.piece // 2])
    seed.send_fd = os.open(short, os.O_RDONLY)
    seed.read_result = result
    try:
        host = Host(seed)
        host.request(0)
        assert host.up.mid_body  # half the body is on the wire
        assert len(host.closes) == 1 and host.closes[0].code is not None
        host.exchange()
        # the remote sees the header and the half sent, nothing after it (the adapter closes)
        assert host.pieces() == [] and isinstance(host.events[0], F.PieceStart)
        assert b"".join(bytes(e.data) for e in host.events[1:]) == seed.expected(0)[:seed.piece // 2]
    finally:
        os.close(seed.send_fd)


def test_a_read_failing_before_the_header_is_rejected(seed):
    seed.read_result = lambda i: fail(OSError("disk gone"))
    host = Host(seed, direct=False)
    host.request(2)
    host.exchange()
    assert [e for e in host.events if isinstance(e, F.Reject)] == [F.Reject(2, F.REJECT_NOT_HELD)]
    assert not host.closes and host.conn.sending is None


def test_control_frames_wait_for_the_body_on_the_wire(tmp_path):
    """A body larger than the socket's buffer: sendfile stops part-way, a HAVE written meanwhile follows the body."""
    seed = Seed(str(tmp_path / "big"), count=2, piece=4 << 20)
    try:
        host = Host(seed)
        host.request(0)
        assert host.up.mid_body and host.wire.producerPaused  # waiting for the socket
        host.run(host.conn.send_have(1))
        assert host.wire.dataBuffer == b""  # held, not written into the body
        host.exchange()
        assert host.pieces() == [(0, seed.expected(0))]
        kinds = [type(e) for e in host.events if not isinstance(e, F.PieceData)]
        assert kinds == [F.PieceStart, F.PieceEnd, F.Have]
        assert seed.reads == []
    finally:
        seed.close()


def test_nothing_goes_out_while_the_transport_is_paused(seed):
    host = Host(seed)
    host.up.pause()
    host.request(0)
    host.exchange()
    assert host.pieces() == []
    host.up.resume()
    host.exchange()
    assert host.pieces() == [(0, seed.expected(0))]


@pytest.mark.parametrize("direct", [True, False])
def test_the_upload_limit_paces_both_paths(seed, direct):
    clock = Clock()
    host = Host(seed, clock=clock, limit=TokenBucket(seed.piece, clock, burst=seed.piece), direct=direct)
    host.request(0, 1, 2)
    host.exchange()
    assert [i for i, _ in host.pieces()] == [0]  # the burst
    clock.advance(0.5)
    host.exchange()
    assert [i for i, _ in host.pieces()] == [0]
    clock.advance(0.5)
    host.exchange()
    assert [i for i, _ in host.pieces()] == [0, 1]  # a piece a second
    clock.advance(1.0)
    host.exchange()
    assert host.pieces() == [(i, seed.expected(i)) for i in (0, 1, 2)]


def test_drop_forgets_the_piece_in_hand_and_its_timer(seed):
    clock = Clock()
    host = Host(seed, clock=clock, limit=TokenBucket(seed.piece, clock, burst=0), direct=False)
    host.request(0)
    assert clock.getDelayedCalls()  # waiting for the limit
    host.up.drop()
    assert not clock.getDelayedCalls()
    clock.advance(10)
    host.exchange()
    assert host.pieces() == []


def test_a_piece_file_of_the_wrong_length_is_not_used(seed):
    seed.piece_file = lambda i: (seed.fd, i * seed.piece, seed.piece - 1)
    host = Host(seed)
    host.request(1)
    host.exchange()
    assert host.pieces() == [(1, seed.expected(1))] and seed.reads == [1]


def test_a_piece_file_that_raises_is_not_used(seed):
    def broken(index):
        raise OSError("gone")

    seed.piece_file = broken
    host = Host(seed)
    host.request(1)
    host.exchange()
    assert host.pieces() == [(1, seed.expected(1))] and seed.reads == [1]


def test_a_read_finishing_after_the_close_sends_nothing(seed):
    pending: list[Deferred] = []
    seed.read_result = lambda i: pending.append(Deferred()) or pending[-1]
    host = Host(seed, direct=False)
    host.request(0)
    host.run(host.conn.abort("bye"))
    pending[0].callback(seed.expected(0))
    host.exchange()
    assert host.pieces() == [] and host.up.bytes_out == 0


@settings(max_examples=60, deadline=None)
@given(
    piece=st.integers(1, 5000),
    count=st.integers(1, 4),
    cut=st.floats(0, 1),
    order=st.permutations(range(4)),
)
def test_any_cut_gives_the_same_bytes(piece, count, cut, order):
    """Wherever sendfile's file ends, every requested piece arrives whole and right, in the order asked."""
    with tempfile.TemporaryDirectory() as d:
        seed = Seed(os.path.join(d, "data"), count=count, piece=piece)
        cut_at = int(cut * piece * count)
        with open(os.path.join(d, "short"), "wb") as f:
            f.write(seed.data[:cut_at])
        seed.send_fd = os.open(os.path.join(d, "short"), os.O_RDONLY)
        try:
            wanted = [i for i in order if i < count]
            host = Host(seed)
            host.request(*wanted)
            host.exchange()
            assert host.pieces() == [(i, seed.expected(i)) for i in wanted]
            assert host.up.bytes_out == piece * len(wanted) and not host.closes
        finally:
            os.close(seed.send_fd)
            seed.close()


def test_control_frames_go_out_at_once_on_an_idle_socket(seed):
    """Twisted's write buffer is empty: a frame is sent straight away, nothing waits for a doWrite."""
    host = Host(seed)
    host.up.write(F.encode_have(1))
    assert host.wire.dataBuffer == b""
    assert host.decoder.feed(host.remote.recv(100)) == [F.Have(1)]


def test_control_frames_queue_behind_what_twisted_holds(seed):
    """Bytes already in Twisted's buffer go first: a frame written then is appended, in order."""
    host = Host(seed)
    host.wire.dataBuffer = F.encode_have(1)
    host.up.write(F.encode_have(2))
    assert host.wire.dataBuffer == F.encode_have(1) + F.encode_have(2)
    assert host.exchange() == [F.Have(1), F.Have(2)]

"""
The block protocol's Twisted layer, driven over in-memory transports: no
sockets, no reactor.
"""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dragonfly.core.bitmap import Bitmap
from dragonfly.protocol import frames as F
from dragonfly.protocol.block import BlockFactory

TASK = hashlib.sha256(b"task").hexdigest()
PIECE = 1000


class Side:
    """A TaskSide holding C{held} pieces of a 5-piece task."""

    accepts_pieces = True

    def __init__(self, held=(0, 1, 2), count=5, defer_reads=False):
        self.clock = Clock()
        self.bitmap = Bitmap(count)
        for i in held:
            self.bitmap.set(i)
        self.events: list[tuple] = []
        self.defer_reads = defer_reads
        self.reads: list[tuple[int, Deferred]] = []

    def local_bitmap(self):
        return self.bitmap

    def piece_length(self, index):
        return PIECE if 0 <= index < self.bitmap.count else None

    def read_piece(self, index):
        data = bytes([index]) * PIECE
        if not self.defer_reads:
            return succeed(data)
        d: Deferred = Deferred()
        self.reads.append((index, d))
        return d

    def attached(self, conn):
        self.events.append(("attached", conn.remote_id))

    def detached(self, conn, reason):
        self.events.append(("detached",))

    def on_bitfield(self, conn):
        self.events.append(("bitfield", sorted(conn.remote_have)))

    def on_have(self, conn, index):
        self.events.append(("have", index))

    def on_piece(self, conn, index, data):
        self.events.append(("piece", index, bytes(data)))

    def on_reject(self, conn, index, reason):
        self.events.append(("reject", index, reason))

    def on_digests(self, conn, first, digests):
        self.events.append(("digests", first, digests))

    def on_uploaded(self, conn, n):
        self.events.append(("uploaded", n))

    def download_limits(self):
        return []


def server(side, transport=None):
    factory = BlockFactory("server-peer", lambda tid: side if tid == TASK else None)
    proto = factory.buildProtocol(None)
    transport = transport or StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def frames_of(data: bytes) -> list:
    return F.FrameDecoder().feed(data)


def hello() -> bytes:
    return F.encode_hello(bytes.fromhex(TASK), "client-peer")


def test_handshake_answers_hello_and_bitfield():
    side = Side()
    proto, t = server(side)
    proto.dataReceived(hello())
    out = frames_of(t.value())
    assert isinstance(out[0], F.Hello) and out[0].peer_id == "server-peer"
    assert isinstance(out[1], F.BitfieldMsg) and sorted(out[1].bitmap) == [0, 1, 2]
    assert side.events == [("attached", "client-peer")]


def test_unknown_task_is_refused_with_an_error():
    side = Side()
    proto, t = server(side)
    proto.dataReceived(F.encode_hello(b"\x01" * 32, "client-peer"))
    (err,) = frames_of(t.value())
    assert isinstance(err, F.ErrorMsg) and err.code == 404
    assert t.disconnecting


def test_malformed_frame_closes_with_reason():
    proto, t = server(Side())
    proto.dataReceived(b"\x2a\x00\x00\x00\x04abcd")
    (err,) = frames_of(t.value())
    assert isinstance(err, F.ErrorMsg) and "unknown" in err.message
    assert t.disconnecting


def test_frames_before_hello_are_refused():
    proto, t = server(Side())
    proto.dataReceived(F.encode_request(0))
    (err,) = frames_of(t.value())
    assert "before HELLO" in err.message
    assert t.disconnecting


def test_request_served_and_unheld_rejected():
    side = Side()
    proto, t = server(side)
    proto.dataReceived(hello())
    t.clear()
    proto.dataReceived(F.encode_request(1) + F.encode_request(4))
    out = frames_of(t.value())
    assert F.Reject(4, F.REJECT_NOT_HELD) in out
    starts = [e for e in out if isinstance(e, F.PieceStart)]
    assert starts == [F.PieceStart(1, PIECE)]
    body = b"".join(bytes(e.data) for e in out if isinstance(e, F.PieceData))
    assert body == bytes([1]) * PIECE
    assert ("uploaded", PIECE) in side.events


def test_uploads_wait_while_the_transport_is_paused():
    side = Side(defer_reads=True)
    proto, t = server(side)
    proto.dataReceived(hello())
    t.clear()
    proto.pauseProducing()
    proto.dataReceived(F.encode_request(0) + F.encode_request(1) + F.encode_request(2))
    # one piece is read ahead, nothing is written while paused
    assert [i for i, _ in side.reads] == [0]
    side.reads[0][1].callback(bytes([0]) * PIECE)
    assert t.value() == b""
    assert len(side.reads) == 1
    proto.resumeProducing()
    assert len(t.value()) == F.PIECE_HEADER_SIZE + PIECE
    # the next read started when the first piece went out
    assert [i for i, _ in side.reads] == [0, 1]


def test_cancel_removes_a_queued_request():
    side = Side(defer_reads=True)
    proto, t = server(side)
    proto.dataReceived(hello())
    proto.dataReceived(F.encode_request(0) + F.encode_request(1) + F.encode_cancel(1))
    side.reads[0][1].callback(bytes([0]) * PIECE)
    assert [i for i, _ in side.reads] == [0]


def connected_pair():
    """A client and a server protocol wired through StringTransports."""
    srv_side, cli_side = Side(held=(0, 1, 2)), Side(held=())
    srv, st_ = server(srv_side)
    factory = BlockFactory("client-peer", lambda tid: None)
    cli = factory.client(cli_side, TASK, "server-peer")
    ct = StringTransport()
    cli.makeConnection(ct)

    def pump():
        while ct.value() or st_.value():
            a, b = ct.value(), st_.value()
            ct.clear()
            st_.clear()
            if a:
                srv.dataReceived(a)
            if b:
                cli.dataReceived(b)

    return cli, cli_side, srv, srv_side, pump


def test_client_downloads_a_piece():
    cli, cli_side, srv, srv_side, pump = connected_pair()
    pump()
    assert ("bitfield", [0, 1, 2]) in cli_side.events
    cli.request(2, 0.0)
    pump()
    assert ("piece", 2, bytes([2]) * PIECE) in cli_side.events
    assert cli.requested == {}


def test_unsolicited_piece_closes_the_connection():
    cli, cli_side, srv, srv_side, pump = connected_pair()
    pump()
    cli.dataReceived(F.piece_header(1, PIECE) + bytes(PIECE))
    assert cli.closed


def test_wrong_piece_length_closes_the_connection():
    cli, cli_side, srv, srv_side, pump = connected_pair()
    pump()
    cli.requested[1] = 0.0
    cli.dataReceived(F.piece_header(1, PIECE - 1) + bytes(PIECE - 1))
    assert cli.closed
    assert not any(e[0] == "piece" for e in cli_side.events)


def test_cancelled_piece_in_flight_is_discarded():
    cli, cli_side, srv, srv_side, pump = connected_pair()
    pump()
    cli.request(0, 0.0)
    cli.cancel(0)
    # the server had already sent it
    cli.dataReceived(F.piece_header(0, PIECE) + bytes(PIECE))
    assert not cli.closed
    assert not any(e[0] == "piece" for e in cli_side.events)


def test_impostor_seed_is_refused():
    side = Side(held=())
    factory = BlockFactory("client-peer", lambda tid: None)
    cli = factory.client(side, TASK, "supernode")
    t = StringTransport()
    cli.makeConnection(t)
    cli.dataReceived(F.encode_hello(bytes.fromhex(TASK), "someone-else"))
    assert cli.closed


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 50), max_size=10))
def test_random_bytes_after_handshake_never_raise(garbage, cuts):
    side = Side()
    proto, t = server(side)
    proto.dataReceived(hello())
    pos = 0
    for c in cuts + [len(garbage)]:
        proto.dataReceived(garbage[pos:pos + c])
        pos += c
    # either still open or closed with an ERROR frame, never an exception
    if proto.closed:
        assert t.disconnecting


def test_upload_limit_paces_pieces():
    from dragonfly.core.ratelimit import TokenBucket

    side = Side(held=(0, 1, 2))
    clock = Clock()
    factory = BlockFactory("server-peer", lambda tid: side, clock=clock,
                           upload_limit=TokenBucket(PIECE, clock, burst=PIECE))
    proto = factory.buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    proto.dataReceived(hello())
    t.clear()
    proto.dataReceived(F.encode_request(0) + F.encode_request(1) + F.encode_request(2))
    sent = lambda: sum(1 for e in frames_of(t.value()) if isinstance(e, F.PieceStart))  # noqa: E731
    assert sent() == 1  # the burst
    clock.advance(0.5)
    assert sent() == 1
    clock.advance(0.5)
    assert sent() == 2  # one piece a second
    clock.advance(1.0)
    assert sent() == 3
    proto.connectionLost(None)


def test_download_limit_pauses_reading():
    from dragonfly.core.ratelimit import TokenBucket

    clock = Clock()
    side = Side(held=())
    bucket = TokenBucket(1000, clock, burst=0)
    side.download_limits = lambda: [bucket]
    factory = BlockFactory("client-peer", lambda tid: None, clock=clock)
    cli = factory.client(side, TASK, "server-peer")
    t = StringTransport()
    cli.makeConnection(t)
    cli.dataReceived(F.encode_hello(bytes.fromhex(TASK), "server-peer"))
    assert t.producerState == "paused"
    clock.advance(1.0)
    assert t.producerState == "producing"


def test_iosim_upload_limit_paces_pieces_between_two_protocols():
    """Two real protocols over iosim: the seed's upload limit lets a piece a second go; a CANCEL of a waiting one holds."""
    from twisted.internet.address import IPv4Address
    from twisted.test import iosim

    from dragonfly.core.ratelimit import TokenBucket

    clock = Clock()
    srv_side, cli_side = Side(held=(0, 1, 2, 3)), Side(held=())
    srv_factory = BlockFactory("server-peer", lambda tid: srv_side if tid == TASK else None, clock=clock,
                               upload_limit=TokenBucket(PIECE, clock, burst=PIECE))
    srv = srv_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    cli = BlockFactory("client-peer", lambda tid: None, clock=clock).client(cli_side, TASK, "server-peer")
    pump = iosim.connect(srv, iosim.makeFakeServer(srv), cli, iosim.makeFakeClient(cli), greet=False)
    pump.flush()
    for i in (0, 1, 2, 3):
        cli.request(i, clock.seconds())
    pump.flush()
    got = lambda: [e[1] for e in cli_side.events if e[0] == "piece"]  # noqa: E731
    assert got() == [0]  # the burst
    cli.cancel(2)  # still waiting in the seed's queue
    pump.flush()
    clock.advance(1.0)
    pump.flush()
    assert got() == [0, 1]
    clock.advance(1.0)
    pump.flush()
    assert got() == [0, 1, 3]
    assert [e for e in cli_side.events if e[0] == "piece"] == [("piece", i, bytes([i]) * PIECE) for i in (0, 1, 3)]
    assert srv.bytes_out == 3 * PIECE and cli.requested == {} and not srv.uploading
    assert srv_factory.accepted == {"127.0.0.1": 1}
    cli.transport.loseConnection()
    pump.flush()
    assert srv.closed and cli.closed and srv_factory.accepted == {} and srv_factory.connections == set()

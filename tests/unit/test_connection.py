"""
The block connection's rules with no transport (L{BlockConnection}), its
timers and limits on a fake clock, and two real L{BlockProtocol}s talking over
C{twisted.test.iosim}.
"""

from __future__ import annotations

import hashlib

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim

from dragonfly.core.bitmap import Bitmap
from dragonfly.protocol import frames as F
from dragonfly.protocol.block import BlockFactory
from dragonfly.protocol.connection import (
    DEFAULT_LIMITS,
    HANDSHAKE,
    IDLE,
    KEEPALIVE,
    BlockConnection,
    CancelTimer,
    Close,
    Limits,
    Send,
    SetTimer,
    State,
    Upload,
)

TASK = hashlib.sha256(b"task").hexdigest()
PIECE = 1000


class Side:
    """A TaskSide holding C{held} pieces of a C{count}-piece task; records what it is told."""

    accepts_pieces = True

    def __init__(self, held=(0, 1, 2), count=5, clock=None):
        self.clock = clock or Clock()
        self.bitmap = Bitmap(count)
        for i in held:
            self.bitmap.set(i)
        self.events: list[tuple] = []
        self.on_attach = None

    def local_bitmap(self):
        return self.bitmap

    def piece_length(self, index):
        return PIECE if 0 <= index < self.bitmap.count else None

    def read_piece(self, index):
        return succeed(bytes([index]) * PIECE)

    def attached(self, conn):
        self.events.append(("attached", conn.remote_id))
        if self.on_attach is not None:
            self.on_attach(conn)

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


class Handle:
    """What a side sees as the connection, forwarding to a BlockConnection and keeping its actions."""

    def __init__(self):
        self.conn: BlockConnection | None = None
        self.actions: list = []

    remote_id = property(lambda self: self.conn.remote_id)
    remote_have = property(lambda self: self.conn.remote_have)

    def send_digests(self, first, digests):
        self.actions += self.conn.send_digests(first, digests)

    def request(self, index, now):
        self.actions += self.conn.request(index, now)


def sent(actions) -> list:
    """The frames in C{actions}' Send and Close (ERROR) actions, decoded."""
    data = b"".join(a.data for a in actions if isinstance(a, Send))
    return F.FrameDecoder().feed(data)


def make(side=None, server_side=None, limits=DEFAULT_LIMITS, clock=None):
    """A BlockConnection: a server resolving TASK to C{server_side}, or a client for C{side}."""
    clock = clock or Clock()
    handle = Handle()
    conn = BlockConnection(
        handle, "me", lambda tid: server_side if tid == TASK else None,
        side=side, task_id=TASK if side is not None else None, remote_id="them" if side is not None else None,
        now=clock.seconds, limits=limits,
    )
    handle.conn = conn
    return conn, handle, clock


def hello(peer="them") -> bytes:
    return F.encode_hello(bytes.fromhex(TASK), peer)


# -- sans-IO rules -------------------------------------------------------------------


def test_server_handshake_actions_in_order():
    side = Side()
    conn, _handle, _ = make(server_side=side)
    assert conn.connection_made() == [SetTimer(HANDSHAKE, 10.0)]
    actions = conn.data_received(hello())
    assert conn.state is State.READY and conn.remote_id == "them"
    frames = sent(actions)
    assert isinstance(frames[0], F.Hello) and frames[0].peer_id == "me"
    assert isinstance(frames[1], F.BitfieldMsg) and sorted(frames[1].bitmap) == [0, 1, 2]
    assert CancelTimer(HANDSHAKE) in actions
    assert SetTimer(IDLE, 60.0) in actions and SetTimer(KEEPALIVE, 30.0) in actions
    assert side.events == [("attached", "them")]


def test_nested_calls_keep_frame_order():
    """The side sends DIGESTS from attached(): they go out after HELLO and BITFIELD."""
    side = Side()
    side.on_attach = lambda h: h.send_digests(0, [b"\x01" * 32])
    conn, handle, _ = make(server_side=side)
    conn.connection_made()
    outer = conn.data_received(hello())
    frames = sent(handle.actions + outer)  # the nested call's actions are handed over first
    assert [type(f) for f in frames] == [F.Hello, F.BitfieldMsg, F.Digests]


def test_client_sends_hello_and_checks_the_answer():
    side = Side(held=())
    conn, _, _ = make(side=side)
    (hello_frame,) = sent(conn.connection_made())
    assert hello_frame == F.Hello(F.PROTOCOL_VERSION, bytes.fromhex(TASK), "me")
    actions = conn.data_received(hello("impostor"))
    assert conn.closed
    (close,) = [a for a in actions if isinstance(a, Close)]
    assert close.code == 400 and "impostor" in close.reason
    assert side.events == []


def test_unknown_task_and_early_frames_are_refused():
    conn, _, _ = make(server_side=None)
    conn.connection_made()
    (close,) = [a for a in conn.data_received(hello()) if isinstance(a, Close)]
    assert close.code == 404
    conn, _, _ = make(server_side=Side())
    conn.connection_made()
    (close,) = [a for a in conn.data_received(F.encode_have(1)) if isinstance(a, Close)]
    assert close.code == 400 and "before HELLO" in close.reason


def test_remote_error_closes_without_answering():
    conn, _, _ = make(server_side=Side())
    conn.connection_made()
    (close,) = [a for a in conn.data_received(F.encode_error(503, "bye")) if isinstance(a, Close)]
    assert close.code is None and "bye" in close.reason


def test_handshake_timeout():
    conn, _, clock = make(server_side=Side())
    conn.connection_made()
    clock.advance(10)
    (close,) = [a for a in conn.timer_fired(HANDSHAKE) if isinstance(a, Close)]
    assert close.code == 408 and conn.closed


def test_handshake_timer_after_hello_does_nothing():
    conn, _, _ = make(server_side=Side())
    conn.connection_made()
    conn.data_received(hello())
    assert conn.timer_fired(HANDSHAKE) == []
    assert conn.state is State.READY


def test_idle_connection_is_closed_and_keepalives_keep_it():
    conn, _, clock = make(server_side=Side())
    conn.connection_made()
    conn.data_received(hello())
    clock.advance(30)
    assert F.KeepAlive() in sent(conn.timer_fired(KEEPALIVE))
    conn.data_received(F.encode_keepalive())  # the remote is alive at t=30
    clock.advance(30)
    assert conn.timer_fired(IDLE) == [SetTimer(IDLE, 30.0)]  # quiet for 30 s only
    clock.advance(30)
    (close,) = [a for a in conn.timer_fired(IDLE) if isinstance(a, Close)]
    assert close.code == 408 and "idle" in close.reason


def test_requests_in_flight_are_not_idle():
    side = Side(held=())
    conn, _, clock = make(side=side)
    conn.connection_made()
    conn.data_received(hello())
    conn.request(1, 0.0)
    clock.advance(500)
    assert conn.timer_fired(IDLE) == [SetTimer(IDLE, 60.0)]
    conn.cancel(1)
    clock.advance(59)
    assert conn.timer_fired(IDLE) == [SetTimer(IDLE, 1.0)]  # the activity counts from the last check


def test_keepalive_not_sent_while_we_talk():
    conn, _, clock = make(server_side=Side())
    conn.connection_made()
    conn.data_received(hello())
    clock.advance(20)
    conn.send_have(1)
    clock.advance(10)
    assert conn.timer_fired(KEEPALIVE) == [SetTimer(KEEPALIVE, 20.0)]


def test_request_queue_limit_is_configurable():
    conn, _, _ = make(server_side=Side(held=range(5)), limits=Limits(max_queued_requests=2))
    conn.connection_made()
    conn.data_received(hello())
    # one to send next and two waiting
    assert Upload() in conn.data_received(F.encode_request(0) + F.encode_request(1) + F.encode_request(2))
    assert not conn.closed
    (close,) = [a for a in conn.data_received(F.encode_request(3)) if isinstance(a, Close)]
    assert "more than 2 requests" in close.reason


def test_upload_queue_order_and_cancel():
    side = Side()
    conn, _, _ = make(server_side=side)
    conn.connection_made()
    conn.data_received(hello())
    conn.data_received(F.encode_request(2) + F.encode_request(0) + F.encode_request(1) + F.encode_cancel(0))
    assert conn.next_upload() == 2
    assert conn.next_upload() is None  # one at a time
    assert Upload() in conn.upload_done(2, PIECE)
    assert conn.next_upload() == 1
    assert F.Reject(1, F.REJECT_NOT_HELD) in sent(conn.upload_failed(1))
    assert side.events[-1] == ("uploaded", PIECE)


def test_piece_body_read_straight_into_the_buffer():
    side = Side(held=())
    conn, _, _ = make(side=side)
    conn.connection_made()
    conn.data_received(hello())
    conn.request(3, 0.0)
    body = bytes(range(256)) * 3 + b"x" * (PIECE - 768)
    frame = F.piece_header(3, PIECE) + body
    conn.data_received(frame[:100])
    window = conn.rx_window()
    assert len(window) == PIECE - (100 - F.PIECE_HEADER_SIZE)
    window[:] = body[100 - F.PIECE_HEADER_SIZE:]
    del window
    conn.rx_filled(PIECE - (100 - F.PIECE_HEADER_SIZE))
    assert side.events[-1] == ("piece", 3, body)
    assert conn.rx_window() is None and conn.requested == {}


def test_no_window_for_a_cancelled_piece_or_outside_a_body():
    side = Side(held=())
    conn, _, _ = make(side=side)
    conn.connection_made()
    conn.data_received(hello())
    assert conn.rx_window() is None
    conn.request(3, 0.0)
    conn.cancel(3)
    conn.data_received(F.piece_header(3, PIECE) + b"a")
    assert conn.rx_window() is None  # discarded through the framer
    conn.data_received(b"a" * (PIECE - 1))
    assert not conn.closed and not any(e[0] == "piece" for e in side.events)


def test_detached_once_only_if_attached():
    side = Side()
    conn, _, _ = make(server_side=side)
    conn.connection_made()
    conn.connection_lost("gone")
    assert side.events == []
    conn, _, _ = make(server_side=side)
    conn.connection_made()
    conn.data_received(hello())
    conn.connection_lost("gone")
    conn.connection_lost("gone")
    assert side.events.count(("detached",)) == 1


# -- the adapter's timers and the factory's limits, on a fake clock ---------------------


def accepted(factory, host="10.0.0.1", port=4000):
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    t = StringTransport()
    proto.makeConnection(t)
    return proto, t


def frames_of(t) -> list:
    return F.FrameDecoder().feed(t.value())


def test_adapter_handshake_timeout():
    clock = Clock()
    factory = BlockFactory("srv", lambda tid: Side(), clock=clock, handshake_timeout=5)
    _proto, t = accepted(factory)
    clock.advance(4.9)
    assert not t.disconnecting
    clock.advance(0.1)
    (err,) = frames_of(t)
    assert isinstance(err, F.ErrorMsg) and err.code == 408
    assert t.disconnecting


def test_adapter_idle_timeout_and_keepalive():
    clock = Clock()
    side = Side(clock=clock)
    factory = BlockFactory("srv", lambda tid: side, clock=clock, idle_timeout=20)
    proto, t = accepted(factory)
    proto.dataReceived(hello())
    t.clear()
    clock.advance(10)
    assert frames_of(t) == [F.KeepAlive()]
    t.clear()
    clock.advance(9.9)
    assert not t.disconnecting
    clock.advance(0.1)
    (err,) = frames_of(t)
    assert err.code == 408 and t.disconnecting


def test_adapter_timers_cancelled_on_close():
    clock = Clock()
    factory = BlockFactory("srv", lambda tid: Side(clock=clock), clock=clock)
    proto, _t = accepted(factory)
    proto.dataReceived(hello())
    assert clock.getDelayedCalls()
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_connections_per_address_are_limited():
    factory = BlockFactory("srv", lambda tid: None, clock=Clock(), max_per_address=2)
    a, _ = accepted(factory, port=1)
    accepted(factory, port=2)
    _refused, t = accepted(factory, port=3)
    (err,) = frames_of(t)
    assert err.code == 429 and "10.0.0.1" in err.message and t.disconnecting
    _other, t2 = accepted(factory, host="10.0.0.2")
    assert t2.value() == b"" and not t2.disconnecting
    a.connectionLost(None)
    _again, t3 = accepted(factory, port=4)
    assert t3.value() == b"" and not t3.disconnecting
    assert factory.refused == 1


def test_connections_in_total_are_limited():
    factory = BlockFactory("srv", lambda tid: None, clock=Clock(), max_connections=3)
    for i in range(3):
        accepted(factory, host=f"10.0.0.{i}")
    _, t = accepted(factory, host="10.0.1.1")
    (err,) = frames_of(t)
    assert err.code == 429 and t.disconnecting
    # our own outgoing connections do not count against the port's limits
    cli = factory.client(Side(held=()), TASK, "srv")
    cli.makeConnection(StringTransport())
    assert sum(factory.accepted.values()) == 3


def test_queued_request_limit_from_the_factory():
    side = Side(held=(0, 1, 2, 3, 4))
    side.read_piece = lambda i: Deferred()
    factory = BlockFactory("srv", lambda tid: side, clock=Clock(), max_queued_requests=2)
    proto, t = accepted(factory)
    proto.dataReceived(hello())
    proto.dataReceived(F.encode_request(0) + F.encode_request(1) + F.encode_request(2))
    assert not t.disconnecting  # one being read, two waiting
    proto.dataReceived(F.encode_request(3))
    assert t.disconnecting and "more than 2" in frames_of(t)[-1].message


# -- two real protocols over iosim ------------------------------------------------------------


def pair(server_held=(0, 1, 2), clock=None, **kw):
    clock = clock or Clock()
    srv_side, cli_side = Side(held=server_held, clock=clock), Side(held=(), clock=clock)
    srv_factory = BlockFactory("server-peer", lambda tid: srv_side if tid == TASK else None, clock=clock, **kw)
    cli_factory = BlockFactory("client-peer", lambda tid: None, clock=clock, **kw)
    srv = srv_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    cli = cli_factory.client(cli_side, TASK, "server-peer")
    pump = iosim.connect(srv, iosim.makeFakeServer(srv), cli, iosim.makeFakeClient(cli), greet=False)
    return cli, cli_side, srv, srv_side, pump, clock


def test_iosim_handshake_bitfield_and_pieces():
    cli, cli_side, srv, srv_side, pump, _ = pair()
    pump.flush()
    assert ("attached", "server-peer") in cli_side.events
    assert ("attached", "client-peer") in srv_side.events
    assert ("bitfield", [0, 1, 2]) in cli_side.events
    assert ("bitfield", []) in srv_side.events
    for i in (0, 2):
        cli.request(i, 0.0)
    cli.request(4, 0.0)  # not held: REJECT
    pump.flush()
    assert ("piece", 0, bytes([0]) * PIECE) in cli_side.events
    assert ("piece", 2, bytes([2]) * PIECE) in cli_side.events
    assert ("reject", 4, F.REJECT_NOT_HELD) in cli_side.events
    assert srv_side.events.count(("uploaded", PIECE)) == 2
    assert srv.bytes_out == 2 * PIECE and cli.requested == {}
    srv.send_have(1)  # a HAVE for a piece the client already knows changes nothing
    pump.flush()
    assert not any(e[0] == "have" for e in cli_side.events)


def test_iosim_cancel_before_the_piece_is_read():
    cli, cli_side, srv, srv_side, pump, _ = pair()
    pump.flush()
    reads = []

    def slow(index):
        d = Deferred()
        reads.append((index, d))
        return d

    srv_side.read_piece = slow
    cli.request(0, 0.0)
    cli.request(1, 0.0)
    pump.flush()
    cli.cancel(1)
    pump.flush()
    reads[0][1].callback(bytes([0]) * PIECE)
    pump.flush()
    assert [i for i, _ in reads] == [0]  # piece 1 was never read
    assert [e for e in cli_side.events if e[0] == "piece"] == [("piece", 0, bytes([0]) * PIECE)]
    assert not cli.closed and not srv.closed


def test_iosim_unknown_task_is_refused():
    cli, cli_side, srv, _srv_side, pump, _ = pair()
    srv._conn.resolve = lambda tid: None
    pump.flush()
    assert cli.closed and srv.closed
    assert not any(e[0] == "attached" for e in cli_side.events)


def test_iosim_protocol_error_closes_both_ends():
    cli, cli_side, srv, srv_side, pump, _ = pair()
    pump.flush()
    srv.transport.write(F.encode_hello(bytes.fromhex(TASK), "server-peer"))  # a second HELLO
    pump.flush()
    assert cli.closed and srv.closed
    assert ("detached",) in cli_side.events and ("detached",) in srv_side.events


def test_iosim_healthy_idle_neighbours_stay_silent_ones_go():
    cli, _cli_side, srv, _srv_side, pump, clock = pair(idle_timeout=20)
    pump.flush()
    for _ in range(30):  # 300 s of nothing requested: KEEPALIVEs keep both ends
        clock.advance(10)
        pump.flush()
    assert not cli.closed and not srv.closed
    # the client stops talking (its timers gone): the server sheds it
    for timer in list(cli._timers.values()):
        timer.cancel()
    for _ in range(4):
        clock.advance(10)
        pump.flush()
    assert srv.closed and cli.closed


def test_iosim_handshake_timeout_sheds_a_silent_client():
    clock = Clock()
    factory = BlockFactory("srv", lambda tid: Side(clock=clock), clock=clock)
    srv = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))

    silent = Protocol()
    pump = iosim.connect(srv, iosim.makeFakeServer(srv), silent, iosim.makeFakeClient(silent), greet=False)
    clock.advance(9)
    pump.flush()
    assert not srv.closed
    clock.advance(1)
    pump.flush()
    assert srv.closed and factory.connections == set() and factory.accepted == {}


@pytest.mark.parametrize("limit", [1, 2])
def test_iosim_seed_refuses_over_the_address_limit(limit):
    clock = Clock()
    side = Side(clock=clock)
    factory = BlockFactory("srv", lambda tid: side, clock=clock, max_per_address=limit)
    clients = []
    for n in range(limit + 1):
        cli_side = Side(held=(), clock=clock)
        srv = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000 + n))
        cli = BlockFactory(f"c{n}", lambda tid: None, clock=clock).client(cli_side, TASK, "srv")
        iosim.connect(srv, iosim.makeFakeServer(srv), cli, iosim.makeFakeClient(cli)).flush()
        clients.append((cli, cli_side))
    assert all(("attached", "srv") in s.events for _, s in clients[:limit])
    last, last_side = clients[-1]
    assert last.closed and not any(e[0] == "attached" for e in last_side.events)


# -- the seed's zero-copy pieces (SeedSide.piece_file) ------------------------------------------


class SyncPool:
    """A WorkerPool that runs the function at once."""

    def run(self, f, *a, **kw):
        from twisted.internet.defer import maybeDeferred

        return maybeDeferred(f, *a, **kw)


def test_seed_piece_file_serves_published_pieces_only(tmp_path):
    import os

    from dragonfly.supernode.cdn import Cdn, CdnTask
    from dragonfly.supernode.node import SuperNode
    from dragonfly.supernode.scheduler import Scheduler

    clock = Clock()
    node = SuperNode(
        lambda track: Cdn(str(tmp_path), None, SyncPool(), clock, piece_size=PIECE, on_new_task=track),
        Scheduler(), clock, "10.0.0.9", 8001,
    )
    body = os.urandom(2 * PIECE + PIECE // 2)
    data_path = os.path.join(node.cdn.repo, TASK + ".data")
    with open(data_path, "wb") as f:
        f.write(body)
    task = CdnTask(
        task_id=TASK, url="http://origin/f", data_path=data_path, meta_path=data_path[:-5] + ".meta",
        status="running", length=len(body), piece_size=PIECE, piece_count=3, available=Bitmap(3),
    )
    node.cdn.tasks[TASK] = task
    node._track(task)
    seed = node.seed_side(TASK)
    assert seed.piece_file(0) is None  # the file opens (in the pool) on the first call
    assert seed.piece_file(0) is None  # not published yet
    task.available.set(0)
    task.available.set(2)
    fd, offset, length = seed.piece_file(0)
    assert os.pread(fd, length, offset) == body[:PIECE]
    fd, offset, length = seed.piece_file(2)
    assert length == PIECE // 2 and os.pread(fd, length, offset) == body[2 * PIECE:]
    assert seed.piece_file(1) is None
    seed.task_failed(task)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the task
    assert seed.piece_file(0) is None


class DroppingSide(Side):
    """A side that takes back the buffers of pieces that will not be delivered."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.taken: list[bytearray] = []

    def buffer(self, size):
        buf = bytearray(size)
        self.taken.append(buf)
        return buf

    def piece_dropped(self, conn, index, buf):
        self.events.append(("dropped", index, any(buf is b for b in self.taken)))


def _downloading(side):
    conn = BlockConnection(
        Handle(), "me", lambda tid: None, side=side, task_id=TASK, remote_id="them", buffer=side.buffer,
    )
    conn.handle.conn = conn
    conn.connection_made()
    conn.data_received(hello())
    return conn


def test_a_piece_cancelled_while_arriving_gives_its_buffer_back():
    side = DroppingSide(held=())
    conn = _downloading(side)
    conn.request(3, 0.0)
    conn.data_received(F.piece_header(3, PIECE) + b"a")
    conn.cancel(3)
    conn.data_received(b"a" * (PIECE - 1))
    assert ("dropped", 3, True) in side.events
    assert not any(e[0] == "piece" for e in side.events)
    # the same piece asked again arrives whole, into a new buffer
    conn.request(3, 0.0)
    conn.data_received(F.piece_header(3, PIECE) + b"b" * PIECE)
    assert side.events[-1] == ("piece", 3, b"b" * PIECE) and len(side.taken) == 2


def test_a_piece_cut_off_by_the_connection_gives_its_buffer_back_before_detached():
    side = DroppingSide(held=())
    conn = _downloading(side)
    conn.request(2, 0.0)
    conn.data_received(F.piece_header(2, PIECE) + b"a" * 10)
    conn.connection_lost("gone")
    assert side.events[-2:] == [("dropped", 2, True), ("detached",)]
    conn.connection_lost("gone")  # once only
    assert [e[0] for e in side.events].count("dropped") == 1


def test_a_piece_delivered_is_not_dropped():
    side = DroppingSide(held=())
    conn = _downloading(side)
    conn.request(1, 0.0)
    conn.data_received(F.piece_header(1, PIECE) + b"c" * PIECE)
    conn.connection_lost("gone")
    assert not any(e[0] == "dropped" for e in side.events)

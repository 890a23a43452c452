"""
Version negotiation in HELLO and HAVEs held for one HAVE_MANY frame
(L{BlockConnection}, sans-IO, fake clock).
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from dragonfly.core.bitmap import Bitmap
from dragonfly.protocol import frames as F
from dragonfly.protocol.connection import E_PROTOCOL, HAVES, BlockConnection, CancelTimer, Close, SetTimer, State
from tests.unit.test_connection import TASK, Handle, Side, sent


class BatchingSide(Side):
    have_delay = 0.1

    def __init__(self, *a, version=None, **kw):
        super().__init__(*a, **kw)
        if version is not None:
            self.block_version = version


def conn_for(side, *, server=False, version=F.MAX_PROTOCOL_VERSION):
    clock = Clock()
    handle = Handle()
    conn = BlockConnection(
        handle, "me", lambda tid: side if tid == TASK else None,
        side=None if server else side, task_id=None if server else TASK, remote_id=None if server else "them",
        now=clock.seconds, version=version,
    )
    handle.conn = conn
    conn.connection_made()
    return conn, clock


def hello(version, peer="them"):
    return F.encode_hello(bytes.fromhex(TASK), peer, version)


def ready(side, remote_version=2, held=()):
    """A connection we opened, past HELLO and the remote's BITFIELD (it holds C{held})."""
    conn, clock = conn_for(side)
    bm = Bitmap(side.bitmap.count)
    for i in held:
        bm.set(i)
    conn.data_received(hello(remote_version) + F.encode_bitfield(bm))
    assert conn.ready
    return conn, clock


# -- negotiation ---------------------------------------------------------------------


def test_both_speak_2():
    clock = Clock()
    handle = Handle()
    conn = BlockConnection(handle, "me", lambda tid: None, side=BatchingSide(), task_id=TASK, now=clock.seconds,
                           version=2)
    handle.conn = conn
    assert sent(conn.connection_made())[0].version == 2
    acceptor, _ = conn_for(BatchingSide(), server=True)
    answer = sent(acceptor.data_received(hello(2)))
    assert answer[0].version == 2 and acceptor.agreed == 2
    conn.data_received(hello(2))
    assert conn.agreed == 2


def test_an_old_initiator_is_answered_in_its_version():
    """A version-1 peer's HELLO: we answer 1 (it refuses any other) and send it plain HAVEs."""
    acceptor, _ = conn_for(BatchingSide(), server=True)
    answer = sent(acceptor.data_received(hello(1)))
    assert answer[0].version == 1 and acceptor.agreed == 1
    actions = acceptor.send_have(3)
    assert sent(actions) == [F.Have(3)]


def test_a_newer_initiator_is_answered_with_ours():
    acceptor, _ = conn_for(BatchingSide(), server=True)
    answer = sent(acceptor.data_received(hello(7)))
    assert answer[0].version == F.MAX_PROTOCOL_VERSION and acceptor.agreed == F.MAX_PROTOCOL_VERSION


def test_a_side_may_offer_less():
    """DRAGONFLY_BLOCK_VERSION=1 (a side's block_version): the HELLO offers 1, either way."""
    conn, _ = conn_for(BatchingSide(version=1))
    acceptor, _ = conn_for(BatchingSide(version=1), server=True)
    assert sent(acceptor.data_received(hello(2)))[0].version == 1
    assert conn.version == 1


def test_an_answer_above_the_offer_or_version_0_is_refused():
    conn, _ = conn_for(BatchingSide(), version=1)
    actions = conn.data_received(hello(2))
    assert conn.closed and any(isinstance(a, Close) and a.code == E_PROTOCOL for a in actions)
    acceptor, _ = conn_for(BatchingSide(), server=True)
    acceptor.data_received(hello(0))
    assert acceptor.closed


def test_an_old_acceptor_refusing_our_version_is_noted():
    """A version-1 peer answers a HELLO of 2 with ERROR: the adapter offers it 1 next time."""
    conn, _ = conn_for(BatchingSide())
    conn.data_received(F.encode_error(E_PROTOCOL, "protocol version 2 is not supported (want 1)"))
    assert conn.closed and conn.version_refused
    other, _ = conn_for(BatchingSide())
    other.data_received(F.encode_error(E_PROTOCOL, "task not held"))
    assert not other.version_refused


# -- sending ------------------------------------------------------------------------------


def test_a_have_is_held_and_goes_with_the_next_in_one_frame():
    side = BatchingSide()
    conn, clock = ready(side)
    first = conn.send_have(3)
    assert first == [SetTimer(HAVES, 0.1)]
    second = conn.send_have(4)
    assert CancelTimer(HAVES) in second and sent(second) == [F.HaveMany((3, 4))]
    assert conn.timer_fired(HAVES) == []  # nothing held: nothing sent
    assert conn.send_have(1) == [SetTimer(HAVES, 0.1)]  # the next is held again


def test_one_held_have_goes_as_a_plain_have():
    conn, _ = ready(BatchingSide())
    conn.send_have(2)
    assert sent(conn.timer_fired(HAVES)) == [F.Have(2)]


def test_held_haves_go_with_the_next_frame():
    """A REQUEST to the same remote takes the held HAVEs along, in front of it; the timer is cancelled."""
    conn, _ = ready(BatchingSide(held=()), held=(0, 1))
    conn.send_have(3)
    actions = conn.request(0, 0.0)
    assert sent(actions) == [F.Have(3), F.Request(0)]
    assert CancelTimer(HAVES) in actions
    assert conn.timer_fired(HAVES) == []


def test_held_haves_are_taken_for_a_piece_header():
    """The uploader takes the held HAVEs to write them in front of a piece body: once, the timer cancelled."""
    conn, _ = ready(BatchingSide())
    assert conn.held_haves() == (b"", [])
    conn.send_have(3)
    frames, actions = conn.held_haves()
    assert F.FrameDecoder().feed(frames) == [F.Have(3)] and actions == [CancelTimer(HAVES)]
    assert conn.held_haves() == (b"", []) and conn.timer_fired(HAVES) == []


def test_no_holding_without_a_delay_or_on_version_1():
    side = Side()
    conn, _ = ready(side)
    assert sent(conn.send_have(1)) == [F.Have(1)]
    conn, _ = ready(BatchingSide(), remote_version=1)
    assert sent(conn.send_have(1)) == [F.Have(1)]


def test_a_close_drops_what_is_held():
    conn, _ = ready(BatchingSide())
    conn.send_have(1)
    actions = conn.abort("bye")
    assert CancelTimer(HAVES) in actions and F.Have(1) not in sent(actions)


# -- receiving ------------------------------------------------------------------------------


def test_have_many_tells_the_side_each_new_piece():
    side = BatchingSide(held=())
    conn, _ = ready(side, held=(1,))
    conn.data_received(b"".join(F.encode_have_many([3, 1, 4, 3])))
    assert [e for e in side.events if e[0] == "have"] == [("have", 3), ("have", 4)]
    assert sorted(conn.remote_have) == [1, 3, 4]


def raw(*indexes):
    return struct.pack(f">BI{len(indexes)}I", F.HAVE_MANY, 4 * len(indexes), *indexes)


@given(st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=20))
def test_an_index_out_of_range_closes_and_nothing_is_told(indexes):
    side = BatchingSide(held=(), count=5)
    conn, _ = ready(side)
    actions = conn.data_received(raw(*indexes))
    haves = [e for e in side.events if e[0] == "have"]
    if max(indexes) >= 5:
        assert conn.closed and haves == []
        (close,) = [a for a in actions if isinstance(a, Close)]
        assert close.code == E_PROTOCOL and "out of range" in close.reason
    else:
        assert not conn.closed and [h[1] for h in haves] == list(dict.fromkeys(indexes))


@given(st.integers(0, 0xFFFFFFFF).filter(lambda n: n == 0 or n % 4 or n > 4 * F.MAX_HAVES_PER_FRAME))
def test_a_bad_count_closes_from_the_header(length):
    conn, _ = ready(BatchingSide())
    actions = conn.data_received(struct.pack(">BI", F.HAVE_MANY, length))
    assert conn.closed
    (close,) = [a for a in actions if isinstance(a, Close)]
    assert close.code == E_PROTOCOL and "malformed frame" in close.reason


def test_have_many_on_version_1_or_before_bitfield_closes():
    conn, _ = ready(BatchingSide(), remote_version=1)
    conn.data_received(raw(1))
    assert conn.closed
    conn, _ = conn_for(BatchingSide())
    conn.data_received(hello(2) + raw(1))
    assert conn.closed and conn.state is State.CLOSING


# -- two real protocols (the adapter) -------------------------------------------------------------


def test_iosim_a_held_have_arrives_after_the_delay_or_with_the_next():
    from tests.unit.test_connection import pair

    cli, cli_side, srv, srv_side, pump, clock = pair()
    pump.flush()
    assert cli._conn.agreed == srv._conn.agreed == 2
    srv_side.have_delay = 0.1
    srv_side.bitmap.set(3)
    srv_side.bitmap.set(4)
    srv.send_have(3)
    pump.flush()
    assert [e for e in cli_side.events if e[0] == "have"] == []
    clock.advance(0.1)
    pump.flush()
    assert [e for e in cli_side.events if e[0] == "have"] == [("have", 3)]
    srv.send_have(4)
    srv.send_have(2)  # already announced in the BITFIELD: told to the side once only
    pump.flush()
    assert [e for e in cli_side.events if e[0] == "have"] == [("have", 3), ("have", 4)]
    assert sorted(cli.remote_have) == [0, 1, 2, 3, 4]


def test_iosim_an_old_acceptor_is_offered_version_1_next_time():

    from twisted.internet.protocol import Protocol
    from twisted.test import iosim

    from dragonfly.protocol.block import BlockFactory

    class Old(Protocol):
        """A version-1 acceptor: refuses any other version."""

        def dataReceived(self, data):
            (ev,) = F.FrameDecoder().feed(data)
            if ev.version != 1:
                self.transport.write(F.encode_error(400, f"protocol version {ev.version} is not supported (want 1)"))
                self.transport.loseConnection()

    clock = Clock()
    factory = BlockFactory("client-peer", lambda tid: None, clock=clock)
    cli = factory.client(Side(held=(), clock=clock), TASK, "old-peer")
    old = Old()
    iosim.connect(old, iosim.makeFakeServer(old), cli, iosim.makeFakeClient(cli), greet=False).flush()
    assert cli.closed and factory.older == {"old-peer"}
    again = factory.client(Side(held=(), clock=clock), TASK, "old-peer")
    assert again._conn.version == 1
    assert factory.client(Side(held=(), clock=clock), TASK, "other")._conn.version == 2


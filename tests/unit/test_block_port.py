"""
A block port's shared state and limits (dragonfly/protocol/port.py): its
twistd options, the accounting of accepted connections, the refusals.
"""

from __future__ import annotations

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python import usage

from dragonfly.protocol import frames as F
from dragonfly.protocol.block import BLOCK_PORT_OPTIONS as REEXPORTED
from dragonfly.protocol.block import BlockFactory, block_port_limits
from dragonfly.protocol.connection import E_BUSY, Limits
from dragonfly.protocol.port import BLOCK_PORT_OPTIONS, BlockPort


class Options(usage.Options):
    optParameters = BLOCK_PORT_OPTIONS


def parse(*argv):
    o = Options()
    o.parseOptions(list(argv))
    return o


def test_the_options_give_the_factory_its_limits():
    assert REEXPORTED is BLOCK_PORT_OPTIONS
    limits = block_port_limits(parse("--block-handshake-timeout", "2.5", "--block-idle-timeout", "0",
                                     "--block-max-connections", "7", "--block-max-per-address", "3",
                                     "--block-max-requests", "5"))
    factory = BlockFactory("me", lambda tid: None, **limits)
    assert factory.limits == Limits(2.5, 0.0, 5)
    assert (factory.max_connections, factory.max_per_address) == (7, 3)


def test_the_defaults_are_the_factorys():
    limits = block_port_limits(parse())
    plain = BlockPort("me", lambda tid: None)
    assert BlockPort("me", lambda tid: None, **limits).limits == plain.limits
    assert limits["max_connections"] == plain.max_connections
    assert limits["max_per_address"] == plain.max_per_address


@pytest.mark.parametrize("argv", [
    ["--block-handshake-timeout", "-1"],
    ["--block-idle-timeout", "-0.5"],
    ["--block-max-connections", "0"],
    ["--block-max-per-address", "0"],
    ["--block-max-requests", "0"],
])
def test_out_of_range_options_are_refused(argv):
    with pytest.raises(ValueError, match=argv[0].lstrip("-")):
        block_port_limits(parse(*argv))


def test_accounting_per_address_and_in_total():
    port = BlockPort("me", lambda tid: None, max_connections=3, max_per_address=2)
    a, b, c = Protocol(), Protocol(), Protocol()
    assert port.refusal("10.0.0.1") is None
    port.opened(a, "10.0.0.1")
    port.opened(b, "10.0.0.1")
    port.opened(c, None)  # one we opened: not counted against the limits
    assert port.accepted == {"10.0.0.1": 2} and port.connections == {a, b, c}
    assert port.refusal("10.0.0.1") is not None and port.refused == 1
    assert port.refusal("10.0.0.2") is None
    port.opened(Protocol(), "10.0.0.2")
    assert port.refusal("10.0.0.3") is not None and port.refused == 2  # 3 accepted in total
    port.lost(a, "10.0.0.1")
    port.lost(b, "10.0.0.1")
    port.lost(c, None)
    assert port.accepted == {"10.0.0.2": 1} and len(port.connections) == 1
    assert port.refusal("10.0.0.1") is None


def test_a_refusal_answers_429_and_closes():
    port = BlockPort("me", lambda tid: None, max_connections=1)
    port.opened(Protocol(), "10.0.0.1")
    refuse = port.refusal("10.0.0.9")
    t = StringTransport()
    refuse.makeConnection(t)
    [error] = F.FrameDecoder().feed(t.value())
    assert error.code == E_BUSY and "too many block connections (1)" in error.message
    assert t.disconnecting


def test_new_limits_apply_to_connections_made_afterwards():
    port = BlockFactory("me", lambda tid: None)
    port.set_limits(max_connections=1, max_queued_requests=9)
    assert port.limits.max_queued_requests == 9
    port.opened(Protocol(), "10.0.0.1")
    assert port.refusal("10.0.0.2") is not None


def test_a_crowded_port_gives_newcomers_a_quarter_of_the_handshake_timeout():
    port = BlockPort("me", lambda tid: None, handshake_timeout=10.0, max_connections=8, max_per_address=8)
    for i in range(4):
        assert port.limits_now().handshake_timeout == 10.0  # at most half full
        port.opened(Protocol(), f"198.18.0.{i}")
    port.opened(Protocol(), "198.18.0.9")  # 5 of 8
    assert port.limits_now() == Limits(2.5, port.limits.idle_timeout, port.limits.max_queued_requests)
    port.set_limits(handshake_timeout=2.0, max_connections=8, max_per_address=8)
    assert port.limits_now().handshake_timeout == 1.0  # never below a second
    port.set_limits(handshake_timeout=None, max_connections=8, max_per_address=8)
    assert port.limits_now().handshake_timeout is None  # off stays off


def test_a_connection_takes_the_limits_of_the_moment_it_is_made():
    port = BlockFactory("me", lambda tid: None, handshake_timeout=10.0, max_connections=3, max_per_address=2)
    calm = port.buildProtocol(None)
    port.opened(Protocol(), "198.18.0.1")
    port.opened(Protocol(), "198.18.0.2")
    crowded = port.buildProtocol(None)
    assert calm._conn.limits.handshake_timeout == 10.0
    assert crowded._conn.limits.handshake_timeout == 2.5


def test_a_flood_of_refusals_is_one_log_line_a_second():
    from twisted.internet.task import Clock
    from twisted.logger import capturedLogs

    clock = Clock()
    port = BlockPort("me", lambda tid: None, clock=clock, max_connections=1, max_per_address=1)
    port.opened(Protocol(), "198.18.0.1")
    with capturedLogs() as events:
        for _ in range(500):
            assert port.refusal("198.18.0.2") is not None
        clock.advance(1.0)
        assert port.refusal("198.18.0.2") is not None
    lines = [e for e in events if "refusing" in e.get("log_format", "")]
    assert [e["since"] for e in lines] == [1, 500]
    assert port.refused == 501


def test_the_running_total_follows_the_accepted_connections():
    port = BlockPort("me", lambda tid: None)
    conns = [(Protocol(), f"198.18.0.{i % 3}") for i in range(7)]
    for p, host in conns:
        port.opened(p, host)
    for p, host in conns[:4]:
        port.lost(p, host)
    assert port.accepted_total == sum(port.accepted.values()) == 3

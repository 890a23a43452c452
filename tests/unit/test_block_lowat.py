"""The receiver's threshold (SO_RCVLOWAT) follows each connection's rate."""

from __future__ import annotations

import socket

from twisted.internet.task import Clock

from dragonfly.protocol.connection import BlockConnection
from dragonfly.protocol.receive import RCVLOWAT_CAP, RCVLOWAT_MAX, RCVLOWAT_MIN, Receiver

MIB = 1 << 20


class FakeSocket:
    def __init__(self) -> None:
        self.lowat: list[int] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        self.lowat.append(value)


def receiver(clock: Clock | None) -> tuple[Receiver, FakeSocket]:
    r = Receiver(BlockConnection.__new__(BlockConnection), lambda actions: None, clock)
    sock = FakeSocket()
    r.attach(None, sock)  # type: ignore[arg-type]
    return r, sock


def body(r: Receiver, clock: Clock, size: int, seconds: float) -> None:
    """A piece body of C{size} bytes seen first now and ending C{seconds} later."""
    r._set_lowat(size)
    clock.advance(seconds)
    r._set_lowat(0)


def test_first_body_waits_for_the_default_then_the_rate_sets_it():
    clock = Clock()
    r, sock = receiver(clock)
    r._set_lowat(MIB)
    assert sock.lowat == [RCVLOWAT_MAX]
    clock.advance(0.5)
    r._set_lowat(0)  # 1 MiB in 0.5 s: 2 MiB/s, half a second of it is 1 MiB
    assert sock.lowat[-1] == 1
    r._set_lowat(3 * MIB)
    assert sock.lowat[-1] == MIB


def test_never_past_the_body_and_never_above_the_cap():
    clock = Clock()
    r, sock = receiver(clock)
    body(r, clock, MIB, 0.01)  # 100 MiB/s
    r._set_lowat(4 * MIB)
    assert sock.lowat[-1] == RCVLOWAT_CAP
    r._set_lowat(1000)
    assert sock.lowat[-1] == 1000


def test_a_slow_connection_is_woken_often_enough_to_show_progress():
    clock = Clock()
    r, sock = receiver(clock)
    body(r, clock, MIB, 50.0)  # 20 KiB/s: half a second of it is 10 KiB, the floor is more
    r._set_lowat(MIB)
    assert sock.lowat[-1] == RCVLOWAT_MIN
    body(r, clock, MIB, 2.0)  # faster again: 512 KiB/s -> 256 KiB
    r._set_lowat(MIB)
    assert sock.lowat[-1] == 256 * 1024


def test_without_a_clock_the_default_holds():
    r, sock = receiver(None)
    r._set_lowat(MIB)
    r._set_lowat(0)
    r._set_lowat(MIB)
    assert sock.lowat == [RCVLOWAT_MAX, 1, RCVLOWAT_MAX]

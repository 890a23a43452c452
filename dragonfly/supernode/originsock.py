"""
The SuperNode's origin connections with a receive buffer of a fixed size
(C{--origin-rcvbuf}).

Linux grows a connection's receive buffer (and the window it advertises)
up to C{tcp_rmem}'s maximum, and the sender's congestion window and send
buffer grow with it: on a fast, near origin the bytes the origin has
handed to its socket and not yet put on the wire, plus those the
SuperNode's kernel holds unread, come to a few MiB.  A SuperNode that
dies mid-fetch asks for them again.  C{SO_RCVBUF} set before the
connection is made fixes the buffer (no autotuning, and the window scale
offered in the SYN fits it), so at most that much is ever in flight.

It also caps the fetch's rate at the buffer per round trip: 512 KiB
holds 160 Mbit/s up to about 25 ms of round trip, not a distant origin.
Off by default (0: the kernel's autotuning).
"""

from __future__ import annotations

import socket
from typing import Any

from zope.interface import directlyProvides, providedBy


class RcvbufReactor:
    """
    C{reactor} whose C{connectTCP} sets C{SO_RCVBUF} to C{rcvbuf} bytes on
    the new socket before it connects (C{tcp.Client} makes the socket at
    once and connects on the next reactor turn); everything else is the
    reactor's.  It provides the reactor's interfaces, so endpoints treat it
    as they would the reactor (its name resolver among them).
    """

    def __init__(self, reactor: Any, rcvbuf: int) -> None:
        self._reactor = reactor
        self._rcvbuf = rcvbuf
        directlyProvides(self, *providedBy(reactor))

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None) -> Any:  # noqa: N802, N803
        connector = self._reactor.connectTCP(host, port, factory, timeout, bindAddress)
        sock = getattr(getattr(connector, "transport", None), "socket", None)
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
            except OSError:
                pass  # the kernel's default then: a smaller window is an optimisation only
        return connector

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def origin_reactor(reactor: Any, rcvbuf: int) -> Any:
    """C{reactor} itself when C{rcvbuf} is 0, else L{RcvbufReactor} over it."""
    return RcvbufReactor(reactor, rcvbuf) if rcvbuf > 0 else reactor

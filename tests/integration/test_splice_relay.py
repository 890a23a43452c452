"""
dfdaemon's spliced relay (L{dragonfly.daemon.splice.SpliceRelay}) on real
socket pairs (no network, no reactor: the test plays the reactor's part).
"""

from __future__ import annotations

import os
import socket

from twisted.internet.defer import Deferred

from dragonfly.daemon.splice import SpliceRelay


class Conn:
    """The dfpeer's end as dfdaemon holds it (its Twisted transport, not read any more)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lost = self.aborted = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def loseConnection(self) -> None:
        self.lost = True

    def abortConnection(self) -> None:
        self.aborted = True


class Head:
    def __init__(self, sock: socket.socket, rest: bytes) -> None:
        self.transport = Conn(sock)
        self.rest = rest


class ClientTransport:
    """What the relay reads of the client's tcp.Connection: its write buffer is empty."""

    _tempDataLen = 0
    dataBuffer = b""
    offset = 0

    def __init__(self) -> None:
        self.producerPaused = False
        self.aborted = False

    def startWriting(self) -> None:
        pass

    def abortConnection(self) -> None:
        self.aborted = True


class Request:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer = None
        self.finished = False
        self.sentLength = 0
        self._finish: Deferred = Deferred()

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer, streaming) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred:
        return self._finish

    def finish(self) -> None:
        self.finished = True


class Reactor:
    def __init__(self) -> None:
        self.readers: set = set()

    def addReader(self, r) -> None:
        self.readers.add(r)

    def removeReader(self, r) -> None:
        self.readers.discard(r)


def relay_of(body: bytes, rest: bytes):
    peer_dfd, peer = socket.socketpair()
    client_dfd, client = socket.socketpair()
    for s in (peer_dfd, client_dfd, peer, client):
        s.setblocking(False)
    reactor, request, transport = Reactor(), Request(), ClientTransport()
    relay = SpliceRelay(reactor, request, (transport, client_dfd), Head(peer_dfd, rest), len(body))
    return relay, reactor, request, transport, peer, client, (peer_dfd, client_dfd)


def run(relay, reactor, peer, client, data: bytes, close_after: bool = False) -> tuple[bytes, object]:
    """Feed C{data} into the dfpeer's end, play the reactor, and read what the client's end gets."""
    results: list = []
    relay.start().addCallback(results.append)
    got = bytearray()
    sent = 0
    for _ in range(100000):
        if results:
            break
        if sent < len(data):
            try:
                sent += peer.send(data[sent : sent + (256 << 10)])
            except BlockingIOError:
                pass
        elif close_after and peer.fileno() >= 0:
            peer.close()
        for r in list(reactor.readers):
            r.doRead()
        relay.resumeProducing()  # (the client's socket is writable)
        try:
            while True:
                chunk = client.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
        except BlockingIOError:
            pass
    try:
        while True:
            chunk = client.recv(1 << 20)
            if not chunk:
                break
            got += chunk
    except BlockingIOError:
        pass
    return bytes(got), results[0] if results else None


def test_the_body_goes_from_socket_to_socket_after_the_bytes_that_came_with_the_head():
    body = os.urandom((5 << 20) + 123)
    rest = body[:1000]
    relay, reactor, request, transport, peer, client, _ = relay_of(body, rest)
    got, complete = run(relay, reactor, peer, client, body[1000:])
    assert complete is True
    assert b"".join(request.written) == rest and got == body[1000:]
    # (the bytes that came with the head went through request.write, which counts its own)
    assert request.finished and request.sentLength == len(body) - 1000
    assert relay.sent == len(body) and relay.taken == len(body)
    assert reactor.readers == set() and request.producer is None and relay._pipe is None
    assert not transport.aborted


def test_a_body_cut_short_by_the_dfpeer_cuts_the_client():
    body = os.urandom(3 << 20)
    relay, reactor, request, transport, peer, client, _ = relay_of(body, b"")
    got, complete = run(relay, reactor, peer, client, body[: 2 << 20], close_after=True)
    assert complete is False
    assert transport.aborted and not request.finished
    assert len(got) <= 2 << 20 and body.startswith(got)
    assert reactor.readers == set() and relay._pipe is None


def test_the_client_leaving_stops_the_relay_and_drops_the_dfpeer():
    body = os.urandom(3 << 20)
    relay, reactor, request, transport, peer, client, _ = relay_of(body, b"")
    results: list = []
    relay.start().addCallback(results.append)
    peer.send(body[: 64 << 10])
    request._finish.errback(ConnectionError("gone"))
    assert results == [False] and relay.peer.aborted and relay._pipe is None and reactor.readers == set()

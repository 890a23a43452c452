"""
The dfpeer's content stream sending verified pieces with sendfile: into one
end of a local socketpair (no network, no reactor), through a transport that
buffers as Twisted's does.  Every test reads the other end and compares the
bytes with the file.
"""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.defer import succeed

from dragonfly.peer.lifecycle import State
from dragonfly.peer.stream import TaskStream

PIECE = 1 << 16
COUNT = 8
HEADERS = b"HTTP/1.1 200 OK\r\n\r\n"


class Task:
    """A task whose file holds C{have} verified pieces (a real file, read and sendfile'd)."""

    def __init__(self, path, have, fd=None):
        self.data = os.urandom(PIECE * COUNT - 1000)
        with open(path, "wb") as f:
            f.write(self.data)
        self.fd = os.open(path, os.O_RDONLY) if fd is None else fd
        self.task_id = "t"
        self.status = "running"
        self.length = len(self.data)
        self.piece_size = PIECE
        self.have = set(have)
        self.ready_for_io = True
        self.stream_from = None
        self.error = None
        self.watchers = []
        self.reads = []

    @property
    def state(self):
        return {"running": State.DOWNLOADING, "success": State.DONE, "failed": State.FAILED}[self.status]

    def watch(self, cb):
        self.watchers.append(cb)

    def unwatch(self, cb):
        self.watchers.remove(cb)

    def want_now(self):
        pass

    def read(self, offset, size):
        self.reads.append((offset, size))
        return succeed(self.data[offset:offset + size])

    def piece_file(self, index):
        if index not in self.have:
            return None
        offset = index * PIECE
        return self.fd, offset, min(PIECE, self.length - offset)

    def changed(self):
        for cb in list(self.watchers):
            cb()

    def arrive(self, *indexes):
        self.have.update(indexes)
        self.changed()

    def succeed(self):
        self.status = "success"
        self.changed()


class Wire:
    """What the stream uses of a tcp.Connection: Twisted's write buffer, and flush() as its doWrite."""

    def __init__(self, sock):
        self.sock = sock
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.producerPaused = False
        self.producer = None

    def write(self, data):
        self.dataBuffer += bytes(data)

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
            self.producer.resumeProducing()


class Request:
    def __init__(self, wire):
        self.wire = wire
        self.startedWriting = 0
        self.sentLength = 0
        self.finished = False

    def write(self, data):
        if not self.startedWriting:
            self.startedWriting = 1
            self.wire.write(HEADERS)
        self.sentLength += len(data)
        self.wire.write(data)

    def registerProducer(self, p, streaming):
        self.wire.producer = p

    def unregisterProducer(self):
        pass


class Host:
    def __init__(self, task, sndbuf=None, warm=None, span=()):
        ours, self.remote = socket.socketpair()
        if sndbuf:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            self.remote.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
        ours.setblocking(False)
        self.remote.setblocking(False)
        self.ours = ours
        self.wire = Wire(ours)
        self.request = Request(self.wire)
        self.task = task
        self.stream = TaskStream(task, self.request, socket_of=lambda r: (self.wire, ours), warm=warm)
        self.done = []
        self.stream.ready()
        self.stream.run(*span).addCallback(self.done.append)
        self.received = b""

    def exchange(self, limit=None):
        """Move bytes until nothing moves (or C{limit} bytes were read)."""
        while limit is None or len(self.received) < limit:
            self.wire.flush()
            try:
                data = self.remote.recv(1 << 20)
            except BlockingIOError:
                self.wire.flush()
                try:
                    data = self.remote.recv(1 << 20)
                except BlockingIOError:
                    return
            if not data:
                return
            self.received += data

    def body(self):
        assert self.received.startswith(HEADERS)
        return self.received[len(HEADERS):]

    def close(self):
        self.ours.close()
        self.remote.close()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "data")


def test_verified_pieces_go_out_with_sendfile_and_the_last_byte_waits_for_success(path):
    task = Task(path, range(COUNT))
    host = Host(task)
    host.exchange()
    # everything but the last byte, none of it read through Python
    assert host.body() == task.data[:-1]
    assert task.reads == [] and host.stream.sent_zero_copy == len(task.data) - 1
    assert host.done == []
    task.succeed()
    host.exchange()
    assert host.body() == task.data
    assert host.done == [b""]
    assert host.request.sentLength == len(task.data)
    host.close()


def test_the_stream_follows_the_pieces_as_they_are_verified(path):
    task = Task(path, [])
    host = Host(task)
    host.exchange()
    assert host.received == b""  # no headers before the first byte can go
    for i in range(COUNT):
        task.arrive(i)
        host.exchange()
        want = min((i + 1) * PIECE, len(task.data) - 1)
        assert host.body() == task.data[:want]
    task.arrive(*range(COUNT))
    assert host.done == []
    task.succeed()
    host.exchange()
    assert host.body() == task.data and host.done == [b""]
    host.close()


def test_a_pause_stops_sendfile_until_the_transport_resumes(path):
    task = Task(path, range(COUNT))
    host = Host(task, sndbuf=4096)
    assert host.stream.offset == 0 and host.wire.dataBuffer == HEADERS  # the headers go first, through Twisted
    host.wire.flush()
    # the socket fills: the stream waits for the transport to be writable
    assert 0 < host.stream.offset < len(task.data) - 1
    assert host.wire.producerPaused
    host.stream.pauseProducing()
    while True:  # the client reads what is in the socket
        try:
            host.received += host.remote.recv(1 << 20)
        except BlockingIOError:
            break
    stopped = host.stream.offset
    assert host.body() == task.data[:stopped]
    task.changed()  # a piece stored meanwhile does not restart a paused stream
    assert host.stream.offset == stopped
    host.stream.resumeProducing()
    task.succeed()
    host.exchange()
    assert host.body() == task.data and host.done == [b""]
    host.close()


def test_a_failing_sendfile_falls_back_to_copies_from_where_it_stopped(path):
    bad = os.open(os.devnull, os.O_WRONLY)  # sendfile cannot read it
    try:
        task = Task(path, range(COUNT), fd=bad)
        host = Host(task)
        task.succeed()
        host.exchange()
        assert host.body() == task.data and host.done == [b""]
        assert host.stream.sent_zero_copy == 0 and host.stream.sent_copied == len(task.data)
        host.close()
    finally:
        os.close(bad)


def test_a_file_shorter_than_the_task_falls_back_part_way(path):
    task = Task(path, range(COUNT))
    cut = 3 * PIECE + 123
    os.truncate(path, cut)  # sendfile runs out of file in piece 3: the rest is read
    host = Host(task)
    task.succeed()
    host.exchange()
    assert host.body() == task.data and host.done == [b""]
    assert host.stream.sent_zero_copy == cut
    assert task.reads and task.reads[0][0] == cut
    host.close()

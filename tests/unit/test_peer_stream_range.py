"""The dfpeer's content stream with a byte range (what dfdaemon's Range requests use), without sockets."""

from __future__ import annotations

from twisted.internet.defer import succeed

from dragonfly.peer.stream import TaskStream

DATA = bytes(range(40))
PIECE = 4


class Store:
    def read(self, task_id, offset, length):
        return succeed(DATA[offset:offset + length])


class Task:
    def __init__(self, have):
        self.task_id = "t"
        self.status = "running"
        self.length = len(DATA)
        self.piece_size = PIECE
        self.have = set(have)
        self.ready_for_io = True
        self.stream_from = None
        self.error = None
        self.watchers = []
        self.daemon = type("D", (), {"store": Store()})()
        self.wanted = []

    def watch(self, cb):
        self.watchers.append(cb)

    def unwatch(self, cb):
        self.watchers.remove(cb)

    def want_now(self):
        self.wanted.append(self.stream_from)

    def arrive(self, index):
        self.have.add(index)
        for cb in list(self.watchers):
            cb()


class Request:
    def __init__(self):
        self.written = b""
        self.producer = None

    def write(self, data):
        self.written += data

    def registerProducer(self, p, streaming):
        self.producer = p

    def unregisterProducer(self):
        self.producer = None


def stream(task, start=0, end=None):
    request = Request()
    s = TaskStream(task, request)
    done = []
    s.ready().addCallback(lambda _: None)
    d = s.run(start, end) if (start, end) != (0, None) else s.run()
    d.addCallback(done.append)
    return request, done


def test_a_range_of_held_pieces_is_sent_at_once_without_waiting_for_the_whole_file():
    task = Task(have=range(0, 9))
    request, done = stream(task, 6, 21)
    assert request.written == DATA[6:21] and done == [b""]
    assert task.watchers == []


def test_a_range_asks_for_its_own_pieces_first_and_ends_without_the_whole_file_check():
    task = Task(have=[0, 1])
    request, done = stream(task, 36, 40)  # the last piece, not held yet
    assert request.written == b"" and done == []
    assert task.stream_from == 9 and task.wanted == [9]  # that piece first
    task.arrive(9)
    assert request.written == DATA[36:] and done == [b""]  # the task is still running


def test_the_whole_body_holds_its_last_bytes_until_the_task_succeeds():
    task = Task(have=range(10))
    request, done = stream(task)
    assert request.written == DATA[:36] and done == []
    task.status = "success"
    task.arrive(9)
    assert request.written == DATA and done == [b""]

"""
A task's bytes in order, as its pieces are verified: the body of the local
API's C{GET /api/v1/downloads/<id>/content} (dfdaemon relays it to the
container runtime while the swarm is still downloading).

While a stream waits for a piece, the task fetches the next few pieces
before rarer ones (L{PeerTask.stream_from}).  The stream is the client
transport's push producer, and its bytes go out one of two ways:

 - zero copy, when the client's connection is plain TCP (or a unix socket)
   and the body is not chunked: C{os.sendfile} from the task's file (the
   descriptor the store opened for uploads, L{PeerTask.piece_file}: only
   verified pieces) straight to the socket, only while Twisted's own write
   buffer is empty, at most L{BURST} bytes at a time; then the stream waits
   for the transport to say the socket is writable again (it marks the
   transport's producer paused and asks it to write, as the block uploader
   does, L{dragonfly.protocol.upload}).  Its bytes are read into the page
   cache first, in the pool, up to L{WARM_AHEAD} ahead of it
   (L{dragonfly.core.files.warm_pages}): pieces written with C{O_DIRECT}
   are not in memory, and the reactor's C{sendfile} read them from the
   disk itself; it sends only what was read ahead, and waits for the pool
   otherwise;
 - copied: read from the store in the worker pool, 1 MiB at a time, and
   written with C{request.write}.  A sendfile that fails or sends nothing
   falls back to this for the rest of the stream, from the byte it reached.

The last bytes are held until the task has succeeded, which with a requested
digest means the whole file matched it: if it fails instead, the connection
is cut before the last byte, so a client never takes a wrong body for a
complete one.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from ..core.files import KERNEL_READAHEAD
from ..protocol.upload import transport_idle, wake_when_writable
from .lifecycle import State

log = Logger()

#: the most bytes one sendfile turn sends before the reactor runs again
BURST = 4 << 20
#: the bytes a stream has read into the page cache in the pool, ahead of its sendfile, at
#: most (L{WARM_STEP} a read, L{WARM_READS} reads under way); DRAGONFLY_STREAM_WARM=0: sendfile reads them itself,
#: in the reactor thread, as before (same-run comparisons)
WARM = os.environ.get("DRAGONFLY_STREAM_WARM", "1") != "0"
WARM_AHEAD = 6 * BURST
WARM_STEP = BURST
#: the stream's reads ahead under way at once, at most: one read at a time kept a live stream
#: 100-150 MiB behind a 256 MiB task at its end (the disk's latency per read, one after another);
#: DRAGONFLY_STREAM_WARM_READS=1 is that (same-run comparisons, docs/benchmarks.md)
WARM_READS = max(1, int(os.environ.get("DRAGONFLY_STREAM_WARM_READS", "3")))
#: DRAGONFLY_STREAM_WARM_EXACT=0: read ahead with the kernel's readahead even near the
#: frontier (into blocks not written yet; same-run comparisons, docs/benchmarks.md)
WARM_EXACT = os.environ.get("DRAGONFLY_STREAM_WARM_EXACT", "1") != "0"
#: DRAGONFLY_TRACE=1: log lines with wall-clock times when the stream waits for a piece
#: (its in-order frontier), when it first sees the task done (and how far it is), and
#: when it has sent every byte ("trace <task> stream ... at <t>", as the task's own)
TRACE = bool(os.environ.get("DRAGONFLY_TRACE"))


def plain_socket(request: Any) -> tuple[Any, socket.socket] | None:
    """
    The client's transport and its socket when the response body may go out
    with sendfile: a plain TCP or unix connection (no TLS) whose producer is
    the HTTP channel, and a body that is neither chunked nor a HEAD's.
    """
    channel = getattr(request, "channel", None)
    transport = getattr(channel, "transport", None)
    if not isinstance(transport, tcp.Connection) or transport.producer is None:
        return None
    if getattr(request, "chunked", False) or request.method == b"HEAD":
        return None
    sock = getattr(transport, "socket", None)
    return (transport, sock) if isinstance(sock, socket.socket) else None


@implementer(IPushProducer)
class TaskStream:
    CHUNK = 1 << 20

    def __init__(
        self, task: Any, request: Any, socket_of: Any = plain_socket,
        warm: Callable[[int, int, int, bool], Deferred] | None = None,
    ) -> None:
        """
        @param socket_of: finds the (transport, socket) to sendfile to, or
            None (copy through C{request.write}); tests give their own.
        @param warm: C{warm(fd, offset, size, exact)} reads bytes of the
            task's file into the page cache in the pool and fires when they
            are (L{dragonfly.core.store.TaskStore.warm}; C{exact}: those and
            no more, the kernel's readahead might run into pieces not
            written yet); None (or
            DRAGONFLY_STREAM_WARM=0): sendfile reads them itself.
        """
        self.task = task
        self.request = request
        self._socket_of = socket_of
        self._warm = warm if WARM else None
        #: the bytes before this offset were read into the page cache (L{_read_ahead}), and a read is under way
        self._warmed = 0
        #: the reads under way, in the file's order: [end, finished]; the next read starts at the last one's end
        self._warming: list[list[Any]] = []
        self._warm_starting = False
        #: the reactor thread's time in sendfile (wall and its CPU, seconds), its calls, and
        #: the times the stream waited for the pool's read-ahead
        self.sendfile_seconds = 0.0
        self.sendfile_cpu = 0.0
        self.sendfile_calls = 0
        self.warm_waits = 0
        #: the longest reactor turn in sendfile (seconds)
        self.sendfile_longest = 0.0
        #: (transport, socket) while the body goes out with sendfile
        self._out: tuple[Any, socket.socket] | None = None
        #: body bytes sent with sendfile, and with request.write
        self.sent_zero_copy = 0
        self.sent_copied = 0
        self.offset = 0
        #: where the body ends (exclusive); None: the task's end
        self.end: int | None = None
        self._paused = False
        self._reading = False
        self._ended = False
        self._ready: Deferred | None = None
        self._done: Deferred | None = None
        #: the Range asked for (a L{ByteRange}), resolved once the length is known
        self._spec: Any = None
        #: (DRAGONFLY_TRACE) the piece last logged as waited for, and whether the task's end was
        self._traced_wait: int | None = None
        self._traced_done = False

    # -- waiting for the length -----------------------------------------------------

    def _known(self) -> bool:
        t = self.task
        return t.state is State.FAILED or (t.length is not None and t.have is not None and t.ready_for_io)

    def ready(self, spec: Any = None) -> Deferred:
        """
        Fires when the task's length is known (or it failed); cancellable.
        With C{spec} (a L{ByteRange}) the range's first piece is wanted
        from the moment the length is known, before the body starts.
        """
        self._spec = spec
        self._ready = Deferred(lambda _: self._end())
        if self.task.stream_from is None and spec is None:
            # (a range's first piece is known with the length)
            self.task.stream_from = 0
        self.task.watch(self._poke)
        self._poke()
        return self._ready

    # -- streaming ------------------------------------------------------------------

    def run(self, start: int = 0, end: int | None = None) -> Deferred:
        """
        Send the body (bytes C{start} to C{end}, exclusive, for a Range
        request); fires with C{b""} when every byte is written.  A range
        that ends before the task's end is sent as its pieces are verified,
        without waiting for the whole-file check.
        """
        self.offset = self._warmed = start
        self.end = end
        self._done = Deferred(lambda _: self._end())
        self.request.registerProducer(self, True)
        self._out = self._socket_of(self.request)
        self._poke()
        return self._done

    def _poke(self) -> None:
        if self._ended:
            return
        t = self.task
        if self._ready is not None and not self._ready.called:
            if self._known():
                span = self._spec.resolve(t.length) if self._spec is not None and t.length is not None else None
                if span is not None and t.piece_size and t.stream_from != span[0] // t.piece_size:
                    t.stream_from = span[0] // t.piece_size
                    t.want_now()
                self._ready.callback(None)
            return
        if self._done is None or self._paused or self._reading:
            return
        if TRACE and t.state is State.DONE and not self._traced_done:
            self._traced_done = True
            log.info("trace {task} stream sees done at {t:.3f}, offset {offset}", task=t.task_id[:12], t=time.time(),
                     offset=self.offset)
        if t.state is State.FAILED:
            self._abort(f"{t.error.code if t.error else 'FAILED'}: {t.error.message if t.error else ''}")
            return
        if not t.ready_for_io:
            # going back to the origin: its file is being written anew
            return
        length = t.length
        stop = length if self.end is None else min(self.end, length)
        if self.offset >= stop:
            if t.state is State.DONE or self.end is not None:
                if TRACE:
                    log.info("trace {task} stream sent all at {t:.3f}", task=t.task_id[:12], t=time.time())
                self._finish()
            return
        index = self.offset // t.piece_size
        if index not in t.have:
            if TRACE and self._traced_wait != index:
                self._traced_wait = index
                log.info("trace {task} stream waits for piece {index} at {t:.3f} ({have} of {count} held)",
                         task=t.task_id[:12], index=index, t=time.time(), have=len(t.have), count=t.count)
            if t.stream_from != index:
                t.stream_from = index
                t.want_now()
            return
        if self._out is not None and self._send_file(index, stop):
            return
        end = min(self.offset + self.CHUNK, (index + 1) * t.piece_size, stop)
        if end == length and self.end is None and t.state is not State.DONE:
            # the last bytes wait for the whole-file check
            return
        self._reading = True
        d = t.read(self.offset, end - self.offset)
        d.addCallbacks(self._got, self._read_failed)

    def _got(self, data: bytes) -> None:
        self._reading = False
        if self._ended:
            return
        self.offset += len(data)
        self.sent_copied += len(data)
        self.request.write(data)
        self._poke()

    # -- zero copy ------------------------------------------------------------------

    def _send_file(self, index: int, stop: int) -> bool:
        """
        Send what may go of piece C{index} (held, verified) with sendfile;
        False if this turn must take the copying path instead (no file, the
        held last bytes, a sendfile that failed).
        """
        assert self._out is not None
        t = self.task
        span = t.piece_file(index)
        if span is None:
            return False
        fd, piece_offset, piece_length = span
        if not piece_offset <= self.offset < piece_offset + piece_length:
            return False
        end = min(piece_offset + piece_length, stop)
        if self.end is None and t.state is not State.DONE:
            end = min(end, t.length - 1)  # the last byte waits for the whole-file check
        if end <= self.offset:
            return False
        transport, sock = self._out
        if not self.request.startedWriting:
            self.request.write(b"")  # the status line and headers, through Twisted
        if self._warm is not None:
            self._read_ahead()
            if self._warm is not None:
                if self._warmed <= self.offset:
                    # the pool reads them (L{_read_ahead} started it, or one
                    # under way does): its end pokes the stream
                    self.warm_waits += 1
                    return True
                end = min(end, self._warmed)
        if not transport_idle(transport):
            wake_when_writable(transport)
            return True
        sent = 0
        began, cpu = time.perf_counter(), time.thread_time()
        while self.offset < end and sent < BURST:
            self.sendfile_calls += 1
            try:
                n = os.sendfile(sock.fileno(), fd, self.offset, min(end - self.offset, BURST - sent))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._fall_back(f"sendfile failed: {e}")
                n = 0
            if n == 0:
                if self._out is not None:
                    self._fall_back("sendfile sent nothing (the file is shorter than the task)")
                break
            self.offset += n
            sent += n
        took = time.perf_counter() - began
        self.sendfile_seconds += took
        self.sendfile_longest = max(self.sendfile_longest, took)
        self.sendfile_cpu += time.thread_time() - cpu
        self.sent_zero_copy += sent
        self.request.sentLength += sent
        if self._out is None:
            return sent > 0 and self._wake(transport)
        self._read_ahead()  # the offset moved on: the next bytes, while the socket drains
        return self._wake(transport)

    # -- reading ahead in the pool -----------------------------------------------------

    def _read_ahead(self) -> None:
        """
        Have the pool read the next held bytes after what it read already
        into the page cache, up to L{WARM_STEP} of them a read, across
        pieces (L{WARM_READS} reads under way at most, each starting where
        the one before ends), within L{WARM_AHEAD} of the offset: no further,
        so a stream its client does not read holds that much at most.
        """
        while self._warm is not None and not self._ended and sum(not e[1] for e in self._warming) < WARM_READS:
            if not self._read_ahead_once():
                return

    def _read_ahead_once(self) -> bool:
        """Start the next read ahead (L{_read_ahead}); False if there is none to start now."""
        t = self.task
        at = max(self._warming[-1][0] if self._warming else self._warmed, self.offset)
        stop = t.length if self.end is None else min(self.end, t.length)
        if at >= min(stop, self.offset + WARM_AHEAD) or t.have is None or at // t.piece_size not in t.have:
            return False
        span = t.piece_file(at // t.piece_size)
        if span is None:
            return False
        fd, piece_offset, piece_length = span
        if not piece_offset <= at < piece_offset + piece_length:
            return False
        # on through the next pieces held, when they follow in the same file
        limit = min(at + WARM_STEP, stop)
        upto = min(piece_offset + piece_length, limit)
        while upto < limit and upto // t.piece_size in t.have:
            more = t.piece_file(upto // t.piece_size)
            if more is None or more[0] != fd or more[1] != upto:
                break
            upto = min(more[1] + more[2], limit)
        entry: list[Any] = [upto, False]
        self._warming.append(entry)
        self._warm_starting = True  # (a warm that fires at once does not poke: the caller goes on)
        try:
            assert self._warm is not None
            d = self._warm(fd, at, upto - at, not self._held_past(upto))
            d.addCallbacks(self._warm_done, self._warm_failed, callbackArgs=(entry,))
        finally:
            self._warm_starting = False
        return True

    def _held_past(self, at: int) -> bool:
        """The pieces from C{at} on are held as far as the kernel's readahead may go past it (or to the end)."""
        t = self.task
        last = min(t.length, at + KERNEL_READAHEAD) - 1
        return not WARM_EXACT or t.state is State.DONE or all(i in t.have for i in range(at // t.piece_size, last // t.piece_size + 1))

    def _warm_done(self, _: int, entry: list[Any]) -> None:
        entry[1] = True
        # in order: the bytes before the first read still under way are in (a file shorter
        # than that: the sendfile finds out and falls back)
        while self._warming and self._warming[0][1]:
            self._warmed = max(self._warmed, self._warming.pop(0)[0])
        if not self._warm_starting:
            self._poke()

    def _warm_failed(self, f: Any) -> None:
        self._warming = []
        if not self._ended:
            log.info("task {task}: stream reads no more ahead: {why}", task=self.task.task_id, why=f.getErrorMessage())
        self._warm = None  # sendfile reads the bytes itself
        if not self._warm_starting:
            self._poke()

    def _wake(self, transport: Any) -> bool:
        wake_when_writable(transport)
        return True

    def _fall_back(self, why: str) -> None:
        log.info("task {task}: stream falls back to copies at byte {offset}: {why}",
                 task=self.task.task_id, offset=self.offset, why=why)
        self._out = None

    def _read_failed(self, f: Any) -> None:
        self._reading = False
        self._abort(f"cannot read the task's file: {f.getErrorMessage()}")

    def _finish(self) -> None:
        done = self._done
        if self._done is not None:
            log.info(
                "task {task}: stream sent {bytes} bytes ({zero} with sendfile: {ms:.1f} ms in the reactor,"
                " {cpu:.1f} ms of its CPU, {calls} calls, the longest turn {longest:.2f} ms; read ahead: {read_ahead},"
                " waited for it {waits} times)",
                task=self.task.task_id, bytes=self.sent_zero_copy + self.sent_copied, zero=self.sent_zero_copy,
                ms=self.sendfile_seconds * 1e3, cpu=self.sendfile_cpu * 1e3, calls=self.sendfile_calls,
                longest=self.sendfile_longest * 1e3,
                read_ahead="in the pool" if self._warm is not None else "no", waits=self.warm_waits,
            )
        self._end()
        if done is not None and not done.called:
            done.callback(b"")

    def _abort(self, why: str) -> None:
        log.warn(
            "task {task}: stream cut at byte {offset}: {why}", task=self.task.task_id, offset=self.offset, why=why
        )
        self._end()
        transport = getattr(self.request, "channel", None)
        transport = getattr(transport, "transport", None)
        if transport is not None:
            transport.abortConnection()
        # the request's end cancels the pending Deferred (see L{_end})

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.task.unwatch(self._poke)
        if self.task.stream_from is not None:
            self.task.stream_from = None
        if self._done is not None:
            try:
                self.request.unregisterProducer()
            except (RuntimeError, AttributeError):
                pass

    # -- IPushProducer -----------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._poke()

    def stopProducing(self) -> None:
        self._end()

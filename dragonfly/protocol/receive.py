"""
The receiving half of a block connection: bytes in, piece bodies read straight
into their buffers, paced by the side's download limits.

L{Receiver} feeds what Twisted read to the connection rules
(L{BlockConnection.data_received}).  Then, on a plain TCP socket, while a
requested piece's body is arriving, it reads the rest of that body with
C{recv_into} straight into the piece's buffer (L{BlockConnection.rx_window}),
up to its last byte and never past it (what follows goes through the framer,
so every size is still checked from the header alone), and never while
reading is paused by a download limit.  Between reads it sets SO_RCVLOWAT so
that the kernel wakes the reactor only once a good part of the body is in.

On such a socket it also takes the transport's C{doRead} (L{Receiver.do_read}):
a wake-up inside a body reads straight into the piece's buffer before
Twisted's own 64 KiB C{recv} would copy the first bytes into a new C{bytes}
and through the framer; outside a body, and on any other transport (TLS, a
test's), Twisted reads as usual.

L{BufferPool} lends the piece buffers and takes them back once the piece is
stored or dropped, so no piece costs fresh pages.  Its buffers are
page-aligned, so the store writes a verified piece with C{O_DIRECT} straight
from it (L{dragonfly.core.files.write_direct}).
"""

from __future__ import annotations

import mmap
import os
import socket
from collections.abc import Callable
from typing import Any, cast

from twisted.logger import Logger

from ..core.ratelimit import TokenBucket, delay_for
from .connection import Action, BlockConnection

__all__ = ["BufferPool", "Receiver", "RCVLOWAT_MAX", "RCVLOWAT_MIN", "RCVLOWAT_CAP", "LOWAT_WINDOW", "PACED_READ"]

log = Logger()

#: the most a receiver waits for before it is woken (SO_RCVLOWAT), until a body's rate is known
RCVLOWAT_MAX = 128 * 1024
#: then: what the connection delivered in LOWAT_WINDOW seconds of its last piece body, within
#: [RCVLOWAT_MIN, RCVLOWAT_CAP] (a tenth of the stall timeout: progress stays visible)
LOWAT_WINDOW = float(os.environ.get("DRAGONFLY_LOWAT_WINDOW", "0.5"))
RCVLOWAT_MIN = 16 * 1024
RCVLOWAT_CAP = 1 << 20
#: the most read straight into a piece per wake-up while a download limit applies
PACED_READ = 256 * 1024
#: read as much as the socket holds
UNPACED_READ = 1 << 62
#: take the transport's doRead on plain TCP sockets (L{Receiver.do_read}); DRAGONFLY_OWN_READ=0
#: leaves every read to Twisted, for same-run comparisons (bench.datapath --ab-env)
OWN_READ = os.environ.get("DRAGONFLY_OWN_READ", "1") != "0"
#: pages of a new piece buffer made when it is mapped (Linux); DRAGONFLY_POPULATE=0: on first touch
_POPULATE = getattr(mmap, "MAP_POPULATE", 0) if os.environ.get("DRAGONFLY_POPULATE", "1") != "0" else 0


#: the huge page size buffers of this size and more are made of
HUGE_PAGE = 2 << 20


def aligned(size: int) -> bytearray:
    """
    A zeroed writable buffer of C{size} bytes whose memory starts on a page
    (anonymous C{mmap}), so C{O_DIRECT} can write from it without a copy:
    a C{memoryview}, typed as the C{bytearray} the receive path takes
    (it uses only the buffer interface both have: C{len}, slice assignment,
    hashing, writes, comparison).  Below a page, a C{bytearray}.

    Below L{HUGE_PAGE} its pages are made at once (C{MAP_POPULATE}): one
    call instead of a page fault per 4 KiB inside the first C{recv_into}
    that fills it (from L{HUGE_PAGE} on, huge pages, see below).  Creating
    and filling a fresh 1 MiB buffer took 540 to 680 us that way against
    320 to 400 us populated (this machine, loaded); a dfpeer makes about ten
    per download (the pool is let go between downloads).
    """
    if size < mmap.PAGESIZE:
        return bytearray(size)
    if size < HUGE_PAGE:
        return cast(bytearray, memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | _POPULATE)))
    # a whole number of huge pages (the kernel then maps it on a huge page
    # boundary), in huge pages where the system allows, and not populated:
    # a fault per 2 MiB, and a large piece's parts are given the pages of
    # parts written before them and pass theirs on once written
    # (dragonfly.core.partwrite.PageBank): populated, a new buffer would hold
    # the whole piece at once
    m = mmap.mmap(-1, -(-size // HUGE_PAGE) * HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    return cast(bytearray, memoryview(m)[:size])


class BufferPool:
    """
    Piece buffers by size, reused: at most C{keep} free ones of each size are
    kept (a task's pieces all have one size but the last).
    """

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._free: dict[int, list[bytearray]] = {}
        #: bytes of the buffers lent now, and the most ever lent at once (memory accounting)
        self.lent = 0
        self.lent_peak = 0

    def take(self, size: int) -> bytearray:
        """A buffer of C{size} bytes: a free one if any (its old bytes still in it), else a new one (L{aligned})."""
        free = self._free.get(size)
        self.lent += size
        if self.lent > self.lent_peak:
            self.lent_peak = self.lent
        return free.pop() if free else aligned(size)

    def give(self, buf: bytearray) -> None:
        """Take back a buffer from L{take}; its holder must not touch it any more."""
        self.lent -= len(buf)
        free = self._free.setdefault(len(buf), [])
        if len(free) < self.keep:
            free.append(buf)

    def kept(self) -> int:
        """The bytes of all the free buffers kept."""
        return sum(size * len(bufs) for size, bufs in self._free.items())

    def free(self, size: int) -> int:
        """How many free buffers of C{size} bytes are kept."""
        return len(self._free.get(size, ()))


class Receiver:
    """
    Moves received bytes into one connection's rules.

    @param conn: the connection's rules.
    @param run: carries out the actions the rules answer with (the adapter).
    @param clock: runs the download pacing; without one, download limits are
        not applied.
    """

    def __init__(self, conn: BlockConnection, run: Callable[[list[Action]], None], clock: Any) -> None:
        self._conn = conn
        self._run = run
        self._clock = clock
        self._transport: Any = None
        self._sock: socket.socket | None = None
        self._lowat = 1
        self._lowat_max = RCVLOWAT_MAX
        self._body_seen: tuple[float, int] | None = None  # (when, bytes to come) of the body arriving
        self._twisted_read: Callable[[], Any] | None = None  # the transport's own doRead, while we hold it
        self.read_paused = False
        #: the side holds reading (L{hold}); apart from the pacing's read_paused
        self.held = False

    def attach(self, transport: Any, sock: socket.socket | None) -> None:
        """
        The connection is up on C{transport}; C{sock} is its socket when we
        may read from it ourselves (a plain TCP connection), else None.  With
        a socket, the transport's C{doRead} becomes L{do_read} (given back by
        L{detach}).
        """
        self._transport = transport
        self._sock = sock
        twisted_read = getattr(transport, "doRead", None) if sock is not None and OWN_READ else None
        if twisted_read is not None:
            self._twisted_read = twisted_read
            transport.doRead = self.do_read

    def detach(self) -> None:
        """The connection is gone: the transport's own C{doRead} again (no cycle through us)."""
        if self._twisted_read is not None and self._transport is not None:
            if self._transport.__dict__.get("doRead") == self.do_read:
                del self._transport.doRead
        self._twisted_read = None

    def do_read(self) -> Any:
        """
        The transport's C{doRead} (the reactor calls it when the socket is
        readable): inside a requested piece's body, read straight into the
        piece's buffer, as much as the socket holds up to the body's last
        byte; then, if the body is over and the socket may hold more (the
        next frame), or outside a body, Twisted's own read, which hands
        its bytes to L{data_received}.  Returns what Twisted's would.
        """
        twisted_read = self._twisted_read
        assert twisted_read is not None
        conn = self._conn
        if self._sock is None or self.read_paused or self.held or conn.closed or getattr(self._transport, "TLS", False):
            return twisted_read()
        window = conn.rx_window()
        if window is None:
            return twisted_read()
        window.release()
        limits = self._limits()
        paced = any(limits)
        n, empty = self._read_body(PACED_READ if paced else UNPACED_READ)
        if n == 0:
            # nothing there after all, or the end of the stream or an error: Twisted's read sees those
            return None if empty else twisted_read()
        remaining = conn.body_remaining
        self._set_lowat(remaining)
        if paced:
            self._pace(limits, n)
        if empty or remaining or self.read_paused or self.held or conn.closed:
            return None  # woken again when more is there (SO_RCVLOWAT)
        return twisted_read()

    @property
    def direct(self) -> bool:
        """Piece bodies are read from the socket straight into their buffers."""
        return self._sock is not None

    def data_received(self, data: bytes) -> None:
        """Twisted read C{data}: hand it to the rules, then read the piece body that follows, if any."""
        conn = self._conn
        if conn.closed:
            return
        # the side's reactions to these frames (its picker's fills) happen once, at the end
        side = conn.side
        hold = getattr(side, "hold_fills", None)
        if hold is None:
            self._run(conn.data_received(data))
        else:
            hold()
            try:
                self._run(conn.data_received(data))
            finally:
                side.release_fills()
        n = len(data)
        limits = self._limits()
        paced = any(limits)  # no bucket (None each): nothing to reserve
        if self._sock is not None and not self.read_paused and not self.held:
            n += self.read_into_piece(PACED_READ if paced else UNPACED_READ)
        self._set_lowat(conn.body_remaining)
        if paced:
            self._pace(limits, n)

    def _limits(self) -> list[TokenBucket | None]:
        side = self._conn.side
        return side.download_limits() if side is not None and self._clock is not None else []

    def read_into_piece(self, most: int) -> int:
        """Read up to C{most} bytes of the piece body arriving straight into its buffer; the bytes read."""
        return self._read_body(most)[0]

    def _read_body(self, most: int) -> tuple[int, bool]:
        """L{read_into_piece}; and whether the socket was found empty (it would block)."""
        conn, sock, total = self._conn, self._sock, 0
        assert sock is not None
        while total < most and not conn.closed and not self.held:
            window = conn.rx_window()
            if window is None:
                break
            try:
                n = sock.recv_into(window, min(len(window), most - total))
            except (BlockingIOError, InterruptedError):
                return total, True
            except OSError:
                break  # Twisted's next read sees the error
            finally:
                window.release()
            if n == 0:
                break  # the end of the stream: Twisted's next read sees it
            total += n
            self._run(conn.rx_filled(n))
        return total, False

    def _pace(self, limits: list[TokenBucket | None], nbytes: int) -> None:
        """Hold reading while the side's download limits (per task, per host) say so."""
        delay = delay_for(limits, nbytes)
        if delay > 0 and not self.read_paused and not self._conn.closed:
            self.read_paused = True
            self._transport.pauseProducing()
            self._clock.callLater(delay, self._resume)

    def _resume(self) -> None:
        self.read_paused = False
        if not self._conn.closed and not self.held:
            self._transport.resumeProducing()

    def hold(self, on: bool) -> None:
        """
        The side stops reading (C{on}: the parts of a large piece it hashes
        and writes while it arrives wait for the disk, so the socket, not
        memory, holds the rest) or lets it go on; apart from the pacing of
        the download limits, which resumes only what it paused.
        """
        if on == self.held:
            return
        self.held = on
        if self._conn.closed or self._transport is None or self.read_paused:
            return
        if on:
            self._transport.pauseProducing()
        else:
            self._transport.resumeProducing()

    def _set_lowat(self, remaining: int) -> None:
        """
        While a piece body arrives nothing else can come before its last byte
        (TCP keeps order), so ask the kernel to wake us only once a good part
        of it is there (Linux honours SO_RCVLOWAT in poll/epoll).  On a link
        slower than the machine this turns one wake-up per segment into one
        per threshold: RCVLOWAT_MAX bytes at first, then what the connection
        delivers in LOWAT_WINDOW seconds (L{_time_body}).  Each wake-up costs
        about 0.2 ms of CPU (docs/bench/swarm-profile.md); the threshold
        never delays a piece (the kernel wakes us at its last byte at the
        latest), and a tenth of the stall timeout keeps progress visible.
        """
        self._time_body(remaining)
        want = min(max(remaining, 1), self._lowat_max)
        if want == self._lowat or self._sock is None:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            self._lowat = want
        except OSError as e:
            log.info("SO_RCVLOWAT refused ({why}): piece bodies go through the framer", why=e)
            self._sock = None

    def _time_body(self, remaining: int) -> None:
        """The rate of each piece body received, from the first wake-up inside it to its end."""
        if self._clock is None:
            return
        if remaining > 0 and self._body_seen is None:
            self._body_seen = (self._clock.seconds(), remaining)
        elif remaining == 0 and self._body_seen is not None:
            t0, size = self._body_seen
            self._body_seen = None
            dt = self._clock.seconds() - t0
            if dt > 0:
                self._lowat_max = int(min(max(size / dt * LOWAT_WINDOW, RCVLOWAT_MIN), RCVLOWAT_CAP))

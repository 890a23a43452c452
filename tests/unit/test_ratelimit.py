from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from dragonfly.core.ratelimit import TokenBucket, delay_for


def test_burst_then_rate():
    clock = Clock()
    b = TokenBucket(1000, clock, burst=500)
    assert b.reserve(500) == 0
    assert b.reserve(1000) == 1.0
    clock.advance(1.0)
    # the debt is paid: the next 1000 bytes wait one more second
    assert b.reserve(1000) == 1.0


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=200))
def test_paced_transfer_runs_at_the_rate(chunks):
    """Sending each chunk after the wait reserve() asks for moves rate bytes a second."""
    clock = Clock()
    rate = 10_000
    b = TokenBucket(rate, clock, burst=1000)
    for n in chunks:
        clock.advance(b.reserve(n))
    total = sum(chunks)
    # all but the first burst at exactly the rate
    assert abs(clock.seconds() - max(total - 1000, 0) / rate) < 1e-6


def test_longest_wait_of_several_buckets():
    clock = Clock()
    slow, fast = TokenBucket(100, clock, burst=0), TokenBucket(1000, clock, burst=0)
    assert delay_for([slow, None, fast], 100) == 1.0
    assert delay_for([None], 100) == 0.0


class _Pool:
    def run(self, f, *a, **kw):
        from twisted.internet import defer

        return defer.maybeDeferred(f, *a, **kw)


class _Transport:
    paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        pass


def test_origin_body_is_paused_by_the_limit(tmp_path):
    """The CDN's body writer pauses the origin response while the origin limit says so."""
    import os

    from dragonfly.core.bodywriter import ChunkedFileWriter

    Pool, Transport = _Pool, _Transport
    clock = Clock()
    fd = os.open(str(tmp_path / "body"), os.O_WRONLY | os.O_CREAT)
    writer = ChunkedFileWriter(Pool(), clock, fd, 1000, None, limit=TokenBucket(1000, clock, burst=0))
    t = Transport()
    writer.makeConnection(t)
    writer.dataReceived(b"x" * 500)
    assert t.paused
    clock.advance(0.4)
    assert t.paused
    clock.advance(0.2)
    assert not t.paused
    os.close(fd)


def test_bytes_arriving_while_paused_are_charged(tmp_path):
    """Bytes already on their way when the body was paused count against the limit too."""
    import os

    from dragonfly.core.bodywriter import ChunkedFileWriter

    clock = Clock()
    fd = os.open(str(tmp_path / "body"), os.O_WRONLY | os.O_CREAT)
    writer = ChunkedFileWriter(_Pool(), clock, fd, 1000, None, limit=TokenBucket(1000, clock, burst=0))
    t = _Transport()
    writer.makeConnection(t)
    writer.dataReceived(b"x" * 500)  # pauses for 0.5 s
    writer.dataReceived(b"x" * 500)  # was in flight: charged, not free
    clock.advance(0.5)
    assert not t.paused
    writer.dataReceived(b"x" * 500)
    # 1500 bytes at 1000 bytes/s: nothing more before t = 1.5 s
    clock.advance(0.99)
    assert t.paused
    clock.advance(0.02)
    assert not t.paused
    os.close(fd)

"""
The block protocol's data path on real loopback TCP between two processes
(bench/block_loopback.py with --verify): zero-copy uploads, their fallback
when sendfile fails part-way, and the copying path, each byte compared with
the file.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("extra", [[], ["--fault", "short"], ["--fault", "badfd"], ["--no-zero-copy"]])
def test_pieces_arrive_whole(extra):
    out = subprocess.run(
        [sys.executable, "-m", "bench.block_loopback", "--size-mib", "24", "--piece-mib", "1", "--verify", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["wrong_pieces"] == 0 and result["bytes"] == 24 << 20


@pytest.mark.parametrize("extra", [[], ["--no-zero-copy"]])
def test_upload_limit_paces_zero_copy_and_copied_pieces(extra):
    """16 MiB at 16 MiB/s (a burst of 1 MiB): about a second, whichever way the pieces go out."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.block_loopback", "--size-mib", "16", "--piece-mib", "1", "--verify",
         "--upload-limit", str(16 << 20), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["wrong_pieces"] == 0
    assert 0.8 <= result["seconds"] <= 3.0, result


FLOOD_SERVER = r"""
import json, os, sys
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from dragonfly.protocol.block import BlockFactory

factory = BlockFactory("srv", lambda tid: None, clock=reactor, handshake_timeout=1.0,
                       max_connections=60, max_per_address=40)

def listening(port):
    # once the reactor runs (its own descriptors open): the baseline
    reactor.callLater(0.1, lambda: print(json.dumps(
        {"port": port.getHost().port, "fds": len(os.listdir("/proc/self/fd"))}), flush=True))

def report():
    print(json.dumps({"fds": len(os.listdir("/proc/self/fd")), "open": len(factory.connections),
                      "refused": factory.refused}), flush=True)

TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory).addCallback(listening)
reactor.callLater(4.0, report)
reactor.callLater(4.1, reactor.stop)
reactor.run()
"""


def test_idle_and_garbage_connections_are_shed():
    """
    A block port flooded with silent connections and garbage, from two
    addresses: over the per-address and total limits it answers ERROR 429,
    garbage gets ERROR 400 at once, the silent ones are closed after the
    handshake timeout, and its open file count returns to its baseline.
    """
    import socket

    from dragonfly.protocol import frames as F

    proc = subprocess.Popen([sys.executable, "-c", FLOOD_SERVER], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    try:
        start = json.loads(proc.stdout.readline())
        socks = []
        for i in range(100):
            source = "127.0.0.1" if i < 60 else "127.0.0.2"
            s = socket.create_connection(("127.0.0.1", start["port"]), source_address=(source, 0))
            s.settimeout(3)
            socks.append(s)
            if i % 4 == 3:
                s.sendall(b"\x2a\x00\x00\x00\x04abcd")  # an unknown frame type
        codes = []
        for s in socks:
            data = b""
            try:
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            codes.append([e.code for e in F.FrameDecoder().feed(data) if isinstance(e, F.ErrorMsg)])
            s.close()
        # every connection was closed by the port, each with one ERROR frame
        assert all(len(c) == 1 for c in codes), codes
        flat = [c[0] for c in codes]
        counts = {code: flat.count(code) for code in (400, 408, 429)}
        assert counts[400] >= 15, counts  # the garbage (what was not refused first)
        assert counts[408] >= 40, counts  # the silent ones, after the handshake timeout
        assert counts[429] >= 10, counts
        assert set(flat) <= {400, 408, 429}
        end = json.loads(proc.stdout.readline())
        assert end["open"] == 0 and end["fds"] == start["fds"]
    finally:
        proc.kill()
        proc.wait()

"""
A SuperNode binds its ports before it imports its API and CDN and reloads
its cache (L{dragonfly.supernode.tap.bind_early}): a peer that connects
while it is still starting (after a restart, say) is not refused but
waits in the listen backlog, and its request is answered once the
SuperNode runs.
"""

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

BIN = os.path.dirname(sys.executable)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_request_made_while_the_supernode_starts_is_answered(tmp_path):
    port, block = free_port(), free_port()
    info = tmp_path / "home" / "supernode.json"
    proc = subprocess.Popen(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "supernode", "--port", str(port), "--block-port", str(block),
         "--listen", "127.0.0.1", "--home", str(tmp_path / "home")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, "the SuperNode never listened"
            s = socket.socket()
            try:
                s.connect(("127.0.0.1", port))
                break
            except OSError as e:
                s.close()
                assert e.errno == errno.ECONNREFUSED
                time.sleep(0.005)
        with s:
            published_at_connect = info.exists()
            # the block port is bound already too
            with socket.create_connection(("127.0.0.1", block), timeout=5):
                pass
            s.settimeout(60)
            s.sendall(b"GET /healthz HTTP/1.0\r\nHost: sn\r\n\r\n")
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
        assert json.loads(body)["ok"] is True
        # the connection was taken before the SuperNode had finished starting
        assert not published_at_connect
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("which", ["port", "block-port"])
def test_a_port_in_use_is_reported_as_before(tmp_path, which):
    """
    The bind's error surfaces where a tcp: endpoint's did: the service could
    not start, and why; with the block port taken, the API port bound early
    is closed again (it must not take connections nobody will answer).
    """
    log = tmp_path / "sn.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        ports = {"port": str(free_port()), "block-port": str(free_port()), which: str(port)}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "supernode", "--port", ports["port"],
                 "--block-port", ports["block-port"], "--listen", "127.0.0.1", "--home", str(tmp_path / "home")],
                stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            while b"could not start" not in log.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.05)
            text = log.read_bytes().decode()
            assert "supernode could not start" in text and f"Couldn't listen on 127.0.0.1:{port}" in text
            assert "Address already in use" in text
            assert not (tmp_path / "home" / "supernode.json").exists()
            if which == "block-port":
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", int(ports["port"])), timeout=5).close()
        finally:
            proc.kill()
            proc.wait(30)


def test_a_supernode_that_cannot_listen_exits_non_zero(tmp_path):
    """It says why and exits 1 (it used to log the reason and then run on, serving nothing)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "supernode", "--port", str(free_port()),
             "--block-port", str(port), "--listen", "127.0.0.1", "--home", str(tmp_path / "home")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("the SuperNode that could not listen was still running after 60 s")
    assert proc.returncode == 1
    text = out.decode()
    assert f"supernode could not start: Couldn't listen on 127.0.0.1:{port}" in text
    assert "Address already in use" in text


def test_a_failed_start_exits_promptly(tmp_path):
    """
    No 5 s wait for the shut-down watchdog: the GC's first collection,
    stopped beside the worker pool, used to wait for a pool job the stopped
    pool dropped (it never fired).
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for n in range(3):  # the race was lost about 4 times in 5
            proc = subprocess.Popen(
                [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "supernode", "--port", str(free_port()),
                 "--block-port", str(port), "--listen", "127.0.0.1", "--home", str(tmp_path / f"home{n}")],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            failed_at = None
            out = b""
            assert proc.stdout is not None
            for line in proc.stdout:  # unbuffered (PYTHONUNBUFFERED or a line per write)
                out += line
                if failed_at is None and b"could not start" in line:
                    failed_at = time.monotonic()
            proc.wait(60)
            assert proc.returncode == 1 and failed_at is not None, out
            assert b"did not finish" not in out, out.decode()
            assert time.monotonic() - failed_at < 2.5, out.decode()


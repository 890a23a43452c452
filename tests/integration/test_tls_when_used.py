"""
The SuperNode and the dfpeer load TLS (pyOpenSSL, cryptography: about
12 MiB of RSS) only when they first use it (L{dragonfly.core.tls}): their
plugin imports Twisted's reactor, endpoints and web client with pyOpenSSL
hidden, and every TLS connection goes through L{dragonfly.core.tls}.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from dragonfly.testing.swarm import wait_for_file

from .test_security import _make_ca, _server_cert

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
RUST = "cryptography/hazmat/bindings/_rust"


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_supernode_and_dfpeer_start_without_pyopenssl(tmp_path) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sn_home = tmp_path / "sn"
        procs.append(subprocess.Popen([TWISTD, "-n", "--pidfile=", "supernode", "--port", "0", "--block-port", "0",
                                       "--listen", "127.0.0.1", "--home", str(sn_home)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        port = wait_for_file(str(sn_home / "supernode.json"), 60, procs[0])["port"]
        peer_home = tmp_path / "peer"
        procs.append(subprocess.Popen([TWISTD, "-n", "--pidfile=", "dfpeer", "--supernode", f"127.0.0.1:{port}",
                                       "--home", str(peer_home), "--ip", "127.0.0.1", "--listen", "127.0.0.1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_file(str(peer_home / "peer.json"), 60, procs[1])
        for p in procs:
            assert RUST not in _maps(p.pid)
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)


SCRIPT = textwrap.dedent("""
    import sys
    from dragonfly.core.tls import load_twisted_without_tls
    assert load_twisted_without_tls()
    assert "OpenSSL" not in sys.modules
    from twisted.internet import reactor
    from twisted.internet.interfaces import IReactorSSL
    from twisted.web.client import Agent, readBody
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.static import Data
    assert not IReactorSSL.providedBy(reactor)  # Twisted's own TLS is off in this process
    assert "OpenSSL" not in sys.modules
    from dragonfly.core.leanhttp import LeanClient
    from dragonfly.core.security import OriginPolicy, PolicyEndpointFactory
    from dragonfly.core.tls import HttpsEndpointFactory, https_policy, server_endpoint

    key, cert, ca, other = sys.argv[1:5]
    root = Resource()
    root.putChild(b"f", Data(b"hello over tls", "application/octet-stream"))
    results = []

    async def main():
        port = await server_endpoint(reactor, f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1").listen(Site(root))
        url = f"https://localhost:{port.getHost().port}/f".encode()
        assert "OpenSSL" in sys.modules  # loaded by the first TLS endpoint
        good, wrong = https_policy(ca), https_policy(other)
        agents = {
            "agent": Agent.usingEndpointFactory(reactor, HttpsEndpointFactory(reactor, good)),
            "policy": Agent.usingEndpointFactory(reactor, PolicyEndpointFactory(reactor, OriginPolicy("", "none"), tls_policy=good)),
        }
        for name, agent in agents.items():
            results.append((name, await readBody(await agent.request(b"GET", url))))
        lean = LeanClient(reactor, context_factory=good)
        results.append(("lean", (await lean.request("GET", url.decode())).body))
        try:
            await Agent.usingEndpointFactory(reactor, HttpsEndpointFactory(reactor, wrong)).request(b"GET", url)
            results.append(("wrong", "answered"))
        except Exception as e:
            results.append(("wrong", type(e).__name__))

    from twisted.internet.defer import Deferred
    d = Deferred.fromCoroutine(main())
    d.addErrback(lambda f: results.append(("error", f.getTraceback())))
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    print(results)
""")


def test_tls_works_with_twisted_loaded_without_pyopenssl(tmp_path) -> None:
    ca_key, ca_cert, ca_pem = _make_ca(tmp_path, "test-ca")
    _, _, other_pem = _make_ca(tmp_path, "other-ca")
    key, cert = _server_cert(tmp_path, ca_key, ca_cert)
    out = subprocess.run([sys.executable, "-c", SCRIPT, key, cert, ca_pem, other_pem],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    results = dict(eval(out.stdout.strip().splitlines()[-1]))  # a printed list of pairs
    assert "error" not in results, results["error"]
    assert results == {"agent": b"hello over tls", "policy": b"hello over tls", "lean": b"hello over tls",
                       "wrong": "ResponseNeverReceived"}

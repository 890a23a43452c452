"""
C{twistd dfpeer}: the peer daemon on every host.

    twistd -n dfpeer --supernode HOST:PORT[,HOST:PORT...] --home DIR [--port BLOCKPORT] [--ip ADVERTISE_IP]
"""

from __future__ import annotations

import os
from typing import Any

import treq
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage
from OpenSSL.crypto import Error as OpenSSLError
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from ..core.ids import BadInput
from ..core.threads import WorkerPool
from ..core.units import parse_rate
from ..supernode.tap import QuietSite, _token, detect_ip
from .client import node_host, parse_nodes
from .daemon import PeerDaemon, PeerService
from .localapi import LocalApi

DEFAULT_HOME = os.path.expanduser("~/.small-dragonfly")


class Options(usage.Options):
    synopsis = "--supernode HOST:PORT[,...] [options]"
    longdesc = (
        "Run the Dragonfly peer daemon: downloads pieces from the parents the "
        "SuperNode assigns, verifies each against the SuperNode's digest, and "
        "serves verified pieces to other peers.  dfget finds it through HOME/peer.json."
    )
    optParameters = [
        ["supernode", "s", "127.0.0.1:8002", "SuperNode(s), host[:port][,host[:port]...]."],
        ["home", None, DEFAULT_HOME, "Work home: pieces in HOME/data, the local API address in HOME/peer.json."],
        ["port", "p", 0, "Block protocol port (0: any free port).", int],
        ["ip", None, None, "Address other peers reach us at (default: the route to the SuperNode)."],
        ["listen", None, "0.0.0.0", "Interface for the block port."],
        ["api", None, "tcp:0:interface=127.0.0.1", "Endpoint of the local API (dfget talks to it)."],
        ["idle-exit", None, 0.0, "Exit after this many seconds with nothing to do (0: never).", float],
        ["workers", None, 4, "Threads for hashing and disk I/O.", int],
        ["pipeline", None, 1, "Requests outstanding on one connection.", int],
        ["in-flight", None, "6M", "Bytes of pieces requested and not yet received, per download."],
        ["upload-limit", None, "0", "Upload rate for the whole host, e.g. 20M (0: none)."],
        ["total-limit", None, "0", "Download rate for the whole host, e.g. 50M (0: none; dfget --totallimit sets it too)."],
        ["cluster-token", None, None, "Bearer token the SuperNode requires (its --cluster-token)."],
        ["cluster-token-file", None, None, "Read the cluster token from this file."],
        ["supernode-ca", None, None, "PEM file of the CA(s) that sign https:// SuperNodes' certificates (default: the system's)."],
    ]

    def postOptions(self) -> None:
        try:
            self["nodes"] = parse_nodes(self["supernode"])
        except ValueError as e:
            raise usage.UsageError(f"--supernode: {e}") from None
        if not 0 <= self["port"] < 65536:
            raise usage.UsageError("--port must be 0..65535")
        if self["ip"] is None:
            self["ip"] = detect_ip(node_host(self["nodes"][0]))
        self["cluster-token"] = _token(self["cluster-token"], self["cluster-token-file"], "cluster")
        if self["supernode-ca"] is not None:
            try:
                with open(self["supernode-ca"], "rb") as f:
                    self["supernode-ca-certs"] = [Certificate.loadPEM(pem) for pem in _pems(f.read())]
            except (OSError, ValueError, OpenSSLError) as e:
                raise usage.UsageError(f"--supernode-ca {self['supernode-ca']}: {e}") from None
            if not self["supernode-ca-certs"]:
                raise usage.UsageError(f"--supernode-ca {self['supernode-ca']}: no PEM certificate in it")
        self["home"] = os.path.abspath(self["home"])
        if self["pipeline"] < 1:
            raise usage.UsageError("--pipeline must be at least 1")
        for name in ("in-flight", "upload-limit", "total-limit"):
            try:
                self[name] = parse_rate(self[name])
            except BadInput as e:
                raise usage.UsageError(f"--{name}: {e}") from None


def _pems(data: bytes) -> list[bytes]:
    """The PEM certificate blocks of a CA file."""
    end = b"-----END CERTIFICATE-----"
    return [block + end for block in data.split(end) if b"-----BEGIN CERTIFICATE-----" in block]


def supernode_http(reactor: Any, ca_certs: list[Any] | None) -> Any:
    """The HTTP client for the SuperNode API: https:// SuperNodes are checked against C{ca_certs} (or the system's CAs)."""
    if ca_certs:
        policy = BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(ca_certs))
    else:
        policy = BrowserLikePolicyForHTTPS()
    return treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=HTTPConnectionPool(reactor)))


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    os.makedirs(options["home"], exist_ok=True)
    top = MultiService()
    pool = WorkerPool(reactor, size=options["workers"], name="dfpeer-io")
    pool.setServiceParent(top)
    http = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor)))
    daemon = PeerDaemon(
        reactor, options["home"], options["nodes"], options["ip"], pool, http,
        per_connection=options["pipeline"], in_flight_bytes=options["in-flight"],
        upload_limit=options["upload-limit"], total_limit=options["total-limit"],
        supernode_http=supernode_http(reactor, options.get("supernode-ca-certs")),
        cluster_token=options["cluster-token"],
    )
    api = LocalApi(daemon)
    PeerService(
        daemon,
        serverFromString(reactor, f"tcp:{options['port']}:interface={options['listen']}"),
        serverFromString(reactor, options["api"]),
        QuietSite(api.resource()),
        idle_exit=options["idle-exit"],
    ).setServiceParent(top)
    return top

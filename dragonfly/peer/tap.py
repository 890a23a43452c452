"""
C{twistd dfpeer}: the peer daemon on every host.

    twistd -n dfpeer --supernode HOST:PORT[=WEIGHT][,HOST:PORT[=WEIGHT]...] --home DIR [--port BLOCKPORT] [--ip ADVERTISE_IP]
    twistd -n dfpeer --config dfpeer.yaml     # the same options in YAML

Every option is documented in docs/configuration.md.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool

from ..core.config import ConfigFileOptions
from ..core.defaults import DEFAULT_HOME
from ..core.fdlimit import RESERVE, fit_open_files
from ..core.files import HomeLocked, lock_home
from ..core.gc import DiskGc
from ..core.httpapi import HttpLimits, guard_site
from ..core.ids import BadInput
from ..core.leanhttp import LeanClient
from ..core.metrics import metrics_only_root
from ..core.service import default_reactor
from ..core.tapkit import QuietSite, detect_ip, parse_gc_options, read_token
from ..core.threads import WorkerPool
from ..core.tls import HttpsEndpointFactory, HttpsPolicy, load_certificates, server_endpoint
from ..core.units import parse_rate, parse_size
from ..core.webclient import LazyHttpClient, http_client
from ..protocol.block import BLOCK_PORT_OPTIONS, block_port_limits
from .client import node_host, parse_nodes
from .daemon import PeerDaemon, PeerService
from .gc import PeerGc
from .localapi import LocalApi


class Options(ConfigFileOptions):
    synopsis = "--supernode HOST:PORT[,...] [options]"
    longdesc = (
        "Run the Dragonfly peer daemon: downloads pieces from the parents the "
        "SuperNode assigns, verifies each against the SuperNode's digest, and "
        "serves verified pieces to other peers.  dfget finds it through HOME/peer.json."
    )
    optParameters = [
        ["supernode", "s", "127.0.0.1:8002", "SuperNode(s), host[:port][=weight][,...] (port 8002, weight 1 when left out); each task goes to the first live node of its weighted rendezvous ranking."],
        ["home", None, DEFAULT_HOME, "Work home: pieces in HOME/data, the local API address in HOME/peer.json."],
        ["port", "p", 0, "Block protocol port other peers download from (0: any free port).", int],
        ["ip", None, None, "Address other peers reach us at (default: the source address of the route to the first SuperNode)."],
        ["listen", None, "0.0.0.0", "Interface (IP address) the block port listens on."],
        ["api", None, "tcp:0:interface=127.0.0.1", "Endpoint of the local API dfget talks to: tcp:PORT:interface=IP (PORT 0: any free port)."],
        ["metrics", None, None, "Endpoint serving only GET /metrics for Prometheus, e.g. tcp:65002 (default: none; "
         "the local API serves /metrics too)."],
        ["idle-exit", None, 0.0, "Exit after this many seconds with nothing to do (0: never).", float],
        ["workers", None, 4, "Threads for hashing and disk I/O, at least 1.", int],
        ["pipeline", None, 1, "Piece requests outstanding on one connection, at least 1.", int],
        ["in-flight", None, "6M", "Bytes of pieces requested and not yet received, per download (N, NK, NM or NG)."],
        ["link-rate", None, "0",
         "This host's downlink, bytes/s (N, NK, NM or NG, powers of 1024; 1192M is 10 Gbit/s): a download then keeps at least "
         "what the link carries in 0.05 s requested (0: unknown, --in-flight alone)."],
        ["upload-limit", None, "0", "Upload rate for the whole host in bytes/s: N, NK, NM or NG, e.g. 20M (0: no limit)."],
        ["total-limit", None, "0", "Download rate for the whole host in bytes/s, e.g. 50M (0: no limit; dfget --totallimit sets it too)."],
        ["gc-interval", None, "60s", "How often expired tasks are removed and the disk is checked (also once at start-up)."],
        ["task-expire", None, "6h", "A finished task nobody downloaded or fetched a piece of for this long is removed from HOME/data."],
        ["gc-disk-high", None, "80%", "Remove least-recently-used tasks when disk use exceeds this: a percentage of the filesystem holding HOME/data, or a size of HOME/data itself such as 10G."],
        ["gc-disk-low", None, "60%", "...until disk use is at or below this (same form as --gc-disk-high)."],
        ["cluster-token", None, None, "Bearer token the SuperNode requires (its --cluster-token; default: none)."],
        ["cluster-token-file", None, None, "Read the cluster token from this file (default: none)."],
        ["supernode-ca", None, None, "PEM file of the CA(s) that sign https:// SuperNodes' certificates (default: the system's)."],
        *BLOCK_PORT_OPTIONS,
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
        self["cluster-token"] = read_token(self["cluster-token"], self["cluster-token-file"], "cluster")
        if self["supernode-ca"] is not None:
            try:
                with open(self["supernode-ca"], "rb") as f:
                    pem = f.read()
            except OSError as e:
                raise usage.UsageError(f"--supernode-ca {self['supernode-ca']}: {e}") from None
            if not _pems(pem):
                raise usage.UsageError(f"--supernode-ca {self['supernode-ca']}: no PEM certificate in it")
            try:
                self["supernode-ca-certs"] = load_certificates(pem)  # loads pyOpenSSL: this dfpeer speaks TLS
            except ValueError as e:
                raise usage.UsageError(f"--supernode-ca {self['supernode-ca']}: {e}") from None
        self["home"] = os.path.abspath(self["home"])
        parse_gc_options(self)
        if not self["api"].startswith("tcp:"):
            raise usage.UsageError(f"--api must be a TCP endpoint such as tcp:0:interface=127.0.0.1, not {self['api']!r}")
        for name in ("pipeline", "workers"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        if self["metrics"]:
            try:
                serverFromString(None, self["metrics"])  # checks the description only
            except (ValueError, KeyError, TypeError) as e:
                raise usage.UsageError(f"--metrics: not a server endpoint: {e}") from None
        try:
            self["block-limits"] = block_port_limits(self)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        for name in ("in-flight", "upload-limit", "total-limit", "link-rate"):
            try:
                parse = parse_size if name == "in-flight" else parse_rate
                self[name] = parse(self[name])
            except BadInput as e:
                raise usage.UsageError(f"--{name}: {e}") from None


def _pems(data: bytes) -> list[bytes]:
    """The PEM certificate blocks of a CA file."""
    end = b"-----END CERTIFICATE-----"
    return [block + end for block in data.split(end) if b"-----BEGIN CERTIFICATE-----" in block]


def supernode_http(reactor: Any, ca_certs: list[Any] | None) -> Any:
    """The HTTP client for the SuperNode API: https:// SuperNodes are checked against C{ca_certs} (or the system's CAs)."""
    policy = HttpsPolicy(ca_certs or None)
    if os.environ.get("DRAGONFLY_LEAN_API", "1") == "0":  # the treq client, for A/B runs
        return http_client(Agent.usingEndpointFactory(reactor, HttpsEndpointFactory(reactor, policy), pool=HTTPConnectionPool(reactor)))
    return LeanClient(reactor, context_factory=policy)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    reactor = default_reactor(reactor)
    try:
        # held until the process ends: a second dfpeer on this home would
        # delete the first one's unfinished files
        lock_home(options["home"], "dfpeer")
    except HomeLocked as e:
        raise SystemExit(f"dfpeer: {e}; stop it, or give this one another --home") from None
    top = MultiService()
    pool = WorkerPool(reactor, size=options["workers"], name="dfpeer-io")
    pool.setServiceParent(top)
    # the origin client (back-to-source fetches), and treq with it, is made on the first fetch
    http = LazyHttpClient(lambda: Agent.usingEndpointFactory(reactor, HttpsEndpointFactory(reactor), pool=HTTPConnectionPool(reactor)))
    daemon = PeerDaemon(
        reactor, options["home"], options["nodes"], options["ip"], pool, http,
        per_connection=options["pipeline"], in_flight_bytes=options["in-flight"],
        upload_limit=options["upload-limit"], total_limit=options["total-limit"],
        supernode_http=supernode_http(reactor, options.get("supernode-ca-certs")),
        cluster_token=options["cluster-token"],
    )
    daemon.link_rate = options["link-rate"] or None
    # the block connections allowed, and the local API's, must fit under the open-file limit
    limits = dict(options["block-limits"])
    limits["max_connections"] = fit_open_files(limits["max_connections"], RESERVE + HttpLimits().max_connections)
    daemon.block_factory.set_limits(**limits)
    api = LocalApi(daemon)
    service = PeerService(
        daemon,
        serverFromString(reactor, f"tcp:{options['port']}:interface={options['listen']}"),
        serverFromString(reactor, options["api"]),
        guard_site(QuietSite(api.resource())),
        idle_exit=options["idle-exit"],
    )
    service.setServiceParent(top)
    disk = DiskGc(
        daemon.store.root, pool, options["gc-disk-high"], options["gc-disk-low"],
        candidates=daemon.gc_entries, evict=daemon.evict, still_evictable=daemon.evictable, what="the dfpeer store",
    )
    PeerGc(daemon, reactor, options["gc-interval"], options["task-expire"], disk, ready=service.ready).setServiceParent(top)
    if options["metrics"]:
        # a scrape port apart from the local API, which must stay on loopback
        StreamServerEndpointService(
            server_endpoint(reactor, options["metrics"]), QuietSite(metrics_only_root(api.registry)),
        ).setServiceParent(top)
    if os.environ.get("DRAGONFLY_MEMTRACE"):
        from ..core import memtrace

        memtrace.install(reactor, "dfpeer", daemon.memory_stats)
    return top

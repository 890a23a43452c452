"""
C{twistd dfdaemon}: the registry mirror and HTTP(S) proxy on every host.

    twistd -n dfdaemon --port 65001 --registry https://registry.example [--registry URL ...] --home DIR [--supernode HOST:PORT,...]

Registry blobs go through the host's dfpeer (the one for C{--home}, started
if none runs); everything else straight to the registry.  See
L{dragonfly.daemon.proxy} and docs/dfdaemon.md.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool

from ..core.config import ConfigFileOptions
from ..core.defaults import DEFAULT_HOME
from ..core.httpapi import HttpLimits, guard_site
from ..core.ids import BadInput
from ..core.metrics import collector, new_registry
from ..core.service import ListeningService, default_reactor
from ..core.tapkit import QuietSite
from ..core.threads import WorkerPool
from ..core.tls import https_policy
from ..core.units import parse_size
from ..core.webclient import http_client
from ..peer.client import parse_nodes
from .ca import CaError, CertificateAuthority, LeafMinter
from .front import FrontFactory
from .peerlink import PeerLink
from .proxy import DaemonCore, ProxyResource, registry_host
from .rules import DEFAULT_RULES, Rule, RuleError, compile_hosts

log = Logger()


class Options(ConfigFileOptions):
    synopsis = "[--registry URL] [--home DIR] [options]"
    longdesc = (
        "Run dfdaemon, the registry mirror and HTTP(S) proxy: GETs of registry blobs "
        "(/v2/<name>/blobs/sha256:<hex>) go through the host's dfpeer and the swarm, "
        "everything else straight upstream.  Point containerd (hosts.toml), docker "
        "(registry-mirrors) or HTTP(S)_PROXY at it.  'dfdaemon gen-ca' makes the CA "
        "for --hijack.  See docs/dfdaemon.md."
    )
    optParameters = [
        ["port", "p", 65001, "Port to listen on.", int],
        ["listen", None, "127.0.0.1", "Interface to listen on (a proxy: keep it on loopback or a trusted network)."],
        ["home", None, DEFAULT_HOME, "Work home shared with the host's dfpeer (HOME/peer.json); dfdaemon.json goes there too."],
        ["supernode", "s", "127.0.0.1:8002", "SuperNode(s) for a dfpeer that dfdaemon starts, host[:port][=weight][,...]."],
        ["ca-cert", None, None, "CA certificate (PEM) for --hijack, from 'dfdaemon gen-ca' (default: none)."],
        ["ca-key", None, None, "The CA's private key (PEM) (default: none)."],
        ["registry-ca", None, None, "CA bundle (PEM) that upstream HTTPS servers are verified with (default: the system's roots)."],
        ["cold-range", None, "first",
         "A Range request on a blob this host does not hold yet: 'swarm' (206 from the swarm once the SuperNode "
         "has those pieces; verified per piece), 'direct' (the registry's own 206 at once; the swarm prefetches "
         "the blob for later requests) or 'first' (the blob's first range on this host direct, later ones from "
         "the swarm)."],
        ["direct-below", None, "256K",
         "Blobs shorter than this (the registry's HEAD gives their length) go straight to the registry, not "
         "through the swarm: N, NK, NM (bytes, powers of 1024); 0 for none."],
        ["workers", None, 2, "Threads for minting certificates.", int],
        ["cluster-token-file", None, None, "For a dfpeer that dfdaemon starts: the file of the SuperNode's cluster token (default: none)."],
        ["supernode-ca", None, None, "For a dfpeer that dfdaemon starts: the CA of https:// SuperNodes (default: the system's)."],
    ]
    structured_keys = {"proxies": "_load_proxies", "hijack_https": "_load_hijack"}
    optFlags = [
        ["no-start-peer", None, "Do not start a dfpeer when none runs for --home (blobs then go direct)."],
        ["no-prefetch", None, "A Range request fetches only the bytes asked for, as a download of its own through "
         "the swarm, not the whole blob (default: the rest of the blob follows in the background)."],
        ["no-splice", None, "Relay blob bodies from the dfpeer through Python instead of splice(2) from socket to socket."],
        ["no-access-check", None, "Serve blobs from the swarm without first asking the registry (HEAD) whether the client may read them: only for registries open to all."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["rules"] = []
        self["hijack"] = []
        self["registries"] = []
        self._file_lists: set[str] = set()  # lists set by --config, until the command line adds to them
        self._given: set[str] = set()

    def _command_line(self, name: str) -> list[Any]:
        """The list an option adds to; the first one from the command line replaces the file's."""
        if name in self._file_lists:
            self._file_lists.discard(name)
            self[name] = []
        return self[name]

    def opt_registry(self, url: str) -> None:
        """
        An upstream registry of mirror requests, e.g. https://index.docker.io
        (repeatable; a list in the config file).  A request's ns=HOST picks
        the registry of that host, the first one serves requests without ns;
        default: none, proxy only.
        """
        self["registries"].append(url)

    def opt_rule(self, regex: str) -> None:
        """A URL regex whose GETs go through the swarm (repeatable; first match wins; replaces the default)."""
        self._command_line("rules").append({"regx": regex})

    def opt_direct(self, regex: str) -> None:
        """A URL regex that always goes straight upstream (repeatable, in order with --rule)."""
        self._command_line("rules").append({"regx": regex, "direct": True})

    def opt_hijack(self, regex: str) -> None:
        """A host regex whose CONNECTs are intercepted with a certificate from --ca-cert (repeatable)."""
        self._command_line("hijack").append(regex)

    def parseArgs(self) -> None:
        pass

    def postOptions(self) -> None:
        hosts: dict[str, str] = {}
        for url in self["registries"]:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise usage.UsageError(f"--registry must be an http(s) URL, not {url!r}")
            if parts.path.strip("/"):
                raise usage.UsageError(f"--registry {url!r}: a registry URL has no path (the /v2/ API is at its root)")
            host = registry_host(url)
            if host in hosts:
                raise usage.UsageError(f"--registry {url!r}: {hosts[host]!r} names the same host")
            hosts[host] = url
        self["registry"] = self["registries"][0] if self["registries"] else None
        if self["cold-range"] not in ("swarm", "direct", "first"):
            raise usage.UsageError(f"--cold-range must be 'first', 'direct' or 'swarm', not {self['cold-range']!r}")
        try:
            self["direct-below-bytes"] = parse_size(self["direct-below"])
        except BadInput as e:
            raise usage.UsageError(f"--direct-below: {e}") from None
        if not 0 <= self["port"] < 65536:
            raise usage.UsageError("--port must be 0..65535")
        try:
            self["nodes"] = parse_nodes(self["supernode"])
        except ValueError as e:
            raise usage.UsageError(f"--supernode: {e}") from None
        try:
            rules = [Rule.from_dict(r) for r in self["rules"]]
            self["compiled-rules"] = tuple(rules) if rules else DEFAULT_RULES
            self["compiled-hijack"] = compile_hosts(self["hijack"])
        except RuleError as e:
            raise usage.UsageError(str(e)) from None
        if self["hijack"] and not (self["ca-cert"] and self["ca-key"]):
            raise usage.UsageError("--hijack needs --ca-cert and --ca-key (make them with 'dfdaemon gen-ca')")
        self["ca"] = None
        if self["ca-cert"] or self["ca-key"]:
            if not (self["ca-cert"] and self["ca-key"]):
                raise usage.UsageError("--ca-cert and --ca-key go together")
            try:
                self["ca"] = CertificateAuthority.load(self["ca-cert"], self["ca-key"])
            except CaError as e:
                raise usage.UsageError(f"--ca-cert/--ca-key: {e}") from None
        try:
            self["https-policy"] = https_policy(self["registry-ca"])
        except ValueError as e:
            raise usage.UsageError(f"--registry-ca: {e}") from None
        self["home"] = os.path.abspath(os.path.expanduser(self["home"]))

    def _load_proxies(self, value: Any, path: str) -> None:
        if not isinstance(value, list):
            raise usage.UsageError(f"'proxies' in {path} must be a list of rules")
        self["rules"] = list(value)
        self._file_lists.add("rules")

    def _load_hijack(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise usage.UsageError(f"'hijack_https' in {path} must be a mapping (cert, key, hosts)")
        for key, item in value.items():
            if key in ("cert", "key"):
                flag = "ca-" + key
                if self[flag] is None:
                    self[flag] = str(item)
            elif key == "hosts":
                if not isinstance(item, list):
                    raise usage.UsageError(f"'hijack_https.hosts' in {path} must be a list")
                for host in item:
                    regex = host.get("regx") if isinstance(host, dict) else host
                    if not isinstance(regex, str):
                        raise usage.UsageError(f"bad hijack host {host!r} in {path}")
                    self["hijack"].append(regex)
                    self._file_lists.add("hijack")
            else:
                raise usage.UsageError(f"unknown key 'hijack_https.{key}' in {path}")


class DaemonService(ListeningService):
    what = "dfdaemon"

    def __init__(
        self, reactor: Any, endpoint: Any, factory: FrontFactory, info_path: str, peer: PeerLink | None = None,
    ) -> None:
        super().__init__(reactor, info_path)
        self.endpoint = endpoint
        self.factory = factory
        self.peer = peer

    async def _start(self) -> None:
        port = await self.listen(self.endpoint, self.factory)
        address = port.getHost()
        self.publish({"port": address.port, "host": address.host})
        log.info("dfdaemon listening on {host}:{port}", host=address.host, port=address.port)
        if self.peer is not None:
            # the dfpeer found (or started) now, so the first pull does not pay its start-up
            self.peer.warm()


def makeService(options: Options, reactor: Any = None) -> MultiService:
    reactor = default_reactor(reactor)
    os.makedirs(options["home"], exist_ok=True)
    top = MultiService()
    pool = WorkerPool(reactor, size=options["workers"], name="dfdaemon")
    pool.setServiceParent(top)
    # no cookie jar: a Set-Cookie one client's registry answer carries never rides on another's request
    upstream = http_client(Agent(reactor, contextFactory=options["https-policy"], pool=HTTPConnectionPool(reactor)))
    local = http_client(Agent(reactor, pool=HTTPConnectionPool(reactor)))
    peer_args = []
    for name in ("cluster-token-file", "supernode-ca"):
        if options[name]:
            peer_args += [f"--{name}", os.path.abspath(options[name])]
    peer = PeerLink(options["home"], options["nodes"], reactor, local, start=not options["no-start-peer"], extra=peer_args)
    core = DaemonCore(reactor, options["registries"], options["compiled-rules"], peer, upstream, local)
    core.check_access = not options["no-access-check"]
    core.cold_range_direct = options["cold-range"] in ("direct", "first")
    core.cold_range_once = options["cold-range"] == "first"
    core.prefetch = not options["no-prefetch"]
    core.direct_below = options["direct-below-bytes"]
    core.splice = not options["no-splice"]

    def status(request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"counters": core.counters.to_json(), "registry": options["registry"], "registries": list(core.registries)}
        ).encode()

    registry = new_registry()
    registry.register(collector(core.counters.metrics))
    site = QuietSite(ProxyResource(core, status, registry))
    # plain HTTP/1.1 channels: the front protocol hands each one its connection
    # (and, inside intercepted TLS, the https origin it stands for)
    guard_site(site, HttpLimits(max_body=None))  # proxied uploads may be any size
    minter = LeafMinter(options["ca"], pool) if options["ca"] is not None else None
    factory = FrontFactory(reactor, site, core, options["compiled-hijack"], minter)
    endpoint = serverFromString(reactor, f"tcp:{options['port']}:interface={options['listen']}")
    DaemonService(reactor, endpoint, factory, os.path.join(options["home"], "dfdaemon.json"), peer).setServiceParent(top)
    return top

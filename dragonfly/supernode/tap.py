"""
C{twistd supernode}: the REST API, the scheduler and the CDN seed.

    twistd -n supernode --port 8002 --block-port 8001 --home DIR [--advertise-ip IP]
    twistd -n supernode --config supernode.yaml     # the same options in YAML

Every option is documented in docs/configuration.md.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from ..core.config import ConfigFileOptions
from ..core.defaults import DEFAULT_SUPERNODE_HOME
from ..core.ids import BadInput
from ..core.pieces import MAX_PIECE_SIZE, MIN_PIECE_SIZE, dragonfly_piece_size, swarm_piece_size
from ..core.piecetag import load_key
from ..core.security import DEFAULT_DENY, OriginPolicy
from ..core.service import ListeningService, default_reactor
from ..core.tapkit import detect_ip, parse_gc_options, read_token
from ..core.units import parse_rate, parse_size
from ..protocol.block import BLOCK_PORT_OPTIONS, BlockFactory, block_port_limits

if TYPE_CHECKING:
    from twisted.web.server import Site

    from .node import SuperNode

# The rest (the API, the CDN, the scheduler) is imported in makeService,
# after both ports are bound (L{bind_early}): a restarted SuperNode's peers
# connect while it still imports and reloads its cache, and their requests
# wait in the listen backlog instead of being refused.  What they call first
# (registrations, syncs, heartbeats, /healthz) is answered without Klein
# (dragonfly/supernode/fastpath.py); Klein, werkzeug and prometheus_client,
# the GC's and the traffic sampler's timers are imported a moment after the
# reactor starts (FULL_API_AFTER), and treq and the origin's agent at the
# first origin fetch.

log = Logger()

#: connections the API takes at once (more are answered 503)
API_MAX_CONNECTIONS = 4096
#: seconds from the reactor's start to loading the rest of the API (Klein, the metrics), one module a turn;
#: a request that needs it sooner loads it at once
FULL_API_AFTER = 1.0
#: seconds between the steps of that load
LOAD_GAP = 0.01


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port < 65536:
        raise ValueError(port)
    return port


class Options(ConfigFileOptions):
    synopsis = "[options]"
    longdesc = (
        "Run a Dragonfly SuperNode: the REST API peers register with (--port), "
        "the scheduler, and the CDN seed that fetches each origin file once and "
        "serves its pieces over the block protocol (--block-port)."
    )
    optParameters = [
        ["port", "p", 8002, "REST API port (0: any free port; the bound port is written to HOME/supernode.json).", _port],
        ["block-port", "b", 8001, "Block protocol (piece download) port of the CDN seed (0: any free port).", _port],
        ["listen", None, "0.0.0.0", "Interface (IP address) both ports listen on."],
        ["home", None, DEFAULT_SUPERNODE_HOME, "Home directory; the CDN cache lives in HOME/repo."],
        ["advertise-ip", None, None, "Address peers use to reach the block port (default: --listen, or this host's address when listening on all interfaces)."],
        ["piece-size", None, "auto", "Piece size in bytes: 'auto' (about 128 pieces, 1M to 15M), 'dragonfly' (1.x's rule: 4M up to 15M) or a size such as 1M (64K to 60M)."],
        ["max-parents", None, 8, "Parents (other peers) handed to each peer, at least 1.", int],
        ["seed-window", None, 1, "Seed pieces one peer may have outstanding at once, at least 1.", int],
        ["seed-slots", None, 16, "Seed pieces outstanding over a task's whole swarm, at least 1.", int],
        ["peer-ttl", None, 60.0, "Seconds without a heartbeat before a peer is dropped.", float],
        ["workers", None, 4, "Threads for hashing and disk I/O, at least 1.", int],
        ["origin-limit", None, "0", "Rate of all origin fetches together in bytes/s: N, NK, NM or NG, e.g. 100M (0: no limit)."],
        ["origin-ca", None, None, "CA bundle (PEM) that HTTPS origins are verified with (default: the system's roots)."],
        ["gc-interval", None, "60s", "How often idle swarms are expired and the disk is checked (also once at start-up)."],
        ["task-expire", None, "3m", "A swarm no peer registered or synced for this long is dropped from the scheduler (the cached file stays until disk GC)."],
        ["gc-disk-high", None, "80%", "Evict least-recently-used cached tasks when disk use exceeds this: a percentage of the filesystem holding HOME/repo, or a size of HOME/repo itself such as 10G."],
        ["gc-disk-low", None, "60%", "...until disk use is at or below this (same form as --gc-disk-high)."],
        ["api-listen", None, None, "Endpoint of the REST API instead of --port/--listen, e.g. "
         "ssl:8002:privateKey=key.pem:certKey=cert.pem for TLS (default: tcp on --port and --listen)."],
        ["admin-token", None, None, "Bearer token admin operations (deleting tasks, preheat) need (default: none, open)."],
        ["admin-token-file", None, None, "Read the admin token from this file (default: none)."],
        ["cluster-token", None, None, "Bearer token every peer call needs (default: none, open)."],
        ["cluster-token-file", None, None, "Read the cluster token from this file (default: none)."],
        ["piece-key-file", None, None, "A secret shared by the cluster's SuperNodes, never by peers: the piece digests "
         "handed out carry tags made with it, so a SuperNode that takes a task over from a dead one adopts the "
         "pieces its peers hold instead of fetching the file again (default: none, a takeover fetches it whole)."],
        ["origin-allow", None, "", "Origin hosts allowed, comma-separated host names (.suffix for subdomains) and CIDRs (default: all)."],
        ["origin-deny", None, DEFAULT_DENY, "Origin hosts denied, comma-separated host names and CIDRs ('none': deny nothing)."],
        ["revalidate", None, "0", "Seconds a cached file is served without asking the origin whether it changed ('never': not at all)."],
        ["origin-retries", None, 3, "Times an origin fetch whose body is cut (reset, short, silent) goes on from the last "
         "byte it wrote with Range/If-Range before its downloads fail (0: fail at once).", int],
        ["origin-rcvbuf", None, "0", "Receive buffer of each origin connection, fixed before it connects (N, NK, NM): "
         "bounds what the origin has in flight to us, which a crash asks for again, and the fetch's rate to "
         "this per round trip (0: the kernel's autotuning)."],
        *BLOCK_PORT_OPTIONS,
    ]

    def postOptions(self) -> None:
        try:
            self["block-limits"] = block_port_limits(self)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["piece-size"] == "auto":
            self["piece-size"] = swarm_piece_size
        elif self["piece-size"] == "dragonfly":
            self["piece-size"] = dragonfly_piece_size
        else:
            try:
                size = parse_size(self["piece-size"])
            except BadInput as e:
                raise usage.UsageError(f"--piece-size: {e}") from None
            if not MIN_PIECE_SIZE <= size <= MAX_PIECE_SIZE * 4:
                raise usage.UsageError(f"--piece-size must be between 64K and 60M, got {size}")
            self["piece-size"] = size
        try:
            self["origin-limit"] = parse_rate(self["origin-limit"])
        except BadInput as e:
            raise usage.UsageError(f"--origin-limit: {e}") from None
        try:
            self["origin-rcvbuf"] = parse_size(self["origin-rcvbuf"])
        except BadInput as e:
            raise usage.UsageError(f"--origin-rcvbuf: {e}") from None
        try:
            self["https-policy"] = None  # the system's roots (made in makeService, after the bind)
            if self["origin-ca"]:
                from ..core.tls import https_policy

                self["https-policy"] = https_policy(self["origin-ca"])
        except ValueError as e:
            raise usage.UsageError(f"--origin-ca: {e}") from None
        parse_gc_options(self)
        for name in ("admin", "cluster"):
            self[f"{name}-token"] = read_token(self[f"{name}-token"], self[f"{name}-token-file"], name)
        self["piece-key"] = None
        if self["piece-key-file"]:
            try:
                self["piece-key"] = load_key(self["piece-key-file"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        try:
            self["origin-policy"] = OriginPolicy(self["origin-allow"], self["origin-deny"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["revalidate"] == "never":
            self["revalidate"] = None
        else:
            try:
                self["revalidate"] = float(self["revalidate"])
                if not self["revalidate"] >= 0:
                    raise ValueError
            except ValueError:
                raise usage.UsageError("--revalidate takes seconds (>= 0) or 'never'") from None
        for name in ("max-parents", "seed-window", "seed-slots", "workers"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        if not 0 <= self["origin-retries"] <= 100:
            raise usage.UsageError("--origin-retries must be 0..100")
        if self["advertise-ip"] is None:
            listen = self["listen"]
            self["advertise-ip"] = listen if listen not in ("0.0.0.0", "::") else detect_ip(None)


def bind_early(interface: str, port: int, reactor: Any, backlog: int = 1024) -> Any:
    """
    A listening TCP socket on C{interface}:C{port}, bound now (before the
    reactor runs), as an endpoint that adopts it; a bind that fails raises
    L{CannotListenError} from C{listen}, as a C{tcp:} endpoint does.  The
    kernel completes the handshakes of connections made from here on, so a
    restarted SuperNode's peers wait in the backlog until it serves them
    rather than being refused and asking again on their next retry tick.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's own ports
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        return _FailedEndpoint(CannotListenError(interface, port, e))
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint

    # the endpoint owns the descriptor from here on (it closes it once adopted)
    return AdoptedStreamServerEndpoint(reactor, sock.detach(), family)


class _FailedEndpoint:
    """An endpoint whose C{listen} fails with the bind's error (L{bind_early})."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def listen(self, factory: Any) -> Any:
        from twisted.internet.defer import fail

        return fail(self.error)


class SupernodeService(ListeningService):
    """
    Binds the block port first (the seed advertises its real port, so port 0
    works), then the API, and writes C{HOME/supernode.json} with both.
    """

    what = "supernode"

    def __init__(
        self, reactor: Any, node: SuperNode, home: str, block_endpoint: Any, api_endpoint: Any, site: Site,
        block_limits: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(reactor, os.path.join(home, "supernode.json"))
        self._block_limits = block_limits or {}
        self.node = node
        self._block_endpoint = block_endpoint
        self._api_endpoint = api_endpoint
        self._site = site

    async def _start(self) -> None:
        from .scheduler import SEED_ID

        try:
            block = await self.listen(self._block_endpoint, BlockFactory(SEED_ID, self.node.seed_side, clock=self.node.clock, **self._block_limits))
        except BaseException:
            from twisted.internet.endpoints import AdoptedStreamServerEndpoint

            # the API's socket, bound early, must not take connections the process will never answer
            if isinstance(self._api_endpoint, AdoptedStreamServerEndpoint):
                os.close(self._api_endpoint.fileno)
            raise
        self.node.block_port = block.getHost().port
        api = await self.listen(self._api_endpoint, self._site)
        self.publish({"port": api.getHost().port, "blockPort": self.node.block_port, "advertiseIp": self.node.advertise_ip})
        # the origin fetches a crash cut a moment ago go on now, not at the first registration
        self.node.cdn.resume_cut()
        log.info(
            "supernode API on port {port}, seed block port {block}, advertised as {ip}",
            port=api.getHost().port, block=self.node.block_port, ip=self.node.advertise_ip,
        )


def makeService(options: Options, reactor: Any = None) -> MultiService:
    reactor = default_reactor(reactor)
    iface = options["listen"]
    # both ports first (see bind_early); the API on its own endpoint (TLS, ...) when given one
    block_endpoint = bind_early(iface, options["block-port"], reactor=reactor)
    if options["api-listen"]:
        from ..core.tls import server_endpoint

        api_endpoint = server_endpoint(reactor, options["api-listen"])
    else:
        api_endpoint = bind_early(iface, options["port"], reactor=reactor)

    from ..core.fdlimit import fit_open_files_shared
    from ..core.httpapi import HttpLimits, guard_site
    from ..core.ratelimit import TokenBucket
    from ..core.security import PolicyEndpointFactory
    from ..core.tapkit import QuietSite
    from ..core.threads import WorkerPool
    from ..core.webclient import LazyHttpClient
    from .api import SupernodeApi
    from .cdn import Cdn
    from .fastpath import load_in_steps
    from .node import SuperNode
    from .originsock import origin_reactor
    from .preheat import Preheater
    from .scheduler import Scheduler

    home = os.path.abspath(options["home"])
    os.makedirs(home, exist_ok=True)
    top = MultiService()
    pool = WorkerPool(reactor, size=options["workers"], name="supernode-io")
    pool.setServiceParent(top)
    policy = options["origin-policy"]

    def origin_agent() -> Any:
        # every origin connection passes the allow/deny policy, by resolved address
        from twisted.web.client import Agent, HTTPConnectionPool

        from ..core.tls import https_policy

        return Agent.usingEndpointFactory(
            reactor, PolicyEndpointFactory(
                origin_reactor(reactor, options["origin-rcvbuf"]), policy, pool,
                tls_policy=options["https-policy"] or https_policy(None),
            ),
            pool=HTTPConnectionPool(reactor),
        )

    # treq and the agent made at the first origin fetch (a restart's resumed one, else a registration's)
    http = LazyHttpClient(origin_agent)
    scheduler = Scheduler(
        max_parents=options["max-parents"], seed_window=options["seed-window"],
        seed_slots=options["seed-slots"], peer_ttl=options["peer-ttl"],
    )
    node = SuperNode(
        lambda track: Cdn(
            home, http, pool, reactor, piece_size=options["piece-size"], on_new_task=track,
            origin_limit=TokenBucket(options["origin-limit"], reactor) if options["origin-limit"] else None,
            revalidate_after=options["revalidate"], retries=options["origin-retries"],
        ),
        scheduler,
        reactor,
        options["advertise-ip"],
        options["block-port"],
        piece_key=options["piece-key"],
    )
    node.cdn.load()
    # the seed's block connections and the API's, with the rest, under the open-file limit
    block_limits = dict(options["block-limits"])
    fit = fit_open_files_shared({"seed block": block_limits.get("max_connections", 1024), "API": API_MAX_CONNECTIONS})
    block_limits["max_connections"] = fit["seed block"]
    api = SupernodeApi(
        node, Preheater(node, http, reactor), admin_token=options["admin-token"],
        cluster_token=options["cluster-token"], origin_policy=policy, resolver_pool=pool,
    )
    root = api.resource(early=True)
    SupernodeService(
        reactor,
        node,
        home,
        block_endpoint,
        api_endpoint,
        guard_site(QuietSite(root), HttpLimits(max_connections=fit["API"])),
        block_limits=block_limits,
    ).setServiceParent(top)

    def timers() -> None:
        # started a moment after the reactor (their imports are not on a restart's way); GC runs at once then
        from ..core.gc import DiskGc
        from .gc import SupernodeGc

        disk = DiskGc(
            node.cdn.repo, pool, options["gc-disk-high"], options["gc-disk-low"],
            candidates=node.gc_entries, evict=node.evict, still_evictable=node.evictable, what="the CDN cache",
        )
        SupernodeGc(
            node, reactor, options["gc-interval"], options["task-expire"], disk,
            peer_interval=min(5.0, options["peer-ttl"] / 4),
        ).setServiceParent(top)
        # the dashboard's traffic chart (GET /api/v1/dashboard, /ui)
        node.traffic_sampler().setServiceParent(top)
        load_in_steps(reactor, root, LOAD_GAP)

    reactor.callWhenRunning(reactor.callLater, FULL_API_AFTER, timers)
    if os.environ.get("DRAGONFLY_MEMTRACE"):
        from ..core import memtrace

        memtrace.install(reactor, "supernode")
    return top

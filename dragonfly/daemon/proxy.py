"""
dfdaemon's request handling: registry mirror, HTTP proxy, and the requests
that arrive inside intercepted TLS, all through one leaf resource.

A request's upstream URL is:
  - its absolute URI (a proxy client: C{GET http://host/path});
  - C{https://<host>} plus its path inside an intercepted CONNECT;
  - a C{--registry} plus its path otherwise (a registry mirror): the one
    whose host is the request's C{ns=HOST[:PORT]} query (containerd names
    the registry it means that way; C{ns} is dropped from the upstream URL),
    or the first one without C{ns}.  An C{ns} naming a host no
    C{--registry} lists gets a JSON 403 and no fetch: dfdaemon is no open
    relay.  (Task ids of blobs are their digests, so C{ns} changes no task.)

A blob GET with one C{Range} is answered 206: by default a blob's first
range on this host with the registry's own 206, relayed, the dfpeer then
fetching the whole blob in the background (C{--cold-range first}, see
L{DaemonCore._cold_range}); later ranges, and every range with
C{--cold-range swarm}, from the swarm: the dfpeer fetches the pieces
covering the range first and the rest of the blob after (each piece
verified by SHA-256 against the SuperNode's digests; a partial body cannot
be checked against the whole blob's digest).  An unsatisfiable
range gets 416; several ranges in one header get the whole blob with 200;
a malformed C{bytes=} range gets 416.

L{dragonfly.daemon.rules} then sends GETs of registry blobs through the
local dfpeer and everything else straight upstream.  Both paths stream:

  - P2P: ask the dfpeer to download the blob (its task id is the blob's
    digest, so one swarm per layer whatever repository or mirror names it)
    and relay C{GET /api/v1/downloads/<id>/content}, which answers once the
    length is known and sends bytes in order as pieces are verified.  The
    client gets the registry's Content-Type, Content-Length and
    Docker-Content-Digest (a whole blob to a plain-TCP client is spliced
    from socket to socket, L{dragonfly.daemon.splice}).  The dfpeer holds the last bytes until the whole
    blob matches its digest; if it does not, both connections are cut short
    of Content-Length and the client retries.
  - Direct: the request goes upstream with its headers (Authorization
    included) and the answer comes back as it is (a 401 with its
    WWW-Authenticate challenge too, so the client can authenticate).

A blob shorter than C{--direct-below} (the length the registry's HEAD
below gives) goes direct: the swarm's fixed costs (a registration, the
CDN's fetch, a first sync) would take longer than its bytes.

Before a blob is served from the swarm, the registry is asked (HEAD with
the client's headers) whether this client may read it: the swarm holds each
blob once for everybody, so the registry's auth must be checked per client.
A 401 (with its challenge), 403 or 404 goes back to the client as the
registry gave it.  C{--no-access-check} skips this for open registries.

If the P2P path fails before the first byte (no dfpeer, no SuperNode, the
origin refused the SuperNode, ...), the request goes direct and the log and
the counters say so.  Back-pressure holds both ways: the upstream response is
the client transport's producer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ..core.bodywriter import AbortBody, DiscardBody
from ..core.headers import HOP_BY_HOP_BYTES
from ..core.httpapi import ApiError, json_response
from ..core.ids import task_id
from ..core.metrics import counter, render_metrics
from ..core.ranges import MULTIPLE, BadRange, ByteRange, content_range, parse_range
from .rules import Decision, Rule, decide
from .splice import SpliceRelay, fetch_head, plain_client

log = Logger()

#: request headers passed to the SuperNode's origin fetch of a blob
ORIGIN_HEADERS = ("authorization", "user-agent", "accept")
#: seconds to wait for the dfpeer's stream to start (the origin answering the SuperNode)
P2P_START_TIMEOUT = 60.0


#: names containerd gives Docker Hub in C{ns}, and the hosts that serve it
DOCKER_HUB = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


class P2PUnavailable(Exception):
    """The swarm could not start the download; the request goes direct."""


class UnlistedRegistry(Exception):
    """A mirror request's C{ns} names a registry that no C{--registry} lists."""


def registry_host(url: str) -> str:
    """The C{host[:port]} of a registry URL, lower case (the form of containerd's C{ns})."""
    return urlsplit(url).netloc.lower()


def split_ns(uri: str) -> tuple[str, str | None]:
    """C{uri} without its C{ns=} query parameter, and that parameter's value (None if absent)."""
    path, sep, query = uri.partition("?")
    if not sep:
        return uri, None
    ns = None
    kept = []
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == "ns":
            ns = unquote_plus(value)  # containerd sends ns=127.0.0.1%3A5000
        else:
            kept.append(part)
    rest = "&".join(kept)
    return (path + "?" + rest if rest else path), ns


def pick_registry(registries: Sequence[str], ns: str | None) -> str | None:
    """
    The registry (an entry of C{registries}) a mirror request with C{ns}
    goes to: the first one without C{ns}, else the one of that host
    (Docker Hub's names count as one host).  Raises L{UnlistedRegistry}.
    """
    if not registries:
        return None
    if ns is None or ns == "":
        return registries[0]
    want = ns.lower()
    for url in registries:
        host = registry_host(url)
        if host == want or (want in DOCKER_HUB and host in DOCKER_HUB):
            return url
    raise UnlistedRegistry(ns)


class Counters:
    """What dfdaemon did, for its log line, its status file and the tests."""

    def __init__(self) -> None:
        self.requests = 0
        self.p2p = 0
        self.p2p_bytes = 0
        self.direct = 0
        self.direct_bytes = 0
        self.fallbacks = 0
        self.p2p_cut = 0
        self.tunnels = 0
        self.intercepted = 0
        self.denied = 0
        self.unlisted = 0
        self.ranges = 0
        self.ranges_direct = 0
        self.small = 0
        self.spliced = 0

    def to_json(self) -> dict[str, int]:
        return dict(vars(self))

    def metrics(self) -> list[Any]:
        """The counters as Prometheus families (read at each scrape)."""
        return [
            counter("dragonfly_dfdaemon_requests_total", "Requests handled (mirror, proxy and intercepted).", self.requests),
            counter(
                "dragonfly_dfdaemon_blob_requests_total",
                "Blob requests by how they were served: p2p (through the swarm), fallback (P2P failed before the "
                "first byte, served direct), denied (the registry refused the client), small (below "
                "--direct-below, served direct).",
                {"p2p": self.p2p, "fallback": self.fallbacks, "denied": self.denied, "small": self.small}, "path",
            ),
            counter(
                "dragonfly_dfdaemon_response_bytes_total", "Body bytes sent to clients, by path.",
                {"p2p": self.p2p_bytes, "direct": self.direct_bytes}, "path",
            ),
            counter("dragonfly_dfdaemon_direct_requests_total", "Requests passed straight upstream.", self.direct),
            counter(
                "dragonfly_dfdaemon_range_requests_total",
                "Blob requests with one Range, by where they were answered: swarm (206 from the dfpeer), direct "
                "(--cold-range direct: the blob was not on this host yet; the swarm prefetches it).",
                {"swarm": self.ranges, "direct": self.ranges_direct}, "path",
            ),
            counter(
                "dragonfly_dfdaemon_unlisted_registry_total",
                "Mirror requests refused (403) because their ns= names no --registry.", self.unlisted,
            ),
            counter(
                "dragonfly_dfdaemon_p2p_cut_total",
                "Blob responses cut short (the swarm's download failed, or the blob did not match its digest).",
                self.p2p_cut,
            ),
            counter(
                "dragonfly_dfdaemon_connect_total", "CONNECT requests, by what became of them.",
                {"tunnel": self.tunnels, "intercepted": self.intercepted}, "mode",
            ),
        ]


def _blob_headers(request: Any, decision: Decision, task_id: str) -> None:
    """
    The headers of a body served from the swarm: a blob named by its digest
    never changes, so it may be cached for a year (as the registry says).
    """
    if decision.digest:
        request.setHeader(b"docker-content-digest", decision.digest.encode())
        request.setHeader(b"etag", f'"{decision.digest}"'.encode())
        request.setHeader(b"cache-control", b"max-age=31536000")
    request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
    request.setHeader(b"x-dragonfly-task-id", task_id.encode())


def _passable(headers: Headers) -> list[tuple[bytes, Sequence[bytes]]]:
    """
    The end-to-end headers of C{headers}; an empty C{Content-Encoding} is
    left out (treq's gzip decoding leaves one on every answer that had
    none, and clients would get it as a header of ours).
    """
    out = []
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in HOP_BY_HOP_BYTES or lower == b"host":
            continue
        if lower == b"content-encoding" and not any(v.strip() for v in values):
            continue
        out.append((name, values))
    return out


def held_digests(tasks: Sequence[Any]) -> list[str]:
    """
    The digests of the blobs a dfpeer's task list (C{GET /api/v1/tasks})
    shows held whole: tasks done whose id is that of their content's
    digest (a blob's task; a URL's task or a range's has another id).
    """
    out = []
    for task in tasks:
        if not isinstance(task, dict) or task.get("status") != "success":
            continue
        hexdigest = task.get("sha256")
        if not isinstance(hexdigest, str) or len(hexdigest) != 64:
            continue
        digest = "sha256:" + hexdigest
        try:
            if task.get("taskId") == task_id("", digest=digest):
                out.append(digest)
        except ValueError:
            continue
    return out


class RecentDigests:
    """
    The most recent C{size} digests added (of the blobs this host's dfpeer
    was seen to hold, or was asked to prefetch).  An entry whose blob the
    dfpeer has since dropped only costs its next range the fast path: the
    swarm fetches it again.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._digests: dict[str, None] = {}

    def add(self, digest: str) -> None:
        self._digests.pop(digest, None)
        self._digests[digest] = None
        if len(self._digests) > self.size:
            del self._digests[next(iter(self._digests))]

    def discard(self, digest: str) -> None:
        self._digests.pop(digest, None)

    def __contains__(self, digest: object) -> bool:
        return digest in self._digests

    def __len__(self) -> int:
        return len(self._digests)


class DaemonCore:
    """
    @param registry: the upstream(s) of mirror requests (C{--registry}: one
        URL or a list, the first is the default), or None.
    @param peer: a L{dragonfly.daemon.peerlink.PeerLink} to the host's dfpeer.
    @param http: a treq HTTPClient for upstream requests (its agent verifies TLS).
    """

    def __init__(
        self,
        reactor: Any,
        registry: str | Sequence[str] | None,
        rules: tuple[Rule, ...],
        peer: Any,
        http: Any,
        local_http: Any,
    ) -> None:
        self.reactor = reactor
        listed = [registry] if isinstance(registry, str) else list(registry or ())
        self.registries = tuple(r.rstrip("/") for r in listed)
        self.registry = self.registries[0] if self.registries else None
        self.rules = rules
        self.peer = peer
        self.http = http
        self.local_http = local_http
        self.counters = Counters()
        #: ask the registry whether the client may read a blob before serving it from the swarm
        self.check_access = True
        #: a Range on a blob the dfpeer does not hold yet goes straight to the
        #: registry (the swarm still prefetches the whole blob) (--cold-range direct)
        self.cold_range_direct = False
        #: with L{cold_range_direct}, only a blob's first range on this host goes to
        #: the registry, later ones to the swarm (--cold-range first, the default)
        self.cold_range_once = False
        #: digests of which a range went to the registry (--cold-range first)
        self.ranged = RecentDigests()
        #: a Range request is followed by the whole blob in the background
        #: (else it is a download of its own of those bytes alone) (--no-prefetch)
        self.prefetch = True
        #: blobs shorter than this many bytes (the registry's HEAD says) go
        #: straight to the registry, not through the swarm; 0: none (--direct-below)
        self.direct_below = 0
        #: a whole blob's body from the dfpeer goes to a plain-TCP client with
        #: splice(2), not through Python (--no-splice)
        self.splice = True
        #: digests this host's dfpeer was seen to hold whole: their ranges go
        #: to the swarm without asking the registry (--cold-range direct)
        self.held = RecentDigests()
        #: digests whose download this dfdaemon asked its dfpeer for (a prefetch)
        self.prefetched = RecentDigests()
        #: L{held} has been filled from the dfpeer's task list (asked once, in the
        #: background, at the first blob request): until then a cold range also
        #: asks the dfpeer at once whether it holds the blob (--cold-range direct)
        self.knows_held = False
        self._learning = False

    # -- entry ---------------------------------------------------------------------

    def target(self, request: Any) -> str | None:
        """
        The absolute upstream URL of C{request}, or None if it has none;
        raises L{UnlistedRegistry} for an C{ns} no C{--registry} lists.
        """
        uri = request.uri.decode("latin-1")
        base = getattr(request.channel, "dfd_base", None)
        if base is not None:
            return base + uri if uri.startswith("/") else None
        if uri.startswith(("http://", "https://")):
            return uri
        if self.registries and uri.startswith("/"):
            path, ns = split_ns(uri)
            registry = pick_registry(self.registries, ns)
            return None if registry is None else registry + path
        return None

    async def handle(self, request: Any) -> None:
        self.counters.requests += 1
        method = request.method.decode("latin-1")
        try:
            url = self.target(request)
        except UnlistedRegistry as e:
            self.counters.unlisted += 1
            ns = str(e)[:255]
            _error(
                request, 403, "REGISTRY_NOT_LISTED",
                f"ns={ns} names no registry of this dfdaemon: add it with --registry https://{ns} (or 'registry' in its config file)",
            )
            return
        if url is None:
            _error(request, 400, "NO_UPSTREAM", "a relative URI needs dfdaemon --registry; use it as a proxy with absolute URIs")
            return
        if method == "CONNECT":
            _error(request, 400, "BAD_CONNECT", "CONNECT must be the first request on a connection")
            return
        decision = decide(self.rules, method, url)
        if decision.p2p and self.cold_range_direct and self.prefetch and not self._learning:
            self._learning = True
            Deferred.fromCoroutine(self._learn_held()).addErrback(
                lambda f: log.info("cannot list the dfpeer's blobs: {why}", why=f.getErrorMessage())
            )
        spec = None
        if decision.p2p:
            try:
                spec = parse_range(request.getHeader(b"range"))
            except BadRange as e:
                _error(request, 416, "BAD_RANGE", str(e))
                return
            if spec is MULTIPLE:
                # several ranges: the whole blob, 200 (RFC 9110 14.2 lets a server ignore Range)
                request.requestHeaders.removeHeader(b"range")
                spec = None
        if (
            isinstance(spec, ByteRange) and self.cold_range_direct and self.prefetch and decision.digest
            and decision.digest not in self.held
            and not (self.cold_range_once and decision.digest in self.ranged)
            and await self._cold_range(request, method, decision)
        ):
            return
        if decision.p2p and (self.check_access or self.direct_below):
            allowed, size = await self._allowed(request, decision.url)
            if self.check_access and not allowed:
                # the registry says no (401 with its challenge, 403, 404): the
                # client gets the registry's own answer, never the swarm's copy
                await self._direct(request, method, decision.url)
                return
            if allowed and size is not None and size < self.direct_below:
                # (--direct-below) a small blob: the swarm's fixed costs would outweigh
                # its bytes, so the registry sends it (checked against its digest)
                self.counters.small += 1
                await self._direct(request, method, decision.url, decision.digest)
                return
        only = None
        if decision.p2p and isinstance(spec, ByteRange) and not self.prefetch:
            # --no-prefetch: the range alone, as a download of its own; its
            # place in the blob needs the blob's length (the registry says)
            total = await self._length(request, decision.url)
            span = spec.resolve(total) if total is not None else None
            if total is not None and span is None:
                request.setHeader(b"content-range", f"bytes */{total}".encode())
                _error(request, 416, "RANGE_NOT_SATISFIABLE", f"{spec.header()} is outside the blob")
                return
            only = (span[0], span[1], total) if span is not None and total is not None else None
            if only is None:
                decision = attrs.evolve(decision, p2p=False)
        if decision.p2p:
            try:
                await self._p2p(request, decision, spec if isinstance(spec, ByteRange) else None, only)
                return
            except P2PUnavailable as e:
                self.counters.fallbacks += 1
                log.warn("p2p unavailable for {url}, going direct: {why}", url=decision.url, why=str(e))
            except CancelledError:
                return
        await self._direct(request, method, decision.url, decision.digest if decision.p2p else None)

    async def _allowed(self, request: Any, url: str) -> tuple[bool, int | None]:
        """
        Ask the registry (HEAD, no body) whether this client may read the
        blob: the swarm serves any blob it holds to whoever asks for its
        digest, so the registry's auth is checked here, per request.  An
        unreachable registry counts as a no (the direct path then says why).
        With the answer comes the blob's length (None if the HEAD told none).
        """
        response = await self._head(request, url)
        if response is None:
            return False, None
        if response.code >= 400:
            if self.check_access:
                self.counters.denied += 1
            return False, None
        return True, _head_length(response)

    async def _head(self, request: Any, url: str) -> Any:
        """
        HEAD C{url} at the registry with the client's credentials, asking of
        the blob, not a part of it; the response (its empty body read), or
        None when the registry cannot be reached (logged).
        """
        headers = Headers(dict(_passable(request.requestHeaders)))
        headers.removeHeader(b"range")
        try:
            response = await self.http.request("HEAD", url, headers=headers, allow_redirects=False)
        except CancelledError:
            raise
        except Exception as e:
            log.warn("HEAD {url} failed: {why}", url=url, why=str(e))
            return None
        response.deliverBody(DiscardBody())
        return response

    # -- direct --------------------------------------------------------------------

    def _upstream(self, request: Any, method: str, url: str) -> Deferred:
        """Send the client's request upstream; fires with the response (its body not read yet)."""
        headers = Headers(dict(_passable(request.requestHeaders)))
        body = request.content if method not in ("GET", "HEAD") else None
        if body is not None:
            body.seek(0)
        try:
            d: Deferred = self.http.request(method, url, headers=headers, data=body, unbuffered=True, allow_redirects=False)
        except Exception:
            d = fail()
        return d

    async def _direct(
        self, request: Any, method: str, url: str, decision_digest: str | None = None, upstream: Deferred | None = None,
    ) -> None:
        """
        Pass the request upstream (or take the C{upstream} answer already
        asked for) and the answer back.  A blob named by its digest (a P2P
        request gone direct) is checked on the way: its last bytes are held
        until the SHA-256 matches, else the client's connection is cut short
        of them.
        """
        self.counters.direct += 1
        try:
            response = await (upstream if upstream is not None else self._upstream(request, method, url))
        except CancelledError:
            return
        except Exception as e:
            log.warn("upstream {url} unreachable: {why}", url=url, why=str(e))
            _error(request, 502, "UPSTREAM_UNREACHABLE", f"{url}: {e}")
            return
        request.setResponseCode(response.code, response.phrase)
        for name, values in _passable(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        if method != "HEAD" and response.code not in (204, 304):
            # (a HEAD's Content-Length is in the headers, as the upstream gave it)
            _set_length(request, response)
        if response.length != 0 and method != "HEAD":
            digest = decision_digest if response.code == 200 else None
            complete = await _relay(request, response, self._count_direct, digest)
            if digest and not complete:
                log.warn("{url}: the registry's bytes do not match {digest}; the client's connection was cut", url=url, digest=digest)
        else:
            response.deliverBody(DiscardBody())
            _finish(request)

    def _count_direct(self, n: int) -> None:
        self.counters.direct_bytes += n

    # -- through the swarm -------------------------------------------------------------

    def _download_body(self, request: Any, decision: Decision) -> dict[str, Any]:
        """The dfpeer's download request for a blob, with the client's origin headers."""
        headers = {}
        for name in ORIGIN_HEADERS:
            value = request.getHeader(name)
            if value is not None:
                headers[name.title()] = value.decode("latin-1") if isinstance(value, bytes) else value
        body: dict[str, Any] = {"url": decision.url, "headers": headers, "notbs": True}
        if decision.digest:
            body["digest"] = decision.digest
        return body

    async def _cold_range(self, request: Any, method: str, decision: Decision) -> bool:
        """
        With C{--cold-range direct} or C{first} (the default: only a blob's
        first range on this host), a range of a blob not known to be on this
        host: the registry is asked for it at once and its answer
        relayed as it comes (True); once the range is sent, the dfpeer is asked
        whether it holds the blob and, if not, to download it in the
        background (the prefetch: later ranges come from the local copy).  The
        question and the prefetch wait for the range so that neither the
        dfpeer's work nor the registry's whole-blob fetch for the swarm
        competes with it.

        The dfpeer is asked at once, alongside the registry, only when
        dfdaemon does not know what it holds: before its task list came
        (L{knows_held}; then a "held" that comes first drops the registry's
        request: False, the swarm serves the range), and for a blob this
        dfdaemon had prefetched (its answer is awaited: the prefetch may have
        completed, and then the registry sends nothing).  An unreachable
        registry: the dfpeer is asked, it may hold the blob.
        """
        digest = decision.digest
        assert digest is not None
        self.ranged.add(digest)
        upstream = self._upstream(request, method, decision.url)
        early = not self.knows_held or digest in self.prefetched
        probe = Deferred.fromCoroutine(self._probe(digest)) if early else None
        first: Deferred = Deferred()
        waiting = [True]  # (False once this coroutine stops waiting, however it stops)

        def arrived(result: Any, which: str) -> Any:
            if waiting[0] and not first.called:
                first.callback((which, result))
            return result

        upstream.addBoth(arrived, "registry")
        if probe is not None:
            probe.addBoth(arrived, "dfpeer")
        try:
            if probe is not None and digest in self.prefetched:
                # this dfdaemon had the dfpeer fetch it: the dfpeer's answer first (a
                # completed prefetch spares the registry the range)
                which, result = "dfpeer", await probe
            else:
                which, result = await first
            held = result if which == "dfpeer" else None
            if held is None and isinstance(result, Failure):
                # the registry is unreachable: the swarm may still have it
                if probe is None:
                    probe = Deferred.fromCoroutine(self._probe(digest))
                held = await probe
        except BaseException:
            waiting[0] = False
            _drop(upstream)
            if probe is not None:
                probe.addErrback(lambda _: None)  # (cancelled with the request)
            raise
        if held:
            _drop(upstream)
            return False
        self.counters.ranges_direct += 1
        try:
            # (a registry that ignores Range answers 200 with the whole blob: checked against its digest)
            await self._direct(request, method, decision.url, digest, upstream)
        finally:
            if 400 <= request.code < 500:
                # refused (401 until the client has a token, 403, 404): no prefetch with
                # these credentials, and the client's next try goes to the registry too
                self.ranged.discard(digest)
                if probe is not None:
                    probe.addErrback(lambda _: None)
            else:
                if probe is None:
                    probe = Deferred.fromCoroutine(self._probe(digest))
                probe.addCallback(self._prefetch, request, decision).addErrback(lambda _: None)
        return True

    async def _learn_held(self) -> None:
        """L{held} filled from the dfpeer's task list (its blobs held whole); then L{knows_held}."""
        api = await self.peer.api()
        response = await self.local_http.get(api + "/api/v1/tasks", timeout=10)
        answer = await response.json()
        tasks = answer.get("tasks") if response.code == 200 and isinstance(answer, dict) else None
        if not isinstance(tasks, list):
            raise ValueError(f"the dfpeer's task list answered {response.code}")
        for digest in held_digests(tasks):
            self.held.add(digest)
        self.knows_held = True

    async def _probe(self, digest: str) -> bool:
        """Whether this host's dfpeer holds the blob whole (False if there is no dfpeer to ask)."""
        try:
            api = await self.peer.api()
        except CancelledError:
            raise
        except Exception:
            return False  # no dfpeer: the prefetch says so in the log
        held = await self._held(api, digest)
        if held:
            self.held.add(digest)
        return held

    def _prefetch(self, held: bool, request: Any, decision: Decision) -> None:
        """The whole blob downloaded by the dfpeer in the background, unless it holds it already."""
        if not held:
            Deferred.fromCoroutine(self._start_download(request, decision)).addErrback(
                lambda f: log.warn("prefetch of {url} failed: {why}", url=decision.url, why=f.getErrorMessage())
            )

    async def _start_download(self, request: Any, decision: Decision) -> None:
        if decision.digest:
            self.prefetched.add(decision.digest)
        api = await self.peer.api()
        response = await self.local_http.post(api + "/api/v1/downloads", json=self._download_body(request, decision), timeout=10)
        answer = await response.json()
        if response.code == 200 and answer.get("status") == "success" and decision.digest:
            self.held.add(decision.digest)

    async def _length(self, request: Any, url: str) -> int | None:
        """The blob's length as the registry tells it (HEAD, with the client's credentials), or None."""
        response = await self._head(request, url)
        if response is None or response.code != 200:
            return None
        return _head_length(response)

    async def _p2p(
        self, request: Any, decision: Decision, span: ByteRange | None = None, only: tuple[int, int, int] | None = None,
    ) -> None:
        """
        The blob from the swarm; with C{span}, those bytes first (206); with
        C{only} (C{(start, end, length)}, --no-prefetch), a download of
        those bytes alone, answered 206.
        """
        try:
            api = await self.peer.api()
        except Exception as e:
            raise P2PUnavailable(f"no dfpeer: {e}") from None
        body = self._download_body(request, decision)
        if only is not None:
            # a task of its own: its content is not the blob, so no digest names it
            body.pop("digest", None)
            body["range"] = f"bytes={only[0]}-{only[1] - 1}"
            body["prefetch"] = False
            span = None
        elif span is not None:
            # the SuperNode's CDN fetches these pieces from the registry first, out of order if need be
            body["range"] = span.header()
        try:
            response = await self.local_http.post(
                api + "/api/v1/downloads", json=body, timeout=10
            )
            answer = await response.json()
        except CancelledError:
            raise
        except Exception as e:
            self.peer.forget()
            raise P2PUnavailable(f"dfpeer at {api}: {e}") from None
        if response.code != 200:
            raise P2PUnavailable(f"dfpeer refused: {answer.get('error', {}).get('message', response.code)}")
        task_id = answer["taskId"]
        if self.splice and span is None and only is None and plain_client(request) is not None:
            if await self._p2p_spliced(request, decision, api, task_id):
                return
        # a range: the dfpeer streams those bytes first, the whole blob follows (prefetch)
        want = {"Range": span.header()} if span is not None else None
        try:
            stream = await self.local_http.get(
                f"{api}/api/v1/downloads/{task_id}/content", headers=want, unbuffered=True, timeout=P2P_START_TIMEOUT
            )
        except CancelledError:
            raise
        except Exception as e:
            raise P2PUnavailable(f"dfpeer stream: {e}") from None
        if stream.code == 416 and span is not None:
            # the length is known now, and the range is outside it
            await stream.content()
            request.setHeader(b"content-range", (stream.headers.getRawHeaders(b"content-range") or [b"bytes */*"])[0])
            _error(request, 416, "RANGE_NOT_SATISFIABLE", f"{span.header()} is outside the blob")
            return
        if stream.code not in (200, 206) or (stream.code == 206) != (span is not None):
            try:
                err = json.loads(await stream.content()).get("error", {})
            except Exception:
                err = {}
            raise P2PUnavailable(f"{err.get('code', stream.code)}: {err.get('message', '')}")
        self.counters.p2p += 1
        log.info("p2p {url} as task {task}", url=decision.url, task=task_id)
        request.setResponseCode(stream.code)
        if span is not None:
            self.counters.ranges += 1
            request.setHeader(b"content-range", stream.headers.getRawHeaders(b"content-range")[0])
        elif only is not None:
            self.counters.ranges += 1
            request.setResponseCode(206)
            request.setHeader(b"content-range", content_range(*only).encode())
        request.setHeader(b"accept-ranges", b"bytes")
        _set_length(request, stream)
        request.responseHeaders.setRawHeaders(b"content-type", stream.headers.getRawHeaders(b"content-type", []))
        _blob_headers(request, decision, task_id)
        complete = await _relay(request, stream, self._count_p2p)
        if not complete:
            self.counters.p2p_cut += 1
            log.warn("p2p {url}: stream cut short; the client's connection was cut too", url=decision.url)

    async def _p2p_spliced(self, request: Any, decision: Decision, api: str, task_id: str) -> bool:
        """
        The whole blob from the dfpeer's content stream, its body spliced
        from socket to socket (L{dragonfly.daemon.splice}); False, with
        nothing sent, when the dfpeer's answer is not a 200 with a length
        (the treq path then asks again and says why).
        """
        try:
            status, headers, conn = await fetch_head(
                self.reactor, api, f"/api/v1/downloads/{task_id}/content"
            ).addTimeout(P2P_START_TIMEOUT, self.reactor)
        except CancelledError:
            raise
        except Exception as e:
            log.info("p2p {url}: no spliced stream ({why}); relaying it", url=decision.url, why=str(e))
            return False
        length = headers.get(b"content-length", b"")
        if status != 200 or not length.isdigit() or len(length) > 19 or b"transfer-encoding" in headers:
            conn.transport.abortConnection()
            return False
        self.counters.p2p += 1
        self.counters.spliced += 1
        log.info("p2p {url} as task {task}", url=decision.url, task=task_id)
        request.setResponseCode(200)
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"content-length", length)
        if b"content-type" in headers:
            request.setHeader(b"content-type", headers[b"content-type"])
        _blob_headers(request, decision, task_id)
        out = plain_client(request)
        assert out is not None
        relay = SpliceRelay(self.reactor, request, out, conn, int(length))
        complete = await relay.start()
        self._count_p2p(relay.sent)
        if not complete:
            self.counters.p2p_cut += 1
            log.warn("p2p {url}: stream cut short; the client's connection was cut too", url=decision.url)
        return True

    async def _held(self, api: str, digest: str) -> bool:
        """Whether this host's dfpeer holds the whole blob (its task id is the digest's), asked locally."""
        try:
            tid = task_id("", digest=digest)
            response = await self.local_http.get(f"{api}/api/v1/downloads/{tid}", timeout=5)
            answer = await response.json()
        except CancelledError:
            raise
        except Exception:
            return False
        return response.code == 200 and answer.get("status") == "success"

    def _count_p2p(self, n: int) -> None:
        self.counters.p2p_bytes += n


def _drop(upstream: Deferred) -> None:
    """An upstream request no longer wanted: cancelled, or its answer's connection closed unread."""
    upstream.addCallback(lambda response: response.deliverBody(AbortBody()))
    upstream.addErrback(lambda f: None)
    upstream.cancel()


class _Relay(Protocol):
    """An upstream body into a client's request, paced by the client's transport."""

    #: the response body's transport, a push producer
    transport: Any

    def __init__(self, request: Any, count: Any, done: Deferred) -> None:
        self.request = request
        self.count = count
        self.done = done
        self.registered = False

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        self.registered = True
        self.request.notifyFinish().addErrback(self._client_gone)

    def _client_gone(self, _: Any) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.count(len(data))
        self.request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.registered:
            try:
                self.request.unregisterProducer()
            except RuntimeError:
                pass
        complete = reason.check(ResponseDone, PotentialDataLoss) is not None
        if self.request.finished or getattr(self.request, "_disconnected", False):
            pass
        elif complete:
            self.request.finish()
        else:
            # short of Content-Length: the client must see the body cut, not complete
            self.request.channel.transport.abortConnection()
        self.done.callback(complete)


class _VerifyingRelay(_Relay):
    """
    A relay that holds the latest chunk back until the next one comes, and
    the last one until the whole body matches C{digest}: a wrong body never
    reaches the client complete.  (Only the fallback path uses it; the hash
    runs here, on the reactor thread, in the chunks the transport delivers.)
    """

    def __init__(self, request: Any, count: Any, done: Deferred, digest: str) -> None:
        super().__init__(request, count, done)
        self.want = digest.split(":", 1)[1]
        self.hash = hashlib.sha256()
        self.held = b""

    def dataReceived(self, data: bytes) -> None:
        self.count(len(data))
        self.hash.update(data)
        if self.held:
            self.request.write(self.held)
        self.held = data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss) is not None:
            if self.hash.hexdigest() == self.want:
                if self.held and not self.request.finished and not getattr(self.request, "_disconnected", False):
                    self.request.write(self.held)
            else:
                reason = Failure(ValueError("digest mismatch"))
        self.held = b""
        super().connectionLost(reason)


def _relay(request: Any, response: Any, count: Any, digest: str | None = None) -> Deferred:
    done: Deferred = Deferred()
    if digest is not None and digest.startswith("sha256:"):
        response.deliverBody(_VerifyingRelay(request, count, done, digest))
    else:
        response.deliverBody(_Relay(request, count, done))
    return done


def _head_length(response: Any) -> int | None:
    """The Content-Length of a 200 answer to a HEAD (its body is empty: the length is the header's), or None."""
    if response.code != 200:
        return None
    values = response.headers.getRawHeaders(b"content-length") or []
    return int(values[0]) if len(values) == 1 and values[0].isdigit() and len(values[0]) <= 19 else None


def _set_length(request: Any, response: Any) -> None:
    """Twisted's client keeps Content-Length out of the headers, in C{length}: pass it on."""
    if isinstance(response.length, int):
        request.setHeader(b"content-length", str(response.length).encode())


def _finish(request: Any) -> None:
    if not request.finished and not getattr(request, "_disconnected", False):
        request.finish()


def _error(request: Any, status: int, code: str, message: str) -> None:
    """The API's JSON error envelope (L{dragonfly.core.httpapi}), unless the client left."""
    if request.finished or getattr(request, "_disconnected", False):
        return
    request.write(json_response(request, ApiError(status, code, message).body(), status))
    request.finish()


class ProxyResource(Resource):
    """Every request, whatever its path, to L{DaemonCore.handle}."""

    isLeaf = True

    def __init__(self, core: DaemonCore, status: Any = None, registry: Any = None) -> None:
        super().__init__()
        self.core = core
        self.status = status
        self.registry = registry

    def render(self, request: Any) -> Any:
        # dfdaemon's own pages: relative URIs only, never inside intercepted TLS
        own = request.method == b"GET" and getattr(request.channel, "dfd_base", None) is None
        if own and self.status is not None and request.uri == b"/_dfdaemon/status":
            return self.status(request)
        if own and self.registry is not None and request.uri == b"/metrics":
            return render_metrics(request, self.registry)
        d = Deferred.fromCoroutine(self.core.handle(request))

        def crashed(f: Any) -> None:
            log.failure("request {uri} crashed", f, uri=request.uri)
            if not request.startedWriting:
                _error(request, 500, "INTERNAL", f.getErrorMessage())
            else:
                request.channel.transport.abortConnection()

        d.addErrback(crashed)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

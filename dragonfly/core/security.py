"""
Access control shared by the SuperNode and dfpeer: bearer tokens and the
origin allow/deny policy.

Tokens are compared in constant time (L{hmac.compare_digest}).

The origin policy guards the SuperNode against being used to reach hosts it
should not (server-side request forgery): every origin URL is checked by name
and by every address its host resolves to, when a task is registered and
again when the connection is made (L{PolicyEndpointFactory}), so a name that
resolves to a denied network later (DNS rebinding) is refused too.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from .tls import HttpsPolicy, tls_client_endpoint

#: denied unless --origin-deny says otherwise: link-local addresses, where
#: cloud metadata services live (169.254.169.254); never a file origin
DEFAULT_DENY = "169.254.0.0/16,fe80::/10"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def tokens_equal(given: str | bytes | None, expected: str) -> bool:
    """Whether C{given} is the token C{expected}, in time independent of where they differ."""
    if given is None:
        return False
    if isinstance(given, str):
        given = given.encode("utf-8", "replace")
    return hmac.compare_digest(given, expected.encode("utf-8"))


def bearer(authorization: bytes | None) -> bytes | None:
    """The token of an C{Authorization: Bearer TOKEN} header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


class OriginDenied(Exception):
    """An origin the policy refuses."""


def _parse_entries(text: str, what: str) -> tuple[list[str], list[Network]]:
    names: list[str] = []
    nets: list[Network] = []
    for raw in text.split(","):
        entry = raw.strip().lower()
        if not entry or entry == "none":
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        name = entry[2:] if entry.startswith("*.") else entry
        if not name.strip(".") or any(c in name for c in "/: \t@"):
            raise ValueError(f"{what}: {raw.strip()!r} is neither a host name nor an address/CIDR")
        names.append(entry)
    return names, nets


def _name_matches(host: str, pattern: str) -> bool:
    """C{example.com} matches itself; C{.example.com} and C{*.example.com} match its subdomains."""
    if pattern.startswith("*."):
        pattern = pattern[1:]
    if pattern.startswith("."):
        return host.endswith(pattern)
    return host == pattern


class OriginPolicy:
    """
    Which origin hosts the SuperNode may fetch from.

    @param allow: comma-separated host names and CIDRs; when not empty, an
        origin must match one (by name, or with every address it resolves to
        in an allowed network).
    @param deny: comma-separated host names and CIDRs; an origin whose name
        matches, or any of whose addresses is in a denied network, is refused.
        Deny wins over allow.
    """

    def __init__(self, allow: str = "", deny: str = DEFAULT_DENY, resolve: Any = None) -> None:
        self.allow_names, self.allow_nets = _parse_entries(allow, "--origin-allow")
        self.deny_names, self.deny_nets = _parse_entries(deny, "--origin-deny")
        self._resolve = resolve

    @property
    def open(self) -> bool:
        """Whether no allow or deny list is configured."""
        return not (self.allow_names or self.allow_nets or self.deny_names or self.deny_nets)

    def check_addresses(self, host: str, addresses: Iterable[Address]) -> None:
        """Raise L{OriginDenied} unless C{host} at C{addresses} is allowed."""
        host = host.lower().rstrip(".")
        addresses = list(addresses)
        for pattern in self.deny_names:
            if _name_matches(host, pattern):
                raise OriginDenied(f"origin host {host} is denied (--origin-deny {pattern})")
        for addr in addresses:
            for net in self.deny_nets:
                if addr.version == net.version and addr in net:
                    raise OriginDenied(f"origin host {host} has address {addr}, in denied network {net}")
        if not (self.allow_names or self.allow_nets):
            return
        if any(_name_matches(host, p) for p in self.allow_names):
            return
        if addresses and all(
            any(a.version == n.version and a in n for n in self.allow_nets) for a in addresses
        ):
            return
        shown = ", ".join(str(a) for a in addresses) or "no address"
        raise OriginDenied(f"origin host {host} ({shown}) is not in --origin-allow")

    def check_url(self, url: str, pool: Any = None, reactor: Any = None) -> Deferred[list[Address]]:
        """
        Resolve C{url}'s host (in C{pool}, off the reactor thread) and check
        it; fires with its addresses, or fails with L{OriginDenied}.
        """
        host = urlsplit(url).hostname or ""
        port = urlsplit(url).port or (443 if url.lower().startswith("https:") else 80)
        return self.check_host(host, port, pool, reactor)

    def check_host(self, host: str, port: int, pool: Any = None, reactor: Any = None) -> Deferred[list[Address]]:
        """
        Fires with the checked addresses of C{host} (resolved in C{pool} or
        the reactor's pool), or fails with L{OriginDenied}.
        """
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is None:
            name = host.lower().rstrip(".")
            for pattern in self.deny_names:
                if _name_matches(name, pattern):
                    return _failed(OriginDenied(f"origin host {host} is denied (--origin-deny {pattern})"))
        if literal is None and (self.allow_names or self.allow_nets) and not self.allow_nets:
            # only names are allowed: a name not among them is refused without asking DNS
            if not any(_name_matches(host.lower().rstrip("."), p) for p in self.allow_names):
                return _failed(OriginDenied(f"origin host {host} is not in --origin-allow"))
        if literal is not None:
            try:
                self.check_addresses(host, [literal])
            except OriginDenied as e:
                return _failed(e)
            return succeed([literal])
        d: Deferred[list[Address]]
        if self._resolve is not None:
            d = self._resolve(host, port)
        elif pool is not None:
            d = pool.run(_getaddrinfo, host, port)
        else:
            d = deferToThreadPool(reactor, reactor.getThreadPool(), _getaddrinfo, host, port)

        def check(addresses: list[Address]) -> list[Address]:
            self.check_addresses(host, addresses)
            return addresses

        return d.addCallback(check)


def _failed(e: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(e)
    return d


def _getaddrinfo(host: str, port: int) -> list[Address]:
    seen: list[Address] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        addr = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if addr not in seen:
            seen.append(addr)
    if not seen:
        raise OSError(f"{host} has no address")
    return seen


class _CheckedEndpoint:
    """Resolve, check every address, then connect to a checked one (TLS on top for https)."""

    def __init__(self, factory: PolicyEndpointFactory, scheme: bytes, host: str, port: int) -> None:
        self._f = factory
        self._scheme = scheme
        self._host = host
        self._port = port

    def connect(self, protocol_factory: Any) -> Deferred[Any]:
        f = self._f
        d = f.policy.check_host(self._host, self._port, f.pool, f.reactor)

        def connect(addresses: list[Address]) -> Deferred[Any]:
            addr = addresses[0]
            cls = TCP6ClientEndpoint if addr.version == 6 else TCP4ClientEndpoint
            endpoint: Any = cls(f.reactor, str(addr), self._port, timeout=f.connect_timeout)
            if self._scheme == b"https":
                creator = f.tls_policy.creatorForNetloc(self._host.encode("idna"), self._port)
                endpoint = tls_client_endpoint(creator, endpoint)
            connecting: Deferred[Any] = endpoint.connect(protocol_factory)
            return connecting

        return d.addCallback(connect)


@implementer(IAgentEndpointFactory)
class PolicyEndpointFactory:
    """For C{Agent.usingEndpointFactory}: every origin connection passes the L{OriginPolicy}."""

    def __init__(self, reactor: Any, policy: OriginPolicy, pool: Any = None, tls_policy: Any = None, connect_timeout: float = 30.0) -> None:
        self.reactor = reactor
        self.policy = policy
        self.pool = pool
        self.tls_policy = tls_policy or HttpsPolicy()
        self.connect_timeout = connect_timeout

    def endpointForURI(self, uri: Any) -> _CheckedEndpoint:
        """An endpoint that checks the origin's addresses before it connects to C{uri}."""
        host = uri.host.decode("idna") if isinstance(uri.host, bytes) else uri.host
        return _CheckedEndpoint(self, uri.scheme, host, uri.port)

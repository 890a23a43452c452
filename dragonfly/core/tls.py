"""
TLS for the daemons, loaded when first used.

pyOpenSSL and cryptography take about 12 MiB of a daemon's RSS and 0.1 s of
its start-up (docs/benchmarks.md, "Memory"), and most SuperNodes and dfpeers
never speak TLS: only an https origin, an https SuperNode or a TLS API does.
Twisted's reactor (C{posixbase}, C{tcp}), C{endpoints} and C{web.client}
import pyOpenSSL when they are imported, if it is installed, and keep the
answer: without it they import fine and only their own TLS helpers are
missing (C{listenSSL}, C{startTLS}, C{wrapClientTLS},
C{BrowserLikePolicyForHTTPS}).  So C{twistd supernode} and C{twistd dfpeer}
import those four modules with pyOpenSSL hidden
(L{load_twisted_without_tls}, called by their plugin before their tap
module), and every TLS connection the daemons make or take goes through this
module, which imports C{twisted.internet.ssl} and C{twisted.protocols.tls}
(and pyOpenSSL with them) the first time a TLS connection is made:

  - L{HttpsPolicy} in place of C{BrowserLikePolicyForHTTPS} (the same
    checks: the system's or the given roots, service-identity host names);
  - L{tls_client_endpoint} in place of C{wrapClientTLS};
  - L{HttpsEndpointFactory} for an C{Agent} (C{Agent.usingEndpointFactory});
  - L{server_endpoint} for an endpoint description that may be C{ssl:},
    which listens as C{listenSSL} does (C{TLSMemoryBIOFactory} over TCP).

dfdaemon loads Twisted whole (its C{--hijack} proxy uses C{startTLS}); the
functions here work the same either way.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

#: the Twisted modules that look for pyOpenSSL when imported and keep the answer
TWISTED_TLS_AT_IMPORT = (
    "twisted.internet.tcp",
    "twisted.internet.posixbase",
    "twisted.internet.endpoints",
    "twisted.web.client",
)


def load_twisted_without_tls() -> bool:
    """
    Import L{TWISTED_TLS_AT_IMPORT} with pyOpenSSL hidden, so that loading
    the reactor, endpoints and the web client leaves pyOpenSSL and
    cryptography out of the process until this module's functions first
    make a TLS connection.  Does nothing (returns False) when pyOpenSSL or
    any of those modules is already loaded: the process then has TLS loaded
    anyway, or Twisted's modules already decided.
    """
    if "OpenSSL" in sys.modules or any(name in sys.modules for name in TWISTED_TLS_AT_IMPORT):
        return False
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]  # "import OpenSSL" raises ImportError
    try:
        for name in TWISTED_TLS_AT_IMPORT:
            importlib.import_module(name)
    finally:
        if sys.modules.get("OpenSSL", 0) is None:
            del sys.modules["OpenSSL"]
    return True


def pem_certificates(pem: bytes) -> list[bytes]:
    """Each PEM certificate block of C{pem}; ValueError if there is none."""
    marker = b"-----END CERTIFICATE-----"
    blocks = [b[b.index(b"-----BEGIN CERTIFICATE-----"):] + marker for b in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in b]
    if not blocks:
        raise ValueError("no PEM certificate in the file")
    return blocks


@implementer(IPolicyForHTTPS)
class HttpsPolicy:
    """
    What C{BrowserLikePolicyForHTTPS} does (servers verified against the
    system's roots, or only against C{roots}, with service-identity host
    name checks), with pyOpenSSL imported on the first connection.

    @param roots: C{twisted.internet.ssl.Certificate}s, or None for the system's roots.
    """

    def __init__(self, roots: list[Any] | None = None) -> None:
        self._roots = roots
        self._trust: Any = None

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        """The client connection creator for C{hostname} (port unused, as Twisted's)."""
        from twisted.internet import ssl

        if self._roots and self._trust is None:
            self._trust = ssl.trustRootFromCertificates(self._roots)
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust)


def load_certificates(pem: bytes) -> list[Any]:
    """
    The certificates of a PEM bundle as C{twisted.internet.ssl.Certificate}s
    (this loads pyOpenSSL); ValueError with a readable reason if one is bad
    or there is none.
    """
    from twisted.internet import ssl

    try:
        return [ssl.Certificate.loadPEM(block) for block in pem_certificates(pem)]
    except ValueError:
        raise
    except Exception as e:  # OpenSSL's errors
        raise ValueError(f"not a PEM certificate ({e})") from None


def https_policy(ca_file: str | None) -> HttpsPolicy:
    """
    A policy that verifies servers (service-identity hostname checks) against
    the system's roots, or only against the CA certificates in C{ca_file}.
    Raises ValueError with a readable reason for a bad file.
    """
    if not ca_file:
        return HttpsPolicy()
    try:
        with open(ca_file, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(str(e)) from None
    return HttpsPolicy(load_certificates(pem))


class TlsClientEndpoint:
    """C{wrapClientTLS(creator, endpoint)}: TLS from the first byte over C{endpoint}'s connection."""

    def __init__(self, creator: Any, endpoint: Any) -> None:
        self.creator = creator
        self.endpoint = endpoint

    def connect(self, protocol_factory: Any) -> Any:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        d = self.endpoint.connect(TLSMemoryBIOFactory(self.creator, True, protocol_factory))
        return d.addCallback(lambda protocol: protocol.wrappedProtocol)


def tls_client_endpoint(creator: Any, endpoint: Any) -> TlsClientEndpoint:
    """C{endpoint} with TLS on top (C{creator}: from an L{HttpsPolicy}'s C{creatorForNetloc})."""
    return TlsClientEndpoint(creator, endpoint)


@implementer(IAgentEndpointFactory)
class HttpsEndpointFactory:
    """
    For C{Agent.usingEndpointFactory}: what an C{Agent}'s own factory makes
    (a C{HostnameEndpoint}, with TLS for https), TLS through L{tls_client_endpoint}.
    """

    def __init__(self, reactor: Any, policy: Any = None, connect_timeout: float | None = None) -> None:
        self.reactor = reactor
        self.policy = policy if policy is not None else HttpsPolicy()
        self.connect_timeout = connect_timeout

    def endpointForURI(self, uri: Any) -> Any:
        """An endpoint for C{uri}: http and https only."""
        from twisted.internet.endpoints import HostnameEndpoint
        from twisted.web.error import SchemeNotSupported

        host = uri.host.decode("ascii")
        endpoint: Any = (
            HostnameEndpoint(self.reactor, host, uri.port) if self.connect_timeout is None
            else HostnameEndpoint(self.reactor, host, uri.port, timeout=self.connect_timeout)
        )
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            return tls_client_endpoint(self.policy.creatorForNetloc(uri.host, uri.port), endpoint)
        raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")


class _ListenSSLOverTCP:
    """
    The reactor with C{listenSSL} as Twisted's own reactor has it
    (C{TLSMemoryBIOFactory} in server mode over C{listenTCP}), for an
    C{ssl:} endpoint when Twisted was loaded without pyOpenSSL.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = "") -> Any:  # noqa: N802, N803
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return self._reactor.listenTCP(port, TLSMemoryBIOFactory(contextFactory, False, factory), backlog, interface)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def server_endpoint(reactor: Any, description: str) -> Any:
    """C{serverFromString(reactor, description)}, where C{ssl:} listens through L{_ListenSSLOverTCP}."""
    from twisted.internet.endpoints import serverFromString

    if description.split(":", 1)[0].strip().lower() == "ssl":
        return serverFromString(_ListenSSLOverTCP(reactor), description)
    return serverFromString(reactor, description)

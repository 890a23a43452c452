"""
Twisted application plugins for Dragonfly: C{twistd supernode}, C{twistd dfpeer}
and C{twistd dfdaemon}.

Each is one declaration; the real module is imported only when its subcommand
runs, so a broken import in one program never breaks C{twistd --help}.
"""

from typing import Any

from twisted.application.service import ServiceMaker
from twisted.python.reflect import namedAny


class _TlsWhenUsed(ServiceMaker):
    """
    A daemon that loads TLS (pyOpenSSL, cryptography: about 12 MiB) only when
    it first makes or takes a TLS connection: Twisted's reactor, endpoints and
    web client are imported without it before the tap module
    (L{dragonfly.core.tls.load_twisted_without_tls}).
    """

    @property
    def options(self) -> Any:  # type: ignore[override]
        from dragonfly.core.tls import load_twisted_without_tls

        load_twisted_without_tls()
        return namedAny(self.module).Options


supernode = _TlsWhenUsed(
    "Dragonfly SuperNode",
    "dragonfly.supernode.tap",
    "Dragonfly SuperNode: REST API, scheduler and CDN seed",
    "supernode",
)

dfpeer = _TlsWhenUsed(
    "Dragonfly peer",
    "dragonfly.peer.tap",
    "Dragonfly peer daemon: downloads and serves pieces (dfget talks to it)",
    "dfpeer",
)

dfdaemon = ServiceMaker(
    "Dragonfly dfdaemon",
    "dragonfly.daemon.tap",
    "Dragonfly dfdaemon: registry mirror and HTTP(S) proxy that pulls image blobs through the swarm",
    "dfdaemon",
)

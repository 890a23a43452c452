"""
Twisted application plugins for Dragonfly: C{twistd supernode}, C{twistd dfpeer}
and C{twistd dfdaemon}.

Each is one declaration; the real module is imported only when its subcommand
runs, so a broken import in one program never breaks C{twistd --help}.
"""

from twisted.application.service import ServiceMaker

supernode = ServiceMaker(
    "Dragonfly SuperNode",
    "dragonfly.supernode.tap",
    "Dragonfly SuperNode: REST API, scheduler and CDN seed",
    "supernode",
)

dfpeer = ServiceMaker(
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

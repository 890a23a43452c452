"""
SuperNode addresses as the programs take them (C{--supernode a:8002=2,https://b:8002}).

Plain functions with no Twisted import: dfget parses C{--node} with them
before anything else is loaded.  The parsing itself (and its errors) is
L{dragonfly.core.rendezvous.parse_nodes}.
"""

from __future__ import annotations

from .rendezvous import parse_nodes as parse_weighted


def parse_nodes(text: str, default_port: int = 8002) -> list[str]:
    """
    C{[https://]host[:port][=weight],...} to a list of C{host:port}, or
    C{https://host:port} for a SuperNode whose API speaks TLS, each followed
    by C{=weight} when its weight is not 1 (the form
    L{dragonfly.peer.client.SupernodeClient} and C{--supernode} take).
    Raises L{ValueError} on a bad address or weight (C{a:8002=x}), a node
    listed twice, or an empty list.
    """
    return [
        n.address + (f"={n.weight}" if n.weight != 1 else "") for n in parse_weighted(text, default_port)
    ]


def node_host(node: str) -> str:
    """The host of a L{parse_nodes} entry."""
    return node.split("=", 1)[0].split("://", 1)[-1].rpartition(":")[0].strip("[]")


def node_url(node: str) -> str:
    node = node.split("=", 1)[0]
    return node if "://" in node else f"http://{node}"

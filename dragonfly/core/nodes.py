"""
SuperNode addresses as the programs take them (C{--supernode a:8002=2,https://b:8002}).

Plain functions with no Twisted import: dfget parses C{--node} with them
before anything else is loaded (no attrs either).
L{dragonfly.core.rendezvous.parse_nodes} reads the same form into its nodes.
"""

from __future__ import annotations

#: the SuperNode API port when an address names none
DEFAULT_PORT = 8002


def _weight(text: str, part: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise ValueError(
            f"supernode weight {text!r} in {part!r} is not a whole number of at least 1 "
            "(the form is host[:port][=weight], e.g. 10.0.0.1:8002=2)"
        )
    return int(text)


def parse_weighted(text: str, default_port: int = DEFAULT_PORT) -> list[tuple[str, int]]:
    """
    Parse C{[https://]host[:port][=weight],...} (Dragonfly's form) to
    (canonical address, weight) pairs.

    A missing port is C{default_port}, a missing weight 1.  An IPv6 host is
    written in brackets (C{[::1]:8002}).  Raises L{ValueError} with a message
    fit for a startup error on a bad address, a weight that is not a whole
    number >= 1, a node listed twice, or an empty list.
    """
    nodes: list[tuple[str, int]] = []
    seen: set[str] = set()
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        address, sep, weight_text = part.partition("=")
        weight = _weight(weight_text.strip(), part) if sep else 1
        address = address.strip()
        scheme = ""
        for prefix in ("https://", "http://"):
            if address.lower().startswith(prefix):
                scheme, address = prefix, address[len(prefix):].rstrip("/")
        host, colon, port = address.rpartition(":")
        if not colon or "]" in port:
            host, port = address, str(default_port)
        if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
            raise ValueError(f"supernode address {part!r} is not host[:port] (an IPv6 host goes in brackets)")
        if not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"supernode address {part!r} is not host[:port][=weight]")
        canonical = f"{'https://' if scheme == 'https://' else ''}{host.lower()}:{int(port)}"
        if canonical in seen:
            raise ValueError(f"supernode {canonical} is listed twice")
        seen.add(canonical)
        nodes.append((canonical, weight))
    if not nodes:
        raise ValueError("no supernode given")
    return nodes


def parse_nodes(text: str, default_port: int = DEFAULT_PORT) -> list[str]:
    """
    C{[https://]host[:port][=weight],...} to a list of C{host:port}, or
    C{https://host:port} for a SuperNode whose API speaks TLS, each followed
    by C{=weight} when its weight is not 1 (the form
    L{dragonfly.peer.client.SupernodeClient} and C{--supernode} take).
    Raises L{ValueError} on a bad address or weight (C{a:8002=x}), a node
    listed twice, or an empty list.
    """
    return [address + (f"={weight}" if weight != 1 else "") for address, weight in parse_weighted(text, default_port)]


def node_host(node: str) -> str:
    """The host of a L{parse_nodes} entry."""
    return node.split("=", 1)[0].split("://", 1)[-1].rpartition(":")[0].strip("[]")


def node_url(node: str) -> str:
    node = node.split("=", 1)[0]
    return node if "://" in node else f"http://{node}"

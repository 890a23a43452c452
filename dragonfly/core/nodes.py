"""
SuperNode addresses as the programs take them (C{--supernode a:8002,https://b:8002}).

Plain functions with no Twisted import: dfget parses C{--node} with them
before anything else is loaded.
"""

from __future__ import annotations


def parse_nodes(text: str, default_port: int = 8002) -> list[str]:
    """
    C{[https://]host[:port][=weight],...} to a list of C{host:port}, or
    C{https://host:port} for a SuperNode whose API speaks TLS (weights are ignored).
    """
    nodes = []
    for part in text.split(","):
        part = part.strip().split("=", 1)[0]
        if not part:
            continue
        scheme = ""
        for prefix in ("https://", "http://"):
            if part.lower().startswith(prefix):
                scheme, part = prefix.lower(), part[len(prefix):].rstrip("/")
        host, sep, port = part.rpartition(":")
        if not sep or "]" in port:
            host, port = part, str(default_port)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"supernode address {part!r} is not host[:port]")
        nodes.append(f"{'https://' if scheme == 'https://' else ''}{host}:{int(port)}")
    if not nodes:
        raise ValueError("no supernode given")
    return nodes


def node_host(node: str) -> str:
    """The host of a L{parse_nodes} entry."""
    return node.split("://", 1)[-1].rpartition(":")[0].strip("[]")


def node_url(node: str) -> str:
    return node if "://" in node else f"http://{node}"

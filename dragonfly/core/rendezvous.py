"""
Which SuperNode owns a task: weighted rendezvous hashing.

A peer given C{--supernode a:8002=2,b:8002,c:8002} ranks the nodes for each
task id by I{weighted rendezvous hashing} (highest random weight): every
(node, task) pair gets a pseudo-random score from a hash of both, scaled by
the node's weight, and the nodes are tried in descending score.  The first
is the task's owner; the rest are its failover order.  Every peer computes
the same ranking with no coordination, and it moves as little as possible:

  - a node that joins takes over only the tasks it now ranks first for;
    the order of the other nodes is unchanged for every task;
  - a node that leaves hands over only its own tasks, each to the node that
    ranked second for it;
  - a node of weight w owns about w / (sum of weights) of the tasks.

The score is C{weight / -ln(h)} with C{h} uniform in (0, 1) from BLAKE2b of
the node's address and the task id (the logarithm method of Schindelhauer
and Schomaker, "Weighted distributed hash tables", 2005): the chance that a
node ranks first is exactly its share of the total weight.

A pure module: no I/O.  L{parse_nodes} reads Dragonfly's
C{host:port[=weight],...} form.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

from attrs import frozen

__all__ = ["Node", "owner", "parse_nodes", "rank", "score"]

#: the SuperNode API port when an address names none
DEFAULT_PORT = 8002


@frozen
class Node:
    """A SuperNode: its address (C{host:port}, or C{https://host:port}) and weight."""

    address: str
    weight: int = 1


def _weight(text: str, part: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise ValueError(
            f"supernode weight {text!r} in {part!r} is not a whole number of at least 1 "
            "(the form is host[:port][=weight], e.g. 10.0.0.1:8002=2)"
        )
    return int(text)


def parse_nodes(text: str, default_port: int = DEFAULT_PORT) -> list[Node]:
    """
    Parse C{[https://]host[:port][=weight],...} (Dragonfly's form).

    A missing port is C{default_port}, a missing weight 1.  An IPv6 host is
    written in brackets (C{[::1]:8002}).  Raises L{ValueError} with a message
    fit for a startup error on a bad address, a weight that is not a whole
    number >= 1, a node listed twice, or an empty list.
    """
    nodes: list[Node] = []
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
        nodes.append(Node(canonical, weight))
    if not nodes:
        raise ValueError("no supernode given")
    return nodes


def score(node: Node, task_id: str) -> float:
    """The rendezvous score of C{node} for C{task_id}: higher ranks first."""
    digest = hashlib.blake2b(
        node.address.encode("utf-8") + b"\0" + task_id.encode("utf-8"), digest_size=8, person=b"dragonfly-hrw",
    ).digest()
    # 53 random bits: uniform in (0, 1), never 0 or 1
    h = ((int.from_bytes(digest, "big") >> 11) + 0.5) / 2.0**53
    return node.weight / -math.log(h)


def rank(nodes: Iterable[Node], task_id: str) -> list[Node]:
    """C{nodes} in the order a peer tries them for C{task_id}: its owner first."""
    return sorted(nodes, key=lambda n: (-score(n, task_id), n.address))


def owner(nodes: Sequence[Node], task_id: str) -> Node:
    """The node that owns C{task_id}."""
    if not nodes:
        raise ValueError("no supernode given")
    return min(nodes, key=lambda n: (-score(n, task_id), n.address))

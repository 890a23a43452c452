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

from .nodes import DEFAULT_PORT, parse_weighted

__all__ = ["Node", "owner", "parse_nodes", "rank", "score"]


@frozen
class Node:
    """A SuperNode: its address (C{host:port}, or C{https://host:port}) and weight."""

    address: str
    weight: int = 1


def parse_nodes(text: str, default_port: int = DEFAULT_PORT) -> list[Node]:
    """
    Parse C{[https://]host[:port][=weight],...} (Dragonfly's form).

    A missing port is C{default_port}, a missing weight 1.  An IPv6 host is
    written in brackets (C{[::1]:8002}).  Raises L{ValueError} with a message
    fit for a startup error on a bad address, a weight that is not a whole
    number >= 1, a node listed twice, or an empty list.  (The parser is
    L{dragonfly.core.nodes.parse_weighted}, which loads no attrs for dfget.)
    """
    return [Node(address, weight) for address, weight in parse_weighted(text, default_port)]


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

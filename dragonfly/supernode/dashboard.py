"""
What the SuperNode's dashboard (C{/ui}) shows: its JSON view and the traffic history.

The page polls C{GET /api/v1/dashboard} about once a second.  The answer
holds the newest tasks with every member's piece bitmap (from the
scheduler), the registered peers, the traffic counters (origin, seed and
peer-to-peer bytes since the SuperNode started) and the last few minutes of
those counters, sampled every L{SAMPLE_INTERVAL} seconds into a bounded ring
(L{dragonfly.core.traffic.TrafficHistory}).  The page turns consecutive samples into rates.
"""

from __future__ import annotations

import base64
from typing import Any

from ..core.bitmap import Bitmap
from ..core.traffic import HISTORY_SAMPLES, SAMPLE_INTERVAL, TrafficHistory, TrafficSample

__all__ = ["DEFAULT_TASKS", "HISTORY_SAMPLES", "MAX_TASKS", "SAMPLE_INTERVAL", "TrafficHistory", "TrafficSample", "dashboard_view"]

#: tasks in one answer, newest first, unless the client asks for another number
DEFAULT_TASKS = 20
MAX_TASKS = 200


def _bitmap(bits: Bitmap | None) -> str | None:
    """A piece bitmap as base64 of its MSB-first bytes (as on the wire)."""
    return base64.b64encode(bits.to_bytes()).decode("ascii") if bits is not None else None


def dashboard_view(node: Any, max_tasks: int = DEFAULT_TASKS) -> dict[str, Any]:
    """The JSON body of C{GET /api/v1/dashboard}, from a L{dragonfly.supernode.node.SuperNode}."""
    sched = node.scheduler
    cdn_tasks = list(node.cdn.tasks.values())
    tasks = []
    memberships: dict[str, int] = {}
    for swarm in sched.tasks.values():
        for peer_id in swarm.members:
            memberships[peer_id] = memberships.get(peer_id, 0) + 1
    # newest first: the CDN keeps tasks in the order they were first asked for
    for task in reversed(cdn_tasks[-max_tasks:] if max_tasks else []):
        view = task.to_json()
        view["peerBytes"] = node.task_peer_bytes.get(task.task_id, 0)
        view["seedBitmap"] = _bitmap(task.available)
        swarm = sched.tasks.get(task.task_id)
        members = []
        if swarm is not None:
            for peer_id in sorted(swarm.members):
                m = swarm.members[peer_id]
                members.append({
                    "peerId": peer_id,
                    "piecesDone": len(m.have) if m.have is not None else 0,
                    "done": m.done,
                    "bitmap": _bitmap(m.have),
                    "parents": len(m.parents),
                    "seedPieces": len(m.seed),
                    "lastSync": m.last_sync,
                })
        view["members"] = members
        tasks.append(view)
    peers = [
        {
            "peerId": p.peer_id, "ip": p.ip, "port": p.port, "hostname": p.hostname,
            "lastSeen": p.last_seen, "tasks": memberships.get(p.peer_id, 0),
        }
        for p in sorted(sched.peers.values(), key=lambda p: p.peer_id)
    ]
    return {
        "now": node.clock.seconds(),
        "sampleInterval": SAMPLE_INTERVAL,
        "totals": {"originBytes": node.cdn.origin_bytes, "seedBytes": node.seed_bytes, "peerBytes": node.peer_bytes},
        "traffic": node.traffic.to_json(),
        "taskCount": len(cdn_tasks),
        "tasks": tasks,
        "peers": peers,
    }

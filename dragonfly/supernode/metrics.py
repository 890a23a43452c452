"""
The SuperNode's Prometheus metrics, read from the live L{SuperNode} at every
scrape (see L{dragonfly.core.metrics} and docs/metrics.md).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import Metric

from ..core.metrics import bounded, counter, gauge, histogram
from .node import TAG_KINDS, SuperNode
from .scheduler import DROP_REASONS

P = "dragonfly_supernode"

CDN_STATUSES = ("waiting", "running", "success", "failed")
#: the CDN's failure codes (dragonfly.supernode.cdn, dragonfly.core.bodywriter)
FETCH_FAILURES = (
    "SOURCE_UNREACHABLE", "SOURCE_ERROR", "SOURCE_TIMEOUT", "SOURCE_TRUNCATED", "SOURCE_TOO_LONG",
    "DIGEST_MISMATCH", "STORE_FAILED", "INTERNAL",
)


def collect(node: SuperNode) -> Iterable[Metric]:
    cdn, sched = node.cdn, node.scheduler
    statuses = dict.fromkeys(CDN_STATUSES, 0)
    for task in cdn.tasks.values():
        statuses[task.status] = statuses.get(task.status, 0) + 1
    yield gauge(f"{P}_tasks", "Tasks in the CDN cache, by CDN status.", statuses, "cdnstatus")
    yield gauge(f"{P}_peers", "Registered peers.", len(sched.peers))
    yield gauge(
        f"{P}_task_peers", "Peers taking part in a task, summed over tasks.",
        sum(len(s.members) for s in sched.tasks.values()),
    )
    yield counter(f"{P}_cdn_cache_hits_total", "Task registrations served without a new origin fetch.", cdn.cache_hits)
    yield counter(f"{P}_cdn_cache_misses_total", "Task registrations that started an origin fetch.", cdn.origin_fetches)
    failures = dict.fromkeys((c.lower() for c in FETCH_FAILURES), 0)
    for code, n in cdn.fetch_failures.items():
        key = bounded(code, FETCH_FAILURES, "OTHER").lower()
        failures[key] = failures.get(key, 0) + n
    yield counter(f"{P}_cdn_fetch_failures_total", "Origin fetches that failed, by reason.", failures, "reason")
    yield counter(f"{P}_origin_bytes_total", "Bytes downloaded from origins.", cdn.origin_bytes)
    yield counter(f"{P}_seed_pieces_total", "Pieces the seed served to peers.", node.seed_pieces)
    yield counter(f"{P}_seed_bytes_total", "Bytes the seed served to peers.", node.seed_bytes)
    yield histogram(
        f"{P}_schedule_duration_seconds", "Time to take a peer's sync report and choose its parents and seed pieces.",
        node.schedule_seconds,
    )
    yield counter(f"{P}_parent_blocks_total", "Parents blocked for a child after repeated failures.", sched.blocks)
    drops = {r: sched.drops.get(r, 0) for r in DROP_REASONS}
    yield counter(f"{P}_peer_drops_total", "Peers dropped by the scheduler, by reason.", drops, "reason")
    # taking tasks over from their swarms (--piece-key-file; docs/scale.md)
    yield counter(f"{P}_takeover_tasks_total", "Tasks taken over from a swarm instead of fetched whole.", cdn.adopted_tasks)
    yield counter(
        f"{P}_takeover_pieces_adopted_total", "Piece digests of taken-over tasks adopted from peers' valid tags.",
        node.adopted_pieces,
    )
    refused = {k: node.refused_tag_kinds.get(k, 0) for k in TAG_KINDS}
    yield counter(
        f"{P}_takeover_tags_refused_total", "Tags that did not check (forged, missing, another key or version), by what they vouched for.",
        refused, "kind",
    )
    yield gauge(
        f"{P}_takeover_peer_held_tasks", "Tasks taken over whose swarm holds them whole, this node's copy partial (counted as running in tasks).",
        sum(1 for t in cdn.tasks.values() if t.peer_held),
    )
    yield counter(
        f"{P}_takeover_fill_bytes_total", "Origin bytes fetched to fill taken-over tasks (pieces no peer held; in origin_bytes_total too).",
        cdn.fill_bytes,
    )

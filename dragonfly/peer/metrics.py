"""
A dfpeer's Prometheus metrics: totals the daemon and its tasks keep in
L{PeerStats}, and gauges read from the live daemon at every scrape (see
L{dragonfly.core.metrics} and docs/metrics.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from attrs import define, field
from prometheus_client.core import Metric

from ..core.metrics import SECONDS, Distribution, counter, gauge, histogram

P = "dragonfly_dfpeer"

#: where a downloaded piece's bytes came from
TRAFFIC_TYPES = ("back_to_source", "supernode", "remote_peer")
TASK_STATUSES = ("waiting", "running", "success", "failed")
#: why a download failed: TaskFailed codes mapped to a few reasons
FAILURE_REASONS = {
    "SOURCE_ERROR": "origin_error",
    "SOURCE_UNREACHABLE": "origin_unreachable",
    "SOURCE_TIMEOUT": "origin_unreachable",
    "SOURCE_TRUNCATED": "origin_unreachable",
    "SOURCE_TOO_LONG": "origin_error",
    "DIGEST_MISMATCH": "digest_mismatch",
    "P2P_FAILED": "p2p_failed",
    "STORE_FAILED": "disk",
    "INTERNAL": "internal",
}
REASONS = (*sorted(set(FAILURE_REASONS.values())), "other")
#: why a task went back to the origin
BACK_TO_SOURCE = ("supernode_unreachable", "supernode_lost", "supernode_cannot_reach_origin")
#: received piece bytes that did not become part of the file
DISCARD_REASONS = ("duplicate", "corrupt", "cancelled")
#: why a neighbour was banned
BAN_REASONS = ("corrupt", "stalled")


def failure_reason(code: str) -> str:
    return FAILURE_REASONS.get(code, "other")


def _zeros(keys: Iterable[str]) -> dict[str, int]:
    return dict.fromkeys(keys, 0)


@define
class PeerStats:
    """Totals since the daemon started (counters never go down)."""

    traffic: dict[str, int] = field(factory=lambda: _zeros(TRAFFIC_TYPES))
    discarded: dict[str, int] = field(factory=lambda: _zeros(DISCARD_REASONS))
    upload_pieces: int = 0
    upload_bytes: int = 0
    downloads: dict[str, int] = field(factory=lambda: _zeros(("success", "failed")))
    failures: dict[str, int] = field(factory=lambda: _zeros(REASONS))
    back_to_source: dict[str, int] = field(factory=lambda: _zeros(BACK_TO_SOURCE))
    bans: dict[str, int] = field(factory=lambda: _zeros(BAN_REASONS))
    durations: Distribution = field(factory=lambda: Distribution(SECONDS))

    def count(self, table: dict[str, int], key: str, n: int = 1) -> None:
        """Add C{n} under C{key}, a key the table was made with (labels stay bounded)."""
        if key not in table:
            raise KeyError(f"{key!r} is not one of {sorted(table)}")
        table[key] += n


def collect(daemon: Any) -> Iterable[Metric]:
    stats: PeerStats = daemon.stats
    yield counter(
        f"{P}_download_traffic_bytes_total",
        "Bytes of downloaded files by where they came from (verified pieces; back_to_source: bytes from the origin).",
        stats.traffic, "type",
    )
    yield counter(
        f"{P}_discarded_bytes_total", "Piece bytes received and thrown away: endgame duplicates, corrupt pieces, pieces that arrived after their CANCEL.",
        stats.discarded, "reason",
    )
    yield counter(f"{P}_upload_pieces_total", "Pieces served to other peers.", stats.upload_pieces)
    yield counter(f"{P}_upload_bytes_total", "Bytes served to other peers.", stats.upload_bytes)
    yield counter(f"{P}_downloads_total", "Downloads that ended, by result.", stats.downloads, "result")
    yield counter(f"{P}_download_failures_total", "Downloads that failed, by reason.", stats.failures, "reason")
    yield histogram(f"{P}_download_duration_seconds", "Duration of successful downloads.", stats.durations)
    yield counter(
        f"{P}_back_to_source_total", "Downloads that went to the origin instead of the swarm, by reason.",
        stats.back_to_source, "reason",
    )
    yield counter(f"{P}_peer_bans_total", "Neighbours banned by a download, by reason.", stats.bans, "reason")
    statuses = _zeros(TASK_STATUSES)
    for task in list(daemon.tasks.values()):
        statuses[task.status] = statuses.get(task.status, 0) + 1
    yield gauge(f"{P}_tasks", "Tasks on this peer by status (running: being downloaded).", statuses, "status")
    yield gauge(f"{P}_connections", "Open block-protocol connections.", len(daemon.block_factory.connections))
    yield gauge(f"{P}_registered", "1 while registered with a SuperNode.", 1 if daemon.registered else 0)

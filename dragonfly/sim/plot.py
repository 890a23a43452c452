"""
A simulated run's completion against the bound, as a PNG (matplotlib, the
C{bench} extra, as bench/swarm.py draws its plots).

Left: each peer's completion time over its bound, peers sorted (a CDF on
its side), per link class and for all, with the issue's targets (p50 1.10,
p99 1.30).  Right: completion times in seconds, sorted, with the time a
SuperNode was killed when one was.
"""

from __future__ import annotations

from .swarm import Result


def plot(result: Result, path: str, title: str) -> None:
    """Draw C{result} into C{path} (PNG). Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ratios = result.ratios()
    n = len(ratios)
    left.plot([(k + 1) / n for k in range(n)], ratios, color="black", lw=2, label=f"all {n} peers")
    by: dict[str, list[float]] = {}
    for label, c, b in zip(result.links, result.completion, result.bounds, strict=False):
        by.setdefault(label, []).append(c / b)
    for label, r in sorted(by.items()):
        r.sort()
        left.plot([(k + 1) / len(r) for k in range(len(r))], r, lw=1, label=f"{label} Mbit/s ({len(r)})")
    left.axhline(1.10, color="grey", ls="--", lw=0.8)
    left.axhline(1.30, color="grey", ls=":", lw=0.8)
    left.text(0.01, 1.10, "p50 target 1.10", va="bottom", fontsize=7, color="grey")
    left.text(0.01, 1.30, "p99 target 1.30", va="bottom", fontsize=7, color="grey")
    left.set_xlabel("fraction of peers")
    left.set_ylabel("completion / bound")
    left.set_ylim(bottom=0.95)
    left.legend(fontsize=7, loc="upper left")
    left.grid(alpha=0.3)
    done = sorted(result.completion)
    right.plot(range(1, n + 1), done, color="black", lw=1.5)
    if result.kill_at is not None:
        right.axhline(result.kill_at, color="red", ls="--", lw=1, label=f"owner killed at {result.kill_at:g} s")
        right.legend(fontsize=7, loc="upper left")
    right.set_xlabel("peers done")
    right.set_ylabel("completion time (s)")
    right.set_yscale("log")
    right.grid(alpha=0.3, which="both")
    s = result.summary()
    fig.suptitle(
        f"{title}: p50 {s['p50_over_bound']:.2f}, p99 {s['p99_over_bound']:.2f}, max {s['max_over_bound']:.2f} "
        f"over bound; origin {s['origin_copies']:.2f}, seed {s['seed_copies']:.2f} copies",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

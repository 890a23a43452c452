"""python -m dragonfly.sim: run one simulated flash crowd and print how close it came to the bound."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..core.pieces import TARGET_PIECES
from ..core.units import parse_size

#: what the command line runs with unless told otherwise: every object from
#: glibc's malloc (not pymalloc's arenas), which asks the kernel for huge pages
#: (transparent, 2 MiB): a 10,000-peer run walks some hundreds of MB of
#: pickers at random, and with 4 KiB pages most of those reads miss the TLB
HUGE_PAGES = {"PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def huge_pages_env(environ: dict[str, str], platform: str = sys.platform) -> dict[str, str] | None:
    """
    The environment to run the simulator again in (None: run in this one):
    L{HUGE_PAGES} on Linux, unless C{DRAGONFLY_SIM_HUGE_PAGES=0} or the caller
    chose an allocator or glibc tunables itself.
    """
    if platform != "linux" or environ.get("DRAGONFLY_SIM_HUGE_PAGES", "1") == "0":
        return None
    if any(k in environ for k in HUGE_PAGES):
        return None
    return dict(environ) | HUGE_PAGES


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--compiled-picker" in args:
        # before the simulator's modules import the pure one
        from .compiled import load

        load()
    from .swarm import DEFAULT_LINKS, TAKEOVER, Config, Simulation, parse_links

    p = argparse.ArgumentParser(
        prog="python -m dragonfly.sim",
        description="Simulate N peers fetching one file through the real Scheduler and Picker on a fluid network.",
    )
    p.add_argument("--peers", type=int, default=100)
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--size", default="1G", help="file size (default 1G)")
    p.add_argument("--piece-size", default=None, help="piece size (default: the SuperNode's auto rule)")
    p.add_argument("--target-pieces", type=int, default=TARGET_PIECES,
                   help=f"pieces a file for the auto rule (default {TARGET_PIECES}, the SuperNode's; 512 gives 2 MiB for 1 GiB)")
    p.add_argument("--max-grow", type=float, default=1.0,
                   help="the picker's in-flight limit may grow to this many times --in-flight by its neighbours' rates (default 1: it holds)")
    p.add_argument("--slowest", type=int, default=0, metavar="K",
                   help="print the K peers furthest over their bound and what they waited on (stderr)")
    p.add_argument("--links", default=DEFAULT_LINKS, help="peer link mix: down/up@latency_ms:share,... in Mbit/s")
    p.add_argument("--seed-mbit", type=float, default=2000.0, help="the SuperNode's uplink, Mbit/s")
    p.add_argument("--origin-mbit", type=float, default=2000.0, help="the CDN's fetch from the origin, Mbit/s")
    p.add_argument("--in-flight", default="6M", help="pieces in flight per peer, in bytes (the dfpeer's --in-flight; at least 4 pieces)")
    p.add_argument("--in-flight-time", type=float, default=0.0, metavar="T",
                   help="a peer's in-flight limit is at least what its downlink carries in T seconds (default 0: --in-flight for all)")
    p.add_argument("--fill-degree", action="store_true",
                   help="the scheduler gives a peer few chose as a parent more parents (Scheduler.fill_degree)")
    p.add_argument("--spread", type=float, default=0.0, help="peers arrive uniformly within this many seconds")
    p.add_argument("--dt", type=float, default=0.005, help="the shortest network step, seconds (flows started within a step catch up on the next)")
    p.add_argument("--classic-picker", action="store_true", help="the picker without its rate rules (for comparison)")
    p.add_argument("--supernodes", type=int, default=1, help="SuperNodes; the task goes to the first of its rendezvous ranking")
    p.add_argument("--kill-supernode", type=float, default=None, metavar="AT",
                   help="the task's owner dies AT seconds in; its peers move to the next node of the ranking")
    p.add_argument("--takeover", choices=TAKEOVER, default="full",
                   help="what the next node fetches from the origin: the whole file (today's CDN) or what no peer holds")
    p.add_argument("--fill-on-have", action="store_true",
                   help="run the whole picker on every HAVE (the dfpeer offers the piece to its announcer only)")
    p.add_argument("--compiled-picker", action="store_true",
                   help="run the picker compiled by mypyc (built once per source into ~/.cache/dragonfly-sim; same decisions, faster)")
    p.add_argument("--plot", metavar="PNG", help="draw completion against the bound into PNG (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="the last line is one JSON object")
    p.add_argument("--progress", action="store_true", help="a line on stderr about once a simulated second")
    a = p.parse_args(argv)
    try:
        parse_links(a.links)
        size = parse_size(a.size)
        piece = parse_size(a.piece_size) if a.piece_size else None
        in_flight = parse_size(a.in_flight)
    except ValueError as e:
        p.error(str(e))
    if a.max_grow < 1:
        p.error("--max-grow must be at least 1")
    if a.in_flight_time < 0:
        p.error("--in-flight-time must be at least 0")
    if a.target_pieces < 1:
        p.error("--target-pieces must be at least 1")
    if a.peers < 1:
        p.error("--peers must be at least 1")
    if a.supernodes < 1:
        p.error("--supernodes must be at least 1")
    if a.kill_supernode is not None and a.supernodes < 2:
        p.error("--kill-supernode needs --supernodes 2 or more")
    config = Config(peers=a.peers, file_size=size, piece_size=piece, links=a.links, seed_mbit=a.seed_mbit,
                    origin_mbit=a.origin_mbit, in_flight_bytes=in_flight, arrival_spread=a.spread, dt=a.dt, seed=a.seed,
                    classic=a.classic_picker, supernodes=a.supernodes, kill_at=a.kill_supernode,
                    takeover=a.takeover, fill_on_have=a.fill_on_have, target_pieces=a.target_pieces,
                    max_grow=a.max_grow, in_flight_time=a.in_flight_time,
                    fill_degree=a.fill_degree)
    progress = (lambda line: print(line, file=sys.stderr, flush=True)) if a.progress else None
    run = Simulation(config, progress).run()
    result = run.summary() | ({"compiled_picker": True} if a.compiled_picker else {}) | (
        {"allocator": os.environ["PYTHONMALLOC"]} if "PYTHONMALLOC" in os.environ else {})
    for d in run.slowest(a.slowest):
        print(json.dumps(d), file=sys.stderr)
    if a.plot:
        from .plot import plot

        title = f"{a.peers:,} peers, {a.size}" + (f", {a.supernodes} SuperNodes" if a.supernodes > 1 else "")
        try:
            plot(run, a.plot, title)
        except ImportError:
            print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    env = huge_pages_env(dict(os.environ))
    if env is not None:
        # the allocator is chosen at start-up: the same command again, in that environment
        os.execve(sys.executable, [sys.executable, "-m", "dragonfly.sim", *sys.argv[1:]], env)
    sys.exit(main())

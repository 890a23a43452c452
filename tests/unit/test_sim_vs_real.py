"""
The simulator against the real swarm: the same scenario, the same shape.

The real numbers are those of C{python -m bench.swarm} (docs/bench/results.json,
run 2026-12-01 23:54-23:56 UTC): real twistd SuperNode and dfpeers on an
emulated network (bench.netem), 64 MiB, every peer 80 Mbit/s up and down, the
SuperNode's and the origin's links 160 Mbit/s, pieces by the SuperNode's
auto rule (1 MiB), no added delay.  The simulator has no TCP/IP headers (the
real peers' links carried 1.06-1.14 copies of the file each) and no CPU
limit, so its times are a little shorter; the seed's copies, the share of
bytes from peers and the spread of completion times must match.
"""

from __future__ import annotations

import pytest

from dragonfly.sim.swarm import Config, Simulation

#: N -> (each dfpeer's seconds, sorted; origin copies; SuperNode (seed) copies;
#: p2p share), from docs/bench/results.json
REAL = {
    5: ([8.27, 8.35, 8.36, 8.67, 8.67], 1.0, 1.0, 0.80),
    10: ([8.82, 9.08, 9.44, 9.45, 9.61, 9.85, 9.99, 10.02, 10.21, 10.26], 1.0, 1.0, 0.90),
    20: ([9.98, 10.53, 10.54, 10.55, 10.55, 10.6, 10.63, 10.64, 10.65, 10.75, 10.75, 10.76, 10.77, 10.81, 10.82,
          10.82, 10.89, 10.93, 10.97, 11.11], 1.0, 1.094, 0.945),
}
#: TCP/IP headers: a link carries this many bytes per byte of the file at best
HEADERS = 1.05


@pytest.mark.parametrize("n", sorted(REAL))
def test_the_simulator_matches_the_real_swarm(n: int) -> None:
    seconds, origin, seed, p2p = REAL[n]
    result = Simulation(Config(peers=n, file_size=64 << 20, links="80/80@0.1:1", seed_mbit=160.0,
                               origin_mbit=160.0, seed=1)).run()
    s = result.summary()
    assert s["piece_bytes"] == 1 << 20
    assert s["origin_copies"] == origin
    # the seed sends each piece once (and a few twice at 20 peers), as the real one did
    assert abs(s["seed_copies"] - seed) <= 0.05
    assert abs(s["p2p_share"] - p2p) <= 0.02
    # completion, rank by rank, with the headers' overhead: within 20% below the real one (its CPU), 10% above
    sim = sorted(result.completion)
    for k, (mine, real) in enumerate(zip(sim, seconds, strict=True)):
        assert 0.8 * real <= mine * HEADERS <= 1.1 * real, (k, mine, real)
    # the same order of magnitude of spread: the last no more than 30% after the first
    assert sim[-1] <= 1.3 * sim[0]

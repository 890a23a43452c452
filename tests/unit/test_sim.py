"""
Tests for L{dragonfly.sim}: the fluid network's max-min fair rates, and a
small simulated swarm driving the real Scheduler and Picker.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly.sim.__main__ import main
from dragonfly.sim.network import Flow, FluidNetwork, Host
from dragonfly.sim.swarm import Config, Simulation, parse_links

# -- the network ------------------------------------------------------------------------


def test_max_min_shares() -> None:
    n = FluidNetwork()
    a, b, c = Host("a", 100, 100), Host("b", 100, 30), Host("c", 100, 100)
    f1 = n.start(Flow(a, b, 1000))
    f2 = n.start(Flow(a, c, 1000))
    f3 = n.start(Flow(c, b, 1000))
    n.allocate()
    # b's downlink (30) is shared by f1 and f3; f2 takes what is left of a's uplink
    assert (f1.rate, f2.rate, f3.rate) == (15.0, 85.0, 15.0)


def test_advance_reports_exact_finish_times() -> None:
    n = FluidNetwork()
    a, b = Host("a", 10, 100), Host("b", 100, 100)
    small = n.start(Flow(a, b, 10))
    big = n.start(Flow(a, b, 100))
    assert n.next_completion() == 2.0  # 5 bytes/s each
    done = n.advance(3.0)
    assert [(at, f) for at, f in done] == [(2.0, small)]
    assert big.done == 15.0 and a.bytes_up == 25.0
    assert n.next_completion() == 8.5  # alone now: 10 bytes/s for the 85 left


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 50), st.integers(1, 50)), min_size=2, max_size=8),
    st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=30),
)
def test_rates_are_max_min_fair(caps: list[tuple[int, int]], pairs: list[tuple[int, int]]) -> None:
    hosts = [Host(str(k), up, down) for k, (up, down) in enumerate(caps)]
    n = FluidNetwork()
    flows = [n.start(Flow(hosts[s % len(hosts)], hosts[d % len(hosts)], 1.0)) for s, d in pairs if s % len(hosts) != d % len(hosts)]
    n.allocate()
    eps = 1e-6
    for h in hosts:
        assert sum(f.rate for f in h.out) <= h.up + eps
        assert sum(f.rate for f in h.into) <= h.down + eps
    # every flow has a bottleneck: a full link on which no flow gets more than it
    for f in flows:
        assert f.rate > 0
        up_full = sum(g.rate for g in f.src.out) >= f.src.up - eps and all(g.rate <= f.rate + eps for g in f.src.out)
        down_full = sum(g.rate for g in f.dst.into) >= f.dst.down - eps and all(g.rate <= f.rate + eps for g in f.dst.into)
        assert up_full or down_full


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 50), st.integers(1, 50)), min_size=2, max_size=8),
    st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7), st.integers(1, 200)), min_size=1, max_size=30),
    st.floats(0.01, 5.0),
)
def test_the_numpy_network_is_the_same_network(
    caps: list[tuple[int, int]], pairs: list[tuple[int, int, int]], dt: float,
) -> None:
    from dragonfly.sim.fastnet import FastNetwork

    nets: list[FluidNetwork | FastNetwork] = [FluidNetwork(), FastNetwork()]
    runs = []
    for n in nets:
        hosts = [Host(str(k), up, down) for k, (up, down) in enumerate(caps)]
        flows = [
            n.start(Flow(hosts[s % len(hosts)], hosts[d % len(hosts)], float(size)))
            for s, d, size in pairs if s % len(hosts) != d % len(hosts)
        ]
        if flows:
            n.stop(flows[0])  # a free slot, reused by the next
            flows[0] = n.start(Flow(flows[0].src, flows[0].dst, flows[0].size))
        n.allocate()
        rates = [n.rate(f) if isinstance(n, FastNetwork) else f.rate for f in flows]
        first = n.next_completion()
        done = n.advance(dt)
        if isinstance(n, FastNetwork):
            n.credit()
        runs.append((rates, first, [(round(at, 6), flows.index(f)) for at, f in done], [h.bytes_up for h in hosts]))
    (r1, t1, d1, b1), (r2, t2, d2, b2) = runs
    assert r2 == pytest.approx(r1, rel=1e-9, abs=1e-9)
    assert t2 == pytest.approx(t1, rel=1e-9)
    assert sorted(d2) == sorted(d1)
    assert b2 == pytest.approx(b1, rel=1e-9, abs=1e-6)


# -- the swarm --------------------------------------------------------------------------

SMALL = Config(peers=12, file_size=16 << 20, piece_size=1 << 20, links="1000/1000@0.5:0.5,100/50@10:0.5",
               seed_mbit=400.0, origin_mbit=400.0, seed=3)


def test_a_small_swarm_completes_within_reason() -> None:
    result = Simulation(SMALL).run()
    summary = result.summary()
    assert summary["peers"] == 12 and summary["pieces"] == 16
    assert len(result.completion) == 12 and all(c > 0 for c in result.completion)
    # nobody beats the bound, and the origin was read exactly once
    assert min(result.ratios()) >= 0.999
    assert summary["origin_copies"] == 1.0
    # every piece left the seed at least once; most bytes came from peers
    assert summary["seed_copies"] >= 0.999
    assert summary["p2p_share"] > 0.5
    assert summary["max_over_bound"] < 10
    assert 0 < summary["us_per_sync"] < 5000


def test_the_same_seed_gives_the_same_run() -> None:
    a = Simulation(SMALL).run()
    b = Simulation(SMALL).run()
    assert a.completion == b.completion
    assert a.seed_copies == b.seed_copies


def test_cli_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--peers", "6", "--size", "8M", "--piece-size", "1M", "--seed", "2", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    out = json.loads(last)
    for key in ("peers", "p50_over_bound", "p99_over_bound", "max_over_bound", "origin_copies", "seed_copies",
                "us_per_sync", "wall_s"):
        assert key in out
    assert out["peers"] == 6
    assert out["p50_over_bound"] <= out["p99_over_bound"] <= out["max_over_bound"]


def test_cli_target_pieces_and_the_slowest_peers(capsys: pytest.CaptureFixture[str]) -> None:
    """--target-pieces sets the auto piece size; --slowest K prints the K slowest peers, slowest first."""
    assert main(["--peers", "4", "--size", "16M", "--seed", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["piece_bytes"] == 1 << 20  # 128: 1 MiB at least
    assert main(["--peers", "4", "--size", "16M", "--target-pieces", "4", "--slowest", "3", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["piece_bytes"] == 4 << 20 and out["pieces"] == 4
    slow = [json.loads(line) for line in captured.err.strip().splitlines()]
    assert len(slow) == 3
    assert [d["over_bound"] for d in slow] == sorted((d["over_bound"] for d in slow), reverse=True)
    assert abs(slow[0]["over_bound"] - out["max_over_bound"]) < 1e-3
    for d in slow:
        # first piece, half, 90%: in order, and before it was done
        assert len(d["first_half_90pct_s"]) == 3 and d["first_half_90pct_s"] == sorted(d["first_half_90pct_s"])
        assert d["first_half_90pct_s"][-1] <= d["done_s"] + 1e-9
        assert 0 <= d["from_seed"] <= 4


def test_the_pickers_limit_may_grow() -> None:
    """--max-grow reaches every peer's picker (1 by default: --in-flight holds, as in the dfpeer)."""
    assert all(p.picker.max_grow == 1.0 for p in Simulation(SMALL).peers)
    grown = Simulation(attrs.evolve(SMALL, max_grow=4.0))
    assert all(p.picker.max_grow == 4.0 for p in grown.peers)
    assert grown.run().summary()["origin_copies"] == 1.0


def test_the_in_flight_limit_follows_the_link() -> None:
    """--in-flight-time: a fast peer gets more requests out; a slow one keeps --in-flight (6 pieces of 1 MiB here)."""
    mix = attrs.evolve(SMALL, file_size=64 << 20, links="10000/10000@0.2:0.5,1000/1000@0.5:0.5", seed_mbit=2000.0,
                       origin_mbit=2000.0)
    assert {p.limit for p in Simulation(mix).peers} == {6}
    sim = Simulation(attrs.evolve(mix, in_flight_time=0.01))
    # 10 Gbit/s carries 12.5 MB in 0.01 s: 11 pieces of 1 MiB; 1 Gbit/s 1.25 MB: 6 as before
    assert {p.host.down * 8 / 1e6: p.limit for p in sim.peers} == {10000.0: 11, 1000.0: 6}
    most: dict[int, int] = {}
    fill = sim._fill

    def watch(peer):  # type: ignore[no-untyped-def]
        fill(peer)
        most[peer.index] = max(most.get(peer.index, 0), peer.picker.in_flight)

    sim._fill = watch  # type: ignore[method-assign]
    assert sim.run().summary()["origin_copies"] == 1.0
    # the fast peers had more out than 6 and its rescues allow (8 in this run with the fixed limit)
    assert max(most[p.index] for p in sim.peers if p.limit == 11) > 8
    assert all(most.get(p.index, 0) <= 2 * p.limit for p in sim.peers)


def test_the_holders_array_follows_the_pickers() -> None:
    """The per-piece holder bytes the HAVE fan-out reads agree with the pickers after every piece that arrives."""
    sim = Simulation(SMALL)
    arrived = sim._piece_arrived
    checked = []

    def check(flow):  # type: ignore[no-untyped-def]
        arrived(flow)
        for index, holders in enumerate(sim.has):
            assert list(holders) == [index in p.picker.have_bits for p in sim.peers]
        checked.append(flow)

    sim._piece_arrived = check  # type: ignore[method-assign]
    sim.run()
    assert len(checked) >= SMALL.peers * sim.count
    assert all(list(holders) == [1] * SMALL.peers for holders in sim.has)
    # the pickers' priority lists share one int object per piece number, and keep their values
    a, b = sim.peers[0].picker, sim.peers[1].picker
    assert a.prio != b.prio and sorted(a.prio) == list(range(sim.count))
    assert all(a.prio[i] is b.prio[j] for i in range(sim.count) for j in range(sim.count) if a.prio[i] == b.prio[j])
    assert all(a._by_prio[a.prio[i]] == i for i in range(sim.count))


def test_events_and_piece_arrivals_are_handled_in_time_order() -> None:
    """The pieces a step completed skip the event heap: merged with it, everything still runs in time order."""
    # HAVEs held (the dfpeer holds none by default): their timers are events too
    sim = Simulation(attrs.evolve(SMALL, have_delay=0.2))
    seen: list[tuple[float, str]] = []
    def watch(name: str) -> None:
        fn = getattr(sim, name)

        def wrap(*args):  # type: ignore[no-untyped-def]
            seen.append((sim.now, name))
            fn(*args)

        setattr(sim, name, wrap)

    for name in ("_piece_arrived", "_request_arrives", "_haves_due", "_sync", "_decision", "_connected"):
        watch(name)
    sim.run()
    times = [t for t, _ in seen]
    assert times == sorted(times)
    kinds = {name for _, name in seen}
    assert kinds == {"_piece_arrived", "_request_arrives", "_haves_due", "_sync", "_decision", "_connected"}
    # arrivals and other events interleave (not all of a step's arrivals first)
    order = [name == "_piece_arrived" for _, name in seen]
    assert sum(1 for a, b in zip(order, order[1:], strict=False) if a and not b) > 10


def test_link_mix_parsing() -> None:
    (a, b) = parse_links("1000/200@5:3,100/100@20:1")
    assert (a.down_mbit, a.up_mbit, a.latency_ms, a.share) == (1000, 200, 5, 0.75)
    assert b.share == 0.25
    for bad in ("1000@5:1", "1000/200:1", "0/10@1:1", "x/1@1:1"):
        with pytest.raises(ValueError, match="link"):
            parse_links(bad)


# -- several SuperNodes --------------------------------------------------------------------

FAILOVER = Config(peers=10, file_size=32 << 20, piece_size=1 << 20, links="1000/1000@0.5:0.5,100/50@10:0.5",
                  seed_mbit=400.0, origin_mbit=100.0, seed=5, supernodes=3, kill_at=1.0)


def test_the_task_lives_on_its_rendezvous_owner() -> None:
    from dragonfly.core.rendezvous import Node, rank
    from dragonfly.sim.swarm import TASK

    sim = Simulation(attrs.evolve(FAILOVER, kill_at=None))
    owner = rank([Node(f"sn{k}:8002") for k in range(3)], TASK)[0].address
    result = sim.run()
    assert [n["address"] for n in result.nodes][0] == owner
    # only the owner's CDN fetched and served
    assert [n["origin_copies"] for n in result.nodes] == [1.0, 0.0, 0.0]
    assert result.nodes[1]["seed_copies"] == result.nodes[2]["seed_copies"] == 0.0


@pytest.mark.parametrize("takeover", ["full", "missing"])
def test_the_owner_dies_mid_run(takeover: str) -> None:
    sim = Simulation(attrs.evolve(FAILOVER, takeover=takeover))
    result = sim.run()
    first, second, third = result.nodes
    assert not first["alive"] and second["alive"] and third["alive"]
    # killed at 1 s, with 100 Mbit/s from the origin the owner had about 12 MiB of 32
    assert 0.3 < first["origin_copies"] < 0.5
    # every peer finished, all on the next node of the ranking (none on the third)
    assert all(p.done_at is not None for p in sim.peers)
    assert all(p.node == 1 for p in sim.peers)
    assert second["peers_moved_in"] == 10 and third["peers_moved_in"] == 0
    assert len(sim.nodes[1].scheduler.tasks["sim" + "0" * 61].members) == 10
    # the whole file again from the origin (today's CDN) or only what no peer held
    assert first["origin_copies"] + second["origin_copies"] == pytest.approx(result.origin_copies, abs=0.002)
    if takeover == "full":
        assert second["origin_copies"] == 1.0
    else:
        # the pieces the dead owner had sent to a peer (at least a few) are not fetched again
        assert second["origin_copies"] <= 1.0 - 3 / 32
    assert min(result.ratios()) >= 0.999


def test_cli_rejects_a_kill_with_one_node() -> None:
    with pytest.raises(SystemExit):
        main(["--peers", "3", "--kill-supernode", "1"])


def test_cli_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "sim.png"
    assert main(["--peers", "6", "--size", "8M", "--piece-size", "1M", "--supernodes", "2", "--kill-supernode", "0.2",
                 "--plot", str(out), "--json"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["kill_at"] == 0.2 and len(last["supernodes"]) == 2


def test_the_collector_is_on_again_after_a_run() -> None:
    import gc

    assert gc.isenabled()
    Simulation(SMALL).run()
    assert gc.isenabled()
    stuck = Simulation(attrs.evolve(SMALL, time_limit=0.01))
    with pytest.raises(RuntimeError):
        stuck.run()
    assert gc.isenabled()


def test_the_compiled_picker_is_keyed_by_its_source_and_loaded_first_or_not_at_all() -> None:
    from dragonfly.sim import compiled

    src = compiled.source().read_bytes()
    assert compiled.key(src) == compiled.key(src)
    assert compiled.key(src) != compiled.key(src + b"\n")
    # the pure picker is imported already here: loading the compiled one now would mix them
    with pytest.raises(RuntimeError, match="imported already"):
        compiled.load()


def test_the_inline_have_fan_out_is_one_frame_per_have() -> None:
    """HAVEs not held: the inline fan-out gives the run that one L{Simulation._haves_arrive} frame per HAVE gives."""
    fast = Simulation(SMALL)
    fast_run = fast.run()
    slow = Simulation(SMALL)

    def announce(peer, index, holders):  # type: ignore[no-untyped-def]
        for n in peer.neighbours:
            if not holders[n]:
                slow._haves_arrive(peer, n, [index])

    slow._announce = announce  # type: ignore[method-assign]
    slow_run = slow.run()
    assert fast_run.completion == slow_run.completion
    assert fast_run.seed_copies == slow_run.seed_copies
    assert (fast.events, fast.haves, fast.have_frames) == (slow.events, slow.haves, slow.have_frames)
    assert fast.haves == fast.have_frames > 0
    assert [p.marks for p in fast.peers] == [p.marks for p in slow.peers]


def test_the_command_line_runs_again_on_huge_pages_unless_told() -> None:
    from dragonfly.sim.__main__ import HUGE_PAGES, huge_pages_env

    assert huge_pages_env({"PATH": "/bin"}, "linux") == {"PATH": "/bin"} | HUGE_PAGES
    # already there (the run again), or chosen by the caller, or turned off, or not Linux: as it is
    assert huge_pages_env({"PATH": "/bin"} | HUGE_PAGES, "linux") is None
    assert huge_pages_env({"PYTHONMALLOC": "pymalloc"}, "linux") is None
    assert huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, "linux") is None
    assert huge_pages_env({"DRAGONFLY_SIM_HUGE_PAGES": "0"}, "linux") is None
    assert huge_pages_env({}, "darwin") is None


def test_the_command_line_runs_on_huge_pages() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "GLIBC_TUNABLES", "DRAGONFLY_SIM_HUGE_PAGES")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    args = [sys.executable, "-m", "dragonfly.sim", "--peers", "4", "--size", "4M", "--piece-size", "1M", "--json"]
    on = json.loads(subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    off = json.loads(subprocess.run(args, env=env | {"DRAGONFLY_SIM_HUGE_PAGES": "0"}, capture_output=True, text=True,
                                    check=True).stdout.splitlines()[-1])
    assert on["allocator"] == "malloc" and "allocator" not in off
    assert on["p50_over_bound"] == off["p50_over_bound"] and on["events"] == off["events"]


def test_the_in_flight_limit_grows_to_one_piece_per_neighbour() -> None:
    """Each peer's limit follows its neighbours (the dfpeer's Neighbours.limits), within neighbour_bytes."""
    assert SMALL.neighbour_bytes == 0  # off by default, as in the dfpeer
    ten = attrs.evolve(SMALL, peers=10, file_size=64 << 20, piece_size=1 << 20, links="80/80@10:1", seed_mbit=160.0,
                       origin_mbit=160.0, neighbour_bytes=16 << 20)
    sim = Simulation(ten)
    assert {p.limit for p in sim.peers} == {6}
    summary = sim.run().summary()
    assert summary["origin_copies"] == 1.0
    assert all(p.limit == max(6, len(p.neighbours)) for p in sim.peers)
    assert max(p.limit for p in sim.peers) > 6
    fixed = Simulation(attrs.evolve(ten, neighbour_bytes=0))
    slower = fixed.run().summary()
    assert {p.limit for p in fixed.peers} == {6}
    # a peer with 9 neighbours and 6 pieces out leaves some uploaders unasked: later
    assert summary["by_class"]["80/80"]["p50"] < slower["by_class"]["80/80"]["p50"]

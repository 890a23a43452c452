"""bench.restart's pure parts: the downtimes from the watchers' samples, the peers' bytes, the table, the options."""

from __future__ import annotations

import pytest

from bench.restart import downtime, lost_at_kills, parse_args, peer_bytes, table, tcp_queues, value_at

URL = "http://198.18.0.10:80/f.bin?run=restarts"


def test_downtime_from_the_samples() -> None:
    kill = 10.0
    supernode = [
        (9.9, {"ok": True, "tasks": 1, "peers": 6}),  # before the kill: ignored
        (10.2, None), (10.4, None),
        (10.61, {"ok": True, "tasks": 0, "peers": 0}),  # the API answers
        (10.7, {"ok": True, "tasks": 0, "peers": 2}),  # peers registered
        (10.8, {"ok": True, "tasks": 1, "peers": 6}),  # the task too
    ]
    origin = [
        (9.95, {"bytesOut": 100}), (10.3, {"bytesOut": 120}), (10.6, {"bytesOut": 120}),  # in flight after the kill
        (10.7, {"bytesOut": 120}), (10.9, {"bytesOut": 150}),
    ]
    port = [(9.9, 1), (10.1, 0), (10.35, 1)]
    assert downtime(kill, supernode, origin, port) == {
        "bound": 0.35, "api": 0.61, "peer": 0.7, "task": 0.8, "origin": 0.9,
    }


def test_the_origin_sending_again_before_the_api_answers_counts() -> None:
    # a SuperNode goes on with its origin fetch while it still imports its API
    kill = 10.0
    supernode = [(10.2, None), (10.6, {"ok": True, "tasks": 1, "peers": 0})]
    origin = [(9.95, {"bytesOut": 100}), (10.1, {"bytesOut": 120}), (10.3, {"bytesOut": 120}),
              (10.45, {"bytesOut": 130}), (10.7, {"bytesOut": 200})]
    port = [(10.1, 0), (10.3, 1)]
    down = downtime(kill, supernode, origin, port)
    assert (down["bound"], down["api"], down["origin"]) == (0.3, 0.6, 0.45)
    # without port samples it is counted from the API answering, as before
    assert downtime(kill, supernode, origin)["origin"] == 0.7


def test_downtime_of_a_supernode_that_never_came_back() -> None:
    assert downtime(1.0, [(1.5, None)], [(1.2, {"bytesOut": 5})]) == {
        "bound": None, "api": None, "peer": None, "task": None, "origin": None,
    }


def test_value_at_takes_the_last_answer_at_or_before() -> None:
    samples = [(1.0, {"n": 1}), (2.0, None), (3.0, {"n": 3})]
    assert value_at(samples, 0.5, lambda v: v["n"]) == 0
    assert value_at(samples, 2.5, lambda v: v["n"]) == 1
    assert value_at(samples, 3.0, lambda v: v["n"]) == 3


def test_peer_bytes_of_the_task_for_the_url() -> None:
    view = {"tasks": [{"url": "other", "traffic": {"remote_peer": 9}}, {"url": URL, "traffic": {"remote_peer": 42}}]}
    assert peer_bytes(view, URL) == 42
    assert peer_bytes(None, URL) == 0 and peer_bytes({"tasks": [{"url": URL}]}, URL) == 0


def run(xfb: list[float], kills: list[dict] | None = None) -> dict:
    return {"xFB": xfb, "originCopies": 1.0, "originWireCopies": 1.0, "right": len(xfb), "peers": len(xfb),
            "kills": kills or []}


def test_table_names_the_slowest_and_each_restart() -> None:
    kill = {"at": 0.3, "bound": 0.3, "api": 0.5, "peer": 0.6, "task": 0.6, "origin": None, "peerMiBWhileDown": 12.5}
    text = table({
        "peers": 2, "peerMbit": 80, "originMbit": 160, "supernodeMbit": 160, "sizeMiB": 48, "fbSeconds": 5.03,
        "load": [1.0, 2.0], "undisturbed": run([1.2, 1.3]), "restarts": run([1.6, 1.4], [kill]),
    })
    assert "| slowest (x F/B) | 1.30 | 1.60 | <= 1.5 |" in text
    assert "killed at 30%" in text and "| kill to API answering (s) | | 0.50 | |" in text
    assert "| kill to the origin sending again (s) | | - | |" in text and "12.5" in text


def test_options() -> None:
    args = parse_args(["--kills", "0.9,0.3"])
    assert args.kills == [0.3, 0.9] and args.peers == 6 and args.size_mib == 48
    for bad in (["--kills", "1.5"], ["--kills", "x"], ["--peers", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_no_kill_runs_and_shows_the_undisturbed_run_alone() -> None:
    assert parse_args(["--no-kill"]).no_kill and not parse_args([]).no_kill
    text = table({
        "peers": 2, "peerMbit": 80, "originMbit": 160, "supernodeMbit": 160, "sizeMiB": 48, "fbSeconds": 5.03,
        "load": [1.0, 2.0], "undisturbed": run([1.2, 1.3]), "restarts": None,
    })
    assert "| slowest (x F/B) | 1.30 |" in text and "killed" not in text and "--no-kill" in text


def test_timeline_from_the_trace_lines() -> None:
    from bench.restart import timeline, timeline_table

    sn = "x trace abc piece 0 stored at 100.300\ny trace abc piece 1 stored at 100.400\n"
    dfget = "dfget trace start at 100.100\ndfget trace posted at 100.150\ndfget trace done at 102.000\n"
    peer = (
        "[dragonfly.peer.task#info] trace abc start at 100.120\n"
        "[dragonfly.peer.task#info] trace abc sync at 100.200: SIZING, 1 parents, seed [], 0 digests, next 0.5\n"
        "[dragonfly.peer.task#info] trace abc sync at 100.300: DOWNLOADING, 2 parents, seed [0], 1 digests, next 0.5\n"
        "[dragonfly.peer.task#info] trace abc piece 1 from vm-1-8001 at 101.500\n"
        "[dragonfly.peer.task#info] trace abc piece 0 from supernode at 100.900\n"
    )
    tl = timeline(sn, [(dfget, peer), ("", "")], 2, t0=100.0)
    assert (tl["snFirst"], tl["snLast"]) == (0.3, 0.4)
    first, empty = tl["peers"]
    assert first == {
        "dfget_start": 0.1, "dfget_posted": 0.15, "dfget_done": 2.0, "task": 0.12, "sync": 0.2,
        "first": 0.9, "q1": 0.9, "half": 0.9, "q3": 0.9, "last": 1.5, "seedPieces": 1,
    }
    assert empty == {"seedPieces": 0}
    # without t0: from the first dfget start
    assert timeline(sn, [(dfget, peer)], 2)["peers"][0]["dfget_start"] == 0.0
    text = timeline_table(tl, 2 << 20)
    assert "| 0 | 0.10 | 0.12 | 0.20 | 0.90 |" in text and "| 1 | - |" in text


TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0A001298:0050 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0A001298:0050 0B001298:A1B2 01 00200000:00000000 01:00000014 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0B001298:A1B2 0A001298:0050 01 00000000:00010000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 0B001298:C000 0C001298:1F41 01 00000100:00000200 00:00000000 00000000     0        0 4 1 0 20 4 30 10 -1
"""


def test_tcp_queues_sums_the_established_connections_of_the_port() -> None:
    # the listener (st 0A) and the connection of another port are left out
    assert tcp_queues(TCP, 80) == (0x200000, 0x10000)
    assert tcp_queues(TCP, 8001) == (0x100, 0x200)
    assert tcp_queues(TCP, 443) == (0, 0) and tcp_queues("", 80) == (0, 0)


def test_lost_at_kills_splits_what_the_resume_asked_for_again() -> None:
    MiB = 1 << 20
    kills = [
        # 15 MiB handed, 12 MiB on the file: 3 lost, 2 of them in the origin's socket, 0.5 in the SuperNode's
        {"handed": 15 * MiB, "stored": 12 * MiB, "originQueued": 2 * MiB, "supernodeQueued": MiB // 2},
        # the next fetch went on from 12 MiB: 14 handed, 24 on the file, 2 lost
        {"handed": 14 * MiB, "stored": 24 * MiB, "originQueued": MiB, "supernodeQueued": None},
    ]
    assert lost_at_kills(kills) == [
        {"lostMiB": 3.0, "originSocketMiB": 2.0, "supernodeSocketMiB": 0.5, "restMiB": 0.5},
        {"lostMiB": 2.0, "originSocketMiB": 1.0, "supernodeSocketMiB": 0.0, "restMiB": 1.0},
    ]


def test_table_shows_where_the_bytes_asked_again_were() -> None:
    kill = {"at": 0.3, "bound": 0.3, "api": 0.5, "peer": 0.6, "task": 0.6, "origin": 0.6, "peerMiBWhileDown": 1.0,
            "lostMiB": 3.0, "originSocketMiB": 2.0, "supernodeSocketMiB": 0.5, "restMiB": 0.5}
    text = table({
        "peers": 2, "peerMbit": 80, "originMbit": 160, "supernodeMbit": 160, "sizeMiB": 48, "fbSeconds": 5.03,
        "load": [1.0, 2.0], "undisturbed": run([1.2, 1.3]), "restarts": run([1.6, 1.4], [kill]),
    })
    assert "| | 3.0 (2.0, 0.5, 0.5) | |" in text

"""bench.images: host 2's GET as a timeline from its processes' DRAGONFLY_TRACE lines."""

from __future__ import annotations

from bench.images import MiB, timeline


def test_the_timeline_in_seconds_from_the_get(tmp_path):
    peer = tmp_path / "host2.log"
    peer.write_text(
        "x [dragonfly.peer.task#info] trace 0123456789ab start at 1000.010\n"
        "x [dragonfly.peer.task#info] trace 0123456789ab piece 3 from p1 at 1000.200\n"
        "x [dragonfly.peer.stream#info] trace 0123456789ab stream waits for piece 0 at 1000.210 (1 of 4 held)\n"
        "x [dragonfly.peer.task#info] trace 0123456789ab piece 0 from p1 at 1000.300\n"
        "x [dragonfly.peer.stream#info] trace 0123456789ab stream waits for piece 1 at 1000.310 (2 of 4 held)\n"
        "x [dragonfly.peer.task#info] trace 0123456789ab piece 1 from seed at 1000.700\n"
        "x [dragonfly.peer.stream#info] trace 0123456789ab stream sees done at 1000.710, offset 8388608\n"
        "x [dragonfly.peer.stream#info] trace 0123456789ab stream sent all at 1000.900\n"
        # the held GET later: its lines do not replace the first GET's
        "x [dragonfly.peer.stream#info] trace 0123456789ab stream sees done at 1002.000, offset 0\n"
        "x [dragonfly.peer.stream#info] trace 0123456789ab stream sent all at 1002.500\n"
    )
    relay = tmp_path / "dfdaemon2.log"
    relay.write_text(
        "x [dragonfly.daemon.splice#info] trace relay start at 1000.050\n"
        "x [dragonfly.daemon.splice#info] trace relay took all at 1000.950\n"
        "x [dragonfly.daemon.splice#info] trace relay sent all at 1000.960 (9 splices in, the client's socket full 2 times)\n"
        "x [dragonfly.daemon.splice#info] trace relay start at 1002.010\n"
    )
    tl = timeline([str(peer), str(relay)], 1000.0, 1.0)
    got = {k: round(v, 3) for k, v in tl.items()}
    assert got == {
        "start": 0.01, "relay start": 0.05, "first piece": 0.2, "last piece": 0.7, "stream_waits": 2,
        "stream sees done": 0.71, "offset at done": 8 * MiB, "stream sent all": 0.9, "relay took all": 0.95,
        "relay sent all": 0.96, "client done": 1.0,
    }


def test_no_trace_lines_leave_the_client_alone(tmp_path):
    log = tmp_path / "host2.log"
    log.write_text("2026 [dragonfly.peer.task#info] complete, 8 bytes in 0.10s\n")
    assert timeline([str(log)], 0.0, 2.5) == {"client done": 2.5}

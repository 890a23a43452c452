"""
The SuperNode's C{/metrics}, scraped through L{treq.testing.StubTreq} while the
API is driven: the numbers move as the requests, the origin fetch, the seed
and the scheduler do.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.task import Clock

from dragonfly.core.ids import task_id
from dragonfly.supernode.api import SupernodeApi
from dragonfly.supernode.cdn import Cdn
from dragonfly.supernode.node import SuperNode
from dragonfly.supernode.scheduler import Scheduler

from .test_supernode_api import BASE, BODY, PIECE, URL, Env, FakeHttp, FakeResponse, SyncPool, result


class StepTimer:
    """A clock that moves C{step} seconds every time it is read."""

    def __init__(self, step: float) -> None:
        self.t = 100.0
        self.step = step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def make(home: str, sched_step: float = 0.002, http_step: float = 0.03) -> Env:
    clock = Clock()
    http = FakeHttp()
    pool = SyncPool()
    node = SuperNode(
        lambda track: Cdn(home, http, pool, clock, piece_size=PIECE, on_new_task=track),
        Scheduler(rng=random.Random(0)), clock, "10.0.0.9", 8001, timer=StepTimer(sched_step),
    )
    api = SupernodeApi(node, timer=StepTimer(http_step))
    return Env(home, clock, http, node, StubTreq(api.resource()))


def scrape(env: Env, accept: str | None = None) -> tuple[str, str]:
    headers = {"accept": [accept]} if accept else {}
    d = env.stub.get(BASE + "/metrics", headers=headers)
    env.stub.flush()
    response = result(d)
    assert response.code == 200
    ctype = response.headers.getRawHeaders(b"content-type")[0].decode()
    return ctype, result(response.content()).decode()


def samples(env: Env) -> dict[tuple[str, frozenset], float]:
    ctype, text = scrape(env)
    assert ctype.startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def env(tmp_path: Any) -> Env:
    return make(str(tmp_path))


S = "dragonfly_supernode_"
TID = task_id(URL)


def test_a_download_moves_the_numbers(env: Env) -> None:
    m = samples(env)
    assert value(m, S + "peers") == 0
    assert value(m, S + "tasks", cdnstatus="success") == 0
    assert value(m, S + "origin_bytes_total") == 0
    assert value(m, S + "http_requests_total", handler="metrics", code="200") == 0

    env.register_peer("peer-1")
    env.register_peer("peer-2")
    code, _ = env.register_task("peer-1")
    assert code == 200
    m = samples(env)
    assert value(m, S + "peers") == 2
    assert value(m, S + "tasks", cdnstatus="running") == 1
    assert value(m, S + "cdn_cache_misses_total") == 1
    assert value(m, S + "cdn_cache_hits_total") == 0

    env.http.serve(FakeResponse(body=BODY))
    code, _ = env.register_task("peer-2")
    assert code == 200
    m = samples(env)
    assert value(m, S + "tasks", cdnstatus="running") == 0
    assert value(m, S + "tasks", cdnstatus="success") == 1
    assert value(m, S + "origin_bytes_total") == len(BODY)
    assert value(m, S + "cdn_cache_misses_total") == 1
    assert value(m, S + "cdn_cache_hits_total") == 1
    assert value(m, S + "task_peers") == 2

    # the scheduler: three syncs, each measured as exactly 2 ms by the step timer
    for _ in range(3):
        code, _ = env.sync(TID, "peer-1", have=[0, 1])
        assert code == 200
    m = samples(env)
    assert value(m, S + "schedule_duration_seconds_count") == 3
    assert value(m, S + "schedule_duration_seconds_sum") == pytest.approx(0.006)
    assert value(m, S + "schedule_duration_seconds_bucket", le="0.001") == 0
    assert value(m, S + "schedule_duration_seconds_bucket", le="0.0025") == 3

    # the seed serves two pieces
    seed = env.node.seed_side(TID)
    conn = type("Conn", (), {"remote_id": "peer-2", "bytes_out": 0})()
    seed.on_uploaded(conn, PIECE)
    seed.on_uploaded(conn, 100)
    m = samples(env)
    assert value(m, S + "seed_pieces_total") == 2
    assert value(m, S + "seed_bytes_total") == PIECE + 100

    # requests by route name (never the path with its task id) and status
    assert value(m, S + "http_requests_total", handler="register_peer", code="200") == 2
    assert value(m, S + "http_requests_total", handler="register_task", code="200") == 2
    assert value(m, S + "http_requests_total", handler="sync", code="200") == 3
    assert value(m, S + "http_requests_total", handler="metrics", code="200") == 4
    assert value(m, S + "http_request_duration_seconds_count", handler="sync") == 3
    assert value(m, S + "http_request_duration_seconds_sum", handler="sync") == pytest.approx(0.09)
    assert not any(TID in str(labels) for _, labels in m)


def test_errors_are_counted_by_route_and_code(env: Env) -> None:
    env.post("/api/v1/peers", {"peerId": "bad id", "ip": "10.0.0.1", "port": 1})
    env.get("/no/such/route")
    env.request("PUT", "/api/v1/peers")
    env.sync(TID, "peer-1")  # unknown task
    m = samples(env)
    assert value(m, S + "http_requests_total", handler="register_peer", code="400") == 1
    assert value(m, S + "http_requests_total", handler="unmatched", code="404") == 1
    assert value(m, S + "http_requests_total", handler="unmatched", code="405") == 1
    assert value(m, S + "http_requests_total", handler="sync", code="404") == 1
    assert value(m, S + "http_requests_total", handler="register_peer", code="200") == 0


def test_failed_fetch_and_dropped_peers(env: Env) -> None:
    env.register_peer("peer-1")
    env.register_peer("peer-2")
    env.register_task("peer-1")
    env.http.serve(FakeResponse(code=404, phrase=b"Not Found"))
    env.request("DELETE", "/api/v1/peers/peer-2")
    m = samples(env)
    assert value(m, S + "tasks", cdnstatus="failed") == 1
    assert value(m, S + "cdn_fetch_failures_total", reason="source_error") == 1
    assert value(m, S + "cdn_fetch_failures_total", reason="source_unreachable") == 0
    assert value(m, S + "origin_bytes_total") == 0
    assert value(m, S + "peers") == 1
    assert value(m, S + "peer_drops_total", reason="left") == 1
    env.clock.advance(61)
    env.node.scheduler.expire(env.clock.seconds())
    m = samples(env)
    assert value(m, S + "peers") == 0
    assert value(m, S + "peer_drops_total", reason="expired") == 1


def test_two_supernodes_in_one_process_keep_their_own_numbers(tmp_path: Any) -> None:
    a, b = make(str(tmp_path / "a")), make(str(tmp_path / "b"))
    a.register_peer("peer-1")
    a.register_task("peer-1")
    a.http.serve(FakeResponse(body=BODY))
    ma, mb = samples(a), samples(b)
    assert value(ma, S + "origin_bytes_total") == len(BODY)
    assert value(mb, S + "origin_bytes_total") == 0
    assert value(ma, S + "peers") == 1 and value(mb, S + "peers") == 0
    assert value(mb, S + "http_requests_total", handler="register_task", code="200") == 0


def test_openmetrics_on_request(env: Env) -> None:
    ctype, text = scrape(env, "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    ctype, text = scrape(env)
    assert "# TYPE dragonfly_supernode_origin_bytes_total counter" in text
    assert "process_resident_memory_bytes" in text

"""
Garbage collection with a fake clock and a fake disk: watermarks, LRU order,
tasks in use kept, idle swarms and dead peers dropped on the SuperNode, and
expired tasks removed from a dfpeer's store (and the SuperNode told).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python import usage

from dragonfly.core.gc import DiskGc, GcEntry, Usage, Watermark, check_watermarks, parse_watermark, plan_eviction
from dragonfly.core.ids import BadInput, task_id
from dragonfly.peer import tap as peer_tap
from dragonfly.peer.daemon import PeerDaemon
from dragonfly.peer.gc import PeerGc
from dragonfly.peer.lifecycle import State
from dragonfly.peer.task import PeerTask
from dragonfly.supernode import tap as supernode_tap
from dragonfly.supernode.gc import SupernodeGc
from tests.unit.test_supernode_api import BODY, PIECE, Env, FakeResponse, SyncPool, make_env, result

MiB = 1 << 20


# -- watermarks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, mark",
    [
        ("80%", Watermark(percent=80.0)),
        ("62.5%", Watermark(percent=62.5)),
        ("100%", Watermark(percent=100.0)),
        ("10G", Watermark(size=10 << 30)),
        ("512M", Watermark(size=512 << 20)),
        ("4096", Watermark(size=4096)),
    ],
)
def test_parse_watermark(text: str, mark: Watermark) -> None:
    assert parse_watermark(text) == mark


@pytest.mark.parametrize("text", ["", "0%", "101%", "-5%", "80 percent", "ten", "1T", "%"])
def test_parse_watermark_bad(text: str) -> None:
    with pytest.raises(BadInput):
        parse_watermark(text)


def test_watermark_bytes() -> None:
    assert Watermark(percent=80).bytes_of(1000) == 800
    assert Watermark(size=300).bytes_of(1000) == 300


@pytest.mark.parametrize(
    "high, low",
    [("80%", "80%"), ("60%", "80%"), ("1G", "2G"), ("80%", "1G"), ("1G", "60%")],
)
def test_check_watermarks_bad(high: str, low: str) -> None:
    with pytest.raises(BadInput):
        check_watermarks(parse_watermark(high), parse_watermark(low))


def test_tap_options_defaults_and_errors() -> None:
    o = supernode_tap.Options()
    o.parseOptions([])
    assert o["gc-interval"] == 60.0 and o["task-expire"] == 180.0
    assert o["gc-disk-high"] == Watermark(percent=80.0) and o["gc-disk-low"] == Watermark(percent=60.0)
    o = peer_tap.Options()
    o.parseOptions(["--task-expire", "30m", "--gc-disk-high", "2G", "--gc-disk-low", "1G"])
    assert o["task-expire"] == 1800.0 and o["gc-disk-high"] == Watermark(size=2 << 30)
    o = peer_tap.Options()
    o.parseOptions([])
    assert o["task-expire"] == 6 * 3600.0
    for argv in (["--gc-disk-high", "1G"], ["--task-expire", "soon"], ["--gc-interval", "0"]):
        with pytest.raises(usage.UsageError):
            supernode_tap.Options().parseOptions(argv)


# -- the planner and the collector --------------------------------------------------------


def test_plan_evicts_least_recently_used_first_and_skips_tasks_in_use() -> None:
    entries = [
        GcEntry("c", 30, last_access=3.0),
        GcEntry("a", 30, last_access=1.0, in_use=True),
        GcEntry("b", 30, last_access=2.0),
        GcEntry("d", 30, last_access=4.0),
    ]
    chosen, left = plan_eviction(entries, used=120, low=50)
    assert [e.task_id for e in chosen] == ["b", "c", "d"]
    assert left == 30
    chosen, left = plan_eviction(entries, used=120, low=90)
    assert [e.task_id for e in chosen] == ["b"]
    assert left == 90


class FakeDisk:
    """A disk whose usage falls as tasks are evicted."""

    def __init__(self, total: int, other: int, tasks: dict[str, tuple[int, float]]) -> None:
        self.total = total
        self.other = other
        self.tasks = dict(tasks)
        self.in_use: set[str] = set()
        self.evicted: list[str] = []
        self.measured = 0

    def usage(self, path: str) -> Usage:
        self.measured += 1
        return Usage(self.other + sum(size for size, _ in self.tasks.values()), self.total)

    def entries(self) -> list[GcEntry]:
        return [GcEntry(t, size, at, t in self.in_use) for t, (size, at) in self.tasks.items()]

    def evict(self, tid: str) -> defer.Deferred:
        self.evicted.append(tid)
        del self.tasks[tid]
        return defer.succeed(None)

    def gc(self, high: str, low: str) -> DiskGc:
        return DiskGc(
            "/nowhere", SyncPool(), parse_watermark(high), parse_watermark(low),
            candidates=self.entries, evict=self.evict, still_evictable=lambda t: t not in self.in_use,
            usage=self.usage,
        )


def run(gc: DiskGc) -> list[str]:
    return result(defer.Deferred.fromCoroutine(gc.run()))


def test_disk_gc_percent_watermarks() -> None:
    # 1000-byte disk, 200 bytes of other files, five 150-byte tasks: 950 used (95 %)
    disk = FakeDisk(1000, 200, {f"t{i}": (150, float(10 - i)) for i in range(5)})
    gc = disk.gc("80%", "60%")
    assert run(gc) == ["t4", "t3", "t2"]  # oldest first, down to 500 <= 600
    assert disk.usage("/") == Usage(500, 1000)
    assert run(gc) == []  # below the high watermark: nothing more
    assert gc.evicted == 3 and gc.evicted_bytes == 450


def test_disk_gc_below_high_does_nothing() -> None:
    disk = FakeDisk(1000, 0, {"a": (400, 1.0), "b": (400, 2.0)})
    assert run(disk.gc("80%", "10%")) == []
    assert disk.evicted == []


def test_disk_gc_never_evicts_a_task_in_use() -> None:
    disk = FakeDisk(1000, 0, {"old": (300, 1.0), "mid": (300, 2.0), "new": (300, 3.0)})
    disk.in_use.add("old")
    assert run(disk.gc("50%", "40%")) == ["mid", "new"]
    assert "old" in disk.tasks
    # everything in use: the run stops above the watermark
    disk = FakeDisk(1000, 0, {"a": (900, 1.0)})
    disk.in_use.add("a")
    assert run(disk.gc("50%", "40%")) == []


def test_disk_gc_rechecks_use_before_evicting() -> None:
    disk = FakeDisk(1000, 0, {"a": (500, 1.0), "b": (500, 2.0)})
    gc = disk.gc("50%", "10%")
    # "a" comes into use while the usage is measured in the pool
    original = disk.usage

    def usage(path: str) -> Usage:
        u = original(path)
        disk.in_use.add("a")
        return u

    gc.usage = usage
    disk.in_use.discard("a")
    assert run(gc) == ["b"]


def test_disk_gc_absolute_sizes() -> None:
    disk = FakeDisk(0, 0, {"a": (4 * MiB, 1.0), "b": (4 * MiB, 2.0), "c": (4 * MiB, 3.0)})
    assert run(disk.gc("10M", "5M")) == ["a", "b"]


def test_disk_usage_runs_in_the_pool() -> None:
    disk = FakeDisk(1000, 900, {})
    gc = disk.gc("80%", "60%")
    pool = SyncPool()
    gc.pool = pool
    run(gc)
    assert pool.calls == 1 and disk.measured == 1


# -- the SuperNode --------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Any) -> Env:
    return make_env(str(tmp_path))


def fetch(env: Env, url: str, body: bytes, peer: str = "peer-1") -> str:
    code, data = env.register_task(peer, url=url)
    assert code == 200, data
    env.http.serve(FakeResponse(body=body))
    tid = data["taskId"]
    assert env.node.cdn.tasks[tid].status == "success"
    return tid


def finish(env: Env, tid: str, peer: str = "peer-1") -> None:
    count = env.node.cdn.tasks[tid].piece_count
    code, data = env.sync(tid, peer, have=list(range(count)))
    assert code == 200, data


def supernode_gc(env: Env, high: str = "100%", low: str = "90%", usage: Any = None, expire: float = 180.0) -> SupernodeGc:
    disk = DiskGc(
        env.node.cdn.repo, SyncPool(), parse_watermark(high), parse_watermark(low),
        candidates=env.node.gc_entries, evict=env.node.evict, still_evictable=env.node.evictable, usage=usage,
    )
    return SupernodeGc(env.node, env.clock, 60.0, expire, disk)


def test_dead_peers_dropped_periodically_without_any_sync(env: Env) -> None:
    env.register_peer("quiet")
    env.register_peer("alive", port=65002)
    tid = fetch(env, "http://origin.test/a", BODY, "quiet")
    finish(env, tid, "quiet")
    gc = supernode_gc(env)
    gc.startService()
    for _ in range(14):  # 70 s, "alive" heartbeats every 10 s, nobody syncs
        env.clock.advance(5)
        if env.clock.seconds() % 10 == 0:
            assert env.post("/api/v1/peers/alive/heartbeat", {})[0] == 200
    assert set(env.node.scheduler.peers) == {"alive"}
    assert env.node.scheduler.availability(tid) == [0] * env.node.cdn.tasks[tid].piece_count
    assert gc.expired_peers == 1
    gc.stopService()


def test_idle_swarm_expires_but_the_cache_stays(env: Env) -> None:
    env.register_peer("peer-1")
    env.register_peer("peer-2", port=65002)
    busy = fetch(env, "http://origin.test/busy", BODY)
    idle = fetch(env, "http://origin.test/idle", BODY)
    finish(env, idle)
    gc = supernode_gc(env, expire=180.0)
    gc.startService()
    for _ in range(50):  # 250 s (runs at 0, 60, ..., 240): peer-1 keeps syncing "busy" only
        env.clock.advance(5)
        env.sync(busy)
        env.post("/api/v1/peers/peer-1/heartbeat", {})
        env.post("/api/v1/peers/peer-2/heartbeat", {})
    assert idle not in env.node.scheduler.tasks and busy in env.node.scheduler.tasks
    assert idle in env.node.cdn.tasks and f"{idle}.data" in env.repo_files()
    # a new peer asks again: served from the cache, the seed hands out pieces again
    fetches = len(env.http.calls)
    code, data = env.register_task("peer-2", url="http://origin.test/idle")
    assert code == 200 and data["task"]["status"] == "success"
    assert len(env.http.calls) == fetches
    code, data = env.sync(idle, "peer-2")
    assert code == 200 and data["seedPieces"], data
    gc.stopService()


def test_supernode_disk_gc_evicts_lru_keeps_in_use_and_refetches(env: Env) -> None:
    env.register_peer("peer-1")
    env.register_peer("peer-2", port=65002)
    tids = {}
    for name in ("a", "b", "c"):
        env.clock.advance(1)
        tids[name] = fetch(env, f"http://origin.test/{name}", BODY)
        finish(env, tids[name])
    # "a" is downloaded by peer-2 (it holds nothing yet): in use although oldest
    assert env.register_task("peer-2", url="http://origin.test/a")[0] == 200
    env.clock.advance(1)
    size = len(BODY)

    def usage(path: str) -> Usage:
        return Usage(sum(t.disk_size for t in env.node.cdn.tasks.values()), 0)

    # three cached: above 2.5 copies' worth, evict down to 2
    gc = supernode_gc(env, high=str(5 * size // 2), low=str(2 * size), usage=usage)
    gc.startService()  # the start-up run
    assert set(env.node.cdn.tasks) == {tids["a"], tids["c"]}
    assert f"{tids['b']}.data" not in env.repo_files() and f"{tids['b']}.meta" not in env.repo_files()
    assert gc.disk.evicted == 1
    # an evicted task is fetched from the origin again by the next peer
    fetches = len(env.http.calls)
    code, data = env.register_task("peer-2", url="http://origin.test/b")
    assert code == 200 and data["task"]["status"] == "running"
    assert len(env.http.calls) == fetches + 1
    env.http.serve(FakeResponse(body=BODY))
    assert env.node.cdn.tasks[tids["b"]].status == "success"
    code, data = env.sync(tids["b"], "peer-2")
    assert code == 200 and data["parents"][0]["peerId"] == "supernode"
    # peer-1 still holds it all, so peer-2 gets it from peer-1; the seed could serve it too
    assert [p["peerId"] for p in data["parents"]] == ["supernode", "peer-1"]
    swarm = env.node.scheduler.tasks[tids["b"]]
    assert swarm.seed_has is not None and swarm.seed_has.complete
    gc.stopService()


def test_supernode_gc_never_evicts_a_task_being_fetched(env: Env) -> None:
    env.register_peer("peer-1")
    code, data = env.register_task("peer-1", url="http://origin.test/slow")
    tid = data["taskId"]
    assert env.node.in_use(tid)
    gc = supernode_gc(env, high="1", low="0", usage=lambda p: Usage(10**9, 0))
    gc.startService()
    assert tid in env.node.cdn.tasks
    gc.stopService()


def test_evicted_files_are_deleted_before_a_refetch_writes(env: Env, tmp_path: Any) -> None:
    """An eviction whose deletion is still in the pool must not delete the next fetch's file."""
    env.register_peer("peer-1")
    tid = fetch(env, "http://origin.test/x", BODY)
    finish(env, tid)
    pending: list[Any] = []

    class SlowPool(SyncPool):
        def run(self, f: Any, *a: Any, **kw: Any) -> defer.Deferred:
            if getattr(f, "__name__", "") == "_remove":  # the store's removal step
                d = defer.Deferred()
                pending.append((d, f, a))
                return d
            return super().run(f, *a, **kw)

    env.node.cdn.store._pool = SlowPool()
    env.node.evict(tid)
    code, data = env.register_task("peer-1", url="http://origin.test/x")
    assert data["task"]["status"] == "waiting"
    n = len(env.http.calls)
    d, f, a = pending.pop()
    f(*a)
    d.callback(None)
    assert len(env.http.calls) == n + 1  # the fetch starts once the old files are gone
    env.http.serve(FakeResponse(body=BODY))
    with open(os.path.join(env.home, "repo", tid + ".data"), "rb") as fh:
        assert fh.read() == BODY


# -- dfpeer ---------------------------------------------------------------------------


class FakeApiResponse:
    code = 200

    def content(self) -> defer.Deferred:
        return defer.succeed(b"{}")


class RecordingHttp:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str, url: str, **kw: Any) -> defer.Deferred:
        self.calls.append((method, url))
        return defer.succeed(FakeApiResponse())


def peer_with_tasks(home: str, clock: Clock, ages: dict[str, float]) -> tuple[PeerDaemon, RecordingHttp, dict[str, str]]:
    http = RecordingHttp()
    daemon = PeerDaemon(clock, home, ["sn.test:8002"], "10.0.0.2", SyncPool(), http)
    daemon.listening(40000)
    daemon.registered = True
    ids = {}
    for name, at in ages.items():
        tid = task_id(f"http://origin.test/{name}")
        ids[name] = tid
        with open(daemon.store.data_path(tid), "wb") as f:
            f.write(b"x" * PIECE)
        task = PeerTask(daemon, tid, {"url": f"http://origin.test/{name}"})
        task.restore({"length": PIECE, "pieceSize": PIECE, "digests": ["00" * 32], "lastAccess": at})
        daemon.store.save_meta(tid, {"taskId": tid, "length": PIECE})
        daemon.tasks[tid] = task
    return daemon, http, ids


def test_peer_task_expire_removes_store_files_and_tells_the_supernode(tmp_path: Any) -> None:
    clock = Clock()
    clock.advance(10_000)
    daemon, http, ids = peer_with_tasks(str(tmp_path), clock, {"old": 100.0, "fresh": 9_000.0, "running": 0.0})
    daemon.tasks[ids["running"]].lifecycle.state = State.DOWNLOADING
    gc = PeerGc(daemon, clock, 60.0, 3600.0, None)
    gc.startService()
    assert set(daemon.tasks) == {ids["fresh"], ids["running"]}
    assert not os.path.exists(daemon.store.data_path(ids["old"]))
    assert not os.path.exists(daemon.store.meta_path(ids["old"]))
    assert http.calls == [("DELETE", f"http://sn.test:8002/api/v1/tasks/{ids['old']}/peers/{daemon.peer_id}")]
    # an upload of a piece counts as use
    result(daemon.tasks[ids["fresh"]].read_piece(0))
    clock.advance(3000)
    assert ids["fresh"] in daemon.tasks
    clock.advance(700)  # 3700 s since the upload, 3760 s in all: the next run removes it
    assert ids["fresh"] not in daemon.tasks
    gc.stopService()


def test_peer_disk_gc_lru_and_in_use(tmp_path: Any) -> None:
    clock = Clock()
    clock.advance(1000)
    daemon, http, ids = peer_with_tasks(str(tmp_path), clock, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})

    class Uploading:
        uploading = True

    daemon.tasks[ids["a"]].conns.add(Uploading())  # a piece of "a" is being sent
    disk = DiskGc(
        daemon.store.root, SyncPool(), parse_watermark(str(3 * PIECE)), parse_watermark(str(2 * PIECE)),
        candidates=daemon.gc_entries, evict=daemon.evict, still_evictable=daemon.evictable,
        usage=lambda p: Usage(sum(t.length or 0 for t in daemon.tasks.values()), 0),
    )
    gc = PeerGc(daemon, clock, 60.0, 6 * 3600.0, disk)
    gc.startService()
    assert set(daemon.tasks) == {ids["a"], ids["d"]}
    assert sorted(os.listdir(daemon.store.root)) == sorted(
        [ids["a"] + ".data", ids["a"] + ".json", ids["d"] + ".data", ids["d"] + ".json"]
    )
    assert [c[1].split("/")[-3] for c in http.calls] == [ids["b"], ids["c"]]
    gc.stopService()


def test_peer_gc_waits_for_restore(tmp_path: Any) -> None:
    clock = Clock()
    daemon, http, ids = peer_with_tasks(str(tmp_path), clock, {})
    ready: defer.Deferred = defer.Deferred()
    calls = []
    gc = PeerGc(daemon, clock, 60.0, 1.0, None, ready=ready)
    gc.run = lambda: calls.append(clock.seconds())  # type: ignore[method-assign]
    gc.startService()
    assert calls == []
    ready.callback({"peerId": "x"})
    assert calls == [0.0]
    clock.advance(60)
    assert calls == [0.0, 60.0]
    gc.stopService()


def test_peer_restore_keeps_lru_order(tmp_path: Any) -> None:
    clock = Clock()
    daemon, _, ids = peer_with_tasks(str(tmp_path), clock, {"a": 1.0})
    path = daemon.store.data_path(ids["a"])
    os.utime(path, (12345.0, 12345.0))
    os.utime(daemon.store.meta_path(ids["a"]), (100.0, 100.0))
    metas = daemon.store.load_finished()
    assert [m["lastAccess"] for m in metas] == [12345.0]
    assert json.load(open(daemon.store.meta_path(ids["a"])))["taskId"] == ids["a"]

"""
Tests for L{dragonfly.core.store}: every file operation goes through the pool
(a fake one here that runs them when told), in order per task.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from dragonfly.core.ids import task_id
from dragonfly.core.store import TaskStore, create_file, load_complete
from dragonfly.peer.store import PieceStore

TID = task_id("http://origin.test/a")
OTHER = task_id("http://origin.test/b")


class SyncPool:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, f: Any, *a: Any, **kw: Any) -> defer.Deferred:
        self.calls.append(f.__name__)
        return defer.maybeDeferred(f, *a, **kw)


class ManualPool:
    """Runs nothing until L{step}: shows what reaches the pool, and when."""

    def __init__(self) -> None:
        self.queue: list[tuple[Any, tuple[Any, ...], defer.Deferred]] = []

    def run(self, f: Any, *a: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.queue.append((f, a, d))
        return d

    def step(self) -> str:
        f, a, d = self.queue.pop(0)
        d.callback(f(*a))
        return f.__name__


def result(d: defer.Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "not fired"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_prepare_write_read(tmp_path: Any) -> None:
    store = TaskStore(str(tmp_path), SyncPool())
    result(store.prepare(TID, 10))
    assert os.path.getsize(store.data_path(TID)) == 10
    good = b"hello"
    assert result(store.write_verified(TID, 5, bytearray(good), hashlib.sha256(good).digest())) is True
    assert result(store.write_verified(TID, 0, bytearray(b"wrong"), hashlib.sha256(good).digest())) is False
    assert result(store.read(TID, 0, 10)) == b"\0" * 5 + good
    assert result(store.sha256(TID)) == hashlib.sha256(b"\0" * 5 + good).hexdigest()


def test_prepare_reserves_the_blocks_and_keeps_size_and_zeros(tmp_path: Any) -> None:
    from dragonfly.core.files import preallocate

    store = TaskStore(str(tmp_path), SyncPool())
    size = 3 << 20
    result(store.prepare(TID, size))
    st = os.stat(store.data_path(TID))
    assert st.st_size == size
    probe = os.open(str(tmp_path / "probe"), os.O_RDWR | os.O_CREAT)
    try:
        can = preallocate(probe, 4096)
    finally:
        os.close(probe)
    if can:  # this file system reserves blocks: every block of the task's file is there
        assert st.st_blocks * 512 >= size
    assert result(store.read(TID, size - 8, 8)) == b"\0" * 8  # the contents are still zeros
    assert preallocate(-1, 10) is False  # a failure is an answer, not an exception


def test_a_large_piece_from_a_pool_buffer_is_written_only_once_verified(tmp_path: Any) -> None:
    from dragonfly.protocol.receive import BufferPool

    store = TaskStore(str(tmp_path), SyncPool())
    piece = 1 << 20
    result(store.prepare(TID, 3 * piece + 100))
    pool = BufferPool()
    good, bad = pool.take(piece), pool.take(piece)
    good[:] = os.urandom(piece)
    bad[:] = os.urandom(piece)
    digest = hashlib.sha256(good).digest()
    assert result(store.write_verified(TID, piece, bad, digest)) is False
    assert result(store.read(TID, piece, piece)) == b"\0" * piece  # nothing of a failed piece was written
    assert result(store.write_verified(TID, piece, good, digest)) is True
    tail = bytearray(os.urandom(100))
    assert result(store.write_verified(TID, 3 * piece, tail, hashlib.sha256(tail).digest())) is True
    assert result(store.read(TID, piece, piece)) == bytes(good)
    assert result(store.read(TID, 3 * piece, 100)) == tail
    assert result(store.read(TID, 0, piece)) == b"\0" * piece


def test_prepare_never_truncates_a_linked_file(tmp_path: Any) -> None:
    store = TaskStore(str(tmp_path / "data"), SyncPool())
    result(store.prepare(TID, 4))
    result(store.write_verified(TID, 0, b"abcd", hashlib.sha256(b"abcd").digest()))
    result(store.finish(TID, {"taskId": TID, "length": 4}))
    out = tmp_path / "output"
    os.link(store.data_path(TID), out)
    result(store.prepare(TID, 8))
    assert out.read_bytes() == b"abcd"
    assert os.path.getsize(store.data_path(TID)) == 8
    assert not os.path.exists(store.meta_path(TID))


def test_finish_is_read_only_and_reloads(tmp_path: Any) -> None:
    store = PieceStore(str(tmp_path), SyncPool())
    result(store.prepare(TID, 3))
    result(store.finish(TID, {"taskId": TID, "length": 3}))
    assert not os.stat(store.data_path(TID)).st_mode & stat.S_IWUSR
    # a half task (no meta), a meta that names another task, and a stray file
    result(store.prepare(OTHER, 3))
    with open(os.path.join(store.root, "notes.txt"), "w") as f:
        f.write("x")
    (metas,) = [result(store.reload())]
    assert [m["taskId"] for m in metas] == [TID] and "lastAccess" in metas[0]
    assert sorted(os.listdir(store.root)) == sorted([TID + ".data", TID + ".json", "notes.txt"])
    # a data file of the wrong size: both files go
    with open(store.data_path(TID), "ab") as f:
        os.chmod(store.data_path(TID), 0o644)
        f.write(b"more")
    assert result(store.reload()) == []
    assert sorted(os.listdir(store.root)) == ["notes.txt"]


def test_reload_without_task_ids_in_metas(tmp_path: Any) -> None:
    store = TaskStore(str(tmp_path), SyncPool(), meta_suffix=".meta", meta_names_task=False)
    result(store.prepare(TID, 2))
    result(store.finish(TID, {"length": 2, "url": "u"}))
    assert os.path.exists(os.path.join(str(tmp_path), TID + ".meta"))
    assert [m["url"] for m in result(store.reload())] == ["u"]
    with open(store.meta_path(TID)) as f:
        assert json.load(f)["length"] == 2


def test_served_descriptor_lingers_after_removal(tmp_path: Any) -> None:
    clock = Clock()
    store = TaskStore(str(tmp_path), SyncPool(), clock=clock)
    result(store.prepare(TID, 4))
    result(store.write_verified(TID, 0, b"abcd", hashlib.sha256(b"abcd").digest()))
    assert store.served_fd(TID) is None
    fd = result(store.serve(TID))
    assert store.served_fd(TID) == fd and result(store.serve(TID)) == fd
    assert os.pread(fd, 4, 0) == b"abcd"
    result(store.remove(TID))
    assert store.served_fd(TID) is None
    assert not os.path.exists(store.data_path(TID))
    # an upload under way still reads the verified bytes, from the unlinked file
    assert os.pread(fd, 4, 0) == b"abcd"
    clock.advance(TaskStore.LINGER)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_forget_withdraws_the_descriptor(tmp_path: Any) -> None:
    store = TaskStore(str(tmp_path), SyncPool())
    result(store.prepare(TID, 1))
    fd = result(store.serve(TID))
    result(store.forget(TID))
    assert store.served_fd(TID) is None
    with pytest.raises(OSError):
        os.fstat(fd)
    assert os.path.exists(store.data_path(TID))


def test_create_and_remove_run_in_order(tmp_path: Any) -> None:
    pool = ManualPool()
    store = TaskStore(str(tmp_path), pool)
    removed = store.remove(TID)
    created = store.create(TID)
    other = store.remove(OTHER)
    # the creation waits for the removal of the same task; another task does not wait
    assert [f.__name__ for f, _, _ in pool.queue] == ["_remove", "_remove"]
    assert pool.step() == "_remove" and removed.called
    assert [f.__name__ for f, _, _ in pool.queue] == ["_remove", "_create"]
    pool.step()
    assert other.called
    assert pool.step() == "_create"
    fd = result(created)
    os.close(fd)
    assert os.path.exists(store.data_path(TID))
    assert store._locks == {}


def test_nothing_touches_the_disk_outside_the_pool(tmp_path: Any) -> None:
    pool = ManualPool()
    store = TaskStore(str(tmp_path), pool)
    store.prepare(TID, 5)
    store.finish(TID, {"taskId": TID, "length": 5})
    store.read(TID, 0, 1)
    assert os.listdir(str(tmp_path)) == []
    while pool.queue:
        pool.step()
    assert sorted(os.listdir(str(tmp_path))) == [TID + ".data", TID + ".json"]


@pytest.mark.parametrize("bad", ["../x", "A" * 64, ""])
def test_bad_ids_refused_at_once(tmp_path: Any, bad: str) -> None:
    store = TaskStore(str(tmp_path), SyncPool())
    for call in (lambda: store.prepare(bad, 1), lambda: store.remove(bad), lambda: store.serve(bad),
                 lambda: store.forget(bad), lambda: store.finish(bad, None), lambda: store.create(bad)):
        with pytest.raises(ValueError):
            call()


# -- the one reload routine, in the dfpeer's shape and in the CDN's -----------------

PEER = {"meta_suffix": ".json"}
CDN = {"meta_suffix": ".meta", "meta_names_task": False, "required": ("url", "length")}


def ids(n: int) -> list[str]:
    return [task_id(f"http://origin.test/{i}") for i in range(n)]


def lay_out(root: str, suffix: str, names_task: bool) -> dict[str, str]:
    """A task directory as a crash leaves it: one task of each kind, by name."""
    kinds = ["complete", "half", "cut", "stale_header", "lone_header", "wrong_size", "no_url", "not_object", "bad_json"]
    tids = dict(zip(kinds, ids(len(kinds)), strict=True))

    def data(kind: str, size: int = 4) -> None:
        with open(os.path.join(root, tids[kind] + ".data"), "wb") as f:
            f.write(b"x" * size)

    def meta(kind: str, body: Any) -> None:
        with open(os.path.join(root, tids[kind] + suffix), "w") as f:
            f.write(body if isinstance(body, str) else json.dumps(body))

    def header(kind: str) -> None:
        with open(os.path.join(root, tids[kind] + ".part"), "w") as f:
            json.dump({"validators": {"etag": '"e"', "length": 10}, "pieceSize": 4}, f)

    def good(kind: str) -> dict[str, Any]:
        return {"url": "http://origin.test/" + kind, "length": 4, **({"taskId": tids[kind]} if names_task else {})}

    data("complete")
    meta("complete", good("complete"))
    data("half")
    data("cut")
    header("cut")
    data("stale_header")
    meta("stale_header", good("stale_header"))
    header("stale_header")
    header("lone_header")
    data("wrong_size", 5)
    meta("wrong_size", good("wrong_size"))
    data("no_url")
    meta("no_url", {k: v for k, v in good("no_url").items() if k != "url"})
    data("not_object")
    meta("not_object", [1, 2])
    data("bad_json")
    meta("bad_json", "{not json")
    for stray in ("notes.txt", tids["complete"] + suffix + ".tmp", "A" * 64 + ".data"):
        with open(os.path.join(root, stray), "w") as f:
            f.write("x")
    return tids


@pytest.mark.parametrize("shape", [PEER, CDN], ids=["dfpeer", "cdn"])
def test_one_reload_routine_for_both_shapes(tmp_path: Any, shape: dict[str, Any]) -> None:
    root, parked = str(tmp_path / "repo"), str(tmp_path / "resume")
    cdn = shape is CDN
    store = TaskStore(root, SyncPool(), clock=Clock(), parked=parked if cdn else None, **shape)
    tids = lay_out(root, shape["meta_suffix"], not cdn)
    strays = ["A" * 64 + ".data", "notes.txt", tids["complete"] + shape["meta_suffix"] + ".tmp"]
    os.utime(os.path.join(root, tids["complete"] + ".data"), (5000.0, 10.0))
    os.utime(os.path.join(root, tids["complete"] + shape["meta_suffix"]), (20.0, 3000.0))
    metas = result(store.reload())
    # the complete tasks come back, named, with their last access
    by_id = {m["taskId"]: m for m in metas}
    # a meta without the CDN's url is complete for the dfpeer, which needs none
    complete = ["complete", "stale_header"] + ([] if cdn else ["no_url"])
    assert sorted(by_id) == sorted(tids[k] for k in complete)
    assert by_id[tids["complete"]]["url"] == "http://origin.test/complete"
    assert by_id[tids["complete"]]["lastAccess"] == 5000.0
    kept = [tids[k] + s for k in complete for s in (".data", shape["meta_suffix"])]
    assert sorted(os.listdir(root)) == sorted(kept + strays)
    if cdn:
        # the CDN parks a cut fetch (data and header) for a resume, byte for byte
        assert sorted(os.listdir(parked)) == [tids["cut"] + ".data", tids["cut"] + ".part"]
        with open(os.path.join(parked, tids["cut"] + ".data"), "rb") as f:
            assert f.read() == b"xxxx"
    else:
        # the dfpeer drops it, and has no parked directory
        assert not os.path.exists(parked)
    # the same directory reloads the same
    assert sorted(m["taskId"] for m in result(store.reload())) == sorted(by_id)
    assert sorted(os.listdir(root)) == sorted(kept + strays)


def test_the_cdn_shape_wants_its_keys_and_the_peer_shape_its_task_id(tmp_path: Any) -> None:
    (tid,) = ids(1)
    root = str(tmp_path)
    with open(os.path.join(root, tid + ".data"), "wb") as f:
        f.write(b"ab")
    with open(os.path.join(root, tid + ".json"), "w") as f:
        json.dump({"taskId": OTHER, "length": 2, "url": "u"}, f)
    assert load_complete(root, ".json", meta_names_task=False) != []
    assert load_complete(root, ".json") == []  # names another task: both files gone
    assert os.listdir(root) == []


def test_reload_runs_in_the_pool(tmp_path: Any) -> None:
    pool = ManualPool()
    store = TaskStore(str(tmp_path / "repo"), pool, parked=str(tmp_path / "resume"))
    with open(store.data_path(TID), "wb") as f:
        f.write(b"cut")
    with open(store.header_path(TID), "w") as f:
        f.write("{}")
    d = store.reload()
    assert not d.called
    assert sorted(os.listdir(store.root)) == [TID + ".data", TID + ".part"]
    assert pool.step() == "load_complete"
    assert result(d) == [] and os.listdir(store.root) == []
    assert sorted(os.listdir(str(tmp_path / "resume"))) == [TID + ".data", TID + ".part"]


def test_run_and_queued_keep_the_task_s_order(tmp_path: Any) -> None:
    pool = ManualPool()
    store = TaskStore(str(tmp_path), pool)
    assert store.queued(TID) is None
    removed = store.remove(TID)
    seen: list[str] = []
    after = store.queued(TID)
    assert after is not None
    after.addCallback(lambda _: seen.append("settled"))
    ran = store.run(TID, lambda: seen.append("ran") or 7)
    assert [f.__name__ for f, _, _ in pool.queue] == ["_remove"] and seen == []
    pool.step()
    assert removed.called and seen == ["settled"]
    pool.step()
    assert result(ran) == 7 and seen == ["settled", "ran"]
    assert store.queued(TID) is None and store._locks == {}
    with pytest.raises(ValueError):
        store.run("../x", os.getpid)


def test_a_failed_step_does_not_stop_the_queue(tmp_path: Any) -> None:
    store = TaskStore(str(tmp_path), SyncPool())

    def broken() -> None:
        raise OSError("disk on fire")

    failed = store.run(TID, broken)
    with pytest.raises(OSError):
        result(failed)
    assert result(store.run(TID, lambda: "next")) == "next"


def test_expire_parked(tmp_path: Any) -> None:
    store = TaskStore(str(tmp_path / "repo"), SyncPool(), parked=str(tmp_path / "resume"))
    old, new = store.parked_paths(TID)
    for path in (old, new):
        with open(path, "w") as f:
            f.write("x")
    os.utime(old, (1.0, 1.0))
    assert result(store.expire_parked(3600)) == 1
    assert os.listdir(str(tmp_path / "resume")) == [TID + ".part"]
    assert result(TaskStore(str(tmp_path / "peer"), SyncPool()).expire_parked(0)) == 0
    with pytest.raises(ValueError):
        TaskStore(str(tmp_path / "peer"), SyncPool()).parked_paths(TID)


def test_create_file_never_truncates_an_open_file(tmp_path: Any) -> None:
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(b"served")
    reader = os.open(path, os.O_RDONLY)
    stale = str(tmp_path / "f.meta")
    open(stale, "w").close()
    fd = create_file(path, stale)
    os.write(fd, b"new")
    os.close(fd)
    assert os.pread(reader, 6, 0) == b"served"  # an upload under way reads what it started on
    os.close(reader)
    assert open(path, "rb").read() == b"new" and not os.path.exists(stale)

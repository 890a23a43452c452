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
from dragonfly.core.store import TaskStore
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

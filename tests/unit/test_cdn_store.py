"""
The CDN's cache directory is a L{dragonfly.core.store.TaskStore}: a cache
written by earlier versions reloads the same through the one reload routine,
and the CDN's file work (removals, parking, expiry) runs in the pool.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from dragonfly.core.ids import task_id
from dragonfly.supernode.cdn import Cdn

from .test_cdn import BODY, ETAG, LM, PIECE, digests, ranged
from .test_store import ManualPool, result
from .test_supernode_api import FakeHttp, SyncPool

URL = "http://origin.test/big.bin"
TID = task_id(URL)
CUT = task_id("http://origin.test/cut.bin")
BAD = task_id("http://origin.test/bad.bin")


def write(path: str, data: bytes | str) -> None:
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def old_cache(home: str) -> None:
    """A cache directory exactly as the CDN wrote it before it was a TaskStore."""
    repo, parked = os.path.join(home, "repo"), os.path.join(home, "resume")
    os.makedirs(repo)
    os.makedirs(parked)
    # a complete task: data, meta (no task id in it)
    write(os.path.join(repo, TID + ".data"), BODY)
    meta = {
        "url": URL, "length": len(BODY), "pieceSize": PIECE, "digests": digests(BODY),
        "sha256": hashlib.sha256(BODY).hexdigest(), "contentType": "application/x-test",
        "validators": {"etag": ETAG, "lastModified": LM, "length": len(BODY)}, "digest": None,
    }
    write(os.path.join(repo, TID + ".meta"), json.dumps(meta))
    os.utime(os.path.join(repo, TID + ".data"), (7000.0, 7000.0))
    os.utime(os.path.join(repo, TID + ".meta"), (100.0, 100.0))
    # a fetch cut by a crash: data and header, no meta
    write(os.path.join(repo, CUT + ".data"), BODY[: 3 * PIECE])
    header = {
        "url": "http://origin.test/cut.bin", "validators": {"etag": ETAG, "lastModified": LM, "length": len(BODY)},
        "pieceSize": PIECE, "contentType": None, "digest": "sha256:" + hashlib.sha256(BODY).hexdigest(),
    }
    write(os.path.join(repo, CUT + ".part"), json.dumps(header))
    # a meta whose digests are not a list: dropped
    write(os.path.join(repo, BAD + ".data"), b"abcd")
    write(os.path.join(repo, BAD + ".meta"), json.dumps({**meta, "url": "u", "length": 4, "digests": 3}))


def test_an_existing_cache_reloads_the_same(tmp_path: Any) -> None:
    home = str(tmp_path)
    old_cache(home)
    http = FakeHttp()
    cdn = Cdn(home, http, SyncPool(), Clock(), piece_size=PIECE)
    assert cdn.load() == 1
    task = cdn.tasks[TID]
    assert (task.status, task.url, task.length, task.piece_count) == ("success", URL, len(BODY), 8)
    assert task.digests == digests(BODY) and task.sha256 == hashlib.sha256(BODY).hexdigest()
    assert task.validators["etag"] == ETAG and task.content_type == "application/x-test"
    assert task.available is not None and task.available.complete
    assert task.last_access == 7000.0  # least-recently-used order survives
    assert result(cdn.read_piece(task, 7)) == BODY[7 * PIECE :]
    assert sorted(os.listdir(cdn.repo)) == [TID + ".data", TID + ".meta"]
    assert sorted(os.listdir(cdn.parked)) == [CUT + ".data", CUT + ".part"]
    # the parked fetch resumes where it stopped
    # (with the sha256 digest its header names: the whole-file hash goes on from the rehashed prefix)
    sha = hashlib.sha256(BODY).hexdigest()
    cut = cdn.ensure(CUT, "http://origin.test/cut.bin", digest="sha256:" + sha)
    assert http.calls[-1].headers == {"Range": [f"bytes={3 * PIECE}-"], "If-Range": [ETAG]}
    http.serve(ranged(3 * PIECE))
    assert cut.status == "success" and cut.sha256 == sha
    # and the cache as it is now reloads the same in a new process
    again = Cdn(home, FakeHttp(), SyncPool(), Clock(), piece_size=PIECE)
    assert again.load() == 2
    assert {t: again.tasks[t].digests for t in again.tasks} == {TID: digests(BODY), CUT: digests(BODY)}


def test_evicting_and_expiring_run_in_the_pool(tmp_path: Any) -> None:
    home = str(tmp_path)
    old_cache(home)
    pool = ManualPool()
    cdn = Cdn(home, FakeHttp(), pool, Clock(), piece_size=PIECE)
    assert cdn.load() == 1  # before the reactor runs: the one blocking call
    fired: list[str] = []
    cdn.evict(TID).addCallback(lambda _: fired.append("evicted"))
    expired = cdn.expire_parked(0)
    cdn.settled(TID).addCallback(lambda _: fired.append("settled"))
    assert fired == []
    # nothing touched the disk yet
    assert sorted(os.listdir(cdn.repo)) == [TID + ".data", TID + ".meta"]
    assert sorted(os.listdir(cdn.parked)) == [CUT + ".data", CUT + ".part"]
    while pool.queue:
        pool.step()
    assert sorted(fired) == ["evicted", "settled"] and result(expired) == 2
    assert os.listdir(cdn.repo) == [] and os.listdir(cdn.parked) == []


def test_a_refetch_waits_for_the_evicted_files(tmp_path: Any) -> None:
    home = str(tmp_path)
    old_cache(home)
    pool = ManualPool()
    http = FakeHttp()
    cdn = Cdn(home, http, pool, Clock(), piece_size=PIECE)
    cdn.load()
    cdn.evict(TID)
    task = cdn.ensure(TID, URL)
    assert task.status == "waiting" and http.calls == []
    while pool.queue:
        pool.step()
    assert task.status == "running" and len(http.calls) == 1
    assert http.calls[0].headers == {}  # nothing stored: a plain fetch
    assert isinstance(task.done, defer.Deferred)

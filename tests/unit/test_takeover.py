"""
A SuperNode taking a task over from its swarm (issue 12, item 2): two
SuperNodes with the same piece key behind the real API (StubTreq), fake
origins, a fake clock.  Node A fetches the file and hands out digests with
tags; node B, asked by the peers after A died, adopts the pieces whose tags
check and asks its origin only for those nobody holds with a valid tag,
pinned with Range/If-Range to the version the peers report.  Forged or
missing tags are never adopted; without a key (or with a bad origin tag) a
takeover is a plain registration and fetches the whole file, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from dragonfly.core.piecetag import PieceKey
from dragonfly.supernode import cdn as cdn_module
from dragonfly.supernode.api import SupernodeApi
from dragonfly.supernode.cdn import Cdn
from dragonfly.supernode.node import TAKEOVER_GRACE, TAKEOVER_QUIET, SuperNode
from dragonfly.supernode.scheduler import Scheduler

from .test_cdn import BODY, ETAG, PIECE, TID, URL, digests, ranged, whole
from .test_supernode_api import BASE, FakeHttp, SyncPool, result

KEY = PieceKey(b"cluster-piece-key-0123456789")
COUNT = len(digests(BODY))  # 8, the last short


class Node:
    def __init__(self, home: str, key: PieceKey | None = KEY) -> None:
        self.clock, self.http = Clock(), FakeHttp()
        self.node = SuperNode(
            lambda track: Cdn(home, self.http, SyncPool(), self.clock, piece_size=PIECE, on_new_task=track, retries=1),
            Scheduler(rng=random.Random(0)), self.clock, "10.0.0.9", 8001, piece_key=key,
        )
        self.stub = StubTreq(SupernodeApi(self.node).resource())

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        d = self.stub.request("POST", BASE + path, json=body)
        self.stub.flush()
        response = result(d)
        return response.code, json.loads(result(response.content()))

    def peer(self, peer_id: str) -> None:
        assert self.post("/api/v1/peers", {"peerId": peer_id, "ip": "10.0.0.1", "port": 40000})[0] == 200

    def register(self, peer_id: str, **extra: Any) -> Any:
        code, data = self.post("/api/v1/tasks", {"peerId": peer_id, "url": URL, **extra})
        assert code == 200, data
        return data

    def sync(self, peer_id: str, **extra: Any) -> Any:
        code, data = self.post(f"/api/v1/tasks/{TID}/sync", {"peerId": peer_id, **extra})
        assert code == 200, data
        return data

    @property
    def task(self) -> Any:
        return self.node.cdn.tasks[TID]


@pytest.fixture(autouse=True)
def _file_sha256(monkeypatch: Any) -> None:
    """These tasks have no digest: the whole-file SHA-256 (and its tag, carried over a takeover) only when asked for."""
    monkeypatch.setattr(cdn_module, "FILE_SHA256_ALWAYS", True)


def owner_with_the_file(tmp_path: Any) -> tuple[Node, Any]:
    """Node A fetched the whole file; a peer's sync got every digest with its tag, and the tagged origin."""
    a = Node(str(tmp_path / "a"))
    a.peer("p1")
    a.register("p1")
    a.http.serve(whole())
    assert a.task.status == "success"
    answer = a.sync("p1")
    assert answer["digests"] == digests(BODY) and answer["tagsFrom"] == 0 and len(answer["tags"]) == COUNT
    assert answer["origin"]["etag"] == ETAG and answer["origin"]["sha256"] == hashlib.sha256(BODY).hexdigest()
    return a, answer


def proofs(answer: Any, pieces: list[int]) -> list[dict[str, Any]]:
    return [{"index": i, "digest": answer["digests"][i], "tag": answer["tags"][i]} for i in pieces]


def test_a_takeover_fetches_only_what_no_peer_holds(tmp_path: Any) -> None:
    _, answer = owner_with_the_file(tmp_path)
    b = Node(str(tmp_path / "b"))
    for p in ("p1", "p2"):
        b.peer(p)
    # the owner died: the peers register with the next node, offering the tagged origin
    reg = b.register("p1", takeover=answer["origin"])
    assert reg["task"]["contentLength"] == len(BODY) and reg["task"]["version"] == answer["task"]["version"]
    assert b.http.calls == [], "a takeover starts no origin fetch"
    b.sync("p1", have=list(range(0, 5)), proofs=proofs(answer, list(range(0, 5))))
    b.register("p2", takeover=answer["origin"])
    forged = proofs(answer, [2, 3, 5, 6])
    forged[-1]["tag"] = "0" * 32  # piece 6: a forged tag
    forged[-2]["digest"] = hashlib.sha256(b"evil").hexdigest()  # piece 5: a digest its tag is not for
    b.sync("p2", have=[2, 3, 5, 6], proofs=forged)
    assert b.task.digests[:5] == digests(BODY)[:5] and b.task.digests[5:] == [None] * 3
    assert b.node.refused_tags == 2 and b.node.adopted_pieces == 5
    # the peers' next syncs: every piece is theirs to serve but 5..7, all in the answers' digests
    assert b.sync("p1")["digests"] == digests(BODY)[:5]
    assert b.http.calls == [], "nothing is fetched before the peers had their time to re-announce"
    b.clock.advance(TAKEOVER_GRACE - 0.2)
    b.sync("p1", proofs=proofs(answer, [0]))
    b.clock.advance(0.2)
    b.sync("p1")
    assert b.http.calls == [], "a peer re-announced a moment ago: others may be on their way"
    b.clock.advance(TAKEOVER_QUIET)
    b.sync("p1")
    # pieces 5 and 6 are held, but nobody vouched for them; 7 nobody holds: one range, pinned
    assert len(b.http.calls) == 1
    assert b.http.calls[0].headers["Range"] == [f"bytes={5 * PIECE}-{len(BODY) - 1}"]
    assert b.http.calls[0].headers["If-Range"] == [ETAG]
    b.http.serve(ranged(5 * PIECE))
    task = b.task
    assert task.digests == digests(BODY) and sorted(task.available) == [5, 6, 7]
    assert task.origin_bytes == len(BODY) - 5 * PIECE
    answer_b = b.sync("p2", digestsFrom=0)
    assert answer_b["digests"] == digests(BODY) and answer_b["tags"] == answer["tags"]
    assert b.node.scheduler.tasks[TID].seed_has is not None and sorted(b.node.scheduler.tasks[TID].seed_has) == [5, 6, 7]
    # the seed serves only what it fetched; the file is not a cached copy (no meta) while the swarm holds the rest
    assert task.status == "running" and task.sha256 == hashlib.sha256(BODY).hexdigest()
    b.clock.advance(1.0)
    b.sync("p1")
    assert len(b.http.calls) == 1, "nothing more to fetch while the swarm holds every other piece"


def test_the_whole_swarm_holds_the_file_no_origin_byte(tmp_path: Any) -> None:
    _, answer = owner_with_the_file(tmp_path)
    b = Node(str(tmp_path / "b"))
    b.peer("p1")
    b.register("p1", takeover=answer["origin"])
    b.sync("p1", have=list(range(COUNT)), proofs=proofs(answer, list(range(COUNT))))
    for _ in range(5):
        b.clock.advance(TAKEOVER_GRACE)
        b.sync("p1")
    assert b.http.calls == [] and b.task.digests == digests(BODY) and b.node.cdn.origin_bytes == 0


def test_a_piece_whose_holders_left_is_fetched(tmp_path: Any) -> None:
    _, answer = owner_with_the_file(tmp_path)
    b = Node(str(tmp_path / "b"))
    b.peer("p1")
    b.peer("p2")
    b.register("p1", takeover=answer["origin"])
    b.sync("p1", have=list(range(COUNT)), proofs=proofs(answer, list(range(COUNT))))
    b.register("p2", takeover=answer["origin"])
    b.sync("p2", have=[0])
    b.clock.advance(TAKEOVER_GRACE)
    b.sync("p2")
    assert b.http.calls == []
    b.node.leave_task(TID, "p1")  # the peer holding 1..7 is gone
    b.clock.advance(1.0)
    b.sync("p2")
    assert [c.headers["Range"] for c in b.http.calls] == [[f"bytes={PIECE}-{len(BODY) - 1}"]]
    b.http.serve(ranged(PIECE))
    assert sorted(b.task.available) == list(range(1, COUNT))


def test_the_origin_fetched_every_piece_a_cached_copy(tmp_path: Any) -> None:
    """A takeover whose swarm held nothing vouched for ends as a cached file like any other."""
    _, answer = owner_with_the_file(tmp_path)
    b = Node(str(tmp_path / "b"))
    b.peer("p1")
    b.register("p1", takeover=answer["origin"])
    b.sync("p1", have=[0], proofs=[{"index": 0, "digest": answer["digests"][0], "tag": "f" * 32}])
    b.clock.advance(TAKEOVER_GRACE)
    b.sync("p1")
    b.http.serve(ranged(0))
    task = b.task
    assert task.status == "success" and task.digests == digests(BODY) and not task.adopted
    assert open(task.data_path, "rb").read() == BODY and task.sha256 == hashlib.sha256(BODY).hexdigest()


def test_a_changed_origin_under_a_takeover_is_fetched_whole(tmp_path: Any) -> None:
    _, answer = owner_with_the_file(tmp_path)
    b = Node(str(tmp_path / "b"))
    b.peer("p1")
    b.register("p1", takeover=answer["origin"])
    b.clock.advance(TAKEOVER_GRACE)
    b.sync("p1")
    new = bytes(reversed(BODY))
    b.http.serve(whole(new, etag='"v2"'))  # the If-Range did not match: a 200 with the new file
    task = b.task
    assert task.status == "success" and task.digests == digests(new) and task.version != answer["task"]["version"]
    code, data = b.post(f"/api/v1/tasks/{TID}/sync", {"peerId": "p1", "version": answer["task"]["version"]})
    assert code == 409 and data["error"]["code"] == "TASK_CHANGED"


def test_without_a_key_or_with_a_bad_origin_tag_the_file_is_fetched_whole(tmp_path: Any) -> None:
    _, answer = owner_with_the_file(tmp_path)
    for n, (key, origin) in enumerate([
        (None, answer["origin"]),
        (KEY, {**answer["origin"], "tag": "0" * 32}),
        (KEY, {**answer["origin"], "length": len(BODY) + 1}),  # the tag is for another length
        (PieceKey(b"another-cluster-key-000000"), answer["origin"]),
    ]):
        b = Node(str(tmp_path / f"b{n}"), key)
        b.peer("p1")
        b.register("p1", takeover=origin)
        assert len(b.http.calls) == 1 and "Range" not in b.http.calls[0].headers, n
        assert not b.task.adopted
        b.http.serve(whole())
        answer_b = b.sync("p1")
        assert ("tags" in answer_b) == (key is not None)


def test_no_tags_without_a_validator_to_pin_a_takeover(tmp_path: Any) -> None:
    a = Node(str(tmp_path / "a"))
    a.peer("p1")
    a.register("p1")
    a.http.serve(whole(etag=None).__class__(body=BODY))  # no ETag, no Last-Modified
    answer = a.sync("p1")
    assert answer["digests"] == digests(BODY) and "tags" not in answer and "origin" not in answer


# -- the peer's side: tags kept beside the digests, given back on a takeover -------------------


def test_a_peer_keeps_tags_and_gives_them_back(tmp_path: Any) -> None:
    from dragonfly.peer.pieces import TaskPieces
    from dragonfly.protocol.supernode_api import SyncAnswer

    _, answer = owner_with_the_file(tmp_path)
    pieces = TaskPieces(TID, None, None, lambda _: None, None, random.Random(0))  # type: ignore[arg-type]
    pieces.size(len(BODY), PIECE)
    # tags for the first pieces, then the rest in a later answer
    first = {**answer, "tags": answer["tags"][:3]}
    pieces.learn(SyncAnswer.from_json(first))
    assert pieces.tags_from == 3 and pieces.origin == answer["origin"]
    pieces.learn(SyncAnswer.from_json({**answer, "digests": [], "tagsFrom": 3, "tags": answer["tags"][3:] + ["x"]}))
    assert pieces.tags_from == COUNT and pieces.tags == answer["tags"]
    assert pieces.have is not None
    for i in (1, 4):
        pieces.have.set(i)
    assert [p.to_json() for p in pieces.proofs()] == proofs(answer, [1, 4])
    # saved with the meta and back after a restart
    meta = pieces.meta()
    assert meta is not None and meta["tags"] == answer["tags"] and meta["origin"] == answer["origin"]
    again = TaskPieces(TID, None, None, lambda _: None, None, random.Random(0))  # type: ignore[arg-type]
    again.restore(meta)
    assert again.tags == answer["tags"] and again.tags_from == COUNT and len(again.proofs()) == COUNT
    # without a piece key nothing changes in the meta
    plain = TaskPieces(TID, None, None, lambda _: None, None, random.Random(0))  # type: ignore[arg-type]
    plain.size(len(BODY), PIECE)
    plain.learn(SyncAnswer.from_json({k: v for k, v in answer.items() if k not in ("tags", "tagsFrom", "origin")}))
    assert set(plain.meta() or {}) == {"length", "pieceSize", "digests"} and plain.proofs() == []


def test_the_syncer_offers_a_takeover_to_a_node_that_lacks_the_task() -> None:
    from twisted.internet import defer

    from dragonfly.core.bitmap import Bitmap
    from dragonfly.peer.client import SupernodeError
    from dragonfly.protocol.supernode_api import PieceProof, TaskRegistered

    from .test_peer_syncer import Task, make

    origin = {"etag": ETAG, "length": len(BODY), "pieceSize": PIECE, "tag": "ab" * 16}
    held = [PieceProof(2, "cd" * 32, "ef" * 16)]

    class Tagged(Task):
        def held_proofs(self) -> tuple[Any, list[PieceProof]]:
            return origin, held

    syncer, session, _, clock = make()
    task = Tagged(clock)
    task.download = True
    task.have = Bitmap(4)
    task.have.set(2)
    syncer._task = task
    offered: list[Any] = []

    async def register(takeover: Any = None) -> TaskRegistered:
        offered.append(takeover)
        return TaskRegistered.from_json({"taskId": syncer._task_id, "task": {"status": "running"}})

    session.register = register  # type: ignore[method-assign]
    defer.Deferred.fromCoroutine(syncer.run())
    assert offered == [None]
    session.syncs = [SupernodeError(404, "TASK_UNKNOWN", "which?")]
    clock.advance(0.5)
    assert offered == [None, origin]
    clock.advance(0.1)
    report = session.reports[-1]
    assert list(report.have) == [2] and list(report.proofs) == held
    clock.advance(0.5)
    assert list(session.reports[-1].proofs) == [], "said once"


def test_a_restarted_node_takes_back_its_parked_prefix_of_that_version(tmp_path: Any) -> None:
    """A node that fetched part of the file before it died adopts the task with the pieces it parked: the fill skips them."""
    from .test_cdn import cut_at

    _, answer = owner_with_the_file(tmp_path)
    c = Node(str(tmp_path / "c"))
    c.peer("p1")
    c.register("p1")
    c.http.serve(cut_at(3 * PIECE + 10))
    c.http.serve(cut_at(3 * PIECE + 10))  # the retry is cut too: the fetch fails, its 3 pieces parked
    assert c.task.status == "failed"
    again = Node(str(tmp_path / "c"))  # the same home, a new process
    again.peer("p1")
    again.register("p1", takeover=answer["origin"])
    task = again.task
    assert task.adopted and sorted(task.available) == [0, 1, 2] and task.digests[:3] == digests(BODY)[:3]
    again.sync("p1", have=[5, 6, 7], proofs=proofs(answer, [5, 6, 7]))
    again.clock.advance(TAKEOVER_GRACE)
    again.sync("p1")
    assert [call.headers["Range"] for call in again.http.calls] == [[f"bytes={3 * PIECE}-{5 * PIECE - 1}"]]
    again.http.serve(ranged(3 * PIECE, BODY[: 5 * PIECE], content_range=f"bytes {3 * PIECE}-{5 * PIECE - 1}/{len(BODY)}"))
    assert sorted(task.available) == [0, 1, 2, 3, 4] and task.digests == digests(BODY)


def test_a_sync_answered_by_another_node_is_followed_by_all_we_hold() -> None:
    """The owner stopped answering and the session's next node answered a sync that held only news: say everything at once."""
    from twisted.internet import defer

    from dragonfly.core.bitmap import Bitmap
    from dragonfly.protocol.supernode_api import PieceProof, SyncAnswer, SyncReport

    from .test_peer_syncer import Task, make

    held = [PieceProof(0, "cd" * 32, "ef" * 16), PieceProof(2, "ab" * 32, "ef" * 16)]

    class Tagged(Task):
        def held_proofs(self) -> tuple[Any, list[PieceProof]]:
            return {"tag": "ab" * 16}, held

    syncer, session, _, clock = make()
    task = Tagged(clock)
    task.download = True
    task.have = Bitmap(4)
    task.have.set(0)
    task.have.set(2)
    syncer._task = task
    session.pinned = "owner"  # type: ignore[attr-defined]
    plain_sync = session.sync

    async def sync(report: SyncReport) -> SyncAnswer:
        answer = await plain_sync(report)
        if len(session.reports) == 3:
            session.pinned = "heir"  # type: ignore[attr-defined]
        return answer

    session.sync = sync  # type: ignore[method-assign]
    defer.Deferred.fromCoroutine(syncer.run())
    syncer.note_have(3)
    clock.advance(0.5)
    clock.advance(0.5)
    assert len(session.reports) == 3 and list(session.reports[-1].proofs) == []
    clock.advance(0.1)
    again = session.reports[-1]
    assert len(session.reports) == 4 and sorted(again.have) == [0, 2] and list(again.proofs) == held
    clock.advance(0.5)
    assert list(session.reports[-1].have) == [] and list(session.reports[-1].proofs) == []


def takeover_metrics(n: Node) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    d = n.stub.get(BASE + "/metrics")
    n.stub.flush()
    text = result(result(d).content()).decode()
    return {
        (s.name, s.labels.get("kind", "")): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
        if s.name.startswith("dragonfly_supernode_takeover") or s.name == "dragonfly_supernode_origin_bytes_total"
    }


def test_takeover_counters_in_metrics(tmp_path: Any) -> None:
    """Tasks taken over, pieces adopted, tags refused by kind, origin bytes of the fills: in /metrics."""
    _, answer = owner_with_the_file(tmp_path)
    b = Node(str(tmp_path / "b"))
    b.peer("p1")
    b.peer("p2")
    P = "dragonfly_supernode_takeover_"
    assert takeover_metrics(b)[(P + "tasks_total", "")] == 0
    b.register("p2", takeover={**answer["origin"], "tag": "0" * 32})  # a forged origin: a plain fetch
    b.http.calls.clear()
    b.node.remove_task(TID)
    b.register("p1", takeover={**answer["origin"], "sha256Tag": "0" * 32})  # the file's SHA-256 not vouched for
    bad = proofs(answer, [0, 1, 2, 3])
    bad[3]["tag"] = "1" * 32
    bad[2]["tag"] = answer["tags"][1]  # the tag of another piece
    b.sync("p1", have=[0, 1, 2, 3], proofs=bad)
    b.clock.advance(TAKEOVER_GRACE + TAKEOVER_QUIET)
    b.sync("p1")
    b.http.serve(ranged(2 * PIECE))
    m = takeover_metrics(b)
    assert m[(P + "tasks_total", "")] == 1
    assert m[(P + "pieces_adopted_total", "")] == 2
    assert (m[(P + "tags_refused_total", "origin")], m[(P + "tags_refused_total", "piece")],
            m[(P + "tags_refused_total", "sha256")]) == (1, 2, 1)
    assert m[(P + "fill_bytes_total", "")] == len(BODY) - 2 * PIECE == b.task.origin_bytes
    assert m[("dragonfly_supernode_origin_bytes_total", "")] == len(BODY) - 2 * PIECE


def test_a_task_its_swarm_holds_whole_is_recorded_evictable_and_kept_over_a_restart(tmp_path: Any) -> None:
    """
    Taken over, every piece vouched for by the peers: the node's copy is
    partial (only what it fetched), the task is "peer-held": in the task's
    JSON, on disk as a meta, listed to the disk GC and evictable once no
    live peer downloads it, and a restarted node knows it again (its
    digests, its version) with the pieces it had on disk.
    """
    _, answer = owner_with_the_file(tmp_path)
    home = str(tmp_path / "b")
    b = Node(home)
    b.peer("p1")
    b.register("p1", takeover=answer["origin"])
    b.sync("p1", have=list(range(COUNT - 1)), proofs=proofs(answer, list(range(COUNT - 1))))
    task = b.task
    assert not task.peer_held and TID not in [e.task_id for e in b.node.gc_entries()]
    b.clock.advance(TAKEOVER_GRACE + TAKEOVER_QUIET)
    b.sync("p1")
    b.http.serve(ranged((COUNT - 1) * PIECE))  # the last piece, which no peer held
    assert task.status == "running" and sorted(task.available) == [COUNT - 1] and task.peer_held
    assert task.to_json()["peerHeld"] is True
    assert json.load(open(task.meta_path))["peerHeld"] is True
    assert takeover_metrics(b)[("dragonfly_supernode_takeover_peer_held_tasks", "")] == 1
    entries = {e.task_id: e for e in b.node.gc_entries()}
    assert entries[TID].size == len(BODY) - (COUNT - 1) * PIECE
    assert entries[TID].in_use, "a live peer still downloads it"
    # a restart: the task, its digests and the piece on disk come back; the peers' proofs are not needed again
    r = Node(home)
    r.node.cdn.load()
    again = r.task
    assert again.peer_held and again.digests == digests(BODY) and again.version == task.version
    assert sorted(again.available) == [COUNT - 1] and r.http.calls == []
    r.peer("p2")
    assert r.register("p2")["task"]["peerHeld"] is True and r.http.calls == [], "no origin fetch for a peer-held task"
    assert r.sync("p2", digestsFrom=0)["digests"] == digests(BODY)
    # evictable like a finished task once no live peer downloads it
    r.node.leave_task(TID, "p2")
    assert r.node.evictable(TID)
    r.node.evict(TID)
    assert TID not in r.node.cdn.tasks and not os.path.exists(again.meta_path)

"""
Pieces a download wants first, fetched out of order (L{dragonfly.supernode.rangefetch}
and the CDN's side fetches): the range -> pieces mapping and the plan under
hypothesis, and the CDN against a fake origin (no sockets, a fake clock, a
pool that runs at once) storing, recording and publishing pieces out of
order exactly once each.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from dragonfly.core.ranges import ByteRange
from dragonfly.supernode import cdn as cdn_module
from dragonfly.supernode.cdn import Cdn
from dragonfly.supernode.node import digest_runs, known_from
from dragonfly.supernode.rangefetch import piece_bytes, side_headers, side_ok, side_plan, wanted_pieces

from .test_cdn import BODY, ETAG, LM, PIECE, TID, URL, digests, ranged, validator_headers, whole
from .test_supernode_api import FakeHttp, FakeResponse, FakeTransport, SyncPool, result

# -- pure ------------------------------------------------------------------------------

specs = st.one_of(
    st.builds(lambda a, n: ByteRange(first=a, last=None if n is None else a + n), st.integers(0, 1 << 34), st.one_of(st.none(), st.integers(0, 1 << 34))),
    st.builds(lambda n: ByteRange(suffix=n), st.integers(0, 1 << 34)),
)


@given(specs, st.integers(0, 1 << 35), st.integers(1, 1 << 24))
def test_wanted_pieces_cover_exactly_the_range(spec: ByteRange, length: int, piece: int) -> None:
    pieces = wanted_pieces(spec, length, piece)
    span = spec.resolve(length)
    if span is None:
        assert pieces is None
        return
    assert pieces is not None
    first, end = pieces
    start, stop = piece_bytes(first, end, length, piece)
    # every wanted byte is in those pieces; no piece is there without a wanted byte
    assert start <= span[0] < span[1] <= stop
    assert span[0] - start < piece and stop - span[1] < piece
    assert 0 <= first < end <= -(-length // piece)


@given(
    st.integers(1, 200), st.integers(0, 200), st.integers(1, 64), st.integers(0, 300 * 64), st.integers(0, 20 * 64),
    st.sets(st.integers(0, 400), max_size=40),
)
def test_side_plan(first: int, more: int, piece: int, reach: int, lookahead: int, taken: set[int]) -> None:
    wanted = (first, first + more)
    plan = side_plan(wanted, piece, reach, taken, lookahead)
    left = [i for i in range(*wanted) if i not in taken and i * piece >= reach + lookahead]
    if not left:
        assert plan is None
        return
    assert plan is not None
    a, b = plan
    # one request, within the wanted pieces, covering every piece the main fetch is not about to bring
    assert wanted[0] <= a < b <= wanted[1]
    assert a == left[0] and b == left[-1] + 1
    assert a not in taken and (b - 1) not in taken


@given(st.sampled_from([ETAG, 'W/"weak"', None]), st.sampled_from([LM, None]), st.integers(0, 1000), st.integers(1, 1000))
def test_side_headers_pin_the_version(etag: str | None, modified: str | None, start: int, size: int) -> None:
    length = start + size + 7
    out = side_headers({"etag": etag, "lastModified": modified, "length": length}, start, start + size)
    if etag == ETAG:
        assert out == {"Range": f"bytes={start}-{start + size - 1}", "If-Range": ETAG}
    elif modified:
        assert out == {"Range": f"bytes={start}-{start + size - 1}", "If-Range": LM}
    else:
        assert out is None  # nothing pins the bytes: no side fetch


def test_side_ok_takes_only_those_bytes_of_that_version() -> None:
    stored = {"etag": ETAG, "lastModified": LM, "length": 100}
    assert side_ok(10, 20, stored, 206, "bytes 10-19/100", {"etag": ETAG, "lastModified": None})
    assert not side_ok(10, 20, stored, 200, None, {"etag": ETAG})
    assert not side_ok(10, 20, stored, 206, "bytes 10-29/100", {"etag": ETAG})
    assert not side_ok(10, 20, stored, 206, "bytes 10-19/101", {"etag": ETAG})
    assert not side_ok(10, 20, stored, 206, "bytes 10-19/100", {"etag": '"v2"'})
    assert not side_ok(10, 20, stored, 206, None, {"etag": ETAG})


@given(st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "c"])), max_size=30), st.integers(0, 35))
def test_digest_runs_and_known_from(ds: list[str | None], first: int) -> None:
    runs = digest_runs(ds)
    rebuilt: list[str | None] = [None] * len(ds)
    for at, run in runs:
        assert run and all(d is not None for d in run)
        rebuilt[at : at + len(run)] = run
    assert rebuilt == ds
    prefix = known_from(ds, first)
    assert prefix == ds[first : first + len(prefix)]
    assert first + len(prefix) >= len(ds) or ds[first + len(prefix)] is None


# -- the CDN ---------------------------------------------------------------------------


class Counting(FakeTransport):
    resumed = 0

    def resumeProducing(self) -> None:
        self.resumed += 1


class Stepped(FakeResponse):
    """A body the test sends a piece at a time."""

    protocol: Any = None
    sent: int = 0

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        self.transport = Counting()
        protocol.makeConnection(self.transport)

    def feed(self, upto: int) -> None:
        self.protocol.dataReceived(self.body[self.sent : upto])
        self.sent = upto

    def end(self) -> None:
        self.feed(len(self.body))
        self.protocol.connectionLost(Failure(ResponseDone()))


def stepped(body: bytes = BODY, etag: str | None = ETAG) -> Stepped:
    return Stepped(body=body, headers=validator_headers(etag))


class Listener:
    def __init__(self) -> None:
        self.ready: list[int] = []
        self.events: list[str] = []

    def length_known(self, task: Any) -> None:
        self.events.append("length")

    def piece_ready(self, task: Any, index: int) -> None:
        assert task.digests[index] is not None
        self.ready.append(index)

    def task_failed(self, task: Any) -> None:
        self.events.append("failed")

    def task_done(self, task: Any) -> None:
        self.events.append("done")


class Env:
    def __init__(self, home: str) -> None:
        self.home, self.clock, self.http = home, Clock(), FakeHttp()
        # the main fetch leaves wanted pieces more than one piece ahead of it to a side fetch
        self.cdn = Cdn(home, self.http, SyncPool(), self.clock, piece_size=PIECE, lookahead=PIECE)

    def start(self) -> tuple[Any, Listener, Stepped]:
        task = self.cdn.ensure(TID, URL)
        listener = Listener()
        task.listeners.append(listener)
        main = stepped()
        self.http.serve(main, 0)
        return task, listener, main


@pytest.fixture
def env(tmp_path: Any) -> Env:
    return Env(str(tmp_path))


LAST = len(digests(BODY)) - 1  # 7, a short piece


def test_a_wanted_tail_is_fetched_out_of_order_and_published_once(env: Env, monkeypatch: Any) -> None:
    # the whole-file SHA-256 too (a task with a sha256 digest's): the main fetch's, over every byte
    monkeypatch.setattr(cdn_module, "FILE_SHA256_ALWAYS", True)
    task, listener, main = env.start()
    main.feed(PIECE + 10)
    assert listener.ready == [0]
    env.cdn.want(task, ByteRange(suffix=100))
    assert len(env.http.calls) == 2
    assert env.http.calls[1].headers == {"Range": [f"bytes={LAST * PIECE}-{len(BODY) - 1}"], "If-Range": [ETAG]}
    env.http.serve(ranged(LAST * PIECE), 1)
    # the tail is stored, recorded and published before the main fetch gets there
    assert listener.ready == [0, LAST]
    assert task.digests[LAST] == digests(BODY)[LAST] and task.digests[1] is None
    with open(task.data_path, "rb") as f:
        f.seek(LAST * PIECE)
        assert f.read() == BODY[LAST * PIECE :]
    # a crash now would resume from the main fetch's stored pieces only (before the first hole)
    part = os.path.join(env.home, "repo", TID + ".part")
    with open(part) as f:
        assert json.load(f)["holesFrom"] == PIECE
    main.end()
    assert task.status == "success", task.error
    assert sorted(listener.ready) == list(range(LAST + 1)) and len(listener.ready) == LAST + 1
    assert task.digests == digests(BODY) and task.sha256 == hashlib.sha256(BODY).hexdigest()
    assert open(task.data_path, "rb").read() == BODY
    assert task.side_bytes == len(BODY) - LAST * PIECE
    assert task.origin_bytes == len(BODY) + task.side_bytes
    meta = json.load(open(task.meta_path))
    assert meta["digests"] == digests(BODY)


def test_the_main_fetch_waits_while_a_side_fetch_brings_the_wanted_pieces(env: Env) -> None:
    task, listener, main = env.start()
    main.feed(PIECE)
    env.cdn.want(task, ByteRange(suffix=10))
    side = Stepped(code=206, body=BODY[LAST * PIECE :], headers=validator_headers())
    side.headers.setRawHeaders(b"content-range", [f"bytes {LAST * PIECE}-{len(BODY) - 1}/{len(BODY)}".encode()])
    env.http.serve(side, 1)
    paused, resumed = main.transport.paused, main.transport.resumed
    assert paused >= 1
    side.feed(10)
    assert main.transport.resumed == resumed  # still held
    side.end()
    assert main.transport.resumed == resumed + 1 and listener.ready == [0, LAST]
    main.end()
    assert task.status == "success" and task.digests == digests(BODY)


def test_a_side_fetch_never_holds_the_main_fetch_past_half_its_idle_timeout(env: Env) -> None:
    task, listener, main = env.start()
    env.cdn.want(task, ByteRange(suffix=10))
    side = Stepped(code=206, body=BODY[LAST * PIECE :], headers=validator_headers())
    side.headers.setRawHeaders(b"content-range", [f"bytes {LAST * PIECE}-{len(BODY) - 1}/{len(BODY)}".encode()])
    env.http.serve(side, 1)
    resumed = main.transport.resumed
    env.clock.advance(31)
    assert main.transport.resumed == resumed + 1
    side.end()
    main.end()
    assert task.status == "success" and sorted(listener.ready) == list(range(LAST + 1)) and len(listener.ready) == LAST + 1


def test_the_holes_mark_goes_once_the_main_fetch_passes_the_side_fetch(env: Env) -> None:
    task, listener, main = env.start()
    env.cdn.want(task, ByteRange(first=4 * PIECE, last=4 * PIECE + 9))
    side = ranged(4 * PIECE, body=BODY[: 5 * PIECE], content_range=f"bytes {4 * PIECE}-{5 * PIECE - 1}/{len(BODY)}")
    env.http.serve(side, 1)
    assert listener.ready == [4]
    part = os.path.join(env.home, "repo", TID + ".part")
    main.feed(4 * PIECE + 3)
    assert json.load(open(part))["holesFrom"] == 0
    main.feed(5 * PIECE)
    assert "holesFrom" not in json.load(open(part))  # the main fetch's own pieces reach the side fetch's end
    assert listener.ready == [4, 0, 1, 2, 3]
    main.end()
    assert task.status == "success" and task.digests == digests(BODY)


def test_a_range_the_main_fetch_reaches_soon_gets_no_side_fetch(env: Env) -> None:
    task, listener, main = env.start()
    main.feed(PIECE)
    env.cdn.want(task, ByteRange(first=PIECE + 5, last=2 * PIECE - 1))  # piece 1: within the lookahead
    assert len(env.http.calls) == 1
    env.cdn.want(task, ByteRange(first=0, last=10))  # stored already
    assert len(env.http.calls) == 1
    main.end()
    assert task.status == "success" and task.origin_bytes == len(BODY)


def test_a_range_wanted_before_the_length_waits_for_it(env: Env) -> None:
    task = env.cdn.ensure(TID, URL)
    env.cdn.want(task, ByteRange(first=5 * PIECE, last=6 * PIECE + 1))
    assert len(env.http.calls) == 1
    main = stepped()
    env.http.serve(main, 0)
    assert env.http.calls[1].headers["Range"] == [f"bytes={5 * PIECE}-{7 * PIECE - 1}"]
    # the main fetch catches up with the side fetch before it answers: nothing twice
    main.end()
    assert task.status == "success" and task.digests == digests(BODY)
    side = ranged(5 * PIECE, body=BODY[: 7 * PIECE], content_range=f"bytes {5 * PIECE}-{7 * PIECE - 1}/{len(BODY)}")
    env.http.serve(side, 1)
    assert side.delivered and task.side_bytes == 0
    assert open(task.data_path, "rb").read() == BODY


@pytest.mark.parametrize(
    "answer",
    [
        whole(),  # the origin ignores ranges (or the file changed): a 200
        ranged(LAST * PIECE, etag='"v2"'),  # another version
        ranged(LAST * PIECE, content_range=f"bytes {LAST * PIECE}-{len(BODY) - 1}/{len(BODY) + 1}"),
    ],
)
def test_a_side_fetch_answered_wrong_is_dropped_and_the_main_fetch_serves(env: Env, answer: FakeResponse) -> None:
    task, listener, main = env.start()
    env.cdn.want(task, ByteRange(suffix=10))
    env.http.serve(answer, 1)
    assert listener.ready == [] and task.side == [] and task.side_bytes == 0
    main.end()
    assert task.status == "success"
    assert listener.ready == list(range(LAST + 1))
    assert open(task.data_path, "rb").read() == BODY and task.origin_bytes == len(BODY)


def test_two_reads_that_disagree_fail_the_task(env: Env) -> None:
    """An origin that sends other bytes for the same validators: nothing is committed."""
    task, listener, main = env.start()
    env.cdn.want(task, ByteRange(suffix=10))
    bad = BODY[: LAST * PIECE] + bytes(len(BODY) - LAST * PIECE)
    env.http.serve(ranged(LAST * PIECE, body=bad), 1)
    assert listener.ready == [LAST]
    main.end()
    assert task.status == "failed" and task.error.code == "SOURCE_CHANGED"
    assert not os.path.exists(task.meta_path)


def test_a_failed_main_fetch_drops_its_side_fetches_and_resumes_before_the_holes(env: Env) -> None:
    task, listener, main = env.start()
    main.feed(2 * PIECE)
    env.cdn.want(task, ByteRange(first=5 * PIECE, last=5 * PIECE))
    side = Stepped(
        code=206, body=BODY[5 * PIECE : 6 * PIECE],
        headers=validator_headers(),
    )
    side.headers.setRawHeaders(b"content-range", [f"bytes {5 * PIECE}-{6 * PIECE - 1}/{len(BODY)}".encode()])
    env.http.serve(side, 1)
    side.feed(PIECE)
    assert listener.ready == [0, 1, 5]
    main.feed(3 * PIECE)
    main.protocol.connectionLost(Failure(ConnectionError("reset")))
    assert task.status == "failed" and task.error.code == "SOURCE_TRUNCATED"
    # the next fetch trusts only the prefix before the first hole (3 pieces < 5)
    again = env.cdn.ensure(TID, URL)
    assert env.http.calls[-1].headers == {"Range": [f"bytes={3 * PIECE}-"], "If-Range": [ETAG]}
    env.http.serve(ranged(3 * PIECE), -1)
    assert again.status == "success" and again.digests == digests(BODY)
    assert open(again.data_path, "rb").read() == BODY


def test_a_fresh_cdn_without_wishes_fetches_as_before(tmp_path: Any) -> None:
    http = FakeHttp()
    cdn = Cdn(str(tmp_path), http, SyncPool(), Clock(), piece_size=PIECE)
    task = cdn.ensure(TID, URL)
    http.serve(whole())
    assert task.status == "success" and len(http.calls) == 1 and task.side_bytes == 0


# -- the SuperNode: a registration with a range ------------------------------------------


def node_env(home: str) -> Any:
    from treq.testing import StubTreq

    from dragonfly.supernode.api import SupernodeApi
    from dragonfly.supernode.node import SuperNode
    from dragonfly.supernode.scheduler import Scheduler

    from .test_supernode_api import Env as ApiEnv

    clock, http = Clock(), FakeHttp()
    node = SuperNode(
        lambda track: Cdn(home, http, SyncPool(), clock, piece_size=PIECE, on_new_task=track, lookahead=PIECE),
        Scheduler(rng=__import__("random").Random(0)), clock, "10.0.0.9", 8001,
    )
    return ApiEnv(home, clock, http, node, StubTreq(SupernodeApi(node).resource()))


def test_a_registration_with_a_range_waits_for_the_length_and_the_seed_offers_the_range_first(tmp_path: Any) -> None:
    from .test_supernode_api import BASE

    env = node_env(str(tmp_path))
    env.register_peer()
    d = env.stub.request("POST", BASE + "/api/v1/tasks", json={"peerId": "peer-1", "url": URL, "range": "bytes=-100"})
    env.stub.flush()
    answered: list[Any] = []
    d.addBoth(answered.append)
    assert answered == []  # the origin has not answered: no length yet
    main = stepped()
    env.http.serve(main, 0)
    env.stub.flush()
    assert len(answered) == 1
    answer = json.loads(result(answered[0].content()))
    assert answer["task"]["contentLength"] == len(BODY)
    # the tail's piece is asked of the origin at once, out of order
    assert env.http.calls[1].headers == {"Range": [f"bytes={LAST * PIECE}-{len(BODY) - 1}"], "If-Range": [ETAG]}
    env.http.serve(ranged(LAST * PIECE), 1)
    code, data = env.sync(answer["taskId"])
    assert code == 200, data
    # the digests known so far, without holes: piece 7's comes by the seed's DIGESTS frame
    assert data["digestsFrom"] == 0 and data["digests"] == []
    # the peer streams nothing yet; the range it registered with comes first
    assert LAST in data["seedPieces"], data
    main.end()
    code, data = env.sync(answer["taskId"], digestsFrom=0)
    assert data["digests"] == digests(BODY)


@pytest.mark.parametrize("value", ["bytes=5-1", "bytes=0-1,4-5", "pages=1-2", "bytes=x"])
def test_a_registration_with_a_bad_range_is_refused(tmp_path: Any, value: str) -> None:
    env = node_env(str(tmp_path))
    env.register_peer()
    code, data = env.register_task(range=value)
    assert code == 400 and data["error"]["code"] == "BAD_FIELD", data
    assert env.http.calls == []


# -- a task that is one range alone (no prefetch) ------------------------------------------


def test_a_range_alone_is_fetched_with_range_and_stored_as_its_own_content(env: Env) -> None:
    spec = ByteRange(first=3 * PIECE + 7, last=5 * PIECE + 1)
    task = env.cdn.ensure(TID, URL, fetch_range=spec)
    assert env.http.calls[0].headers == {"Range": [spec.header()]}
    part = BODY[3 * PIECE + 7 : 5 * PIECE + 2]
    env.http.serve(ranged(3 * PIECE + 7, body=BODY[: 5 * PIECE + 2], content_range=f"bytes {3 * PIECE + 7}-{5 * PIECE + 1}/{len(BODY)}"))
    assert task.status == "success", task.error
    assert task.length == len(part) and open(task.data_path, "rb").read() == part
    assert task.digests == digests(part) and task.sha256 is None  # no digest: no whole-file hash
    assert task.validators["range"] == f"bytes {3 * PIECE + 7}-{5 * PIECE + 1}/{len(BODY)}"
    # never revalidated as if it were the whole file
    assert env.cdn.fresh(TID, URL).result is task and len(env.http.calls) == 1


@pytest.mark.parametrize(
    "answer",
    [
        whole(),  # the origin ignores ranges
        ranged(3 * PIECE, content_range=f"bytes {3 * PIECE}-{len(BODY) - 1}/{len(BODY)}"),  # other bytes
    ],
)
def test_a_range_alone_answered_otherwise_fails(env: Env, answer: FakeResponse) -> None:
    task = env.cdn.ensure(TID, URL, fetch_range=ByteRange(first=5, last=99))
    env.http.serve(answer)
    assert task.status == "failed" and task.error.code == "SOURCE_IGNORES_RANGE"
    assert sorted(os.listdir(os.path.join(env.home, "repo"))) == []


@pytest.mark.parametrize(
    "body",
    [
        {"range": "bytes=0-99", "prefetch": False},  # the range is not in the identifier
        {"range": "bytes=0-99", "prefetch": False, "identifier": "#range=bytes=0-98"},
        {"range": "bytes=0-99", "prefetch": False, "identifier": "#range=bytes=0-99", "digest": "sha256:" + "a" * 64},
        {"prefetch": False, "identifier": "#range=bytes=0-99"},
    ],
)
def test_a_range_alone_must_name_itself(tmp_path: Any, body: dict) -> None:
    env = node_env(str(tmp_path))
    env.register_peer()
    code, data = env.register_task(**body)
    assert code == 400 and data["error"]["code"] == "BAD_FIELD", data
    assert env.http.calls == []


def test_a_range_alone_registers_as_its_own_task(tmp_path: Any) -> None:
    from dragonfly.core.ids import task_id

    from .test_supernode_api import URL as API_URL

    env = node_env(str(tmp_path))
    env.register_peer()
    code, data = env.register_task(range="bytes=-100", prefetch=False, identifier="#range=bytes=-100")
    assert code == 200, data
    assert data["taskId"] == task_id(API_URL, identifier="#range=bytes=-100") != task_id(API_URL)
    assert env.http.calls[0].headers == {"Range": ["bytes=-100"]}


# -- a cut body taken up again in-process (issue 14) ----------------------------------------


def retrying(tmp_path: Any, retries: int = 2) -> Env:
    env = Env(str(tmp_path))
    env.cdn = Cdn(env.home, env.http, SyncPool(), env.clock, piece_size=PIECE, lookahead=PIECE, retries=retries)
    return env


def test_a_cut_body_goes_on_in_process_and_the_peers_see_nothing(tmp_path: Any, monkeypatch: Any) -> None:
    # the whole-file SHA-256 too (a task with a sha256 digest's): carried over the cut from the bytes read back
    monkeypatch.setattr(cdn_module, "FILE_SHA256_ALWAYS", True)
    from .test_cdn import cut_at

    env = retrying(tmp_path)
    task = env.cdn.ensure(TID, URL)
    listener = Listener()
    task.listeners.append(listener)
    env.http.serve(cut_at(3 * PIECE + 500), 0)
    # still running: it asks for the rest from the last byte written (500 bytes into piece 3, rehashed
    # from the file), pinned to the version
    assert task.status == "running" and listener.events == ["length"]
    assert env.http.calls[1].headers == {"Range": [f"bytes={3 * PIECE + 500}-"], "If-Range": [ETAG]}
    env.http.serve(ranged(3 * PIECE + 500), 1)
    assert task.status == "success", task.error
    assert listener.events == ["length", "done"]  # one length (one BITFIELD), no failure
    assert listener.ready == list(range(LAST + 1))  # each piece published once
    assert open(task.data_path, "rb").read() == BODY and task.sha256 == hashlib.sha256(BODY).hexdigest()
    assert task.digests == digests(BODY)
    assert task.origin_bytes == len(BODY)  # one copy: no byte asked for twice
    assert env.cdn.fetch_retries == 1


def test_a_cut_at_a_piece_boundary_goes_on_from_it(tmp_path: Any) -> None:
    from .test_cdn import cut_at

    env = retrying(tmp_path)
    task = env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(2 * PIECE), 0)
    assert env.http.calls[1].headers == {"Range": [f"bytes={2 * PIECE}-"], "If-Range": [ETAG]}
    env.http.serve(ranged(2 * PIECE), 1)
    assert task.status == "success", task.error
    assert open(task.data_path, "rb").read() == BODY and task.origin_bytes == len(BODY)


def test_a_silent_origin_goes_on_from_the_bytes_written_before_it_stopped(tmp_path: Any) -> None:
    """Silence aborts the body: the bytes received and not yet handed to the pool are asked for again, no more."""
    env = retrying(tmp_path)
    task = env.cdn.ensure(TID, URL)
    main = stepped()
    env.http.serve(main, 0)
    main.feed(PIECE + 700)
    env.clock.advance(61)  # the idle timeout
    main.protocol.connectionLost(Failure(ConnectionError("aborted")))
    assert task.status == "running"
    [asked] = env.http.calls[1].headers["Range"]
    offset = int(asked[len("bytes="):-1])
    assert PIECE <= offset <= PIECE + 700
    env.http.serve(ranged(offset), 1)
    assert task.status == "success", task.error
    assert open(task.data_path, "rb").read() == BODY and task.digests == digests(BODY)


def test_a_cut_body_keeps_the_pieces_a_side_fetch_stored_further_on(tmp_path: Any) -> None:
    env = retrying(tmp_path)
    task = env.cdn.ensure(TID, URL)
    listener = Listener()
    task.listeners.append(listener)
    main = stepped()
    env.http.serve(main, 0)
    main.feed(2 * PIECE + 5)
    env.cdn.want(task, ByteRange(suffix=10))
    env.http.serve(ranged(LAST * PIECE), 1)
    main.protocol.connectionLost(Failure(ConnectionError("reset")))
    assert task.status == "running"
    # from the main fetch's last byte written (5 bytes into piece 2); the side fetch's pieces further on stay
    assert env.http.calls[2].headers == {"Range": [f"bytes={2 * PIECE + 5}-"], "If-Range": [ETAG]}
    env.http.serve(ranged(2 * PIECE + 5), 2)
    assert task.status == "success", task.error
    assert sorted(listener.ready) == list(range(LAST + 1)) and len(listener.ready) == LAST + 1
    assert open(task.data_path, "rb").read() == BODY and task.digests == digests(BODY)


@pytest.mark.parametrize(
    "answer", [whole(), whole(etag='"v2"'), ranged(3 * PIECE + 500, etag='"v2"')],
    ids=["ignores-range", "changed-200", "changed-206"],
)
def test_a_retry_that_finds_another_version_fails_as_before(tmp_path: Any, answer: FakeResponse) -> None:
    """A retry from part-way into a piece: an origin that ignores the range or changed the file fails the task."""
    from .test_cdn import cut_at

    env = retrying(tmp_path)
    task = env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(3 * PIECE + 500), 0)
    assert env.http.calls[1].headers == {"Range": [f"bytes={3 * PIECE + 500}-"], "If-Range": [ETAG]}
    env.http.serve(answer, 1)
    assert task.status == "failed" and task.error.code == "SOURCE_TRUNCATED"
    # the next registration: the parked prefix, 500 bytes into piece 3, goes on from there,
    # and the origin's answer decides again (here the first version, whole)
    assert sorted(os.listdir(os.path.join(env.home, "resume"))) == [TID + ".data", TID + ".part"]
    task = env.cdn.ensure(TID, URL)
    assert env.http.calls[2].headers == {"Range": [f"bytes={3 * PIECE + 500}-"], "If-Range": [ETAG]}
    env.http.serve(whole(), 2)
    assert task.status == "success", task.error
    assert open(task.data_path, "rb").read() == BODY and task.digests == digests(BODY)


def test_retries_run_out(tmp_path: Any) -> None:
    from .test_cdn import Cut

    env = retrying(tmp_path, retries=2)
    task = env.cdn.ensure(TID, URL)
    first = Cut(body=BODY, headers=validator_headers())
    first.cut = PIECE
    env.http.serve(first, 0)
    for n in (1, 2):
        at = n * PIECE
        r = Cut(code=206, body=BODY[at:], headers=validator_headers())
        r.cut = PIECE
        r.headers.setRawHeaders(b"content-range", [f"bytes {at}-{len(BODY) - 1}/{len(BODY)}".encode()])
        env.http.serve(r, n)
    assert task.status == "failed" and task.error.code == "SOURCE_TRUNCATED"
    assert len(env.http.calls) == 3 and env.cdn.fetch_retries == 2
    # what reached the disk is parked for a later registration, as before
    assert sorted(os.listdir(os.path.join(env.home, "resume"))) == [TID + ".data", TID + ".part"]


def test_a_peer_waiting_for_a_piece_a_side_fetch_brings_syncs_again_soon(tmp_path: Any) -> None:
    from dragonfly.protocol.supernode_api import SYNC_INTERVAL
    from dragonfly.supernode.node import SIDE_SYNC_INTERVAL

    env = node_env(str(tmp_path))
    env.register_peer()
    d = env.stub.request("POST", "http://supernode.test/api/v1/tasks", json={"peerId": "peer-1", "url": URL, "range": "bytes=-100"})
    env.stub.flush()
    main = stepped()
    env.http.serve(main, 0)
    env.stub.flush()
    answered: list[Any] = []
    d.addBoth(answered.append)
    tid = json.loads(result(answered[0].content()))["taskId"]
    side = Stepped(code=206, body=BODY[LAST * PIECE :], headers=validator_headers())
    side.headers.setRawHeaders(b"content-range", [f"bytes {LAST * PIECE}-{len(BODY) - 1}/{len(BODY)}".encode()])
    env.http.serve(side, 1)
    code, data = env.sync(tid, want=LAST)
    assert code == 200 and data["syncInterval"] == SIDE_SYNC_INTERVAL
    side.end()
    code, data = env.sync(tid, want=LAST)
    assert data["syncInterval"] == SYNC_INTERVAL and LAST in data["seedPieces"]

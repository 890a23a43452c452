"""
Resumable origin fetches (L{dragonfly.supernode.resume}, L{dragonfly.supernode.cdn},
L{dragonfly.core.bodywriter}): the Range/If-Range decision as pure functions
under hypothesis, the body writer resumed at random offsets, and the CDN
against a fake origin (no sockets, a fake clock, a pool that runs at once).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from dragonfly.core.bodywriter import ChunkedFileWriter, ResumePoint, rehash_prefix
from dragonfly.core.ids import task_id
from dragonfly.supernode import cdn as cdn_module
from dragonfly.supernode.cdn import Cdn
from dragonfly.supernode.resume import (
    ContentRange,
    Verdict,
    if_range_value,
    judge,
    parse_content_range,
    resume_headers,
)

from .test_supernode_api import FakeHttp, FakeResponse, FakeTransport, SyncPool

PIECE = 1024
BODY = bytes(random.Random(11).getrandbits(8) for _ in range(7 * PIECE + 300))  # 8 pieces, the last short
URL = "http://origin.test/big.bin"
TID = task_id(URL)
ETAG = '"v1-abc"'
LM = "Tue, 01 Dec 2026 10:00:00 GMT"


def digests(body: bytes, piece: int = PIECE) -> list[str]:
    return [hashlib.sha256(body[i : i + piece]).hexdigest() for i in range(0, len(body), piece)]


# -- the decision, pure -------------------------------------------------------------

etags = st.one_of(
    st.none(),
    st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters='"'), max_size=12).map(lambda t: f'"{t}"'),
    st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters='"'), max_size=12).map(lambda t: f'W/"{t}"'),
)
dates = st.one_of(st.none(), st.sampled_from([LM, "Wed, 02 Dec 2026 11:00:00 GMT"]))
lengths = st.one_of(st.none(), st.integers(0, 1 << 40))


@given(st.integers(0, 1 << 62), st.integers(0, 1 << 62), st.one_of(st.integers(1, 1 << 62), st.none()))
def test_content_range_round_trip(first: int, extra: int, total: int | None) -> None:
    last = first + extra
    value = f"bytes {first}-{last}/{'*' if total is None else total}"
    parsed = parse_content_range(value)
    if total is not None and last >= total:
        assert parsed is None
    else:
        assert parsed == ContentRange(first, last, total)
        assert parse_content_range(value.encode()) == parsed


@given(st.one_of(st.text(max_size=40), st.binary(max_size=40)))
def test_content_range_parser_never_raises(value: Any) -> None:
    parsed = parse_content_range(value)
    assert parsed is None or (0 <= parsed.first <= parsed.last and (parsed.total is None or parsed.last < parsed.total))


@given(etags, dates, lengths, st.integers(-5, 1 << 41))
def test_resume_headers(etag: str | None, modified: str | None, length: int | None, offset: int) -> None:
    validators = {"etag": etag, "lastModified": modified, "length": length}
    out = resume_headers(validators, offset)
    strong = etag is not None and not etag.startswith("W/")
    if length is None or not 0 < offset < length or not (strong or modified):
        assert out is None
        return
    assert out == {"Range": f"bytes={offset}-", "If-Range": etag if strong else modified}
    # a weak tag never pins a range
    assert not out["If-Range"].startswith("W/")
    assert if_range_value(validators) == out["If-Range"]


@given(
    st.integers(1, 1 << 40), st.integers(1, 1 << 40), etags, dates,
    st.sampled_from([200, 206, 304, 404, 416, 500, 503]),
    st.integers(-3, 3), st.integers(-3, 3), st.integers(-3, 3), etags, dates, st.booleans(),
)
def test_judge(
    offset: int, more: int, etag: str | None, modified: str | None, status: int,
    d_first: int, d_last: int, d_total: int, etag2: str | None, modified2: str | None, same: bool,
) -> None:
    length = offset + more
    stored = {"etag": etag, "lastModified": modified, "length": length}
    answered = {"etag": etag, "lastModified": modified} if same else {"etag": etag2, "lastModified": modified2}
    first, last, total = offset + d_first, length - 1 + d_last, length + d_total
    header = f"bytes {first}-{last}/{total}"
    verdict = judge(offset, stored, status, header, answered)
    if status == 200:
        assert verdict is Verdict.FROM_ZERO
    elif status == 416:
        assert verdict is Verdict.REFETCH
    elif status != 206:
        assert verdict is Verdict.FAIL
    else:
        exact = (first, last, total) == (offset, length - 1, length)
        consistent = all(answered[k] is None or answered[k] == stored[k] for k in ("etag", "lastModified"))
        assert verdict is (Verdict.CONTINUE if exact and consistent else Verdict.REFETCH)


def test_judge_a_206_without_content_range_is_not_trusted() -> None:
    stored = {"etag": ETAG, "lastModified": None, "length": 100}
    assert judge(10, stored, 206, None, {"etag": ETAG}) is Verdict.REFETCH
    assert judge(10, stored, 206, b"bytes 10-99/100", {"etag": None, "lastModified": None}) is Verdict.CONTINUE


# -- the body writer, resumed ------------------------------------------------------------


class ImmediatePool(SyncPool):
    pass


def _write(path: str, body: bytes, start: ResumePoint | None, feed: list[int], chunk: int, length: int | None) -> tuple[Any, list]:
    offset = start.offset if start is not None else 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.ftruncate(fd, offset)
    seen: list[tuple[int, str]] = []
    writer = ChunkedFileWriter(ImmediatePool(), Clock(), fd, chunk, length, on_chunk=lambda i, d: seen.append((i, d)), start=start)
    writer.makeConnection(FakeTransport())
    at = offset
    for n in feed:
        writer.dataReceived(body[at : at + n])
        at += n
    writer.dataReceived(body[at:])
    writer.connectionLost(Failure(ResponseDone()))
    out: list[Any] = []
    writer.done.addBoth(out.append)
    return out[0], seen


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    st.integers(1, 4 * PIECE), st.data(), st.sampled_from([PIECE, 333, 4096]),
)
def test_writer_resumed_anywhere_gives_the_same_file_and_digests(tmp_path: Any, size: int, data: Any, chunk: int) -> None:
    body = BODY[:size]
    path = str(tmp_path / f"body-{size}-{chunk}")
    cut = data.draw(st.integers(0, size), label="cut")
    feeds = data.draw(st.lists(st.integers(1, 900), max_size=8), label="feeds")
    # the first try stores the bytes before the cut, then the connection drops
    with open(path, "wb") as f:
        f.write(body[:cut])
    point = rehash_prefix(path, cut, chunk)
    assert point.offset == cut
    assert point.digests == digests(body[: cut - cut % chunk], chunk)
    result, seen = _write(path, body, point, feeds, chunk, len(body))
    assert result == (len(body), hashlib.sha256(body).hexdigest())
    assert open(path, "rb").read() == body
    # the digests of the chunks after the cut arrive, in order
    assert point.digests + [d for _, d in seen] == digests(body, chunk)
    assert [i for i, _ in seen] == list(range(len(point.digests), len(digests(body, chunk))))


def test_writer_keeps_what_arrived_before_a_cut(tmp_path: Any) -> None:
    """A body cut short is still written up to its last byte: the resume goes on from there."""
    path = str(tmp_path / "cut")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    writer = ChunkedFileWriter(SyncPool(), Clock(), fd, PIECE, len(BODY))
    writer.makeConnection(FakeTransport())
    writer.dataReceived(BODY[: 2 * PIECE + 17])
    writer.connectionLost(Failure(ConnectionError("reset")))
    out: list[Any] = []
    writer.done.addBoth(out.append)
    assert isinstance(out[0], Failure) and out[0].value.code == "SOURCE_TRUNCATED"
    assert open(path, "rb").read() == BODY[: 2 * PIECE + 17]


def test_writer_bounds_the_bytes_waiting_for_the_pool(tmp_path: Any) -> None:
    """A pool that does not keep up pauses the body once MAX_PENDING_BYTES wait; it resumes at half."""
    from twisted.internet import defer

    jobs: list[Any] = []

    class StuckPool:
        def run(self, f: Any, *a: Any) -> Any:
            d = defer.Deferred()
            jobs.append((d, f, a))
            return d

    fd = os.open(str(tmp_path / "b"), os.O_WRONLY | os.O_CREAT, 0o644)
    writer = ChunkedFileWriter(StuckPool(), Clock(), fd, 1 << 20)
    t = FakeTransport()
    writer.makeConnection(t)
    block = b"x" * (1 << 20)
    for _ in range(7):
        writer.dataReceived(block)
    assert t.paused == 0
    writer.dataReceived(block)
    assert t.paused == 1
    resumed: list[int] = []
    t.resumeProducing = lambda: resumed.append(1)  # type: ignore[method-assign]
    while not resumed:
        d, f, a = jobs.pop(0)
        d.callback(f(*a))
    assert writer._pending <= ChunkedFileWriter.MAX_PENDING_BYTES // 2
    os.close(fd)


# -- the CDN ---------------------------------------------------------------------------


def validator_headers(etag: str | None = ETAG, modified: str | None = LM) -> Headers:
    h = Headers({b"content-type": [b"application/x-test"]})
    if etag:
        h.setRawHeaders(b"etag", [etag.encode()])
    if modified:
        h.setRawHeaders(b"last-modified", [modified.encode()])
    return h


def ranged(offset: int, body: bytes = BODY, etag: str | None = ETAG, content_range: str | None = None) -> FakeResponse:
    h = validator_headers(etag)
    h.setRawHeaders(b"content-range", [(content_range or f"bytes {offset}-{len(body) - 1}/{len(body)}").encode()])
    return FakeResponse(code=206, phrase=b"Partial Content", body=body[offset:], headers=h)


def whole(body: bytes = BODY, etag: str | None = ETAG) -> FakeResponse:
    return FakeResponse(body=body, headers=validator_headers(etag))


class Cut(FakeResponse):
    """Sends C{cut} bytes of the body, then the connection is reset."""

    cut = 0

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(FakeTransport())
        protocol.dataReceived(self.body[: self.cut])
        protocol.connectionLost(Failure(ConnectionError("connection reset")))


def cut_at(n: int, etag: str | None = ETAG) -> FakeResponse:
    r = Cut(body=BODY, headers=validator_headers(etag))
    r.cut = n
    return r


class Env:
    def __init__(self, home: str) -> None:
        self.home, self.clock, self.http = home, Clock(), FakeHttp()
        self.cdn = Cdn(home, self.http, SyncPool(), self.clock, piece_size=PIECE)

    def files(self, sub: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.home, sub)))

    def sent_headers(self, n: int = -1) -> dict[str, list[str]]:
        return self.http.calls[n].headers


@pytest.fixture
def env(tmp_path: Any) -> Env:
    return Env(str(tmp_path))


def check_complete(env: Env, body: bytes = BODY) -> None:
    task = env.cdn.tasks[TID]
    assert task.status == "success", task.error
    # a task with no sha256 digest takes no whole-file hash: its pieces' digests are its check
    assert task.sha256 is None
    assert task.digests == digests(body)
    assert open(task.data_path, "rb").read() == body
    assert env.files("repo") == [TID + ".data", TID + ".meta"]
    assert env.files("resume") == []


def test_a_cut_fetch_resumes_where_it_stopped(env: Env) -> None:
    task = env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(3 * PIECE + 500))
    assert task.status == "failed" and task.error.code == "SOURCE_TRUNCATED"
    # nothing half-fetched in the cache; the prefix parked
    assert env.files("repo") == []
    assert env.files("resume") == [TID + ".data", TID + ".part"]
    task = env.cdn.ensure(TID, URL)
    assert env.sent_headers() == {"Range": [f"bytes={3 * PIECE + 500}-"], "If-Range": [ETAG]}
    # the pieces stored before are published once the origin confirms the version
    assert task.piece_count is None
    env.http.serve(ranged(3 * PIECE + 500))
    check_complete(env)
    assert task.origin_bytes == len(BODY)  # 3.5 pieces, then the rest: one copy in all
    assert env.cdn.resumed_fetches == 1 and env.cdn.resumed_bytes == 3 * PIECE + 500


def test_if_range_uses_last_modified_without_a_strong_etag(env: Env) -> None:
    env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(2 * PIECE, etag='W/"weak"'))
    env.cdn.ensure(TID, URL)
    assert env.sent_headers() == {"Range": [f"bytes={2 * PIECE}-"], "If-Range": [LM]}


def test_without_validators_nothing_is_kept(env: Env) -> None:
    """No ETag, no Last-Modified: a range could mix two versions, so the prefix is dropped."""
    r = Cut(body=BODY, headers=Headers({}))
    r.cut = 3 * PIECE
    env.cdn.ensure(TID, URL)
    env.http.serve(r)
    assert env.files("repo") == [] and env.files("resume") == []
    env.cdn.ensure(TID, URL)
    assert env.sent_headers() == {}


def test_restart_mid_fetch_resumes(env: Env) -> None:
    """The process dies mid-fetch (nothing runs after the last write); a new one on the same home resumes."""
    holder: list[Any] = []

    class Hanging(FakeResponse):
        def deliverBody(self, protocol: Any) -> None:
            protocol.makeConnection(FakeTransport())
            protocol.dataReceived(self.body[: 5 * PIECE + 3])
            holder.append(protocol)

    env.cdn.ensure(TID, URL)
    env.http.serve(Hanging(body=BODY, headers=validator_headers()))
    assert env.cdn.tasks[TID].available is not None and len(env.cdn.tasks[TID].available) == 5
    assert env.files("repo") == [TID + ".data", TID + ".part"]
    again = Env(env.home)
    assert again.cdn.load() == 0
    assert again.files("repo") == [] and again.files("resume") == [TID + ".data", TID + ".part"]
    task = again.cdn.ensure(TID, URL)
    # the 3 bytes past the fifth piece were still in memory: gone with the process
    assert again.sent_headers() == {"Range": [f"bytes={5 * PIECE}-"], "If-Range": [ETAG]}
    again.http.serve(ranged(5 * PIECE))
    check_complete(again)
    assert task.origin_bytes == len(BODY) - 5 * PIECE


def test_a_restart_hashes_the_parked_prefix_ahead(env: Env, monkeypatch: Any) -> None:
    """The prefix a crash left is hashed from the cache reload on: the resume itself hashes nothing."""
    holder: list[Any] = []

    class Hanging(FakeResponse):
        def deliverBody(self, protocol: Any) -> None:
            protocol.makeConnection(FakeTransport())
            protocol.dataReceived(self.body[: 5 * PIECE + 3])
            holder.append(protocol)

    env.cdn.ensure(TID, URL)
    env.http.serve(Hanging(body=BODY, headers=validator_headers()))
    again = Env(env.home)
    assert again.cdn.load() == 0
    assert len(again.cdn._prehash) == 1
    hashed: list[int] = []
    real = cdn_module.rehash_prefix
    monkeypatch.setattr(cdn_module, "rehash_prefix", lambda *a: hashed.append(a[1]) or real(*a))
    task = again.cdn.ensure(TID, URL)
    assert again.sent_headers() == {"Range": [f"bytes={5 * PIECE}-"], "If-Range": [ETAG]}
    again.http.serve(ranged(5 * PIECE))
    check_complete(again)
    assert hashed == [] and task.origin_bytes == len(BODY) - 5 * PIECE


class Hanging(FakeResponse):
    """Sends C{cut} bytes of the body and nothing more: the process dies with the fetch under way."""

    cut = 5 * PIECE + 3

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(FakeTransport())
        protocol.dataReceived(self.body[: self.cut])


def crashed_mid_fetch(env: Env, headers: dict[str, str] | None = None, cut: int = 5 * PIECE + 3) -> Env:
    """A fetch under way when the process died (C{cut} bytes received, the whole pieces written); a new CDN on the same home, reloaded."""
    env.cdn.ensure(TID, URL, headers)
    r = Hanging(body=BODY, headers=validator_headers())
    r.cut = cut
    env.http.serve(r)
    again = Env(env.home)
    new: list[str] = []
    again.cdn._on_new_task = lambda task: new.append(task.task_id)
    assert again.cdn.load() == 0
    again.new = new  # type: ignore[attr-defined]
    return again


def test_a_fetch_a_crash_cut_goes_on_at_start_unasked(env: Env) -> None:
    """Restarted, the CDN asks the origin for the rest at once, before any peer registers the task again."""
    again = crashed_mid_fetch(env)
    assert again.cdn.resume_cut() == [TID]
    assert again.new == [TID]  # type: ignore[attr-defined]  # the node hooks its seed and scheduler onto it
    assert again.sent_headers() == {"Range": [f"bytes={5 * PIECE}-"], "If-Range": [ETAG]}
    task = again.cdn.tasks[TID]
    assert task.status == "running"
    # a peer registering now joins the fetch under way (no second request)
    assert again.cdn.ensure(TID, URL) is task and len(again.http.calls) == 1
    again.http.serve(ranged(5 * PIECE))
    check_complete(again)
    assert task.origin_bytes == len(BODY) - 5 * PIECE
    assert again.cdn.resume_cut() == []  # once


def test_a_fetch_asked_with_request_headers_waits_for_its_registration(env: Env) -> None:
    """Request headers (credentials, maybe) never reach the disk: such a fetch cannot go on unasked."""
    again = crashed_mid_fetch(env, {"Authorization": "Bearer x"})
    assert again.cdn.resume_cut() == [] and again.http.calls == []
    again.cdn.ensure(TID, URL, {"Authorization": "Bearer x"})
    assert again.sent_headers() == {"Authorization": ["Bearer x"], "Range": [f"bytes={5 * PIECE}-"], "If-Range": [ETAG]}


def test_an_old_cut_or_a_failed_fetch_waits_for_its_registration(env: Env) -> None:
    again = crashed_mid_fetch(env)
    data = os.path.join(again.home, "resume", TID + ".data")
    old = os.stat(data).st_mtime - cdn_module.RESUME_AT_START - 1
    os.utime(data, (old, old))  # the crash was longer ago than its peers wait
    again.cdn.load()
    assert again.cdn.resume_cut() == []
    # a fetch that failed (parked while the process ran) is not a crash's: it waits too
    third = Env(env.home)
    os.utime(data, None)
    third.cdn.load()
    assert third.cdn.resume_cut() == [] and third.http.calls == []


def test_a_parked_header_without_the_plain_mark_waits_for_its_registration(env: Env) -> None:
    """A prefix an older SuperNode left (no "plain" in its header) is not taken as asked without headers."""
    env.cdn.ensure(TID, URL)
    env.http.serve(Hanging(body=BODY, headers=validator_headers()))
    part = os.path.join(env.home, "repo", TID + ".part")
    header = json.load(open(part))
    assert header["plain"] is True
    del header["plain"]
    json.dump(header, open(part, "w"))
    again = Env(env.home)
    again.cdn.load()
    assert again.cdn.resume_cut() == []


def test_a_whole_file_on_disk_asks_for_the_last_byte(env: Env) -> None:
    """Every byte stored but no meta yet: the last byte is asked again, so the origin confirms the version."""
    env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(len(BODY)))  # all bytes, then a reset before the response ended
    env.cdn.ensure(TID, URL)
    assert env.sent_headers()["Range"] == [f"bytes={len(BODY) - 1}-"]
    env.http.serve(ranged(len(BODY) - 1))
    check_complete(env)


def test_origin_ignoring_range_means_from_byte_zero(env: Env) -> None:
    env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(4 * PIECE))
    task = env.cdn.ensure(TID, URL)
    env.http.serve(whole())  # a 200: the whole file again
    check_complete(env)
    assert task.origin_bytes == 4 * PIECE + len(BODY)
    assert env.cdn.resumed_fetches == 0


def test_a_changed_validator_is_a_new_version_from_byte_zero(env: Env) -> None:
    env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(4 * PIECE))
    env.cdn.ensure(TID, URL)
    new = bytes(reversed(BODY))
    env.http.serve(whole(new, etag='"v2"'))  # If-Range did not match: a 200 with the new file
    check_complete(env, new)
    assert env.cdn.tasks[TID].validators["etag"] == '"v2"'


@pytest.mark.parametrize(
    "response",
    [
        FakeResponse(code=416, phrase=b"Range Not Satisfiable", body=b"", headers=validator_headers()),
        ranged(4 * PIECE, content_range=f"bytes 0-{len(BODY) - 1}/{len(BODY)}"),  # not the range asked for
        ranged(4 * PIECE, content_range=f"bytes {4 * PIECE}-{len(BODY)}/{len(BODY) + 1}"),  # another length
        ranged(4 * PIECE, etag='"v2"'),  # a 206 of another version
    ],
    ids=["416", "wrong-start", "wrong-length", "other-etag"],
)
def test_an_unusable_answer_means_a_plain_fetch_again(env: Env, response: FakeResponse) -> None:
    env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(4 * PIECE))
    env.cdn.ensure(TID, URL)
    n = len(env.http.calls)
    env.http.serve(response)
    # the stored bytes are dropped and the whole file asked for, without a range
    assert len(env.http.calls) == n + 1
    assert env.sent_headers() == {}
    assert env.files("resume") == []
    env.http.serve(whole())
    check_complete(env)


def test_an_origin_error_on_resume_keeps_the_stored_bytes(env: Env) -> None:
    env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(4 * PIECE))
    task = env.cdn.ensure(TID, URL)
    env.http.serve(FakeResponse(code=503, phrase=b"Unavailable", body=b"busy"))
    assert task.status == "failed" and task.error.code == "SOURCE_ERROR"
    assert env.files("repo") == [] and env.files("resume") == [TID + ".data", TID + ".part"]
    # a 404 means the file is gone: nothing is kept
    env.cdn.ensure(TID, URL)
    assert env.sent_headers()["Range"] == [f"bytes={4 * PIECE}-"]
    env.http.serve(FakeResponse(code=404, phrase=b"Not Found", body=b"gone"))
    assert env.files("repo") == [] and env.files("resume") == []


def test_a_silent_origin_keeps_the_stored_bytes(env: Env) -> None:
    holder: list[Any] = []

    class Silent(FakeResponse):
        def deliverBody(self, protocol: Any) -> None:
            protocol.makeConnection(FakeTransport())
            protocol.dataReceived(self.body[: 2 * PIECE])
            holder.append(protocol)

    task = env.cdn.ensure(TID, URL)
    env.http.serve(Silent(body=BODY, headers=validator_headers()))
    env.clock.advance(61)
    holder[0].connectionLost(Failure(ResponseDone()))
    assert task.status == "failed" and task.error.code == "SOURCE_TIMEOUT"
    assert env.files("resume") == [TID + ".data", TID + ".part"]


def test_a_digest_mismatch_keeps_nothing(env: Env) -> None:
    digest = "sha256:" + "0" * 64
    env.cdn.ensure(TID, URL, digest=digest)
    env.http.serve(whole())
    assert env.cdn.tasks[TID].error.code == "DIGEST_MISMATCH"
    assert env.files("repo") == [] and env.files("resume") == []


def test_removing_a_task_drops_its_parked_bytes(env: Env) -> None:
    env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(4 * PIECE))
    env.cdn.ensure(TID, URL)
    env.cdn.remove(TID)
    assert env.files("repo") == [] and env.files("resume") == []


def test_expire_parked(env: Env) -> None:
    env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(4 * PIECE))
    out: list[Any] = []
    env.cdn.expire_parked(3600).addCallback(out.append)
    assert out == [0]
    for name in env.files("resume"):
        os.utime(os.path.join(env.home, "resume", name), (1.0, 1.0))
    env.cdn.expire_parked(3600).addCallback(out.append)
    assert out == [0, 2] and env.files("resume") == []


def test_a_corrupt_header_is_dropped(env: Env) -> None:
    env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(4 * PIECE))
    with open(os.path.join(env.home, "resume", TID + ".part"), "w") as f:
        f.write("{not json")
    env.cdn.ensure(TID, URL)
    assert env.sent_headers() == {}
    assert env.files("resume") == []
    env.http.serve(whole())
    check_complete(env)


def test_a_resumed_fetch_s_meta_matches_a_plain_one(env: Env, tmp_path: Any) -> None:
    env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(6 * PIECE + 1))
    env.cdn.ensure(TID, URL)
    env.http.serve(ranged(6 * PIECE + 1))
    resumed = json.load(open(os.path.join(env.home, "repo", TID + ".meta")))
    plain = Env(str(tmp_path / "plain"))
    plain.cdn.ensure(TID, URL)
    plain.http.serve(whole())
    assert json.load(open(os.path.join(plain.home, "repo", TID + ".meta"))) == resumed


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12), st.integers(1, 200), st.integers(0, 50))
def test_pwritev_all_writes_every_part_despite_short_writes(tmp_path: Any, parts: list[bytes], most: int, offset: int) -> None:
    from dragonfly.core import bodywriter

    real = os.pwritev

    def short(fd: int, views: Any, at: int) -> int:
        # the kernel may take fewer bytes than offered
        return real(fd, [bytes(b"".join(bytes(v) for v in views)[:most])], at)

    path = str(tmp_path / f"v-{most}-{offset}-{len(parts)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        bodywriter.os.pwritev = short  # type: ignore[attr-defined]
        bodywriter.pwritev_all(fd, [memoryview(p) for p in parts], offset)
    finally:
        bodywriter.os.pwritev = real  # type: ignore[attr-defined]
        os.close(fd)
    data = open(path, "rb").read()
    assert data[offset:] == b"".join(parts)


def test_the_origin_connection_is_read_in_large_blocks(tmp_path: Any) -> None:
    class Tcp:
        bufferSize = 65536

    class Proxy(FakeTransport):
        def __init__(self) -> None:
            super().__init__()
            self._producer = Tcp()

    fd = os.open(str(tmp_path / "b"), os.O_WRONLY | os.O_CREAT, 0o644)
    writer = ChunkedFileWriter(SyncPool(), Clock(), fd, PIECE)
    proxy = Proxy()
    writer.makeConnection(proxy)
    assert proxy._producer.bufferSize == ChunkedFileWriter.READ_SIZE
    os.close(fd)


def test_the_supernode_gc_deletes_old_parked_prefixes(env: Env) -> None:
    import random as _random

    from dragonfly.supernode.gc import SupernodeGc
    from dragonfly.supernode.node import SuperNode
    from dragonfly.supernode.scheduler import Scheduler

    node = SuperNode(lambda track: env.cdn, Scheduler(rng=_random.Random(0)), env.clock, "10.0.0.9", 8001)
    env.cdn.ensure(TID, URL)
    env.http.serve(cut_at(4 * PIECE))
    gc = SupernodeGc(node, env.clock, 60.0, 3600.0, None)
    gc.run()
    assert env.files("resume") == [TID + ".data", TID + ".part"]
    for name in env.files("resume"):
        os.utime(os.path.join(env.home, "resume", name), (1.0, 1.0))
    gc.run()
    assert env.files("resume") == []


def test_a_held_body_stays_paused_though_deliver_body_resumes_the_transport(tmp_path: Any) -> None:
    """
    twisted.web's Response.deliverBody resumes the transport right after the
    body protocol's connectionMade; a writer still held (no file yet, a rate
    debt) pauses it again on the first bytes, so the origin rate limit and
    the wait for the file hold from the first byte on.
    """
    from dragonfly.core.ratelimit import TokenBucket

    class Transport(FakeTransport):
        def __init__(self) -> None:
            super().__init__()
            self.running = True

        def pauseProducing(self) -> None:
            super().pauseProducing()
            self.running = False

        def resumeProducing(self) -> None:
            self.running = True

    clock = Clock()
    writer = ChunkedFileWriter(SyncPool(), clock, None, PIECE, limit=TokenBucket(1 << 20, clock))
    t = Transport()
    writer.makeConnection(t)  # held: no file yet
    assert not t.running
    t.resumeProducing()  # what deliverBody does next
    writer.dataReceived(b"x" * 1000)
    assert not t.running
    fd = os.open(str(tmp_path / "f"), os.O_WRONLY | os.O_CREAT, 0o644)
    writer.attach(fd)
    assert t.running
    # a rate debt pauses it, the clock resumes it
    writer.dataReceived(b"x" * (2 << 20))
    assert not t.running
    t.resumeProducing()  # anything else that resumes it is overruled by the next bytes
    writer.dataReceived(b"x" * 10)
    assert not t.running
    clock.advance(3)
    assert t.running


# -- the whole-file SHA-256: only for a task with a sha256 digest -------------------------------------


def test_wants_file_sha256(monkeypatch: Any) -> None:
    sha = "sha256:" + "ab" * 32
    assert cdn_module.wants_file_sha256(sha) and cdn_module.wants_file_sha256(sha.upper().replace("SHA256", "sha256"))
    assert not cdn_module.wants_file_sha256(None) and not cdn_module.wants_file_sha256("")
    assert not cdn_module.wants_file_sha256("md5:" + "ab" * 16)
    assert not cdn_module.wants_file_sha256("sha512:" + "ab" * 64)
    assert not cdn_module.wants_file_sha256("sha256:abc")  # malformed: nothing to check it against
    monkeypatch.setattr(cdn_module, "FILE_SHA256_ALWAYS", True)
    assert cdn_module.wants_file_sha256(None) and cdn_module.wants_file_sha256("md5:" + "ab" * 16)


@pytest.mark.parametrize("digest", [None, "md5:" + hashlib.md5(BODY).hexdigest()])
def test_a_task_without_a_sha256_digest_takes_no_whole_file_hash(env: Env, digest: str | None) -> None:
    task = env.cdn.ensure(TID, URL, digest=digest)
    env.http.serve(whole())
    writer = task.main_writer
    assert task.status == "success", task.error
    assert writer is not None
    # the pieces are hashed and published as ever; the file's hash was never fed
    assert task.digests == digests(BODY) and open(task.data_path, "rb").read() == BODY
    assert task.sha256 is None and writer._hash.hexdigest() == hashlib.sha256().hexdigest()
    with open(task.meta_path) as f:
        assert json.load(f)["sha256"] is None
    # and such a meta reloads
    again = Cdn(env.home, FakeHttp(), SyncPool(), Clock(), piece_size=PIECE)
    assert again.load() == 1 and again.tasks[TID].sha256 is None and again.tasks[TID].digests == digests(BODY)


def test_a_sha256_digest_is_hashed_in_the_fetch_and_checked(env: Env) -> None:
    sha = hashlib.sha256(BODY).hexdigest()
    task = env.cdn.ensure(TID, URL, digest="sha256:" + sha)
    env.http.serve(whole())
    assert task.status == "success", task.error
    assert task.sha256 == sha and task.digests == digests(BODY)
    with open(task.meta_path) as f:
        assert json.load(f)["sha256"] == sha


def test_a_body_other_than_its_sha256_digest_fails(env: Env) -> None:
    task = env.cdn.ensure(TID, URL, digest="sha256:" + "0" * 64)
    env.http.serve(whole())
    assert task.status == "failed" and task.error is not None and task.error.code == "DIGEST_MISMATCH"
    assert env.files("repo") == []


def test_file_sha256_always_hashes_a_task_without_a_digest(env: Env, monkeypatch: Any) -> None:
    monkeypatch.setattr(cdn_module, "FILE_SHA256_ALWAYS", True)
    task = env.cdn.ensure(TID, URL)
    env.http.serve(whole())
    assert task.status == "success" and task.sha256 == hashlib.sha256(BODY).hexdigest()


def test_rehash_prefix_without_the_whole_file_hash(tmp_path: Any) -> None:
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(BODY)
    both = rehash_prefix(path, 5 * PIECE + 3, PIECE)
    pieces = rehash_prefix(path, 5 * PIECE + 3, PIECE, whole=False)
    assert both.whole and not pieces.whole
    assert pieces.offset == both.offset and pieces.digests == both.digests == digests(BODY)[:5]
    assert pieces.chunk_hash.hexdigest() == both.chunk_hash.hexdigest() == hashlib.sha256(BODY[5 * PIECE : 5 * PIECE + 3]).hexdigest()
    assert both.file_hash.hexdigest() == hashlib.sha256(BODY[: 5 * PIECE + 3]).hexdigest()
    assert pieces.file_hash.hexdigest() == hashlib.sha256().hexdigest()  # never fed
    # a writer keeping a whole-file hash cannot go on from it; one keeping none can
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(ValueError):
            ChunkedFileWriter(ImmediatePool(), Clock(), fd, PIECE, len(BODY), start=pieces)
        ChunkedFileWriter(ImmediatePool(), Clock(), fd, PIECE, len(BODY), start=pieces, whole_hash=False)
    finally:
        os.close(fd)


@pytest.mark.parametrize("digest", [None, "sha256:" + hashlib.sha256(BODY).hexdigest()])
def test_a_restart_rehashes_the_whole_file_only_for_a_sha256_digest(env: Env, digest: str | None) -> None:
    """A parked prefix is rehashed into its pieces' digests, and into the whole file's only when the fetch keeps one."""

    class Hanging(FakeResponse):
        def deliverBody(self, protocol: Any) -> None:
            protocol.makeConnection(FakeTransport())
            protocol.dataReceived(self.body[: 5 * PIECE + 3])

    env.cdn.ensure(TID, URL, digest=digest)
    env.http.serve(Hanging(body=BODY, headers=validator_headers()))
    plan = cdn_module._parked_plan(TID, env.cdn.repo)
    assert plan is not None and plan.offset == 5 * PIECE and plan.whole is bool(digest)
    again = Env(env.home)
    assert again.cdn.load() == 0 and len(again.cdn._prehash) == 1
    task = again.cdn.ensure(TID, URL, digest=digest)
    again.http.serve(ranged(5 * PIECE))
    assert task.status == "success", task.error
    assert task.digests == digests(BODY) and open(task.data_path, "rb").read() == BODY
    assert task.sha256 == (hashlib.sha256(BODY).hexdigest() if digest else None)
    assert task.origin_bytes == len(BODY) - 5 * PIECE


@pytest.mark.parametrize("digest", [None, "sha256:" + hashlib.sha256(BODY).hexdigest()])
def test_a_cut_fetch_rehashes_the_whole_file_only_for_a_sha256_digest(tmp_path: Any, monkeypatch: Any, digest: str | None) -> None:
    env = Env(str(tmp_path))
    env.cdn = Cdn(env.home, env.http, SyncPool(), env.clock, piece_size=PIECE, retries=1)
    wholes: list[bool] = []
    real = cdn_module.rehash_prefix
    monkeypatch.setattr(cdn_module, "rehash_prefix", lambda *a: wholes.append(a[4]) or real(*a))
    task = env.cdn.ensure(TID, URL, digest=digest)
    env.http.serve(cut_at(3 * PIECE + 500))
    assert wholes == [bool(digest)]
    env.http.serve(ranged(3 * PIECE + 500))  # the retry goes on from the last byte written
    assert task.status == "success", task.error
    assert task.digests == digests(BODY) and open(task.data_path, "rb").read() == BODY
    assert task.sha256 == (hashlib.sha256(BODY).hexdigest() if digest else None)


# -- O_DIRECT writes (DRAGONFLY_CDN_DIRECT_WRITES=1) and the seed's reads of what they wrote ----------


@pytest.mark.parametrize(("value", "direct"), [(None, False), ("1", True), ("0", False)])
def test_the_cdn_writes_with_o_direct_only_when_told_to(value: str | None, direct: bool) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("DRAGONFLY_CDN_DIRECT_WRITES", "DRAGONFLY_DIRECT_WRITES")}
    if value is not None:
        env["DRAGONFLY_CDN_DIRECT_WRITES"] = value
    out = subprocess.run(
        [sys.executable, "-c", "from dragonfly.core.bodywriter import CDN_DIRECT_WRITES as d; print(d)"],
        env=env, capture_output=True, text=True, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(cdn_module.__file__))),  # this tree's dragonfly
    )
    assert out.stdout.strip() == str(direct)


@pytest.mark.parametrize("direct", [True, False])
def test_the_cdn_s_writers_take_the_direct_setting(env: Env, monkeypatch: Any, direct: bool) -> None:
    made: list[bool] = []
    real = ChunkedFileWriter.__init__

    def spy(self: Any, *a: Any, **kw: Any) -> None:
        made.append(kw.get("direct", False))
        real(self, *a, **kw)

    monkeypatch.setattr(cdn_module, "CDN_DIRECT_WRITES", direct)
    monkeypatch.setattr(ChunkedFileWriter, "__init__", spy)
    env.cdn.ensure(TID, URL)
    env.http.serve(whole())
    check_complete(env)
    assert made == [direct]


def test_a_task_is_in_order_while_nothing_lies_past_its_in_order_bytes() -> None:
    task = cdn_module.CdnTask(TID, URL, "x.data", "x.meta", status="running")
    assert task.in_order
    task.holes_end = 5 * PIECE  # a side fetch is planned: its pieces may lie past a hole
    assert not task.in_order
    task.holes_end = 0
    task.side.append(object())  # type: ignore[arg-type]
    assert not task.in_order
    task.side.clear()
    task.adopted = True  # taken over: its file is sized, with holes
    assert not task.in_order


def test_the_seed_s_pieces_are_read_ahead_unless_the_file_may_hold_holes(env: Env, monkeypatch: Any) -> None:
    asked: list[tuple[int, int, int, bool]] = []

    def warm(fd: int, offset: int, size: int, exact: bool = True) -> int:
        asked.append((fd, offset, size, exact))
        return size

    monkeypatch.setattr(cdn_module, "warm_pages", warm)
    task = cdn_module.CdnTask(TID, URL, "x.data", "x.meta", status="running")
    from .test_supernode_api import result

    assert result(env.cdn.warm_piece(task, 7, PIECE, PIECE)) == PIECE
    task.holes_end = 6 * PIECE  # past the piece: unwritten ranges, read exactly the piece
    result(env.cdn.warm_piece(task, 7, PIECE, PIECE))
    task.status = "success"  # every byte written: readahead again
    result(env.cdn.warm_piece(task, 7, PIECE, PIECE))
    assert asked == [(7, PIECE, PIECE, False), (7, PIECE, PIECE, True), (7, PIECE, PIECE, False)]

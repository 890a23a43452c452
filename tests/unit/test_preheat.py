"""
Preheat jobs through the REST API with StubTreq: a fake registry (a Klein
resource) with Basic or Bearer-token auth, manifests and indexes; the CDN
fetches blobs from it through StubTreq too.  No sockets, a fake clock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from typing import Any

import pytest
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.task import Clock

from dragonfly.core.ids import task_id
from dragonfly.supernode.api import SupernodeApi
from dragonfly.supernode.cdn import Cdn
from dragonfly.supernode.node import SuperNode
from dragonfly.supernode.preheat import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Preheater,
    blob_task_id,
    parse_challenge,
    parse_manifest_url,
)
from dragonfly.supernode.scheduler import PeerInfo, Scheduler
from tests.unit.test_supernode_api import SyncPool

REG = "http://registry.test"
API = "http://supernode.test"
NAME = "library/app"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeRegistry:
    """
    The distribution API's read side: manifests by tag or digest, blobs, and
    with C{auth="bearer"} a token service at C{/token}; with C{auth="basic"}
    plain Basic auth.
    """

    app = Klein()

    def __init__(self, auth: str | None = None, user: str = "alice", password: str = "s3cret") -> None:
        self.auth = auth
        self.basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.token = "tok-" + str(random.Random(1).getrandbits(64))
        self.manifests: dict[str, tuple[str, bytes]] = {}  # tag or digest -> (media type, body)
        self.blobs: dict[str, bytes] = {}
        self.blob_gets: dict[str, int] = {}
        self.token_requests: list[dict[str, Any]] = []
        self.accepts: list[str] = []

    # -- content --

    def blob(self, data: bytes) -> str:
        digest = sha(data)
        self.blobs[digest] = data
        return digest

    def image(self, seed: int, layers: int = 2, media: str = OCI_MANIFEST, tag: str | None = None) -> tuple[str, list[str]]:
        rng = random.Random(seed)
        config = self.blob(json.dumps({"seed": seed}).encode())
        layer_digests = [self.blob(rng.randbytes(rng.randint(100, 5000))) for _ in range(layers)]
        body = json.dumps(
            {
                "schemaVersion": 2, "mediaType": media,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 1},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": 1} for d in layer_digests],
            }
        ).encode()
        digest = sha(body)
        self.manifests[digest] = (media, body)
        if tag:
            self.manifests[tag] = (media, body)
        return digest, [config, *layer_digests]

    def index(self, tag: str, manifests: list[str], media: str = OCI_INDEX) -> None:
        body = json.dumps(
            {
                "schemaVersion": 2, "mediaType": media,
                "manifests": [
                    {"mediaType": OCI_MANIFEST, "digest": d, "size": 1, "platform": {"os": "linux", "architecture": a}}
                    for d, a in zip(manifests, ["amd64", "arm64", "s390x"])
                ],
            }
        ).encode()
        self.manifests[tag] = (media, body)

    # -- serving --

    def _authorized(self, request: Any) -> bool:
        got = (request.getHeader(b"authorization") or b"").decode()
        if self.auth is None:
            return True
        if self.auth == "basic":
            if got == self.basic:
                return True
            request.setHeader(b"www-authenticate", b'Basic realm="test"')
            return False
        if got == f"Bearer {self.token}":
            return True
        request.setHeader(
            b"www-authenticate",
            f'Bearer realm="{REG}/token",service="registry.test",scope="repository:{NAME}:pull"'.encode(),
        )
        return False

    @app.route("/token", methods=["GET"])
    def token_service(self, request: Any) -> bytes:
        self.token_requests.append(
            {
                "args": {k.decode(): v[0].decode() for k, v in request.args.items()},
                "authorization": (request.getHeader(b"authorization") or b"").decode(),
            }
        )
        if request.getHeader(b"authorization") not in (None, self.basic.encode()):
            request.setResponseCode(401)
            return b'{"errors": [{"code": "UNAUTHORIZED"}]}'
        return json.dumps({"token": self.token, "expires_in": 300}).encode()

    @app.route("/v2/<path:rest>", methods=["GET"])
    def v2(self, request: Any, rest: str) -> bytes:
        if not self._authorized(request):
            request.setResponseCode(401)
            return b'{"errors": [{"code": "UNAUTHORIZED"}]}'
        name, _, kind_ref = rest.rpartition("/")
        name, _, kind = name.rpartition("/")
        if name != NAME:
            request.setResponseCode(404)
            return b'{"errors": [{"code": "NAME_UNKNOWN"}]}'
        if kind == "manifests":
            self.accepts.append((request.getHeader(b"accept") or b"").decode())
            if kind_ref not in self.manifests:
                request.setResponseCode(404)
                return b'{"errors": [{"code": "MANIFEST_UNKNOWN"}]}'
            media, body = self.manifests[kind_ref]
            request.setHeader(b"content-type", media.encode())
            return body
        if kind == "blobs" and kind_ref in self.blobs:
            self.blob_gets[kind_ref] = self.blob_gets.get(kind_ref, 0) + 1
            request.setHeader(b"content-type", b"application/octet-stream")
            return self.blobs[kind_ref]
        request.setResponseCode(404)
        return b'{"errors": [{"code": "BLOB_UNKNOWN"}]}'


class Env:
    def __init__(self, home: str, registry: FakeRegistry) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.registry = registry
        self.origin = StubTreq(registry.app.resource())
        self.node = SuperNode(
            lambda track: Cdn(home, self.origin, SyncPool(), self.clock, piece_size=1024, on_new_task=track),
            Scheduler(rng=random.Random(0)), self.clock, "10.0.0.9", 8001,
        )
        self.preheater = Preheater(self.node, self.origin, self.clock, max_jobs=5, keep_finished=3600.0)
        self.api = StubTreq(SupernodeApi(self.node, self.preheater).resource())

    def pump(self) -> None:
        for _ in range(200):
            self.clock.advance(0)
            self.origin.flush()

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        kwargs = {"json": body} if body is not None else {}
        d = self.api.request(method, API + path, **kwargs)
        self.api.flush()
        out: list[Any] = []
        d.addCallback(lambda r: r.content().addCallback(lambda c: out.append((r.code, json.loads(c)))))
        self.api.flush()
        assert out, "no answer"
        return out[0]

    def preheat(self, **body: Any) -> str:
        code, data = self.call("POST", "/api/v1/preheats", body)
        assert code == 201, data
        return data["ID"]

    def job(self, job_id: str) -> dict[str, Any]:
        code, data = self.call("GET", f"/api/v1/preheats/{job_id}")
        assert code == 200, data
        return data

    def cached(self, digest: str) -> Any:
        return self.node.cdn.tasks.get(blob_task_id(f"{REG}/v2/{NAME}/blobs/{digest}", digest))


@pytest.fixture
def make_env(tmp_path: Any) -> Any:
    def make(auth: str | None = None) -> Env:
        return Env(str(tmp_path), FakeRegistry(auth))

    return make


# -- helpers -------------------------------------------------------------------------


def test_parse_manifest_url() -> None:
    assert parse_manifest_url("https://r.example:5000/v2/library/app/manifests/v1.2") == (
        "https://r.example:5000", "library/app", "v1.2",
    )
    digest = "sha256:" + "a" * 64
    assert parse_manifest_url(f"http://r/v2/a/b/c/manifests/{digest}")[2] == digest
    for bad in ("https://r/v2/app/blobs/x", "https://r/app/manifests/v1", "ftp://r/v2/a/manifests/v1",
                "https://r/v2/App/manifests/v1", "https://r/v2/a/manifests/sha256:12", "https://r/v2/a/manifests/v1?x=1"):
        with pytest.raises(ValueError):
            parse_manifest_url(bad)


def test_parse_challenge() -> None:
    scheme, params = parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io", "scope": "repository:library/alpine:pull"}


def test_blob_task_id_is_the_digest_alone() -> None:
    digest = "sha256:" + "b" * 64
    url = f"{REG}/v2/{NAME}/blobs/{digest}"
    assert blob_task_id(url, digest) == task_id(url, digest=digest)
    # the same layer through another registry host, mirror or repository: one task
    assert blob_task_id(url, digest) == blob_task_id(f"https://mirror.test/v2/other/name/blobs/{digest}", digest)


# -- file preheat ----------------------------------------------------------------------


def test_file_preheat_warms_the_cdn_and_a_peer_finds_it_cached(make_env: Any) -> None:
    env = make_env()
    data = random.Random(3).randbytes(3000)
    digest = env.registry.blob(data)
    url = f"{REG}/v2/{NAME}/blobs/{digest}"
    job_id = env.preheat(type="file", url=url + "?sig=abc", filter="sig&expires")
    job = env.job(job_id)
    assert job["status"] in ("WAITING", "RUNNING")
    assert job["startTime"].startswith("2023-11-14T22:13:20")
    env.pump()
    job = env.job(job_id)
    assert job["status"] == "SUCCESS", job
    assert job["finishTime"] is not None and "error" not in job
    tid = task_id(url, filter_keys=["sig", "expires"])
    assert [t["taskId"] for t in job["tasks"]] == [tid]
    task = env.node.cdn.tasks[tid]
    # a URL's task (no digest to check) takes no whole-file hash; its pieces are its check
    assert task.status == "success" and task.sha256 is None
    assert task.digests == [hashlib.sha256(data[i:i + task.piece_size]).hexdigest() for i in range(0, len(data), task.piece_size)]
    # a peer's first request is answered from the cache: no second origin fetch
    env.node.scheduler.register_peer(PeerInfo("p1", "10.0.0.1", 1), env.clock.seconds())
    code, reply = env.call("POST", "/api/v1/tasks", {"peerId": "p1", "url": url + "?sig=other", "filter": ["sig", "expires"]})
    assert code == 200 and reply["taskId"] == tid and reply["task"]["status"] == "success"
    assert env.registry.blob_gets == {digest: 1}


def test_same_job_twice_while_running_is_one_job(make_env: Any) -> None:
    env = make_env()
    digest = env.registry.blob(b"x" * 2000)
    body = {"type": "file", "url": f"{REG}/v2/{NAME}/blobs/{digest}"}
    first = env.preheat(**body)
    code, data = env.call("POST", "/api/v1/preheats", body)
    assert (code, data["ID"]) == (200, first)
    env.pump()
    # finished: a new request is a new job (and finds the file cached)
    second = env.preheat(**body)
    env.pump()
    assert second != first and env.job(second)["status"] == "SUCCESS"
    assert env.registry.blob_gets == {digest: 1}


def test_file_preheat_of_a_missing_file_fails_with_the_origin_error(make_env: Any) -> None:
    env = make_env()
    job_id = env.preheat(type="file", url=f"{REG}/nothing-here")
    env.pump()
    job = env.job(job_id)
    assert job["status"] == "FAILED"
    assert "404" in job["error"]


# -- image preheat -----------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, "basic", "bearer"])
def test_image_preheat_warms_config_and_layers(make_env: Any, auth: str | None) -> None:
    env = make_env(auth)
    _, blobs = env.registry.image(1, layers=3, tag="v1")
    headers = {"Authorization": env.registry.basic} if auth else {}
    job_id = env.preheat(type="image", url=f"{REG}/v2/{NAME}/manifests/v1", headers=headers)
    env.pump()
    job = env.job(job_id)
    assert job["status"] == "SUCCESS", job
    assert [t["digest"] for t in job["tasks"]] == blobs
    for digest in blobs:
        task = env.cached(digest)
        assert task is not None and task.status == "success"
        assert "sha256:" + task.sha256 == digest
    assert env.registry.blob_gets == {d: 1 for d in blobs}
    assert all(OCI_MANIFEST in a and DOCKER_MANIFEST in a and OCI_INDEX in a and DOCKER_LIST in a for a in env.registry.accepts)
    if auth == "bearer":
        # one token, got with the Basic credentials, for the challenge's service and scope
        assert env.registry.token_requests == [
            {"args": {"service": "registry.test", "scope": f"repository:{NAME}:pull"}, "authorization": env.registry.basic}
        ]


def test_bearer_token_without_credentials_for_a_public_image(make_env: Any) -> None:
    env = make_env("bearer")
    _, blobs = env.registry.image(2, tag="latest")
    job_id = env.preheat(type="image", url=f"{REG}/v2/{NAME}/manifests/latest")
    env.pump()
    assert env.job(job_id)["status"] == "SUCCESS"
    assert env.registry.token_requests[0]["authorization"] == ""


def test_bad_credentials_fail_the_job(make_env: Any) -> None:
    env = make_env("bearer")
    env.registry.image(3, tag="v1")
    bad = "Basic " + base64.b64encode(b"alice:wrong").decode()
    job_id = env.preheat(type="image", url=f"{REG}/v2/{NAME}/manifests/v1", headers={"Authorization": bad})
    env.pump()
    job = env.job(job_id)
    assert job["status"] == "FAILED" and "401" in job["error"]
    assert env.registry.blob_gets == {}


def test_basic_registry_without_credentials_fails_clearly(make_env: Any) -> None:
    env = make_env("basic")
    env.registry.image(3, tag="v1")
    job_id = env.preheat(type="image", url=f"{REG}/v2/{NAME}/manifests/v1")
    env.pump()
    job = env.job(job_id)
    assert job["status"] == "FAILED" and "needs credentials" in job["error"]


@pytest.mark.parametrize("media", [OCI_INDEX, DOCKER_LIST])
def test_index_is_expanded_to_every_platform(make_env: Any, media: str) -> None:
    env = make_env("bearer")
    amd, amd_blobs = env.registry.image(10, layers=2)
    arm, arm_blobs = env.registry.image(11, layers=3, media=DOCKER_MANIFEST)
    env.registry.index("multi", [amd, arm], media=media)
    job_id = env.preheat(type="image", url=f"{REG}/v2/{NAME}/manifests/multi", headers={"Authorization": env.registry.basic})
    env.pump()
    job = env.job(job_id)
    assert job["status"] == "SUCCESS", job
    assert [t["digest"] for t in job["tasks"]] == amd_blobs + arm_blobs
    assert all(env.cached(d).status == "success" for d in amd_blobs + arm_blobs)
    assert len(env.registry.token_requests) == 1


def test_shared_layers_are_warmed_once(make_env: Any) -> None:
    env = make_env()
    one, blobs = env.registry.image(20, layers=2)
    media, body = env.registry.manifests[one]
    doc = json.loads(body)
    doc["config"]["digest"] = env.registry.blob(b'{"other": "config"}')
    two_body = json.dumps(doc).encode()
    env.registry.manifests[sha(two_body)] = (media, two_body)
    env.registry.index("two", [one, sha(two_body)])
    job_id = env.preheat(type="image", url=f"{REG}/v2/{NAME}/manifests/two")
    env.pump()
    job = env.job(job_id)
    assert job["status"] == "SUCCESS"
    assert len(job["tasks"]) == 4  # two configs, two shared layers
    assert set(env.registry.blob_gets.values()) == {1}


def test_missing_manifest_fails(make_env: Any) -> None:
    env = make_env()
    job_id = env.preheat(type="image", url=f"{REG}/v2/{NAME}/manifests/nope")
    env.pump()
    job = env.job(job_id)
    assert job["status"] == "FAILED"
    assert "not found" in job["error"] and "404" in job["error"]
    assert job["finishTime"] is not None


def test_missing_blob_fails_the_job_but_warms_the_others(make_env: Any) -> None:
    env = make_env()
    _, blobs = env.registry.image(30, layers=2, tag="v1")
    del env.registry.blobs[blobs[1]]
    job_id = env.preheat(type="image", url=f"{REG}/v2/{NAME}/manifests/v1")
    env.pump()
    job = env.job(job_id)
    assert job["status"] == "FAILED" and blobs[1].split(":")[1] in job["error"]
    assert env.cached(blobs[0]).status == "success" and env.cached(blobs[2]).status == "success"


def test_manifest_by_digest_must_match(make_env: Any) -> None:
    env = make_env()
    good, _ = env.registry.image(40)
    media, body = env.registry.manifests[good]
    env.registry.manifests[good] = (media, body.replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
    job_id = env.preheat(type="image", url=f"{REG}/v2/{NAME}/manifests/{good}")
    env.pump()
    job = env.job(job_id)
    assert job["status"] == "FAILED" and "does not match its digest" in job["error"]


def test_schema1_and_garbage_manifests_fail(make_env: Any) -> None:
    env = make_env()
    env.registry.manifests["old"] = ("application/vnd.docker.distribution.manifest.v1+prettyjws", b'{"schemaVersion": 1}')
    env.registry.manifests["junk"] = (OCI_MANIFEST, b"<html>")
    for tag, words in (("old", "schema 1"), ("junk", "not JSON")):
        job_id = env.preheat(type="image", url=f"{REG}/v2/{NAME}/manifests/{tag}")
        env.pump()
        job = env.job(job_id)
        assert job["status"] == "FAILED" and words in job["error"], job


# -- the API and the job table ----------------------------------------------------------


@pytest.mark.parametrize(
    "body, code",
    [
        ({}, "MISSING_FIELD"),
        ({"type": "file"}, "MISSING_FIELD"),
        ({"type": "blob", "url": f"{REG}/x"}, "BAD_FIELD"),
        ({"type": "file", "url": "ftp://x/y"}, "BAD_INPUT"),
        ({"type": "image", "url": f"{REG}/v2/{NAME}/blobs/sha256:{'a' * 64}"}, "BAD_INPUT"),
        ({"type": "file", "url": f"{REG}/x", "headers": {"a": 1}}, "BAD_FIELD"),
        ({"type": "file", "url": f"{REG}/x", "filter": [1]}, "BAD_FIELD"),
        ({"type": "file", "url": f"{REG}/x", "identifier": 5}, "BAD_FIELD"),
    ],
)
def test_bad_requests(make_env: Any, body: dict, code: str) -> None:
    env = make_env()
    status, data = env.call("POST", "/api/v1/preheats", body)
    assert status == 400 and data["error"]["code"] == code, data


def test_unknown_job_is_404(make_env: Any) -> None:
    env = make_env()
    status, data = env.call("GET", "/api/v1/preheats/nope")
    assert status == 404 and data["error"]["code"] == "PREHEAT_UNKNOWN"


def test_job_table_is_bounded_and_finished_jobs_expire(make_env: Any) -> None:
    env = make_env()
    ids = []
    for i in range(5):
        digest = env.registry.blob(bytes([i]) * 100)
        ids.append(env.preheat(type="file", url=f"{REG}/v2/{NAME}/blobs/{digest}"))
    env.pump()
    assert all(env.job(i)["status"] == "SUCCESS" for i in ids)
    # a sixth job pushes out the oldest finished one (max_jobs=5)
    env.clock.advance(1)
    newest = env.preheat(type="file", url=f"{REG}/v2/{NAME}/blobs/{env.registry.blob(b'z' * 10)}")
    code, data = env.call("GET", "/api/v1/preheats")
    listed = [j["ID"] for j in data["preheats"]]
    assert code == 200 and len(listed) == 5 and newest in listed
    env.pump()
    # an hour after they finished, finished jobs are gone
    env.clock.advance(3601)
    code, data = env.call("GET", "/api/v1/preheats")
    assert data["preheats"] == []
    assert env.call("GET", f"/api/v1/preheats/{newest}")[0] == 404


def test_full_table_of_running_jobs_refuses(make_env: Any) -> None:
    env = make_env()
    env.preheater.max_running = 0  # nothing starts
    for i in range(5):
        env.preheat(type="file", url=f"{REG}/f{i}")
    status, data = env.call("POST", "/api/v1/preheats", {"type": "file", "url": f"{REG}/f9"})
    assert status == 503 and data["error"]["code"] == "TOO_MANY_JOBS"
    code, data = env.call("GET", "/api/v1/preheats")
    assert {j["status"] for j in data["preheats"]} == {"WAITING"}


def test_jobs_beyond_max_running_wait(make_env: Any) -> None:
    from twisted.internet.defer import Deferred

    env = make_env()
    env.preheater.max_running = 1
    gates: list[Deferred] = []

    async def warm(job: Any, tid: str, url: str, headers: Any, digest: Any) -> None:
        gate: Deferred = Deferred()
        gates.append(gate)
        await gate

    env.preheater._warm = warm  # type: ignore[method-assign]
    a = env.preheat(type="file", url=f"{REG}/a")
    b = env.preheat(type="file", url=f"{REG}/b")
    env.clock.advance(0)
    assert env.job(a)["status"] == "RUNNING" and env.job(b)["status"] == "WAITING"
    gates.pop().callback(None)
    assert env.job(a)["status"] == "SUCCESS" and env.job(b)["status"] == "RUNNING"
    gates.pop().errback(RuntimeError("boom"))
    job = env.job(b)
    assert job["status"] == "FAILED" and "boom" in job["error"]

"""
The SuperNode's Dragonfly-manager open API (what Harbor's preheat provider
calls), with StubTreq and a fake registry: the exact bodies Harbor sends.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq

from dragonfly.core.httpapi import ApiError
from dragonfly.supernode.api import SupernodeApi
from dragonfly.supernode.oapi import parse_job_request
from tests.unit.test_preheat import API, NAME, REG, Env, FakeRegistry

PAT = "pat-0123456789"


def harbor_body(url: str, authorization: str | None, scope: str = "", cluster_ids: Any = None) -> dict[str, Any]:
    """What Harbor's provider marshals (dragonflyCreateJobRequest): every field, zero values included."""
    return {
        "type": "preheat",
        "args": {
            "type": "image",
            "url": url,
            "tag": "",
            "filtered_query_params": "",
            "headers": {"Authorization": authorization} if authorization else {},
            "scope": scope,
            "concurrent_count": 0,
            "timeout": 0,
        },
        "scheduler_cluster_ids": cluster_ids,
    }


class OapiEnv(Env):
    def __init__(self, home: str, registry: FakeRegistry, admin_token: str | None = PAT) -> None:
        super().__init__(home, registry)
        self.api = StubTreq(SupernodeApi(self.node, self.preheater, admin_token=admin_token).resource())

    def request(self, method: str, path: str, body: Any = None, token: str | None = PAT) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        d = self.api.request(method, API + path, **kwargs)
        self.api.flush()
        out: list[Any] = []
        d.addCallback(lambda r: r.content().addCallback(lambda c: out.append((r.code, json.loads(c)))))
        self.api.flush()
        assert out, "no answer"
        return out[0]


@pytest.fixture
def env(tmp_path: Any) -> OapiEnv:
    return OapiEnv(str(tmp_path), FakeRegistry("basic"))


def test_harbor_health_check_and_auth(env: OapiEnv) -> None:
    assert env.request("GET", "/healthy", token=None) == (200, "OK")
    assert env.request("GET", "/_ping", token=None) == (200, "OK")
    body = harbor_body(f"{REG}/v2/{NAME}/manifests/v1", env.registry.basic)
    code, data = env.request("POST", "/oapi/v1/jobs", body, token=None)
    assert code == 401 and data["error"]["code"] == "UNAUTHORIZED"
    code, data = env.request("POST", "/oapi/v1/jobs", body, token="wrong")
    assert code == 401
    assert env.preheater.jobs == {}


@pytest.mark.parametrize("cluster_ids", [None, [1]])
@pytest.mark.parametrize("scope", ["", "single_seed_peer", "all_seed_peers", "all_peers"])
def test_harbor_preheat_job_runs_and_reports_what_harbor_polls(env: OapiEnv, scope: str, cluster_ids: Any) -> None:
    _, blobs = env.registry.image(1, layers=3, tag="v1")
    code, job = env.request("POST", "/oapi/v1/jobs", harbor_body(f"{REG}/v2/{NAME}/manifests/v1", env.registry.basic, scope, cluster_ids))
    assert code == 200, job
    assert isinstance(job["id"], int) and job["state"] == "PENDING"
    assert job["created_at"].endswith("Z") and job["updated_at"].endswith("Z")
    code, polled = env.request("GET", f"/oapi/v1/jobs/{job['id']}")
    assert code == 200 and polled["id"] == job["id"] and polled["state"] == "PENDING"
    env.pump()
    code, done = env.request("GET", f"/oapi/v1/jobs/{job['id']}")
    assert code == 200 and done["state"] == "SUCCESS", done
    (state,) = done["result"]["job_states"]
    assert state["error"] == ""
    (result,) = state["results"]
    assert result["scheduler_cluster_id"] == 1 and result["failure_tasks"] == []
    assert [t["url"] for t in result["success_tasks"]] == [f"{REG}/v2/{NAME}/blobs/{d}" for d in blobs]
    assert all(t["ip"] == "10.0.0.9" for t in result["success_tasks"])
    for digest in blobs:
        assert env.cached(digest).status == "success"
    assert env.registry.blob_gets == {d: 1 for d in blobs}


def test_a_failed_job_is_failure_with_its_error(env: OapiEnv) -> None:
    env.registry.image(2, layers=1, tag="v1")
    code, job = env.request("POST", "/oapi/v1/jobs", harbor_body(f"{REG}/v2/{NAME}/manifests/v1", "Basic bm86bm8="))
    assert code == 200
    env.pump()
    code, done = env.request("GET", f"/oapi/v1/jobs/{job['id']}")
    assert done["state"] == "FAILURE"
    assert "credentials" in done["result"]["job_states"][0]["error"]


def test_username_and_password_become_basic_auth(env: OapiEnv) -> None:
    _, blobs = env.registry.image(3, layers=2, tag="v2")
    body = {"type": "preheat", "args": {"type": "image", "url": f"{REG}/v2/{NAME}/manifests/v2",
                                        "username": "alice", "password": "s3cret"}}
    code, job = env.request("POST", "/oapi/v1/jobs", body)
    assert code == 200, job
    env.pump()
    assert env.request("GET", f"/oapi/v1/jobs/{job['id']}")[1]["state"] == "SUCCESS"
    assert "password" not in json.dumps(env.request("GET", f"/oapi/v1/jobs/{job['id']}")[1])


def test_dragonfly_1x_preheat_routes(env: OapiEnv) -> None:
    _, blobs = env.registry.image(4, layers=1, tag="v3")
    code, data = env.request("POST", "/preheats", {"type": "image", "url": f"{REG}/v2/{NAME}/manifests/v3",
                                                   "headers": {"Authorization": env.registry.basic}})
    assert code == 200 and isinstance(data["id"], str)
    assert env.request("GET", f"/preheats/{data['id']}")[1]["status"] in ("WAITING", "RUNNING")
    env.pump()
    code, job = env.request("GET", f"/preheats/{data['id']}")
    assert job["status"] == "SUCCESS" and job["errorMsg"] == "" and job["finishTime"].endswith("Z")
    assert env.request("GET", "/preheats/nope")[0] == 404


@pytest.mark.parametrize(
    "mutate, status, words",
    [
        (lambda b: b.pop("type"), 400, "'type' is required"),
        (lambda b: b.update(type="sync_peers"), 400, "'type' must be 'preheat'"),
        (lambda b: b.pop("args"), 400, "'args' is required"),
        (lambda b: b["args"].pop("url"), 400, "'args.url' is required"),
        (lambda b: b["args"].update(url=""), 400, "'args.url' is required"),
        (lambda b: b["args"].pop("type"), 400, "'args.type' is required"),
        (lambda b: b["args"].update(type="blob"), 400, "'args.type' must be"),
        (lambda b: b["args"].update(scope="everywhere"), 400, "'args.scope' must be one of"),
        (lambda b: b["args"].update(headers={"A": 1}), 400, "'args.headers'"),
        (lambda b: b["args"].update(concurrent_count=501), 400, "concurrent_count"),
        (lambda b: b["args"].update(timeout="30m"), 400, "'args.timeout' must be an integer"),
        (lambda b: b.update(scheduler_cluster_ids=["a"]), 400, "scheduler_cluster_ids"),
        (lambda b: b["args"].update(url="ftp://x/v2/a/manifests/b"), 400, ""),
    ],
)
def test_bad_job_bodies_are_a_json_400_naming_the_field(env: OapiEnv, mutate: Any, status: int, words: str) -> None:
    body = harbor_body(f"{REG}/v2/{NAME}/manifests/v1", env.registry.basic)
    mutate(body)
    code, data = env.request("POST", "/oapi/v1/jobs", body)
    assert code == status and words in data["error"]["message"], data
    assert env.preheater.jobs == {}


def test_unknown_and_bad_job_ids(env: OapiEnv) -> None:
    assert env.request("GET", "/oapi/v1/jobs/99")[1]["error"]["code"] == "JOB_UNKNOWN"
    assert env.request("GET", "/oapi/v1/jobs/abc")[0] == 400
    # a digit that is not ASCII (schemathesis found it: int() refused it, a 500)
    assert env.request("GET", "/oapi/v1/jobs/%C2%B9")[0] == 400


def test_without_an_admin_token_every_call_passes(tmp_path: Any) -> None:
    env = OapiEnv(str(tmp_path), FakeRegistry(None), admin_token=None)
    env.registry.image(5, layers=1, tag="v1")
    code, job = env.request("POST", "/oapi/v1/jobs", harbor_body(f"{REG}/v2/{NAME}/manifests/v1", None), token=None)
    assert code == 200
    env.pump()
    assert env.request("GET", f"/oapi/v1/jobs/{job['id']}", token=None)[1]["state"] == "SUCCESS"


def test_parse_keeps_tag_filter_and_headers() -> None:
    body = harbor_body("http://r/v2/a/manifests/b", "Bearer x")
    body["args"].update(tag="t1", filtered_query_params="Expires&Signature", platform="linux/amd64")
    req = parse_job_request(body)
    assert (req.identifier, req.filter, req.headers, req.scope) == ("t1", ["Expires", "Signature"], {"Authorization": "Bearer x"}, "single_seed_peer")
    with pytest.raises(ApiError):
        parse_job_request({"type": "preheat", "args": []})

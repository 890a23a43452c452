"""
Preheat against a real registry: docker-registry on loopback behind htpasswd
Basic auth, an image of random layers pushed with skopeo, a real SuperNode.
Every blob must land in the CDN with its digest, the registry must send each
blob once, and a later dfget of a blob must be served from the cache.
"""

import base64
import json
import time
import urllib.request

import pytest

from dragonfly.supernode.preheat import blob_task_id
from dragonfly.testing.registry import Registry, have_tools, make_image
from dragonfly.testing.swarm import Swarm, get_json, sha256_file
from dragonfly.testing.tokens import TokenService

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(have_tools() is not None, reason=str(have_tools())),
]

KiB = 1 << 10


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_job(api, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        job = get_json(f"{api}/api/v1/preheats/{job_id}")
        if job["status"] in ("SUCCESS", "FAILED"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


@pytest.mark.parametrize("auth_kind", ["Basic", "Bearer"])
def test_image_preheat_from_a_registry_with_auth(tmp_path, auth_kind):
    """htpasswd Basic auth, or Bearer tokens from a token service (the challenge is followed)."""
    image = make_image(str(tmp_path / "layout"), [300 * KiB, 1500 * KiB, 2 * 1024 * KiB], tag="v1", seed=7)
    tokens = None
    if auth_kind == "Basic":
        registry = Registry(str(tmp_path / "registry"), user="alice", password="wonderland").start()
    else:
        tokens = TokenService(str(tmp_path / "tokens"), "alice", "wonderland").start()
        registry = Registry(str(tmp_path / "registry"), tokens=tokens).start()
    try:
        registry.push(image, "team/app")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode()
            api = swarm.supernode_api
            manifest_url = f"{registry.url}/v2/team/app/manifests/v1"
            # without credentials: FAILED with a clear error
            code, data = _post(api + "/api/v1/preheats", {"type": "image", "url": manifest_url})
            assert code == 201, data
            job = _wait_job(api, data["ID"])
            # (Basic: the registry's 401; Bearer: the token service's)
            assert job["status"] == "FAILED" and ("credentials" in job["error"] or "401" in job["error"]), job
            # with them: every blob warmed
            auth = "Basic " + base64.b64encode(b"alice:wonderland").decode()
            code, data = _post(
                api + "/api/v1/preheats", {"type": "image", "url": manifest_url, "headers": {"Authorization": auth}}
            )
            assert code == 201, data
            job = _wait_job(api, data["ID"])
            assert job["status"] == "SUCCESS", job
            blobs = [image.config_digest, *image.layers]
            assert [t["digest"] for t in job["tasks"]] == blobs
            cached = {t["taskId"]: t for t in get_json(api + "/api/v1/tasks")["tasks"]}
            for digest in blobs:
                blob_url = f"{registry.url}/v2/team/app/blobs/{digest}"
                task = cached[blob_task_id(blob_url, digest)]
                assert task["status"] == "success"
                assert "sha256:" + task["sha256"] == digest
                assert task["contentLength"] == len(image.blob(digest))
            assert registry.blob_gets() == {d: 1 for d in blobs}
            # a second preheat of the same image fetches nothing more
            code, data = _post(
                api + "/api/v1/preheats", {"type": "image", "url": manifest_url, "headers": {"Authorization": auth}}
            )
            assert _wait_job(api, data["ID"])["status"] == "SUCCESS"
            # a peer downloading the biggest layer as a blob task finds it cached
            swarm.start_peer("p0")
            layer = image.layers[-1]
            out = tmp_path / "layer.tgz"
            proc = swarm.dfget(
                f"{registry.url}/v2/team/app/blobs/{layer}", str(out), "p0",
                "--digest", layer, "--header", f"Authorization: {auth}",
            )
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
            assert "sha256:" + sha256_file(str(out)) == layer
            assert registry.blob_gets() == {d: 1 for d in blobs}
    finally:
        registry.stop()
        if tokens is not None:
            tokens.stop()


def _harbor(api, method, path, token, body=None):
    """A call as Harbor's Dragonfly provider makes it: JSON, Accept JSON, the personal access token as Bearer."""
    headers = {"Accept": "application/json", "Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    req = urllib.request.Request(api + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_harbor_preheat_through_the_open_api(tmp_path):
    """
    The exact calls of Harbor's Dragonfly provider: its health check, its
    job body (a registry Bearer token minted for the repository, as Harbor's
    distributor token is, in args.headers) and its polling of the job state.
    """
    image = make_image(str(tmp_path / "layout"), [700 * KiB, 1200 * KiB], tag="v1", seed=9)
    tokens = TokenService(str(tmp_path / "tokens"), "alice", "wonderland").start()
    registry = Registry(str(tmp_path / "registry"), tokens=tokens).start()
    pat = "harbor-pat-" + "x" * 20
    try:
        registry.push(image, "team/app")
        with Swarm(str(tmp_path / "swarm")) as swarm:
            swarm.start_supernode("--admin-token", pat)
            api = swarm.supernode_api
            with urllib.request.urlopen(api + "/healthy", timeout=10) as resp:
                assert resp.status == 200
            manifest_url = f"{registry.url}/v2/team/app/manifests/v1"
            body = {
                "type": "preheat",
                "args": {
                    "type": "image", "url": manifest_url, "tag": "", "filtered_query_params": "",
                    "headers": {"Authorization": "Bearer " + tokens.token(["repository:team/app:pull"])},
                    "scope": "single_seed_peer", "concurrent_count": 0, "timeout": 0,
                },
                "scheduler_cluster_ids": None,
            }
            # a wrong personal access token is refused, and nothing runs
            code, data = _harbor(api, "POST", "/oapi/v1/jobs", "wrong", body)
            assert code == 401, data
            code, job = _harbor(api, "POST", "/oapi/v1/jobs", pat, body)
            assert code == 200 and isinstance(job["id"], int) and job["state"] == "PENDING", job
            deadline = time.monotonic() + 60
            while True:
                code, job = _harbor(api, "GET", f"/oapi/v1/jobs/{job['id']}", pat)
                assert code == 200, job
                if job["state"] != "PENDING":
                    break
                assert time.monotonic() < deadline, job
                time.sleep(0.1)
            assert job["state"] == "SUCCESS", job
            blobs = [image.config_digest, *image.layers]
            tasks = job["result"]["job_states"][0]["results"][0]["success_tasks"]
            assert [t["url"] for t in tasks] == [f"{registry.url}/v2/team/app/blobs/{d}" for d in blobs]
            cached = {t["taskId"]: t for t in get_json(api + "/api/v1/tasks")["tasks"]}
            for digest in blobs:
                task = cached[blob_task_id(f"{registry.url}/v2/team/app/blobs/{digest}", digest)]
                assert task["status"] == "success" and "sha256:" + task["sha256"] == digest
            assert registry.blob_gets() == {d: 1 for d in blobs}
            # a body with a field missing: a JSON 400 naming it
            del body["args"]["url"]
            code, data = _harbor(api, "POST", "/oapi/v1/jobs", pat, body)
            assert code == 400 and "args.url" in data["error"]["message"], data
    finally:
        registry.stop()
        tokens.stop()

"""
Schemathesis against the real SuperNode: requests generated from
C{dragonfly/openapi.yaml} (valid and invalid ones) go to a C{twistd
supernode} on loopback; none may answer 5xx, every answer is JSON and every
error the documented envelope.

The SuperNode runs with C{--origin-allow origin.test}, so task registrations
for generated URLs are refused (403) without any DNS lookup or origin fetch,
and the ones for C{origin.test} fail at the origin (nothing listens there).
"""

import json

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings

from dragonfly.supernode.api import SupernodeApi  # noqa: F401  (the spec's routes)
from dragonfly.testing.swarm import Swarm

from .test_openapi_spec import SPEC

pytestmark = pytest.mark.integration

SCHEMA = schemathesis.openapi.from_path(SPEC)
OPERATIONS = [r.ok() for r in SCHEMA.get_all_operations()]
with open(SPEC) as _f:
    RAW_SPEC = yaml.safe_load(_f)
EXAMPLES = 40  # per operation, valid and invalid requests mixed


@pytest.fixture(scope="module")
def supernode(tmp_path_factory):
    with Swarm(str(tmp_path_factory.mktemp("schemathesis"))) as s:
        s.start_supernode("--origin-allow", "origin.test")
        # a registered peer, so that some generated requests get past "unknown peer"
        requests.post(s.supernode_api + "/api/v1/peers", json={"peerId": "p", "ip": "127.0.0.1", "port": 9}, timeout=5)
        yield s.supernode_api


@pytest.mark.parametrize("operation", OPERATIONS, ids=[f"{o.method.upper()} {o.path}" for o in OPERATIONS])
def test_no_server_errors_and_every_answer_is_json(supernode, operation):
    session = requests.Session()
    seen = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy() | operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE))
    def check(case):
        response = case.call(base_url=supernode, session=session, timeout=10)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        where = f"{case.method} {case.formatted_path} body={case.body!r}"
        assert response.status_code < 500, (where, response.status_code, response.text)
        declared = _declared_types(operation, response.status_code)
        media = response.headers.get("content-type", [""])[0].split(";")[0].strip()
        if response.status_code < 400 and declared and "application/json" not in declared:
            # the pages, files and metrics the spec says are not JSON
            assert media in declared, (where, media, declared)
            return
        assert response.headers.get("content-type") == ["application/json"], (where, response.text)
        body = json.loads(response.content)
        if response.status_code >= 400:
            assert isinstance(body, dict) and set(body) == {"error"}, (where, body)
            assert body["error"]["code"] and isinstance(body["error"]["message"], str), (where, body)

    check()
    assert seen


def _declared_types(operation, status):
    """The media types the spec declares for this operation's answer with C{status}."""
    spec = RAW_SPEC
    responses = spec["paths"][operation.path][operation.method.lower()]["responses"]
    answer = responses.get(str(status)) or {}
    if "$ref" in answer:
        answer = spec["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    return set((answer.get("content") or {}).keys())

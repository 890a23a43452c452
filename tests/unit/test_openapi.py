"""The OpenAPI file describes the REST API the SuperNode really serves."""

import os
import re

import yaml
from openapi_spec_validator import validate

import dragonfly
from dragonfly.supernode.api import SupernodeApi

SPEC = os.path.join(os.path.dirname(dragonfly.__file__), "openapi.yaml")


def load():
    with open(SPEC) as f:
        return yaml.safe_load(f)


def test_spec_is_valid_openapi():
    validate(load())


def test_every_route_is_documented_and_nothing_else():
    spec_routes = {
        (path, method.upper())
        for path, item in load()["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete", "patch")
    }
    served = set()
    for rule in SupernodeApi.app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: "{" + _camel(m.group(1)) + "}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((path, method))
    assert served == spec_routes


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(w.title() for w in rest)

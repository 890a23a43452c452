"""docs/api-reference.md is the OpenAPI file rendered by dragonfly.openapi_doc, and up to date."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from dragonfly import openapi_doc

PAGE = Path(__file__).resolve().parents[2] / "docs" / "api-reference.md"


def spec() -> dict:
    with open(openapi_doc.SPEC, encoding="utf-8") as f:
        return yaml.safe_load(f)


def index_rows(text: str) -> set[tuple[str, str]]:
    """The (METHOD, path) pairs of the page's operations index."""
    section = text.split("\n## Operations\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| ([A-Z]+) \| \[`([^`]+)`\]\(#op-[^)]+\) \|", section, re.M))


def test_page_is_up_to_date():
    want = openapi_doc.render(openapi_doc.load_spec())
    have = PAGE.read_text(encoding="utf-8")
    assert have == want, "docs/api-reference.md is stale: run python -m dragonfly.openapi_doc --write"


def test_index_lists_every_operation_of_the_spec():
    documented = {
        (method.upper(), path)
        for path, item in spec()["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace")
    }
    assert len(documented) >= 18
    text = openapi_doc.render(spec())
    assert index_rows(text) == documented
    for method, path in documented:
        assert f"### `{method} {path}`" in text


def test_every_schema_has_a_section_and_every_link_lands():
    text = openapi_doc.render(spec())
    for name in spec()["components"]["schemas"]:
        assert f'<a id="schema-{name}"></a>\n\n### {name}\n' in text
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= anchors
    assert len(anchors) == text.count("<a id=")  # no anchor twice


def test_render_resolves_refs_nests_and_escapes():
    mini = {
        "openapi": "3.0.3",
        "info": {"title": "Mini", "version": "2"},
        "tags": [{"name": "things", "description": "About things."}],
        "paths": {
            "/things/{id}": {
                "parameters": [{"$ref": "#/components/parameters/Id"}],
                "put": {
                    "tags": ["things"],
                    "operationId": "putThing",
                    "summary": "Store a thing",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}}},
                    "responses": {
                        "204": {"description": "Stored."},
                        "400": {"$ref": "#/components/responses/Bad"},
                    },
                },
            },
            "/ping": {"get": {"summary": "Untagged", "responses": {"200": {"description": "pong"}}}},
        },
        "components": {
            "parameters": {"Id": {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}},
            "responses": {"Bad": {"description": "Bad\nthing.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Err"}}}}},
            "schemas": {
                "Err": {"type": "object", "properties": {"code": {"type": "string"}}},
                "Thing": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^a|b$", "maxLength": 8, "description": "Its\nname."},
                        "tags": {"type": "array", "nullable": True, "maxItems": 3, "items": {"type": "string", "enum": ["x", "y"]}},
                        "owner": {
                            "type": "object",
                            "required": ["id"],
                            "properties": {"id": {"type": "integer"}, "err": {"$ref": "#/components/schemas/Err"}},
                        },
                    },
                },
            },
        },
    }
    text = openapi_doc.render(mini)
    assert index_rows(text) == {("PUT", "/things/{id}"), ("GET", "/ping")}
    assert "## Tag: things\n\nAbout things.\n" in text
    assert "## Tag: other\n" in text and text.index("## Tag: other") > text.index("### `PUT /things/{id}`")
    # the path-level parameter, resolved
    assert "| `id` | path | yes | integer | min `1` |  |" in text
    # the request body's schema, resolved, with pipes escaped and descriptions on one line
    assert "| `name` | string | yes | max length `8`; pattern `^a\\|b$` | Its name. |" in text
    assert "| `tags` | array of string, nullable |  | max items `3`; items one of `x`, `y` |  |" in text
    # one level of nesting, and a $ref inside it becomes a link
    assert "| `owner.id` | integer | yes |  |  |" in text
    assert "| `owner.err` | [Err](#schema-Err) |  |  |  |" in text
    assert "| `400` | Bad thing. | [Err](#schema-Err) (`application/json`) |" in text
    assert "| `204` | Stored. |  |" in text
    assert text == openapi_doc.render(mini)  # deterministic


def test_main_write_and_check(tmp_path, capsys):
    out = tmp_path / "ref.md"
    js = ["--json", str(tmp_path / "openapi.json")]  # not the package's copy
    assert openapi_doc.main(["--check", "--out", str(out), *js]) == 1  # missing
    assert openapi_doc.main(["--write", "--out", str(out), *js]) == 0
    assert out.read_text(encoding="utf-8") == openapi_doc.render(openapi_doc.load_spec())
    assert openapi_doc.main(["--check", "--out", str(out), *js]) == 0
    out.write_text(out.read_text(encoding="utf-8").replace("SuperNode", "Supernode", 1), encoding="utf-8")
    assert openapi_doc.main(["--check", "--out", str(out), *js]) == 1
    assert "stale" in capsys.readouterr().err
    assert openapi_doc.main([]) == 0
    assert capsys.readouterr().out == openapi_doc.render(openapi_doc.load_spec())


def test_the_json_copy_the_supernode_loads_is_the_yaml_spec(tmp_path, capsys):
    assert json.loads(openapi_doc.SPEC_JSON.read_text(encoding="utf-8")) == spec(), (
        "dragonfly/openapi.json is stale: run python -m dragonfly.openapi_doc --write"
    )
    assert openapi_doc.SPEC_JSON.read_text(encoding="utf-8") == openapi_doc.spec_json(spec())
    # --check sees a stale copy; --write makes it again
    out, copy = tmp_path / "ref.md", tmp_path / "openapi.json"
    argv = ["--out", str(out), "--json", str(copy)]
    assert openapi_doc.main(["--write", *argv]) == 0
    assert json.loads(copy.read_text(encoding="utf-8")) == spec()
    copy.write_text(copy.read_text(encoding="utf-8").replace("SuperNode", "Supernode", 1), encoding="utf-8")
    assert openapi_doc.main(["--check", *argv]) == 1
    assert str(copy) in capsys.readouterr().err

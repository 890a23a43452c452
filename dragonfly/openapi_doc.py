"""
Render the SuperNode's OpenAPI file (C{dragonfly/openapi.yaml}) as the
Markdown page C{docs/api-reference.md}, and as C{dragonfly/openapi.json}: the
same document in JSON, which the SuperNode loads at start-up (parsing the YAML
would cost it the yaml module and about 2.5 MiB of memory).

    python -m dragonfly.openapi_doc > docs/api-reference.md
    python -m dragonfly.openapi_doc --write     # the page and the JSON copy, in place
    python -m dragonfly.openapi_doc --check     # exit 1 if either is stale

The output depends only on the spec: operations keep the spec's order, tags
the order of its C{tags} list, schemas are sorted by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

SPEC = Path(__file__).resolve().parent / "openapi.yaml"
#: the spec as JSON, for the SuperNode (C{--write} makes it)
SPEC_JSON = SPEC.with_suffix(".json")
PAGE = Path(__file__).resolve().parent.parent / "docs" / "api-reference.md"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# (keyword, label) in the order they are listed; "items" constraints get an "items " prefix
CONSTRAINTS = (
    ("enum", "one of"), ("minimum", "min"), ("maximum", "max"),
    ("exclusiveMinimum", "exclusive min"), ("exclusiveMaximum", "exclusive max"),
    ("minLength", "min length"), ("maxLength", "max length"), ("pattern", "pattern"),
    ("minItems", "min items"), ("maxItems", "max items"), ("uniqueItems", "unique items"),
    ("default", "default"),
)

Schema = dict[str, Any]


def load_spec(path: Path = SPEC) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        spec: dict[str, Any] = yaml.safe_load(f)
    return spec


def spec_json(spec: dict[str, Any]) -> str:
    """The text of C{openapi.json}: C{spec} as compact JSON, keys sorted, one line."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (METHOD, path, operation) of the spec, in the spec's order."""
    return [
        (method.upper(), path, op)
        for path, item in spec.get("paths", {}).items()
        for method, op in item.items()
        if method in METHODS
    ]


def op_anchor(method: str, path: str, op: dict[str, Any]) -> str:
    return "op-" + str(op.get("operationId") or f"{method}-{path}").replace("/", "-").strip("-")


def code(value: Any) -> str:
    """A Markdown code span of C{value} (JSON for anything but a string)."""
    text = value if isinstance(value, str) and value else json.dumps(value)
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def security(requirements: list[dict[str, list[str]]]) -> str:
    """A security requirement list: C{none, or `bearer`}."""
    alternatives = [" and ".join(f"`{k}`" + (f" ({', '.join(v)})" if v else "") for k, v in r.items()) or "none" for r in requirements]
    return ", or ".join(alternatives) or "none"


def cell(text: str) -> str:
    """One table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


class Renderer:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.components: dict[str, Any] = spec.get("components", {})

    def resolve(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Follow local C{$ref}s (C{#/components/...}) until a real object."""
        seen: set[str] = set()
        while "$ref" in obj:
            ref = obj["$ref"]
            if not ref.startswith("#/") or ref in seen:
                raise ValueError(f"cannot resolve $ref {ref!r}")
            seen.add(ref)
            target: Any = self.spec
            for part in ref[2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            obj = target
        return obj

    def type_of(self, s: Schema) -> str:
        """A short type: C{integer}, C{array of [PeerId](#schema-PeerId)}, C{string, nullable}..."""
        if "$ref" in s:
            name = s["$ref"].rsplit("/", 1)[-1]
            text = f"[{name}](#schema-{name})"
        elif "allOf" in s or "oneOf" in s or "anyOf" in s:
            key = next(k for k in ("allOf", "oneOf", "anyOf") if k in s)
            parts = [self.type_of(p) for p in s[key]]
            text = ("all of " + ", ".join(parts)) if key == "allOf" else " or ".join(parts)
        elif s.get("type") == "array":
            text = "array of " + self.type_of(s.get("items", {}))
        elif s.get("type") == "object" and isinstance(s.get("additionalProperties"), dict) and "properties" not in s:
            text = "object of " + self.type_of(s["additionalProperties"]) + " values"
        else:
            text = str(s.get("type", "any"))
            if "format" in s:
                text += f" ({s['format']})"
        return text + (", nullable" if s.get("nullable") else "")

    def constraints(self, s: Schema, prefix: str = "") -> list[str]:
        out: list[str] = []
        for key, label in CONSTRAINTS:
            if key in s:
                value = ", ".join(code(v) for v in s[key]) if key == "enum" else code(s[key])
                out.append(f"{prefix}{label} {value}")
        if s.get("type") == "array" and "items" in s and "$ref" not in s["items"]:
            out += self.constraints(s["items"], prefix + "items ")
        return out

    def fields(self, s: Schema) -> list[list[str]]:
        """Rows (name, type, required, constraints, description) of an object schema's properties,
        with the fields of an inline object property one level down (C{parent.child})."""
        rows: list[list[str]] = []
        for part in s.get("allOf", [s]):
            if "$ref" in part:
                continue
            required = set(part.get("required", []))
            for name, prop in part.get("properties", {}).items():
                rows.append(self.field_row(name, prop, name in required))
                for sub, subprop in prop.get("properties", {}).items():
                    rows.append(self.field_row(f"{name}.{sub}", subprop, sub in prop.get("required", [])))
        return rows

    def field_row(self, name: str, prop: Schema, required: bool) -> list[str]:
        return [code(name), self.type_of(prop), "yes" if required else "",
                "; ".join(self.constraints(prop)), prop.get("description", "")]

    def schema_block(self, s: Schema) -> list[str]:
        """The fields table of an object schema, or its type and constraints if it has no fields."""
        lines: list[str] = []
        bases = ", ".join(self.type_of(p) for p in s.get("allOf", []) if "$ref" in p)
        rows = self.fields(s)
        if bases:
            lines += [f"All the fields of {bases}" + (", and:" if rows else "."), ""]
        if rows:
            lines += table(["Field", "Type", "Required", "Constraints", "Description"], rows)
        elif not bases:
            lines.append(f"Type: {self.type_of(s)}.")
            if self.constraints(s):
                lines.append("Constraints: " + "; ".join(self.constraints(s)) + ".")
        return lines

    def render(self) -> str:
        info, ops = self.spec.get("info", {}), operations(self.spec)
        out = [
            f"# {info.get('title', 'API')} reference", "",
            "<!-- Generated from dragonfly/openapi.yaml by dragonfly/openapi_doc.py: do not edit. -->",
            "_Generated from [`dragonfly/openapi.yaml`](../dragonfly/openapi.yaml) (OpenAPI "
            f"{self.spec.get('openapi', '?')}, API version {info.get('version', '?')}); do not edit by hand. "
            "After changing the spec, regenerate it with `python -m dragonfly.openapi_doc --write`. "
            "[api.md](api.md) explains the API in prose._", "",
            info.get("description", "").strip(), "",
        ]
        for server in self.spec.get("servers", []):
            out += [f"Server: `{server['url']}`: {server.get('description', '')}".rstrip(": "), ""]
        for name, scheme in self.components.get("securitySchemes", {}).items():
            kind = " ".join(str(scheme[k]) for k in ("type", "scheme", "in", "name") if k in scheme)
            out += [f"Security scheme `{name}` ({kind}): {scheme.get('description', '')}".rstrip(": "), ""]
        if "security" in self.spec:
            out += [f"Default security (every operation unless it says otherwise): {security(self.spec['security'])}.", ""]
        out += ["## Operations", ""] + table(["Method", "Path", "Summary", "Tag"], [
            [method, f"[{code(path)}](#{op_anchor(method, path, op)})", op.get("summary", ""), ", ".join(op.get("tags", []))]
            for method, path, op in ops
        ]) + [""]
        tags = {t["name"]: t.get("description", "") for t in self.spec.get("tags", [])}
        tags.update((t, "") for t in sorted({t for _, _, op in ops for t in op.get("tags", [])} - set(tags)))
        groups = [(t, d, [o for o in ops if t in o[2].get("tags", [])]) for t, d in tags.items()]
        for tag, description, members in groups + [("other", "", [o for o in ops if not o[2].get("tags")])]:
            if members:
                out += [f"## Tag: {tag}", ""] + ([description.strip(), ""] if description else [])
                for method, path, op in members:
                    out += self.operation(method, path, op)
        out += ["## Schemas", ""]
        for name, s in sorted(self.components.get("schemas", {}).items()):
            out += [f'<a id="schema-{name}"></a>', "", f"### {name}", ""]
            out += ([s["description"].strip(), ""] if s.get("description") else []) + self.schema_block(s) + [""]
            if "example" in s:
                out += ["Example:", "", "```json", json.dumps(s["example"], indent=2), "```", ""]
        return "\n".join(out).rstrip("\n") + "\n"

    def operation(self, method: str, path: str, op: dict[str, Any]) -> list[str]:
        out = [f'<a id="{op_anchor(method, path, op)}"></a>', "", f"### `{method} {path}`", ""]
        if op.get("summary"):
            out += [f"**{op['summary']}**", ""]
        if op.get("description"):
            out += [op["description"].strip(), ""]
        if "security" in op:
            out += [f"Security: {security(op['security'])}.", ""]
        params: dict[tuple[str, str], dict[str, Any]] = {}
        item = self.spec["paths"][path]
        for p in item.get("parameters", []) + op.get("parameters", []):
            p = self.resolve(p)
            params[(p["name"], p["in"])] = p
        if params:
            out += ["Parameters:", ""]
            out += table(["Name", "In", "Required", "Type", "Constraints", "Description"], [
                [code(p["name"]), p["in"], "yes" if p.get("required") else "", self.type_of(p.get("schema", {})),
                 "; ".join(self.constraints(p.get("schema", {}))), p.get("description", "")]
                for p in params.values()
            ]) + [""]
        if "requestBody" in op:
            body = self.resolve(op["requestBody"])
            for media, content in body.get("content", {}).items():
                s = content.get("schema", {})
                need = "required" if body.get("required") else "optional"
                desc = f" {body['description'].strip()}" if body.get("description") else ""
                out += [f"Request body ({need}, `{media}`): {self.type_of(s)}.{desc}", ""]
                if "$ref" in s or "properties" in s or "allOf" in s:
                    out += self.schema_block(self.resolve(s)) + [""]
        rows: list[list[str]] = []
        bodies: list[tuple[str, Schema]] = []
        for status, response in sorted(op.get("responses", {}).items(), key=lambda r: str(r[0]).replace("default", "9")):
            response = self.resolve(response)
            desc = response.get("description", "")
            if response.get("headers"):
                desc += " Headers: " + ", ".join(f"`{h}`" for h in response["headers"]) + "."
            content = response.get("content", {})
            schemas = [f"{self.type_of(c.get('schema', {}))} (`{media}`)" for media, c in content.items()]
            rows.append([f"`{status}`", desc, "; ".join(schemas)])
            bodies += [(status, c["schema"]) for c in content.values() if "properties" in c.get("schema", {})]
        out += ["Responses:", ""] + table(["Status", "Description", "Body"], rows) + [""]
        for status, s in bodies:
            out += [f"The `{status}` body's fields:", ""] + self.schema_block(s) + [""]
        return out


def render(spec: dict[str, Any]) -> str:
    return Renderer(spec).render()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dragonfly.openapi_doc", description="Render the SuperNode's OpenAPI file as Markdown.")
    p.add_argument("--spec", type=Path, default=SPEC, help="the OpenAPI file (default: the package's)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the page to --out and the JSON copy to --json instead of stdout")
    mode.add_argument("--check", action="store_true", help="exit 1 if --out or --json differs from what the spec gives")
    p.add_argument("--out", type=Path, default=PAGE, help="the page for --write/--check (default: docs/api-reference.md)")
    p.add_argument("--json", type=Path, default=SPEC_JSON, help="the JSON copy for --write/--check (default: dragonfly/openapi.json)")
    args = p.parse_args(argv)
    spec = load_spec(args.spec)
    text = render(spec)
    if args.write:
        args.out.write_text(text, encoding="utf-8")
        args.json.write_text(spec_json(spec), encoding="utf-8")
    elif not args.check:
        sys.stdout.write(text)
    else:
        stale = [path for path, want in ((args.out, text), (args.json, spec_json(spec)))
                 if not path.exists() or path.read_text(encoding="utf-8") != want]
        for path in stale:
            print(f"{path} is stale: run python -m dragonfly.openapi_doc --write", file=sys.stderr)
        return 1 if stale else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

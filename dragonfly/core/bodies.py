"""
Request bodies checked against their OpenAPI schemas, in one place.

L{check} walks a JSON value along the subset of JSON Schema our
C{openapi.yaml} uses (C{type}, C{required}, C{properties},
C{additionalProperties}, C{items}, C{minimum}/C{maximum},
C{minLength}/C{maxLength}, C{maxItems}, C{pattern}, C{enum}, C{oneOf},
C{$ref}) and raises L{ApiError} 400 naming the first field that does not
fit: C{MISSING_FIELD} for a required field that is absent or null,
C{BAD_FIELD} otherwise (or the code C{value_codes} gives a top-level field
whose value, not its type, is wrong: C{BAD_PEER_ID} for a peer id, say).

As in the handlers before it: null counts as absent, a boolean is not an
integer, and C{80.0} is not an integer either.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from .httpapi import ApiError

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}
_TYPE_NAMES = {
    "string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean",
    "array": "a list", "object": "an object",
}


class Schemas:
    """
    The C{components/schemas} of an OpenAPI document, to resolve C{$ref}s.

    @param value_codes: top-level field name -> the error code for a value
        of the right type that breaks a constraint (pattern, length, range).
    """

    def __init__(self, spec: Mapping[str, Any], value_codes: Mapping[str, str] | None = None) -> None:
        self._components = spec.get("components", {}).get("schemas", {})
        self.value_codes = dict(value_codes or {})

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """The schema C{schema} stands for, its C{$ref}s followed."""
        while "$ref" in schema:
            schema = self._components[schema["$ref"].rsplit("/", 1)[1]]
        return schema

    def check(self, body: Any, schema: Mapping[str, Any]) -> None:
        """L{ApiError} 400 unless C{body} fits C{schema}."""
        self._check(body, self.resolve(schema), None, None)

    # -- the walk --------------------------------------------------------------------

    def _check(self, value: Any, schema: Mapping[str, Any], name: str | None, top: str | None) -> None:
        schema = self.resolve(schema)
        label = f"field {name!r}" if name else "the request body"
        if "oneOf" in schema:
            for option in schema["oneOf"]:
                try:
                    self._check(value, option, name, top)
                    return
                except ApiError:
                    continue
            raise ApiError(400, "BAD_FIELD", f"{label} has none of the allowed forms")
        kind = schema.get("type")
        if kind is not None and not _is(value, kind):
            raise ApiError(400, "BAD_FIELD", f"{label} must be {_TYPE_NAMES.get(kind, kind)}")
        bad = self.value_codes.get(top or "", "BAD_FIELD")
        if "enum" in schema and value not in schema["enum"]:
            raise ApiError(400, bad, f"{label} must be one of {', '.join(map(str, schema['enum']))}")
        if isinstance(value, str):
            if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
                raise ApiError(400, bad, f"{label} has a wrong length")
            if "pattern" in schema and not _pattern(schema["pattern"]).search(value):
                raise ApiError(400, bad, f"{label} is not of the allowed form")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if "minimum" in schema and value < schema["minimum"]:
                raise ApiError(400, bad, f"{label} must be >= {schema['minimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                raise ApiError(400, bad, f"{label} must be <= {schema['maximum']}")
        elif isinstance(value, list):
            if len(value) > schema.get("maxItems", len(value)):
                raise ApiError(400, "BAD_FIELD", f"{label} has more than {schema['maxItems']} entries")
            items = schema.get("items")
            if items is not None:
                for item in value:
                    self._check(item, items, name, top)
        elif isinstance(value, dict):
            self._object(value, schema, name, top)

    def _object(self, value: dict[str, Any], schema: Mapping[str, Any], name: str | None, top: str | None) -> None:
        properties = schema.get("properties", {})
        for key in schema.get("required", ()):
            if value.get(key) is None:
                raise ApiError(400, "MISSING_FIELD", f"field {key!r} is required")
        for key, sub in properties.items():
            if value.get(key) is not None:
                self._check(value[key], sub, key, key if name is None else top)
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for key, item in value.items():
                if key not in properties and item is not None:
                    self._check(item, extra, name, top)


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return kind == "boolean"
    return isinstance(value, _TYPES.get(kind, (object,)))


@lru_cache(maxsize=64)
def _pattern(source: str) -> re.Pattern[str]:
    return re.compile(source)

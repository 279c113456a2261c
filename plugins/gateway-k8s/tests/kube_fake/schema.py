"""OpenAPI v3 validation of custom resources, for the subset structural CRD schemas use.

Types, required, properties, additionalProperties, enum, minimum, minLength, pattern, items,
x-kubernetes-int-or-string and x-kubernetes-preserve-unknown-fields; written here (not the
`jsonschema` library) because those x-kubernetes keywords and the API server's messages matter.
"""

from __future__ import annotations

import re
from typing import Any

Cause = tuple[str, str]  # (field path, message)

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def _type_ok(value: Any, wanted: str) -> bool:
    if isinstance(value, bool) and wanted != "boolean":
        return False
    return isinstance(value, _TYPES[wanted])


def validate(value: Any, schema: dict[str, Any], path: str = "") -> list[Cause]:
    """Every violation of `schema` by `value`, as (path, message) in the API server's words."""
    causes: list[Cause] = []
    where = path or "<root>"
    if value is None and schema.get("nullable"):
        return causes
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or (_type_ok(value, "integer"))):
            return [
                (
                    where,
                    f'Invalid value: "{type(value).__name__}": {where} in body must be '
                    "of type integer-or-string",
                )
            ]
    elif "type" in schema and not _type_ok(value, schema["type"]):
        found = "null" if value is None else type(value).__name__
        return [
            (
                where,
                f'Invalid value: "{found}": {where} in body must be of type '
                f'{schema["type"]}: "{found}"',
            )
        ]
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(f'"{e}"' for e in schema["enum"])
        causes.append((where, f'Unsupported value: "{value}": supported values: {allowed}'))
    if "minimum" in schema and isinstance(value, int | float) and value < schema["minimum"]:
        causes.append(
            (
                where,
                f"Invalid value: {value}: {where} in body should be greater than "
                f"or equal to {schema['minimum']}",
            )
        )
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            causes.append(
                (
                    where,
                    f'Invalid value: "{value}": {where} in body should be at '
                    f"least {schema['minLength']} chars long",
                )
            )
        if "pattern" in schema and not re.search(schema["pattern"], value):
            causes.append(
                (
                    where,
                    f'Invalid value: "{value}": {where} in body should match '
                    f"'{schema['pattern']}'",
                )
            )
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            causes.extend(validate(item, schema["items"], f"{path}[{index}]"))
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                child = f"{path}.{key}" if path else key
                causes.append((child, "Required value"))
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            if key in properties:
                causes.extend(validate(item, properties[key], child))
            elif isinstance(extra, dict):
                causes.extend(validate(item, extra, child))
            elif (
                properties
                and extra is not True
                and not schema.get("x-kubernetes-preserve-unknown-fields")
                and path  # the root's apiVersion/kind/metadata are the server's
            ):
                causes.append((child, f'Invalid value: "{key}": field not declared in schema'))
    return causes

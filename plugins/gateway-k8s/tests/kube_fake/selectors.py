"""Label and field selectors of the fake API server, parsed as the API server parses them.

Labels: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a)`, `k`, `!k`; fields: `=`, `==`, `!=`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Predicate = Callable[[dict[str, Any]], bool]


class SelectorError(ValueError):
    """A selector the API server would answer with 400 BadRequest."""


_SET = re.compile(r"^\s*(!?)([A-Za-z0-9_./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_CMP = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(==|!=|=)\s*([A-Za-z0-9_./-]*)\s*$")
_EXISTS = re.compile(r"^\s*(!?)([A-Za-z0-9_./-]+)\s*$")


def _split(selector: str) -> list[str]:
    """Commas separate requirements except inside `( )`."""
    parts, depth, current = [], 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def _holds(op: str, value: str | None, wanted: frozenset[str]) -> bool:
    if op in ("in", "="):
        return value in wanted
    if op in ("notin", "!="):
        return value not in wanted
    if op == "exists":
        return value is not None
    return value is None  # "!": does not exist


def label_selector(selector: str | None) -> Callable[[dict[str, str]], bool]:
    """A predicate over a labels dict; raises SelectorError on a malformed selector."""
    requirements: list[tuple[str, str, frozenset[str]]] = []  # (op, key, values)
    for part in _split(selector or ""):
        if match := _SET.match(part):
            if match.group(1):
                raise SelectorError(f"unable to parse requirement: {part!r}")
            values = frozenset(v.strip() for v in match.group(4).split(",") if v.strip())
            requirements.append((match.group(3), match.group(2), values))
        elif match := _CMP.match(part):
            key, op, value = match.groups()
            requirements.append(("!=" if op == "!=" else "=", key, frozenset({value})))
        elif match := _EXISTS.match(part):
            negate, key = match.groups()
            requirements.append(("!" if negate else "exists", key, frozenset()))
        else:
            raise SelectorError(f"unable to parse requirement: {part!r}")

    def matches(labels: dict[str, str]) -> bool:
        return all(_holds(op, labels.get(key), values) for op, key, values in requirements)

    return matches


def field_value(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def field_selector(selector: str | None, allowed: frozenset[str]) -> Predicate:
    """A predicate over a whole object; only the `allowed` field labels are accepted."""
    requirements: list[tuple[str, str, frozenset[str]]] = []  # (op, path, values)
    for part in _split(selector or ""):
        match = _CMP.match(part)
        if not match:
            raise SelectorError(f"invalid selector: {part!r}")
        path, op, value = match.groups()
        if path not in allowed:
            raise SelectorError(f'field label not supported: "{path}"')
        requirements.append(("!=" if op == "!=" else "=", path, frozenset({value})))

    def matches(obj: dict[str, Any]) -> bool:
        return all(_holds(op, field_value(obj, path), values) for op, path, values in requirements)

    return matches

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


def label_selector(selector: str | None) -> Callable[[dict[str, str]], bool]:
    """A predicate over a labels dict; raises SelectorError on a malformed selector."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    for part in _split(selector or ""):
        if match := _SET.match(part):
            if match.group(1):
                raise SelectorError(f"unable to parse requirement: {part!r}")
            key, op = match.group(2), match.group(3)
            values = {v.strip() for v in match.group(4).split(",") if v.strip()}
            if op == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif match := _CMP.match(part):
            key, op, value = match.groups()
            if op == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif match := _EXISTS.match(part):
            negate, key = match.groups()
            if negate:
                checks.append(lambda labels, k=key: k not in labels)
            else:
                checks.append(lambda labels, k=key: k in labels)
        else:
            raise SelectorError(f"unable to parse requirement: {part!r}")
    return lambda labels: all(check(labels) for check in checks)


def field_value(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def field_selector(selector: str | None, allowed: frozenset[str]) -> Predicate:
    """A predicate over a whole object; only the `allowed` field labels are accepted."""
    checks: list[Predicate] = []
    for part in _split(selector or ""):
        match = _CMP.match(part)
        if not match:
            raise SelectorError(f"invalid selector: {part!r}")
        path, op, value = match.groups()
        if path not in allowed:
            raise SelectorError(f'field label not supported: "{path}"')
        if op == "!=":
            checks.append(lambda obj, p=path, v=value: field_value(obj, p) != v)
        else:
            checks.append(lambda obj, p=path, v=value: field_value(obj, p) == v)
    return lambda obj: all(check(obj) for check in checks)

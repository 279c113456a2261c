"""RBAC of the fake API server: a Role's rules (a dict or the chart's rendered Role YAML) decide
which verbs on which resources a request may use; the rest get 403 Forbidden.
"""

from __future__ import annotations

from typing import Any

import yaml


def rules_of(role: dict[str, Any] | str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rules of a Role given as a dict, a YAML text (possibly several documents: every
    Role/ClusterRole's rules are taken) or a list of rules."""
    if isinstance(role, list):
        return role
    if isinstance(role, str):
        rules: list[dict[str, Any]] = []
        for doc in yaml.safe_load_all(role):
            if isinstance(doc, dict) and doc.get("kind") in ("Role", "ClusterRole"):
                rules.extend(doc.get("rules") or [])
        return rules
    return list(role.get("rules") or [])


def allows(
    rules: list[dict[str, Any]], *, verb: str, group: str, resource: str, name: str | None = None
) -> bool:
    """`resource` may be `plural` or `plural/subresource`, as in Role rules; a rule with
    `resourceNames` grants only requests naming one of them (so never list, watch or create)."""
    for rule in rules:
        names = rule.get("resourceNames")
        if names and name not in names:
            continue
        if not any(g in ("*", group) for g in rule.get("apiGroups", [])):
            continue
        if not any(r in ("*", resource) for r in rule.get("resources", [])):
            continue
        if any(v in ("*", verb) for v in rule.get("verbs", [])):
            return True
    return False

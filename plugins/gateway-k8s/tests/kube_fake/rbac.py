"""RBAC of the fake API server: a Role's rules (a dict or the chart's rendered Role YAML) decide
which verbs on which resources a request may use, in which namespaces; the rest get 403.
"""

from __future__ import annotations

from typing import Any

import yaml

Rule = dict[str, Any]
Scoped = tuple[str | None, Rule]
"""A rule and the namespace it grants in (None: every namespace, and requests across all)."""


def _documents(role: dict[str, Any] | str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(role, str):
        return [d for d in yaml.safe_load_all(role) if isinstance(d, dict)]
    if isinstance(role, dict):
        return [role]
    return []


def scoped_rules_of(role: dict[str, Any] | str | list[dict[str, Any]]) -> list[Scoped]:
    """The rules of ``role`` with where each applies: a Role document that names its namespace
    grants there only, as a real RoleBinding does; a ClusterRole, a Role naming no namespace,
    or a bare list of rules, everywhere (also to requests across all namespaces)."""
    if isinstance(role, list):
        return [(None, rule) for rule in role]
    scoped: list[Scoped] = []
    for doc in _documents(role):
        kind = doc.get("kind")
        if isinstance(role, dict) and kind is None:
            kind = "Role"
        if kind not in ("Role", "ClusterRole"):
            continue
        namespace = (doc.get("metadata") or {}).get("namespace") if kind == "Role" else None
        scoped.extend((namespace or None, rule) for rule in doc.get("rules") or [])
    return scoped


def rules_of(role: dict[str, Any] | str | list[dict[str, Any]]) -> list[Rule]:
    """The rules of a Role given as a dict, a YAML text (possibly several documents: every
    Role/ClusterRole's rules are taken) or a list of rules, wherever they apply."""
    return [rule for _, rule in scoped_rules_of(role)]


def allows(
    rules: list[Rule] | list[Scoped],
    *,
    verb: str,
    group: str,
    resource: str,
    name: str | None = None,
    namespace: str | None = None,
) -> bool:
    """`resource` may be `plural` or `plural/subresource`, as in Role rules; a rule with
    `resourceNames` grants only requests naming one of them (so never list, watch or create).
    Scoped rules (`scoped_rules_of`) grant in their namespace only; ``namespace`` None is a
    request across all namespaces (or of a cluster-scoped kind), which only unscoped rules
    grant."""
    for item in rules:
        scope, rule = item if isinstance(item, tuple) else (None, item)
        if scope is not None and scope != namespace:
            continue
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

"""The API permissions the gateway and the controller use, one rule per need with its reason.

Owns `GATEWAY_RULES`, `CONTROLLER_RULES` and `LEADER_ELECTION_RULES`: the one source the Helm
chart's Roles are checked against (tests/test_chart.py: the rendered Roles grant exactly these),
and the README's RBAC table lists.
"""

from __future__ import annotations

from typing import Any

from . import crd

Rule = dict[str, Any]


def _rule(group: str, resource: str, verbs: list[str], why: str) -> Rule:
    return {"apiGroups": [group], "resources": [resource], "verbs": verbs, "why": why}


GATEWAY_RULES: list[Rule] = [
    _rule(crd.GROUP, crd.PLURAL, ["list", "watch"], "its view of every cluster"),
    _rule(crd.GROUP, crd.PLURAL, ["create", "delete"], "new cluster; stop"),
    _rule(
        crd.GROUP,
        crd.PLURAL,
        ["patch"],
        "the scheduler's target in spec.worker.replicas; sharing in an annotation",
    ),
    _rule(
        "",
        "secrets",
        ["get"],
        "a cluster's token and TLS credentials, by name (read once; no list: other Secrets "
        "of the namespace stay unread)",
    ),
    _rule(
        "",
        "pods/log",
        ["get"],
        "the logs route: the end of a cluster's scheduler and worker containers' output, by "
        "pod name (no pods get, list or watch: the gateway never reads the pods themselves)",
    ),
]

CONTROLLER_RULES: list[Rule] = [
    _rule(crd.GROUP, crd.PLURAL, ["list", "watch"], "its informer"),
    _rule(crd.GROUP, f"{crd.PLURAL}/status", ["patch"], "phase, reason, addresses, counts"),
    _rule("", "pods", ["list", "watch", "create", "delete"], "schedulers and workers"),
    _rule("", "services", ["list", "watch", "create"], "the schedulers' Services"),
    _rule(
        "",
        "secrets",
        ["list", "watch", "create"],
        "each cluster's credentials Secret: made once, watched; its token for the agent's API",
    ),
    _rule("", "secrets", ["get"], "a credentials Secret that already existed (409 on create)"),
    _rule("", "events", ["list"], "why a scheduler pod is stuck before its container runs"),
]

# The controller's, in its own namespace only (the chart's `-leader-election` Role), even when
# the rules above are granted cluster-wide.
LEADER_ELECTION_RULES: list[Rule] = [
    _rule("coordination.k8s.io", "leases", ["get", "create", "update"], "leader election"),
]


def role_rules(rules: list[Rule]) -> list[Rule]:
    """``rules`` as a Role's ``rules`` (without the reasons)."""
    return [{k: v for k, v in rule.items() if k != "why"} for rule in rules]


def grants(rules: list[Rule]) -> dict[tuple[str, str], set[str]]:
    """``rules`` as (API group, resource) -> verbs, rules on one resource joined."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out

"""Shared pieces of the end-to-end tests (test_end_to_end.py, test_end_to_end_faults.py): the
RBAC they run under, the gateway's configuration, waiting, and what is left in the fake.

The fixtures built on them (`chart_kube`, `kubelet`, `controller`) are in conftest.py.
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kube_fake import FakeKube
from kube_fake.rbac import rules_of

from gateway_k8s import crd

NS = "dask"
BIN = os.path.dirname(sys.executable)
BAD_IMAGE = "registry.invalid/no-such:image"


# What the simulated kubelet itself needs (it shares the fake's one identity).
KUBELET_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "get", "delete"]},
    {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]


def chart_rules(chart_roles: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """What the Helm chart's rendered Roles grant (the gateway's, the controller's and its
    leader election Role), plus the kubelet's needs."""
    return [rule for role in chart_roles.values() for rule in rules_of(role)] + KUBELET_RULES


def without(
    rules: list[dict[str, Any]], group: str, resource: str, verb: str
) -> list[dict[str, Any]]:
    """``rules`` with ``verb`` on ``resource`` (of API ``group``) no longer granted by any rule
    (a rule naming other resources too is split)."""
    out: list[dict[str, Any]] = []
    for rule in rules:
        covers = group in rule.get("apiGroups", []) and resource in rule.get("resources", [])
        if not covers or verb not in rule.get("verbs", []):
            out.append(rule)
            continue
        others = [r for r in rule["resources"] if r != resource]
        if others:
            out.append({**copy.deepcopy(rule), "resources": others})
        verbs = [v for v in rule["verbs"] if v != verb]
        if verbs:
            out.append({**copy.deepcopy(rule), "resources": [resource], "verbs": verbs})
    return out


def gateway_config(kube: FakeKube, *, keep: bool = False, **cluster: Any) -> dict[str, Any]:
    return {
        "gateway": {"backend": "kubernetes", "stop_clusters_on_shutdown": not keep},
        "backend": {
            "kubernetes": {
                "server": kube.url,
                "namespace": NS,
                "cluster_heartbeat_period": 1,
                "api_qps": 0,
            }
        },
        "cluster": {
            "image": "dask:test",
            "scheduler_cmd": [f"{BIN}/dask", "scheduler"],
            "worker_cmd": [f"{BIN}/dask", "worker"],
            "worker_memory": "1 GiB",
            **cluster,
        },
    }


def stored(kube: FakeKube, group: str, version: str, plural: str) -> list[dict[str, Any]]:
    """The objects of a kind in the namespace, read from the store (RBAC hides nothing)."""
    kind = kube.store.find_kind(group, version, plural)
    assert kind is not None, plural
    items, _ = kube.store.select(kind, NS, lambda obj: True)
    return items


def leftovers(kube: FakeKube) -> dict[str, list[str]]:
    """Names of everything still in the fake's store in the namespace (read from the store,
    not through the API, so RBAC does not hide anything)."""
    found: dict[str, list[str]] = {}
    for group, version, plural in (
        ("", "v1", "pods"),
        ("", "v1", "services"),
        ("", "v1", "secrets"),
        (crd.GROUP, crd.VERSION, crd.PLURAL),
    ):
        items = stored(kube, group, version, plural)
        if items:
            found[plural] = [o["metadata"]["name"] for o in items]
    return found


def worker_pods(kube: FakeKube, resource: str) -> list[dict[str, Any]]:
    """The worker pods of the DaskCluster ``resource`` in the store."""
    return [
        p
        for p in stored(kube, "", "v1", "pods")
        if p["metadata"]["name"].startswith(f"{resource}-worker-")
    ]


async def until(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.2)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """`until` for threads (the synchronous client's side of a test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)

"""What the end-to-end tests share: the fake API server under the chart's RBAC, the simulated
kubelet running real Dask processes, the controller in this process, and waiting helpers.

Imported by `test_end_to_end.py` and `test_end_to_end_groups.py`: importing `e2e_kube`,
`e2e_kubelet` and `e2e_controller` gives a module the fixtures `kube` (which overrides
conftest's everything-allowed one), `kubelet` and `controller`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet
from kube_fake.rbac import rules_of

from gateway_k8s import crd
from gateway_k8s.config import KubeControllerConfig
from gateway_k8s.controller import Controller
from gateway_k8s.runner import make_controller

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


@pytest.fixture(name="kube")
def e2e_kube(chart_roles: dict[str, dict[str, Any]]) -> Iterator[FakeKube]:
    """The fake API server granting only what the Helm chart's rendered Roles grant (the
    gateway's, the controller's and its leader election Role; plus the kubelet's needs): a
    request of the gateway or the controller beyond them fails the test."""
    rules = [rule for role in chart_roles.values() for rule in rules_of(role)] + KUBELET_RULES
    fake = FakeKube(crds=[crd.crd()], role=rules)
    with fake.running():
        yield fake


@pytest.fixture(name="kubelet")
def e2e_kubelet(kube: FakeKube, tmp_path: Path) -> Iterator[Kubelet]:
    with Kubelet(
        kube=kube, workdir=tmp_path / "kubelet", failing_images={BAD_IMAGE}
    ).running() as k:
        yield k


@pytest.fixture(name="controller")
async def e2e_controller(kube: FakeKube) -> AsyncIterator[Controller]:
    config = KubeControllerConfig(
        server=kube.url,
        namespace=NS,
        address_mode="pod",
        leader_election=False,
        retire_grace=5.0,
        api_qps=0,
    )
    made = await make_controller(config)
    stop = asyncio.Event()
    task = asyncio.create_task(made.run(stop=stop))
    yield made
    stop.set()
    await asyncio.wait_for(task, 20)
    made.client.close()


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
        kind = kube.store.find_kind(group, version, plural)
        assert kind is not None, plural
        items, _ = kube.store.select(kind, NS, lambda obj: True)
        if items:
            found[plural] = [o["metadata"]["name"] for o in items]
    return found


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

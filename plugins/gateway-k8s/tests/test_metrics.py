"""Core's /metrics on the Kubernetes backend: workers of every group counted, by group, from
the controller's counts (`status.groups`), and each group's cores and memory in the user's use.

Unit tests: the gateway and the controller in this process, a kubelet that starts no processes
(its pods run without processes, so no scheduler heartbeats: the gateway's worker records stay
empty and the counts come from the DaskCluster's status alone).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import NS, until
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet
from prometheus_client.parser import text_string_to_metric_families

from gateway_k8s import objects
from gateway_k8s.controller import Controller
from gateway_k8s.kube import CLUSTERS

pytestmark = pytest.mark.unit
GiB = 2**30


@pytest.fixture
def kubelet(kube: FakeKube, tmp_path: Path) -> Iterator[Kubelet]:
    with Kubelet(kube=kube, workdir=tmp_path, run_processes=False).running() as k:
        yield k


def workers_gauge(text: str) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "gateway_workers":
                out[(s.labels["user"], s.labels["group"], s.labels["status"])] = s.value
    return out


def user_gauge(text: str, name: str, user: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("user") == user:
                return float(s.value)
    return None


async def test_named_group_workers_are_in_the_worker_gauges_by_group(
    kube: FakeKube,
    kubelet: Kubelet,
    controller: Controller,
    make_gateway: Any,
    make_api_client: Any,
) -> None:
    gateway = await make_gateway(
        {
            "gateway": {"backend": "kubernetes"},
            "backend": {"kubernetes": {"server": kube.url, "namespace": NS, "api_qps": 0}},
            "metrics": {"public": True},
            "cluster": {
                "image": "dask:test",
                "scheduler_cores": 1,
                "scheduler_memory": "1 GiB",
                "worker_cores": 1,
                "worker_memory": "2 GiB",
                "worker_groups": {"gpu": {"worker_cores": 4, "worker_memory": "16 GiB"}},
                "enabled_worker_groups": ["gpu"],
            },
        }
    )
    alice = make_api_client(gateway, "alice")
    answer = await alice.post("/api/v1/clusters/", json={"cluster_options": {}})
    assert answer.status == 201, answer.body
    name = answer.body["name"]
    # What the scheduler's heartbeat asks for: one default worker, two of the gpu group.
    await controller.client.patch(
        CLUSTERS,
        NS,
        objects.resource_name(name),
        {"spec": {"worker": {"replicas": 1}, "workerGroups": {"gpu": {"replicas": 2}}}},
    )

    async def metrics() -> str:
        response = await alice.get("/metrics", auth=False)
        assert response.status == 200, response.body
        return str(response.body)

    async def both_running() -> bool:
        groups = (await alice.get(f"/api/v2/clusters/{name}")).body["groups"]
        return bool(groups["gpu"]["running"] == 2 and groups["default"]["running"] == 1)

    await until(both_running, "the v2 counts to show the workers of both groups running")
    text = await metrics()
    assert workers_gauge(text) == {
        ("alice", "default", "running"): 1.0,
        ("alice", "gpu", "running"): 2.0,
    }
    # Each group's workers with its own cores and memory, and the scheduler's.
    assert user_gauge(text, "gateway_cores_in_use", "alice") == 1 + 1 * 1 + 2 * 4
    assert user_gauge(text, "gateway_memory_in_use_bytes", "alice") == (1 + 2 + 2 * 16) * GiB

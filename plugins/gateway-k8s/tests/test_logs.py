"""Tests of gateway_k8s.logs against the fake API server: the end of a container's log within
the line and byte bounds (the API server's tail-then-limit order worked around), the messages
for pods that are gone or not started, 403 as unavailable, and the workers heartbeats name.

Unit tests: no processes (a log file registered as the simulated kubelet registers one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kube_fake import FakeKube
from test_kube_fake import running_pod

from gateway_core.errors import BackendUnavailable
from gateway_core.models import WorkerStatus
from gateway_core.reconciler.heartbeat import Heartbeat
from gateway_k8s import logs, objects
from gateway_k8s.kube import KubeClient

pytestmark = pytest.mark.unit
NS = "dask"
RESOURCE = objects.resource_name("a" * 32)


@pytest.fixture
async def reader(kube: FakeKube) -> Any:
    client = KubeClient(kube.api_client(), threads=3)
    yield logs.PodLogs(client)
    client.close()


def lines(count: int, width: int = 20) -> bytes:
    return b"".join(f"{i:0{width - 1}d}\n".encode() for i in range(count))


async def test_the_end_within_lines_and_bytes(
    kube: FakeKube, core: Any, reader: logs.PodLogs, tmp_path: Path
) -> None:
    scheduler = objects.scheduler_name(RESOURCE)
    running_pod(kube, core, tmp_path, scheduler, ["dask"], lines(1000))
    # 5 lines of 20 bytes: well within the bytes.
    text = await reader.tail(NS, scheduler, lines=5, max_bytes=1000)
    assert text.splitlines() == [f"{i:019d}" for i in range(995, 1000)]
    # 500 lines are 10000 bytes, more than the request's limit (4 x 1000): the reader asks
    # again for fewer lines, and keeps the end, whole lines only.
    before = reader.client.requests
    text = await reader.tail(NS, scheduler, lines=500, max_bytes=1000)
    assert reader.client.requests - before == 2
    got = text.splitlines()
    assert got[-1] == f"{999:019d}" and len(text.encode()) <= 1000
    assert got == [f"{i:019d}" for i in range(1000 - len(got), 1000)] and len(got) >= 45
    assert await reader.tail(NS, scheduler, lines=0, max_bytes=1000) == ""


async def test_cluster_logs_messages(
    kube: FakeKube, core: Any, reader: logs.PodLogs, tmp_path: Path
) -> None:
    scheduler = objects.scheduler_name(RESOURCE)
    running_pod(kube, core, tmp_path, scheduler, ["dask"], b"scheduler says hi\n")
    worker = f"{RESOURCE}-worker-abc123"
    core.create_namespaced_pod(
        NS,
        {
            "metadata": {"name": worker},
            "spec": {"containers": [{"name": "dask", "image": "x", "command": ["x"]}]},
        },
    )
    answer = await logs.cluster_logs(
        reader,
        namespace=NS,
        resource=RESOURCE,
        components=["scheduler", worker, f"{RESOURCE}-worker-gone", "dask-other-scheduler"],
        tail=10,
        max_bytes=1000,
    )
    assert answer["scheduler"] == "scheduler says hi"
    assert answer[worker] == f'(no log: container "dask" in pod "{worker}" is waiting to ' + (
        "start: ContainerCreating)"
    )
    assert "does not exist" in answer[f"{RESOURCE}-worker-gone"]
    # A name that is not one of this cluster's pods is never read.
    assert answer["dask-other-scheduler"] == "(no log: this worker has no pod of this cluster)"


async def test_a_refusal_is_unavailable(tmp_path: Path) -> None:
    fake = FakeKube(role=[{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}])
    with fake.running():
        client = KubeClient(fake.api_client(), threads=3)
        try:
            with pytest.raises(BackendUnavailable, match=r'cannot get resource "pods/log"'):
                await logs.cluster_logs(
                    logs.PodLogs(client),
                    namespace=NS,
                    resource=RESOURCE,
                    components=["scheduler"],
                    tail=10,
                    max_bytes=1000,
                )
        finally:
            client.close()


def test_worker_names_follow_heartbeats() -> None:
    names = logs.WorkerNames()
    names.record("c", Heartbeat.parse({"active_workers": ["w1", "w2"]}))
    names.record("c", Heartbeat.parse({"active_workers": ["w2"], "closed_workers": ["w1"]}))
    workers = names.of("c")
    assert workers["w1"].status == WorkerStatus.STOPPED and workers["w1"].stop_time
    assert workers["w2"].status == WorkerStatus.RUNNING
    names.forget("c")
    assert names.of("c") == {}

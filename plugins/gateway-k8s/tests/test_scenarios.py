"""The backend scenario suite of `gateway_core.testing.scenarios` on the ``kubernetes`` backend:
a gateway, the controller, the fake API server granting only the chart's Roles and the
simulated kubelet running real Dask schedulers and workers (as in test_end_to_end.py).

Owns the ``gateway_backend_setup`` fixture for this backend: how the suite sees a cluster
(`LiveCluster`: the gateway's record, read afresh; its workers are the cluster's worker pods,
since the gateway keeps no per-worker records here), its pods as jobs, ending them behind the
gateway's back, and the scenarios that do not apply, with the reason. Integration tests.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
from typing import Any

import pytest
from e2e_support import BAD_IMAGE, NS, gateway_config
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet

from gateway_core.models import Cluster, ClusterStatus, WorkerStatus
from gateway_core.testing.scenarios import BackendScenarios, BackendSetup, LiveJob
from gateway_k8s import crd, objects
from gateway_k8s.backend import KubeBackend
from gateway_k8s.controller import Controller

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_process_left_behind")]
ENDED = ("Failed", "Succeeded")


@pytest.fixture
def kube(chart_kube: FakeKube) -> FakeKube:
    """The fake under the chart's Roles (conftest's `chart_kube`); `kubelet` and
    `controller` (conftest) run against it."""
    return chart_kube


def pods_of(kube: FakeKube, name: str) -> list[dict[str, Any]]:
    """The pods of gateway cluster ``name`` in the fake's store (read from the store, so RBAC
    hides nothing), found by the cluster's label."""
    kind = kube.store.find_kind("", "v1", "pods")
    assert kind is not None
    resource = objects.resource_name(name)

    def ours(obj: dict[str, Any]) -> bool:
        return (obj["metadata"].get("labels") or {}).get(objects.LABEL_CLUSTER) == resource

    items, _ = kube.store.select(kind, NS, ours)
    return list(items)


def objects_of(kube: FakeKube, name: str) -> dict[str, list[str]]:
    """Every object of cluster ``name`` still stored: its DaskCluster, pods, Service, Secret."""
    resource = objects.resource_name(name)
    found: dict[str, list[str]] = {}
    for group, version, plural in (
        ("", "v1", "pods"),
        ("", "v1", "services"),
        ("", "v1", "secrets"),
        (crd.GROUP, crd.VERSION, crd.PLURAL),
    ):
        kind = kube.store.find_kind(group, version, plural)
        assert kind is not None, plural
        items, _ = kube.store.select(kind, NS, lambda o: True)
        names = [o["metadata"]["name"] for o in items if o["metadata"]["name"].startswith(resource)]
        if names:
            found[plural] = names
    return found


class PodWorker:
    """One worker of a `LiveCluster`: its pod, whose status is read at each access."""

    def __init__(self, kube: FakeKube, cluster: str, pod: str) -> None:
        self.kube, self.cluster_name, self.name = kube, cluster, pod

    @property
    def status(self) -> WorkerStatus:
        pod = next((p for p in pods_of(self.kube, self.cluster_name) if self._is(p)), None)
        if pod is None:
            return WorkerStatus.STOPPED  # deleted
        status = pod.get("status") or {}
        if status.get("phase") == "Failed":
            return WorkerStatus.FAILED
        if status.get("phase") == "Succeeded":
            return WorkerStatus.STOPPED
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        return (
            WorkerStatus.RUNNING
            if status.get("phase") == "Running" and ready
            else (WorkerStatus.STARTING)
        )

    def _is(self, pod: dict[str, Any]) -> bool:
        return bool(pod["metadata"]["name"] == self.name)


class LiveCluster:
    """The gateway's record of one cluster as the suite waits on it: every attribute is read
    from the backend at each access (its informer's cache, or its memory of stopped clusters),
    so ``status`` and ``reason`` follow the DaskCluster. ``workers`` are the cluster's worker
    pods (the controller's business: the gateway keeps no per-worker records on Kubernetes)."""

    def __init__(self, backend: KubeBackend, kube: FakeKube, name: str) -> None:
        self._backend, self._kube, self._name = backend, kube, name
        self._workers: dict[str, PodWorker] = {}

    def current(self) -> Cluster:
        backend = self._backend
        if self._name in backend.stopped:
            return backend.stopped[self._name]
        obj = backend._resource(self._name)
        if obj is None:
            raise LookupError(f"the gateway knows no cluster {self._name}")
        return backend._record(obj)

    @property
    def name(self) -> str:
        return self._name

    @property
    def workers(self) -> dict[str, PodWorker]:
        for pod in pods_of(self._kube, self._name):
            labels = pod["metadata"].get("labels") or {}
            name = pod["metadata"]["name"]
            if labels.get(objects.LABEL_COMPONENT) == "worker" and name not in self._workers:
                self._workers[name] = PodWorker(self._kube, self._name, name)
        return dict(self._workers)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.current(), attr)


def owner_of(pid: int) -> str | None:
    try:
        return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name
    except FileNotFoundError:
        return None


def live_pods(kube: FakeKube, kubelet: Kubelet, cluster: Any) -> dict[str, LiveJob]:
    """The cluster's pods that have not ended (by its label), and any process the kubelet
    still runs for a pod of it (a deleted pod's process may outlive its object briefly)."""
    resource = objects.resource_name(cluster.name)
    live: dict[str, LiveJob] = {}
    for pod in pods_of(kube, cluster.name):
        phase = (pod.get("status") or {}).get("phase", "Pending")
        if phase in ENDED:
            continue
        name = pod["metadata"]["name"]
        labels = pod["metadata"].get("labels") or {}
        worker = None if labels.get(objects.LABEL_COMPONENT) == "scheduler" else name
        owner = None
        with contextlib.suppress(KeyError):
            process = kubelet.pod(NS, name).process
            if process is not None and process.poll() is None:
                owner = owner_of(process.pid)
        live[name] = LiveJob(owner=owner or "", running=phase == "Running", worker=worker)
    for pod in list(kubelet.pods.values()):
        if not pod.name.startswith(f"{resource}-") or pod.name in live:
            continue
        if pod.process is not None and pod.process.poll() is None:
            worker = None if pod.name == objects.scheduler_name(resource) else pod.name
            owner = owner_of(pod.process.pid) or ""
            live[pod.name] = LiveJob(owner=owner, running=True, worker=worker)
    return live


def kill_pod_process(kubelet: Kubelet, cluster: Any, worker: Any) -> None:
    """Kill -9 the process of a worker's pod (or the scheduler's), as a crash in the container
    would: the pod fails, its object stays."""
    resource = objects.resource_name(cluster.name)
    pod = kubelet.pod(NS, worker.name if worker is not None else objects.scheduler_name(resource))
    assert pod.process is not None, pod.name
    os.killpg(pod.process.pid, signal.SIGKILL)


@pytest.fixture
def gateway_backend_setup(kube: FakeKube, kubelet: Kubelet, controller: Controller) -> BackendSetup:
    """The kubernetes backend for the scenario suite: real Dask in pods of the simulated
    kubelet, the controller reconciling them."""

    def check_stopped(cluster: Any) -> None:
        # Stopping deletes the DaskCluster; its pods, Service and Secret go with it.
        assert not objects_of(kube, cluster.name), objects_of(kube, cluster.name)

    def inspect_running(running: Any) -> None:
        resource = objects.resource_name(running.cluster.name)
        pods = pods_of(kube, running.cluster.name)
        assert len(pods) == 3, [p["metadata"]["name"] for p in pods]
        for pod in pods:
            [owner] = pod["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"]) == ("DaskCluster", resource)
        assert running.cluster.status == ClusterStatus.RUNNING

    return BackendSetup(
        backend="kubernetes",
        config=gateway_config(kube, scheduler_memory="1 G", worker_memory="768 M"),
        not_applicable={
            "unknown_user": "pods run as their image's user under the cluster's service "
            "account, never as the requesting user's account: any user name works",
            "status_command_fails_once": "no status command: the controller watches the pods "
            "(an informer on the API server), it runs no command to ask about them",
            "one_status_command_per_check": "no status command: the controller watches the "
            "pods (an informer on the API server), it runs no command to ask about them",
        },
        record=lambda gateway, name: LiveCluster(gateway.backend, kube, name),
        live_jobs=lambda cluster: live_pods(kube, kubelet, cluster),
        end_job=lambda cluster, worker: kill_pod_process(kubelet, cluster, worker),
        inspect_running=inspect_running,
        check_stopped=check_stopped,
        refused_option={"image": BAD_IMAGE},
        refused_reason=[re.escape(f"image '{BAD_IMAGE}' cannot be pulled"), "ErrImagePull"],
        dying_scheduler=lambda script: {"scheduler_cmd": ["/bin/sh", "-c", script]},
        dead_scheduler_reason=[r"the scheduler exited: Error \(exit code 3\)"],
        ended_reason=lambda cluster: [r"the scheduler exited: Error \(exit code 137\)"],
    )


class TestKubernetesScenarios(BackendScenarios):
    """Every scenario that applies to Kubernetes, on the fake API server and kubelet."""

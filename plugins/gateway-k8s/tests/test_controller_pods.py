"""The controller against the fake API server and a kubelet that marks pods running without
starting processes: worker pods follow `replicas`, a replaced controller (its expectations
lost) creates nothing twice, excess workers no scheduler retires are deleted in the end, and
a running cluster whose worker pods RBAC refuses shows why and heals once they are granted.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet

from gateway_k8s import crd, objects
from gateway_k8s.config import KubeControllerConfig
from gateway_k8s.controller import Controller
from gateway_k8s.kube import CLUSTERS, EVENTS, PODS, SECRETS, KubeClient, load_api_client
from gateway_k8s.runner import make_controller

pytestmark = pytest.mark.unit
NS = "dask"


@pytest.fixture
def kubelet(kube: FakeKube, tmp_path: Path) -> Iterator[Kubelet]:
    with Kubelet(kube=kube, workdir=tmp_path, run_processes=False).running() as k:
        yield k


@pytest.fixture
async def client(kube: FakeKube) -> AsyncIterator[KubeClient]:
    made = KubeClient(load_api_client(server=kube.url), threads=3)
    yield made
    made.close()


async def start(kube: FakeKube) -> tuple[Controller, asyncio.Event, asyncio.Task[None]]:
    config = KubeControllerConfig(
        server=kube.url,
        namespace=NS,
        address_mode="pod",
        leader_election=False,
        retire_grace=0.5,
        retire_timeout=2.0,
        api_qps=0,
    )
    controller = await make_controller(config)
    stop = asyncio.Event()
    return controller, stop, asyncio.create_task(controller.run(stop=stop))


async def until(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_workers_follow_replicas_across_a_controller_replacement(
    kube: FakeKube, kubelet: Kubelet, client: KubeClient
) -> None:
    body = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": "dask-c2", "labels": {objects.LABEL_MANAGED: objects.MANAGED_BY}},
        "spec": {"user": "alice", "worker": {"replicas": 4}},
    }
    owner = await client.create(CLUSTERS, NS, body)
    await client.create(
        SECRETS, NS, objects.credentials_secret(owner=owner, token="t", cert=b"c", key=b"k")
    )

    async def workers() -> list[str]:
        items, _ = await client.list(PODS, NS, labels=f"{objects.LABEL_COMPONENT}=worker")
        return sorted(p["metadata"]["name"] for p in items)

    async def status() -> dict[str, Any]:
        return (await client.get(CLUSTERS, NS, "dask-c2") or {}).get("status") or {}

    first, stop, task = await start(kube)
    await until(lambda: _eq(workers(), 4), "four workers")
    # Replaced mid-flight: the new controller has no expectations, only what it lists.
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    first.client.close()
    before = await workers()
    second, stop, task = await start(kube)
    try:
        running = await until(
            lambda: _status_running(status(), 4), "status to show four running workers"
        )
        assert running["phase"] == "Running"
        assert running["schedulerAddress"].startswith("tls://127.")
        assert await workers() == before  # nothing created twice, nothing replaced
        # Scale down: no scheduler process retires them here, so after retire_timeout the
        # controller deletes the newest excess pods itself.
        await client.patch(CLUSTERS, NS, "dask-c2", {"spec": {"worker": {"replicas": 2}}})
        await until(lambda: _eq(workers(), 2), "two workers")
        await asyncio.sleep(1.0)
        assert len(await workers()) == 2
        final = await until(lambda: _status_running(status(), 2), "status to show two")
        assert final["groups"]["default"] == {"requested": 2, "pending": 0, "running": 2}
        # Someone deletes the running scheduler's pod: the cluster fails (its state is gone),
        # it is not quietly restarted, and its workers go.
        await client.delete(PODS, NS, "dask-c2-scheduler")

        async def failed() -> dict[str, Any] | None:
            current = await status()
            return current if current.get("phase") == "Failed" else None

        assert (await until(failed, "the cluster to fail"))["reason"] == (
            "the scheduler's pod was deleted"
        )
        await until(lambda: _eq(workers(), 0), "the workers to be deleted")
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        second.client.close()


async def _eq(names: Any, count: int) -> bool:
    return len(await names) == count


async def _status_running(status: Any, count: int) -> dict[str, Any] | None:
    current = await status
    return current if current.get("workers") == count else None


async def test_a_stuck_scheduler_pod_reports_its_last_warning_event(
    kube: FakeKube, client: KubeClient
) -> None:
    """No kubelet: the scheduler pod stays Pending; a Warning event about it (as a kubelet
    writes when a volume cannot be mounted) becomes the cluster's pending reason."""
    body = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": "dask-c3", "labels": {objects.LABEL_MANAGED: objects.MANAGED_BY}},
        "spec": {"user": "alice"},
    }
    owner = await client.create(CLUSTERS, NS, body)
    await client.create(
        SECRETS, NS, objects.credentials_secret(owner=owner, token="t", cert=b"c", key=b"k")
    )
    controller, stop, task = await start(kube)
    controller.resync_period = 0.2
    try:

        async def scheduler() -> Any:
            return await client.get(PODS, NS, "dask-c3-scheduler")

        await until(scheduler, "the scheduler pod")
        event = {
            "metadata": {"generateName": "dask-c3-scheduler."},
            "involvedObject": {"kind": "Pod", "name": "dask-c3-scheduler", "namespace": NS},
            "reason": "FailedMount",
            "message": 'secret "dask-c3-credentials" not found',
            "type": "Warning",
        }
        await client.create(EVENTS, NS, event)

        async def reason() -> str:
            status = (await client.get(CLUSTERS, NS, "dask-c3") or {}).get("status") or {}
            return str(status.get("reason") or "") if "FailedMount" in str(status) else ""

        text = await until(reason, "the warning in status.reason")
        assert text == (
            'the scheduler is starting; last warning: FailedMount: secret "dask-c3-credentials"'
            " not found"
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        controller.client.close()


async def test_workers_whose_image_cannot_be_pulled_are_the_running_clusters_reason(
    kube: FakeKube, client: KubeClient, tmp_path: Path
) -> None:
    bad = "registry.invalid/worker:1"
    body = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": "dask-c4", "labels": {objects.LABEL_MANAGED: objects.MANAGED_BY}},
        "spec": {"user": "alice", "worker": {"replicas": 1, "image": bad}},
    }
    owner = await client.create(CLUSTERS, NS, body)
    await client.create(
        SECRETS, NS, objects.credentials_secret(owner=owner, token="t", cert=b"c", key=b"k")
    )
    with Kubelet(kube=kube, workdir=tmp_path, run_processes=False, failing_images={bad}).running():
        controller, stop, task = await start(kube)
        controller.resync_period = 0.2
        try:

            async def reason() -> str:
                status = (await client.get(CLUSTERS, NS, "dask-c4") or {}).get("status") or {}
                return str(status.get("reason") or "") if status.get("phase") == "Running" else ""

            text = await until(reason, "the workers' pull error in status.reason")
            assert text.startswith("group default: worker dask-c4-worker-")
            assert f"image {bad!r} cannot be pulled" in text
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
            controller.client.close()


async def test_workers_failing_in_a_row_fail_the_cluster_instead_of_looping(
    kube: FakeKube, client: KubeClient, tmp_path: Path
) -> None:
    """Real (tiny) processes: a scheduler that sleeps, workers that exit with status 3."""
    python = sys.executable
    body = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": "dask-c5", "labels": {objects.LABEL_MANAGED: objects.MANAGED_BY}},
        "spec": {
            "user": "alice",
            "scheduler": {
                "extraContainerConfig": {"command": [python, "-c", "import time; time.sleep(60)"]}
            },
            "worker": {
                "replicas": 1,
                "extraContainerConfig": {"command": [python, "-c", "import sys; sys.exit(3)"]},
            },
        },
    }
    owner = await client.create(CLUSTERS, NS, body)
    await client.create(
        SECRETS, NS, objects.credentials_secret(owner=owner, token="t", cert=b"c", key=b"k")
    )
    with Kubelet(kube=kube, workdir=tmp_path).running():
        controller, stop, task = await start(kube)
        try:

            async def failed() -> dict[str, Any] | None:
                status = (await client.get(CLUSTERS, NS, "dask-c5") or {}).get("status") or {}
                return status if status.get("phase") == "Failed" else None

            status = await until(failed, "the cluster to fail", timeout=60)
            assert status["reason"].startswith("3 workers failed in a row; the last: worker ")
            assert "exit code 3" in status["reason"], status["reason"]

            async def no_pods() -> bool:
                items, _ = await client.list(PODS, NS)
                return not items

            await until(no_pods, "the cluster's pods to be deleted")
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
            controller.client.close()


async def test_a_running_cluster_whose_worker_pods_are_refused_runs_on_with_the_reason(
    kube: FakeKube, kubelet: Kubelet, client: KubeClient
) -> None:
    """RBAC (or a quota) refuses creating worker pods of a running cluster: it keeps running,
    its reason names the refused verb and resource, and once the create is granted again the
    retried reconcile makes the worker and clears the reason."""
    body = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": "dask-c5", "labels": {objects.LABEL_MANAGED: objects.MANAGED_BY}},
        "spec": {"user": "alice", "worker": {"replicas": 0}},
    }
    owner = await client.create(CLUSTERS, NS, body)
    await client.create(
        SECRETS, NS, objects.credentials_secret(owner=owner, token="t", cert=b"c", key=b"k")
    )

    async def status() -> dict[str, Any]:
        return (await client.get(CLUSTERS, NS, "dask-c5") or {}).get("status") or {}

    async def running() -> dict[str, Any] | None:
        current = await status()
        return current if current.get("phase") == "Running" else None

    controller, stop, task = await start(kube)
    try:
        await until(running, "the cluster to run")
        everything_but_creating_pods = [
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["get", "list", "watch", "update"]},
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["patch", "delete"]},
            {
                "apiGroups": ["*"],
                "resources": ["services", "secrets", "events"],
                "verbs": ["create"],
            },
        ]
        kube.role = everything_but_creating_pods
        await client.patch(CLUSTERS, NS, "dask-c5", {"spec": {"worker": {"replicas": 1}}})

        async def refused() -> dict[str, Any] | None:
            current = await status()
            return current if "may not create pods" in (current.get("reason") or "") else None

        stuck = await until(refused, "the refusal to be the reason")
        assert stuck["phase"] == "Running"
        assert 'cannot create resource "pods"' in stuck["reason"], stuck["reason"]
        kube.role = None  # granted again
        healed = await until(
            lambda: _status_running(status(), 1), "the worker once granted", timeout=45
        )
        assert "reason" not in healed, healed
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        controller.client.close()


async def test_excess_workers_of_a_named_group_are_asked_of_its_scheduler_by_group(
    kube: FakeKube, kubelet: Kubelet, client: KubeClient
) -> None:
    """After ``retire_grace`` the controller asks the scheduler's agent to retire a named
    group's excess workers, naming the group in the scale message (as the API does): without
    it the agent would scale the default group."""
    from aiohttp import web

    body = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": "dask-c4", "labels": {objects.LABEL_MANAGED: objects.MANAGED_BY}},
        "spec": {
            "user": "alice",
            "worker": {"replicas": 0},
            "workerGroups": {"big": {"replicas": 2}},
        },
    }
    owner = await client.create(CLUSTERS, NS, body)
    await client.create(
        SECRETS, NS, objects.credentials_secret(owner=owner, token="t4", cert=b"c", key=b"k")
    )

    async def status() -> dict[str, Any]:
        return (await client.get(CLUSTERS, NS, "dask-c4") or {}).get("status") or {}

    asked: list[tuple[str, dict[str, Any]]] = []

    async def comm(request: web.Request) -> web.Response:
        asked.append((request.headers.get("Authorization", ""), await request.json()))
        return web.json_response({})

    controller, stop, task = await start(kube)
    runner: web.AppRunner | None = None
    try:
        await until(lambda: _status_running(status(), 2), "the group's two workers running")
        scheduler = await client.get(PODS, NS, "dask-c4-scheduler")
        assert scheduler is not None
        app = web.Application()
        app.router.add_post("/api/comm", comm)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, scheduler["status"]["podIP"], objects.API_PORT).start()
        await client.patch(
            CLUSTERS, NS, "dask-c4", {"spec": {"workerGroups": {"big": {"replicas": 1}}}}
        )

        async def was_asked() -> bool:
            return bool(asked)

        await until(was_asked, "the scheduler to be asked to retire")
        assert asked[0] == ("token t4", {"op": "scale", "count": 1, "group": "big"})
    finally:
        if runner is not None:
            await runner.cleanup()
        stop.set()
        await asyncio.wait_for(task, 20)
        controller.client.close()


async def test_a_pod_create_committed_after_its_controller_died_leaves_no_extra_worker(
    kube: FakeKube, kubelet: Kubelet, client: KubeClient
) -> None:
    """The controller dies with a worker pod's create in flight, and the API server commits
    that create anyway (as a real one may) after the replacement controller already made
    the workers it found missing: one pod too many, which the replacement deletes (the
    newest that has not started, else after `retire_timeout`); `replicas` workers remain."""
    body = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": "dask-c7", "labels": {objects.LABEL_MANAGED: objects.MANAGED_BY}},
        "spec": {"user": "alice", "worker": {"replicas": 0}},
    }
    owner = await client.create(CLUSTERS, NS, body)
    await client.create(
        SECRETS, NS, objects.credentials_secret(owner=owner, token="t", cert=b"c", key=b"k")
    )

    async def workers() -> list[str]:
        items, _ = await client.list(PODS, NS, labels=f"{objects.LABEL_COMPONENT}=worker")
        return sorted(p["metadata"]["name"] for p in items if not _ended_or_deleting(p))

    async def running() -> bool:
        status = (await client.get(CLUSTERS, NS, "dask-c7") or {}).get("status") or {}
        return status.get("phase") == "Running"

    first, _, first_task = await start(kube)
    await until(running, "the cluster to run")
    kube.commit_abandoned = True
    kube.delays[("create", "pods")] = 3.0
    await client.patch(CLUSTERS, NS, "dask-c7", {"spec": {"worker": {"replicas": 2}}})

    async def held() -> bool:
        return kube.holding > 0

    await until(held, "a worker pod's create in flight")
    first_task.cancel()  # dies with the create in flight (its request stays sent)
    await asyncio.gather(first_task, return_exceptions=True)
    kube.delays.clear()  # the replacement's creates are quick
    second, stop, task = await start(kube)
    try:
        # The abandoned create lands once its 3 s are up: three pods for a moment.
        await until(lambda: _eq(workers(), 3), "the late create to land", timeout=20)
        await until(lambda: _eq(workers(), 2), "the extra worker to be deleted", timeout=30)
        await asyncio.sleep(1.5)
        assert len(await workers()) == 2  # and stays so: nothing deleted or created twice
        ever = [
            e.obj["metadata"]["name"]
            for e in kube.store.events
            if e.kind == "/pods" and e.type == "ADDED" and "-worker-" in e.obj["metadata"]["name"]
        ]
        assert len(ever) == 3, ever  # the late one plus the two the replacement made
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        second.client.close()
        first.client.close()


def _ended_or_deleting(pod: dict[str, Any]) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase in ("Succeeded", "Failed") or bool(pod["metadata"].get("deletionTimestamp"))


async def test_a_started_clusters_deleted_secret_is_not_replaced_with_new_credentials(
    kube: FakeKube, kubelet: Kubelet, client: KubeClient
) -> None:
    """New credentials would not match those the running scheduler and the gateway hold (and
    the same moment comes when the garbage collector deletes a just-deleted DaskCluster's
    Secret before the controller's cache heard of the deletion): the cluster gets a reason
    instead, and no second Secret is made."""
    body = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": "dask-c8", "labels": {objects.LABEL_MANAGED: objects.MANAGED_BY}},
        "spec": {"user": "alice", "worker": {"replicas": 0}},
    }
    await client.create(CLUSTERS, NS, body)

    async def status() -> dict[str, Any]:
        return (await client.get(CLUSTERS, NS, "dask-c8") or {}).get("status") or {}

    async def running() -> bool:
        return (await status()).get("phase") == "Running"

    controller, stop, task = await start(kube)
    try:
        await until(running, "the cluster to run")  # the controller made its Secret
        await client.delete(SECRETS, NS, "dask-c8-credentials")

        async def told() -> str:
            return str((await status()).get("reason") or "")

        reason = await until(told, "the reason")
        assert reason.startswith("the cluster's credentials Secret was deleted"), reason
        await asyncio.sleep(1.0)
        assert await client.get(SECRETS, NS, "dask-c8-credentials") is None
        made = [
            e
            for e in kube.store.events
            if e.kind == "/secrets"
            and e.type == "ADDED"
            and e.obj["metadata"]["name"] == "dask-c8-credentials"
        ]
        assert len(made) == 1, made
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        controller.client.close()

"""End to end on the fake API server and the simulated kubelet: a `gateway` with the
`kubernetes` backend, the controller (in this process, its own informers and client), real
Dask schedulers and workers run by the kubelet, and our client through the gateway's proxy.

Integration tests: real processes on loopback.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp
import pytest
from e2e_support import BAD_IMAGE, NS, gateway_config, leftovers, until
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet

from gateway_k8s.controller import Controller

pytestmark = pytest.mark.integration


@pytest.fixture
def kube(chart_kube: FakeKube) -> FakeKube:
    """The fake under the chart's Roles (conftest's `chart_kube`); `kubelet` and
    `controller` (conftest) run against it."""
    return chart_kube


def client_session(address: str, kube: FakeKube) -> dict[str, Any]:
    """What a user does, with our (synchronous) client: new cluster, scale to 2, compute,
    scale to 1 in the middle of a computation, shut down."""
    from gateway_client import BasicAuth, Gateway

    def slow_square(x: int) -> int:  # local: pickled by value, the workers cannot import us
        import time as _time

        _time.sleep(0.2)
        return x * x

    seen: dict[str, Any] = {}
    with Gateway(address, auth=BasicAuth("alice", "")) as gateway:
        cluster = gateway.new_cluster()
        seen["name"] = cluster.name
        with cluster.get_client(set_as_default=False) as client:
            cluster.scale(2)
            client.wait_for_workers(2, timeout=60)
            seen["workers_at_2"] = len(client.scheduler_info()["workers"])
            futures = client.map(slow_square, range(40))
            time.sleep(0.5)
            cluster.scale(1)
            seen["results"] = client.gather(futures)
            deadline = time.monotonic() + 60
            while len(client.scheduler_info()["workers"]) != 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            seen["workers_at_1"] = len(client.scheduler_info()["workers"])
            seen["pods_at_1"] = sorted(leftovers(kube).get("pods", []))
        seen["listed"] = [c.name for c in gateway.list_clusters()]
        cluster.shutdown()
    return seen


async def test_a_cluster_scales_computes_and_leaves_nothing_behind(
    kube: FakeKube, kubelet: Kubelet, controller: Controller, make_gateway: Any
) -> None:
    gateway = await make_gateway(gateway_config(kube))
    address = f"http://{gateway.public_address}{gateway.context.prefix}"
    seen = await asyncio.to_thread(client_session, address, kube)
    assert seen["workers_at_2"] == 2
    assert seen["results"] == [x * x for x in range(40)]  # no task lost on scale-down
    assert seen["workers_at_1"] == 1
    resource = f"dask-{seen['name']}"
    # Retired workers' pods are removed: the scheduler and one worker remain.
    workers = [p for p in seen["pods_at_1"] if p.startswith(f"{resource}-worker-")]
    assert len(workers) == 1, seen["pods_at_1"]
    assert seen["listed"] == [seen["name"]]
    await until(lambda: not leftovers(kube), "every object of the cluster to be deleted")
    assert not gateway.context.routes.get("SNI", seen["name"])


async def test_an_image_that_cannot_be_pulled_reaches_the_api_reason(
    kube: FakeKube,
    kubelet: Kubelet,
    controller: Controller,
    make_gateway: Any,
    make_api_client: Any,
) -> None:
    gateway = await make_gateway(gateway_config(kube, image=BAD_IMAGE))
    alice = make_api_client(gateway, "alice")
    name = (await alice.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]

    async def failed() -> Any:
        body = (await alice.get(f"/api/v1/clusters/{name}")).body
        return body if body["status"] == "FAILED" else None

    await until(failed, "the cluster to fail")
    cluster = await gateway.backend.get_cluster(name)
    assert cluster is not None
    assert cluster.reason is not None
    assert BAD_IMAGE in cluster.reason and "ErrImagePull" in cluster.reason, cluster.reason
    await until(lambda: not leftovers(kube), "the failed cluster's objects to be deleted")


async def test_a_restarted_gateway_finds_its_cluster_and_an_oom_kill_reaches_the_reason(
    kube: FakeKube,
    kubelet: Kubelet,
    controller: Controller,
    make_gateway: Any,
    make_api_client: Any,
) -> None:
    first = await make_gateway(gateway_config(kube, keep=True))
    alice = make_api_client(first, "alice")
    name = (await alice.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
    body = (await alice.get(f"/api/v1/clusters/{name}?wait")).body
    await until(lambda: first.context.routes.get("SNI", name), "the first gateway's route")
    assert body["status"] in ("PENDING", "RUNNING")
    await first.stop()
    second = await make_gateway(gateway_config(kube))
    bob_view = make_api_client(second, "alice")

    async def running() -> Any:
        answer = (await bob_view.get(f"/api/v1/clusters/{name}")).body
        return answer if answer["status"] == "RUNNING" else None

    answer = await until(running, "the cluster to be running for the second gateway")
    assert answer["tls_cert"]
    assert second.context.routes.get("SNI", name)
    # The dashboard loads through the restarted gateway's proxy (a route it rebuilt).
    assert answer["dashboard_route"] == f"/clusters/{name}/status"
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(f"http://{second.public_address}{answer['dashboard_route']}") as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert "Bokeh" in await resp.text()
    # The kernel's OOM killer ends the scheduler: the user is told why.
    kubelet.oom_kill(NS, f"dask-{name}-scheduler")

    async def failed() -> Any:
        cluster = await second.backend.get_cluster(name)
        return cluster if cluster is not None and cluster.status.name == "FAILED" else None

    cluster = await until(failed, "the cluster to fail")
    assert "OOMKilled" in (cluster.reason or ""), cluster.reason
    assert not second.context.routes.get("SNI", name)
    await until(lambda: not leftovers(kube), "the cluster's objects to be deleted")


def original_client_session(address: str) -> dict[str, Any]:
    """The same user flow with the original `dask-gateway` client (PyPI): new cluster, scale
    to 2, compute, shut down."""
    from dask_gateway import BasicAuth, Gateway

    seen: dict[str, Any] = {}
    with Gateway(address, auth=BasicAuth("alice", "")) as gateway:
        cluster = gateway.new_cluster()
        seen["name"] = cluster.name
        try:
            cluster.scale(2)
            with cluster.get_client(set_as_default=False) as client:
                client.wait_for_workers(2, timeout=60)
                seen["workers"] = len(client.scheduler_info()["workers"])
                seen["total"] = client.submit(sum, client.map(lambda x: x * x, range(10))).result()
            seen["listed"] = [c.name for c in gateway.list_clusters()]
        finally:
            cluster.shutdown()
        seen["after"] = [c.name for c in gateway.list_clusters()]
    return seen


@pytest.mark.compat
async def test_the_original_client_runs_a_kubernetes_cluster(
    kube: FakeKube, kubelet: Kubelet, controller: Controller, make_gateway: Any
) -> None:
    try:
        import dask_gateway  # noqa: F401
    except ImportError:
        message = "the compat tier needs the original client: run it with `nox -s compat`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    gateway = await make_gateway(gateway_config(kube))
    address = f"http://{gateway.public_address}{gateway.context.prefix}"
    seen = await asyncio.to_thread(original_client_session, address)
    assert seen["workers"] == 2
    assert seen["total"] == 285
    assert seen["listed"] == [seen["name"]]
    assert seen["after"] == []
    await until(lambda: not leftovers(kube), "every object of the cluster to be deleted")


async def test_the_logs_of_a_running_cluster_through_the_api(
    kube: FakeKube,
    kubelet: Kubelet,
    controller: Controller,
    make_gateway: Any,
    make_api_client: Any,
) -> None:
    """The logs route reads the scheduler's and the worker's pods' logs (`pods/log`, which the
    chart grants the gateway): what the real processes printed."""
    gateway = await make_gateway(gateway_config(kube))
    alice = make_api_client(gateway, "alice")
    name = (await alice.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]

    async def running() -> Any:
        body = (await alice.get(f"/api/v1/clusters/{name}")).body
        return body["status"] == "RUNNING"

    await until(running, "the cluster to run")
    await alice.post(f"/api/v1/clusters/{name}/scale", json={"count": 1})

    async def worker_logs() -> Any:
        answer = await alice.get(f"/api/v2/clusters/{name}/logs?tail=200")
        assert answer.status == 200, answer.body
        workers = [c for c in answer.body if c != "scheduler"]
        if workers and "Registered to" in answer.body[workers[0]]:
            return answer.body
        return None

    logs = await until(worker_logs, "the worker's log to show it registered")
    assert "Scheduler at:" in logs["scheduler"], logs["scheduler"]
    (worker,) = (c for c in logs if c != "scheduler")
    assert worker.startswith(f"dask-{name}-worker-")
    assert len(logs) == 2
    # The scheduler's alone, and its last line only.
    answer = await alice.get(f"/api/v2/clusters/{name}/logs?component=scheduler&tail=1")
    assert list(answer.body) == ["scheduler"] and answer.body["scheduler"].count("\n") == 0
    assert answer.body["scheduler"] and answer.body["scheduler"] in logs["scheduler"]
    await alice.delete(f"/api/v1/clusters/{name}")
    answer = await alice.get(f"/api/v2/clusters/{name}/logs?component=scheduler")
    assert answer.body == {"scheduler": "(no log: the cluster stopped and its pods were deleted)"}
    await until(lambda: not leftovers(kube), "every object of the cluster to be deleted")

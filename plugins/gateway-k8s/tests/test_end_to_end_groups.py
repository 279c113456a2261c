"""Worker groups end to end on the fake API server and the simulated kubelet: the gateway
writes a named group into the DaskCluster, the controller starts its pods, real Dask workers
of both groups join one scheduler, and each group scales on its own.

Integration tests: real processes on loopback.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from e2e_support import NS, gateway_config, leftovers, until
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet

from gateway_k8s.controller import Controller

pytestmark = pytest.mark.integration


@pytest.fixture
def kube(chart_kube: FakeKube) -> FakeKube:
    """The fake under the chart's Roles (conftest's `chart_kube`); `kubelet` and
    `controller` (conftest) run against it."""
    return chart_kube


GROUP = "special"
RESOURCE = "special"
"""The Dask worker resource the group's workers have. Dask lower-cases the names it reads
from ``DASK_*`` variables, so tasks ask for ``special``, whatever the variable's case."""

RUNNING_ONE = {"count": 1, "pending": 0, "running": 1, "stopping": 0}
NONE = {"count": 0, "pending": 0, "running": 0, "stopping": 0}


def groups_config(kube: FakeKube) -> dict[str, Any]:
    return gateway_config(
        kube,
        worker_groups={
            GROUP: {
                "environment": {"DASK_DISTRIBUTED__WORKER__RESOURCES__SPECIAL": "1"},
                "backend": {"worker_extra_pod_labels": {"kind": "special"}},
            }
        },
    )


def pods(kube: FakeKube) -> list[dict[str, Any]]:
    """The pods in the fake's store (read there, not through the API)."""
    kind = kube.store.find_kind("", "v1", "pods")
    assert kind is not None
    items, _ = kube.store.select(kind, NS, lambda obj: True)
    return list(items)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    """Poll ``check`` (in the client's thread) until it answers something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def group_session(address: str, kube: FakeKube) -> dict[str, Any]:
    """With our client: a cluster, one default and one named group worker, a task only the
    group can run and one any worker can, the group scaled to 0 during a computation, then
    adaptive scaling of the group alone, and shutdown."""
    from distributed import get_worker

    from gateway_client import BasicAuth, Gateway

    def slow_square(x: int) -> int:  # local: pickled by value, the workers cannot import us
        import time as _time

        _time.sleep(0.2)
        return x * x

    def where(_: int) -> str:
        return str(get_worker().name)

    seen: dict[str, Any] = {}
    with Gateway(address, auth=BasicAuth("alice", "")) as gateway:
        cluster = gateway.new_cluster()
        seen["name"] = cluster.name
        with cluster.get_client(set_as_default=False) as client:
            cluster.scale(1)
            cluster.scale(1, group=GROUP)
            client.wait_for_workers(2, timeout=90)
            seen["groups_at_1"] = wait_for(
                lambda: (
                    (g := cluster.worker_groups()) == {"default": RUNNING_ONE, GROUP: RUNNING_ONE}
                    and g
                ),
                "one running worker in each group",
            )
            workers = client.scheduler_info()["workers"].values()
            seen["resources"] = {w["name"]: w.get("resources") or {} for w in workers}
            seen["group_pod_labels"] = [
                p["metadata"]["labels"]
                for p in pods(kube)
                if p["metadata"]["name"].startswith(f"{cluster.name}-{GROUP}-")
            ]
            seen["needs_group"] = client.submit(
                where, 1, resources={RESOURCE: 1}, pure=False
            ).result(timeout=60)
            seen["needs_nothing"] = client.submit(slow_square, 7, pure=False).result(timeout=60)
            futures = client.map(slow_square, range(40), pure=False)
            time.sleep(0.5)
            cluster.scale(0, group=GROUP)
            seen["results"] = client.gather(futures)
            seen["left"] = wait_for(
                lambda: (
                    len(w := client.scheduler_info()["workers"]) == 1
                    and [x["name"] for x in w.values()]
                ),
                "the group's worker to leave",
            )
            seen["groups_at_0"] = wait_for(
                lambda: (g := cluster.worker_groups())[GROUP] == NONE and g,
                "the group to have no worker",
            )
            seen["pods_at_0"] = wait_for(
                lambda: (
                    len(names := sorted(p["metadata"]["name"] for p in pods(kube))) == 2 and names
                ),
                "the group's pod to be deleted",
            )
            # Adaptive scaling of the group alone: its minimum brings one worker back.
            cluster.adapt(minimum=1, maximum=2, group=GROUP)
            seen["adapted"] = wait_for(
                lambda: (g := cluster.worker_groups())[GROUP] == RUNNING_ONE and g,
                "the adaptive group's minimum worker",
            )
            client.wait_for_workers(2, timeout=90)
            seen["adapted_workers"] = sorted(
                w["name"] for w in client.scheduler_info()["workers"].values()
            )
        cluster.shutdown()
    return seen


async def test_a_named_group_scales_and_computes_beside_the_default_group(
    kube: FakeKube, kubelet: Kubelet, controller: Controller, make_gateway: Any
) -> None:
    gateway = await make_gateway(groups_config(kube))
    address = f"http://{gateway.public_address}{gateway.context.prefix}"
    seen = await asyncio.to_thread(group_session, address, kube)
    name = seen["name"]
    assert seen["groups_at_1"] == {"default": RUNNING_ONE, GROUP: RUNNING_ONE}
    # The group's worker has the resource (its environment) and its pod the group's labels.
    [group_worker] = [w for w in seen["resources"] if w.startswith(f"{name}-{GROUP}-")]
    assert seen["resources"][group_worker] == {RESOURCE: 1}
    [default_worker] = [w for w in seen["resources"] if w != group_worker]
    assert default_worker.startswith(f"dask-{name}-worker-")
    assert seen["resources"][default_worker] == {}
    [labels] = seen["group_pod_labels"]
    assert labels["kind"] == "special" and labels["daskgateway.dev/worker-group"] == GROUP
    assert seen["needs_group"] == group_worker
    assert seen["needs_nothing"] == 49
    # Scaling the group to 0 mid-computation lost no task and kept the default worker.
    assert seen["results"] == [x * x for x in range(40)]
    assert seen["left"] == [default_worker]
    assert seen["groups_at_0"][GROUP] == NONE
    assert seen["groups_at_0"]["default"] == RUNNING_ONE
    assert seen["pods_at_0"] == sorted([default_worker, f"dask-{name}-scheduler"])
    assert seen["adapted"][GROUP] == RUNNING_ONE
    assert seen["adapted"]["default"] == RUNNING_ONE
    [new_worker] = [w for w in seen["adapted_workers"] if w != default_worker]
    assert new_worker.startswith(f"{name}-{GROUP}-") and new_worker != group_worker
    await until(lambda: not leftovers(kube), "every object of the cluster to be deleted")


def original_client_session(address: str, kube: FakeKube) -> dict[str, Any]:
    """The original `dask-gateway` client (PyPI), which knows no groups: new cluster, scale,
    compute, shut down."""
    from dask_gateway import BasicAuth, Gateway

    seen: dict[str, Any] = {}
    with Gateway(address, auth=BasicAuth("alice", "")) as gateway:
        cluster = gateway.new_cluster()
        seen["name"] = cluster.name
        try:
            cluster.scale(2)
            with cluster.get_client(set_as_default=False) as client:
                client.wait_for_workers(2, timeout=90)
                seen["workers"] = len(client.scheduler_info()["workers"])
                seen["total"] = client.submit(sum, client.map(lambda x: x * x, range(10))).result()
            seen["pods"] = sorted(p["metadata"]["name"] for p in pods(kube))
        finally:
            cluster.shutdown()
        seen["after"] = [c.name for c in gateway.list_clusters()]
    return seen


@pytest.mark.compat
async def test_the_original_client_scales_the_default_group_beside_a_named_one(
    kube: FakeKube,
    kubelet: Kubelet,
    controller: Controller,
    make_gateway: Any,
    make_api_client: Any,
) -> None:
    try:
        import dask_gateway  # noqa: F401
    except ImportError:
        message = "the compat tier needs the original client: run it with `nox -s compat`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    gateway = await make_gateway(groups_config(kube))
    address = f"http://{gateway.public_address}{gateway.context.prefix}"
    seen = await asyncio.to_thread(original_client_session, address, kube)
    name = seen["name"]
    assert seen["workers"] == 2
    assert seen["total"] == 285
    # The two workers were the default group's; the named group stayed at 0.
    workers = [p for p in seen["pods"] if p != f"dask-{name}-scheduler"]
    assert len(workers) == 2 and all(p.startswith(f"dask-{name}-worker-") for p in workers)
    assert seen["after"] == []
    body = (await make_api_client(gateway, "alice").get(f"/api/v2/clusters/{name}")).body
    assert list(body["groups"]) == ["default", GROUP]
    await until(lambda: not leftovers(kube), "every object of the cluster to be deleted")

"""Adaptive scaling driven by load on the Kubernetes backend, end to end: `adapt(0, 3)`, a
load of sleeping tasks makes the scheduler's agent want workers, the gateway writes its
target to the DaskCluster, the controller makes worker pods that the kubelet runs; once the
load is done the agent retires them and their pods go, back to the minimum; no task is lost.

Integration test: real Dask processes run by the simulated kubelet on the fake API server
(under the chart's Roles), the controller in this process, our client through the proxy.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from e2e_support import gateway_config, leftovers, until, worker_pods
from kube_fake import FakeKube
from kube_fake.kubelet import Kubelet

from gateway_k8s.controller import Controller

pytestmark = pytest.mark.integration

TASKS = 24
TASK_SECONDS = 1.0


@pytest.fixture
def kube(chart_kube: FakeKube) -> FakeKube:
    return chart_kube


def adaptive_session(address: str, kube: FakeKube) -> dict[str, Any]:
    from gateway_client import BasicAuth, Gateway

    def nap(x: int) -> int:  # local: pickled by value, the workers cannot import us
        import time as _time

        _time.sleep(1.0)
        return x + 1

    seen: dict[str, Any] = {"pods": [], "workers": []}
    started = time.monotonic()
    with Gateway(address, auth=BasicAuth("alice", "")) as gateway:
        cluster = gateway.new_cluster()
        resource = f"dask-{cluster.name}"
        with cluster.get_client(set_as_default=False) as client:
            cluster.adapt(minimum=0, maximum=3)
            futures = client.map(nap, range(TASKS))
            # Watch the cluster grow while the load runs.
            while not all(f.done() for f in futures):
                seen["workers"].append(len(client.scheduler_info()["workers"]))
                seen["pods"].append(len(worker_pods(kube, resource)))
                assert time.monotonic() - started < 60, "the load did not finish in 60 s"
                time.sleep(0.25)
            seen["results"] = client.gather(futures)
            seen["load_done"] = time.monotonic() - started
            # Results released (a worker holding data the client still refers to is kept, as
            # Dask's adaptive scaling should): then back to the minimum, no worker, no pod.
            del futures
            deadline = time.monotonic() + 40
            while (
                client.scheduler_info()["workers"] or worker_pods(kube, resource)
            ) and time.monotonic() < deadline:
                time.sleep(0.25)
            seen["workers_after"] = len(client.scheduler_info()["workers"])
            seen["pods_after"] = len(worker_pods(kube, resource))
            seen["groups_after"] = cluster.worker_groups()
        cluster.shutdown()
    seen["took"] = time.monotonic() - started
    return seen


async def test_adaptive_scaling_follows_the_load_and_shrinks_back_to_the_minimum(
    kube: FakeKube, kubelet: Kubelet, controller: Controller, make_gateway: Any
) -> None:
    config = gateway_config(
        kube,
        adaptive_period=0.5,
        environment={
            # Scale down after two agreeing checks (1 s), not three; target 2 s of work each.
            "DASK_DISTRIBUTED__ADAPTIVE__WAIT_COUNT": "2",
            "DASK_DISTRIBUTED__ADAPTIVE__TARGET_DURATION": "2s",
        },
    )
    gateway = await make_gateway(config)
    address = f"http://{gateway.public_address}{gateway.context.prefix}"
    seen = await asyncio.to_thread(adaptive_session, address, kube)
    # Every task ran to its result.
    assert seen["results"] == [x + 1 for x in range(TASKS)], seen
    # The load grew the cluster from nothing to more than one worker, never past the maximum.
    assert max(seen["workers"]) >= 2, seen
    assert max(seen["pods"]) <= 3 and max(seen["workers"]) <= 3, seen
    # With more than one worker the load took less than its serial time.
    assert seen["load_done"] < TASKS * TASK_SECONDS + 20, seen
    # Back to the minimum: no worker, no worker pod.
    assert seen["workers_after"] == 0 and seen["pods_after"] == 0, seen
    assert seen["groups_after"]["default"]["running"] == 0, seen
    assert seen["took"] < 90, seen
    await until(lambda: not leftovers(kube), "every object of the cluster to be deleted")

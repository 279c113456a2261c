"""Unit tests of the controller's parts: the work queue, expectations, the informer's relist
after a 410 Gone, and leader election between two controllers, on the fake API server (no pods
run: no kubelet).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from kube_fake import FakeKube

from gateway_k8s.config import KubeControllerConfig
from gateway_k8s.controller import Expectations, LeaderElector, WorkQueue, failure_reason
from gateway_k8s.kube import LEASES, PODS, Informer, KubeClient, load_api_client

pytestmark = pytest.mark.unit
NS = "dask"


async def test_the_work_queue_deduplicates_and_requeues_keys_added_while_held() -> None:
    queue = WorkQueue()
    queue.add(("ns", "a"))
    queue.add(("ns", "a"))
    queue.add(("ns", "b"))
    assert len(queue) == 2
    key = await queue.get()
    assert key == ("ns", "a")
    queue.add(("ns", "a"))  # changed while a reconciler holds it
    assert len(queue) == 1  # only b: a waits for done
    queue.done(key)
    assert len(queue) == 2
    assert await queue.get() == ("ns", "b")
    assert await queue.get() == ("ns", "a")


async def test_the_work_queue_backs_off_per_key_and_forget_resets() -> None:
    queue = WorkQueue(base_delay=0.01, max_delay=0.04)
    key = ("ns", "a")
    assert [queue.retry(key) for _ in range(4)] == [0.01, 0.02, 0.04, 0.04]
    queue.forget(key)
    assert queue.retry(key) == 0.01
    started = time.monotonic()
    assert await asyncio.wait_for(queue.get(), 1) == key
    assert time.monotonic() - started >= 0.005
    queue.close()


async def test_the_controller_takes_its_backoff_from_its_config(kube: FakeKube) -> None:
    from gateway_k8s.controller import Controller

    config = KubeControllerConfig(
        server=kube.url,
        namespace=NS,
        queue_backoff_base=0.5,
        queue_backoff_max=2.0,
        api_backoff_base=0.3,
        api_backoff_max=4.0,
    )
    client = KubeClient(load_api_client(server=kube.url), threads=3)
    try:
        controller = Controller(config=config, client=client)
        key = ("ns", "a")
        assert [controller.queue.retry(key) for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]
        controller.queue.close()
        for informer in controller.informers:
            assert (informer.backoff_base, informer.backoff_max) == (0.3, 4.0)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"queue_backoff_base": 0}, "queue_backoff_base: must be more than 0 seconds, got 0"),
        (
            {"api_backoff_base": 2, "api_backoff_max": 1},
            "api_backoff_max: must be at least api_backoff_base (2 s), got 1",
        ),
        ({"queue_backoff_max": 7200}, "queue_backoff_max: must be at most 3600 seconds, got 7200"),
    ],
)
def test_bad_backoff_is_refused_naming_the_value(settings: dict[str, Any], problem: str) -> None:
    from gateway_core.config import ConfigError

    with pytest.raises(ConfigError) as info:
        KubeControllerConfig(**settings)
    assert info.value.problems == [problem]


async def test_a_failing_list_is_retried_after_the_informers_backoff(kube: FakeKube) -> None:
    """A refused list is tried again after ``backoff_base``, doubling up to ``backoff_max``:
    a short backoff tries many times in a second and a half, a long one once."""
    kube.role = []  # nothing granted: every list is refused
    tries: dict[float, int] = {}
    for base in (0.05, 5.0):
        client = KubeClient(load_api_client(server=kube.url), threads=3)
        informer = Informer(client, PODS, namespace=NS, backoff_base=base, backoff_max=base * 2)
        informer.start()
        try:
            await asyncio.sleep(1.5)
        finally:
            await informer.stop()
            client.close()
        assert informer.refused is not None and informer.refused.verb == "list"
        tries[base] = client.requests
    assert tries[5.0] == 1, tries
    assert tries[0.05] >= 5, tries


def test_expectations_count_unseen_creates_until_observed_or_expired() -> None:
    now = [100.0]
    expectations = Expectations(timeout=10, clock=lambda: now[0])
    key = ("ns", "c")
    expectations.expect_create(key, "w1", "default")
    expectations.expect_create(key, "w2", "gpu")
    expectations.expect_delete(key, "w0")
    assert expectations.pending_creates(key, "default") == {"w1"}
    assert expectations.pending_creates(key) == {"w1", "w2"}
    assert not expectations.satisfied(key)
    expectations.created(key, "w1")
    expectations.deleted(key, "w0")
    assert expectations.pending_creates(key) == {"w2"}
    assert expectations.pending_deletes(key) == set()
    now[0] += 11  # the watch never showed w2: trust the cache again
    assert expectations.satisfied(key)


def test_failure_reasons_come_from_container_states_and_conditions() -> None:
    pulling = {
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "image": "bad:1",
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}},
                }
            ],
        }
    }
    assert failure_reason(pulling, what="the scheduler") == (
        "Failed",
        "the scheduler's image 'bad:1' cannot be pulled: ImagePullBackOff: not found",
    )
    oom = {
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}
            ],
        }
    }
    phase, reason = failure_reason(oom, what="the scheduler") or ("", "")
    assert phase == "Failed" and "OOMKilled" in reason and "137" in reason
    unschedulable = {
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "message": "0/3 nodes available"}
            ],
        }
    }
    assert failure_reason(unschedulable, what="the scheduler") == (
        "Pending",
        "the scheduler cannot be scheduled: 0/3 nodes available",
    )
    assert failure_reason({"status": {"phase": "Running"}}, what="x") is None


def pod(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "dask-gateway-k8s"}},
        "spec": {"containers": [{"name": "c", "image": "i"}]},
    }


async def until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_the_informer_relists_after_410_gone_and_misses_nothing(kube: FakeKube) -> None:
    client = KubeClient(load_api_client(server=kube.url), threads=4)
    seen: list[tuple[str, str]] = []
    informer = Informer(
        client, PODS, namespace=NS, handler=lambda t, o: seen.append((t, o["metadata"]["name"]))
    )
    try:
        await client.create(PODS, NS, pod("a"))
        # As if the informer had listed, then lost its connection: it resumes from the
        # version it saw, but the changes since are compacted away (410 Gone).
        informer.resource_version = await informer._relist()
        assert seen == [("ADDED", "a")]
        await client.create(PODS, NS, pod("b"))
        await client.delete(PODS, NS, "a")
        kube.compact()
        informer.start()
        await until(lambda: informer.relists == 1, "a relist")
        await until(lambda: set(informer.cache) == {(NS, "b")}, "the cache to catch up")
        assert ("ADDED", "b") in seen and ("DELETED", "a") in seen
        # And the watch resumes from the new list: later changes arrive.
        await client.create(PODS, NS, pod("c"))
        await until(lambda: (NS, "c") in informer.cache, "a change after the relist")
        assert informer.relists == 1
    finally:
        await informer.stop()
        client.close()


def elector(kube: FakeKube, identity: str) -> LeaderElector:
    config = KubeControllerConfig(
        server=kube.url, namespace=NS, lease_duration=2.0, renew_period=0.5, identity=identity
    )
    return LeaderElector(KubeClient(load_api_client(server=kube.url), threads=3), config, identity)


async def test_one_of_two_controllers_leads_and_the_other_takes_over_after_expiry(
    kube: FakeKube,
) -> None:
    first, second = elector(kube, "one"), elector(kube, "two")
    tasks = {e.identity: asyncio.create_task(e.run()) for e in (first, second)}
    try:
        await until(lambda: first.leading.is_set() or second.leading.is_set(), "a leader")
        await asyncio.sleep(2.5)  # longer than the lease: the follower must still follow
        assert first.leading.is_set() != second.leading.is_set()
        leader, follower = (first, second) if first.leading.is_set() else (second, first)
        # The leader dies without releasing the Lease (kill -9).
        tasks[leader.identity].cancel()
        stopped = time.monotonic()
        await until(follower.leading.is_set, "the follower to take over", 10)
        assert time.monotonic() - stopped >= 1.5  # not before the Lease expired
        lease = await follower.client.get(LEASES, NS, follower.config.lease_name)
        assert lease is not None
        assert lease["spec"]["holderIdentity"] == follower.identity
        assert lease["spec"]["leaseTransitions"] == 1
    finally:
        for task in tasks.values():
            task.cancel()
        for e in (first, second):
            e.client.close()


async def test_only_the_leading_controller_reconciles(kube: FakeKube) -> None:
    """Two controllers on one namespace: the follower keeps its caches but acts on nothing,
    so the new cluster's scheduler pod is created once; no kubelet runs it."""
    from gateway_k8s import crd, objects
    from gateway_k8s.kube import CLUSTERS, SECRETS
    from gateway_k8s.runner import make_controller

    controllers = []
    for identity in ("one", "two"):
        config = KubeControllerConfig(
            server=kube.url,
            namespace=NS,
            identity=identity,
            lease_duration=2.0,
            renew_period=0.5,
            api_qps=0,
        )
        controllers.append(await make_controller(config))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop=stop)) for c in controllers]
    client = KubeClient(load_api_client(server=kube.url), threads=3)
    try:
        await until(lambda: any(c.elector.leading.is_set() for c in controllers), "a leader")
        body = {
            "apiVersion": crd.API_VERSION,
            "kind": crd.KIND,
            "metadata": {"name": "dask-c1", "labels": {objects.LABEL_MANAGED: objects.MANAGED_BY}},
            "spec": {"user": "alice", "worker": {"replicas": 0}},
        }
        owner = await client.create(CLUSTERS, NS, body)
        await client.create(
            SECRETS, NS, objects.credentials_secret(owner=owner, token="t", cert=b"c", key=b"k")
        )

        async def pods() -> list[str]:
            items, _ = await client.list(PODS, NS)
            return [p["metadata"]["name"] for p in items]

        for _ in range(100):
            if await pods():
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # time for a second, wrong, create
        assert await pods() == ["dask-c1-scheduler"]
        leader = next(c for c in controllers if c.elector.leading.is_set())
        follower = next(c for c in controllers if c is not leader)
        assert leader.reconciles > 0
        assert follower.reconciles == 0
        assert (NS, "dask-c1") in follower.clusters.cache  # its cache is warm for a takeover
        status = (await client.get(CLUSTERS, NS, "dask-c1") or {}).get("status") or {}
        assert status.get("phase") == "Pending"
    finally:
        stop.set()
        for task in tasks:
            await asyncio.wait_for(task, 20)
        for c in controllers:
            c.client.close()
        client.close()

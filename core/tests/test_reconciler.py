"""Tests of the reconciler and ProcessBackend with the in-process driver (no real processes).

Heartbeats go straight from the fake schedulers to the backend; periods and timeouts are tiny.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pluggy
import pytest
import sqlalchemy

from gateway_core import hookspecs
from gateway_core.backends.base import BackendUnavailable, ClusterConflict
from gateway_core.backends.kit import cluster_env
from gateway_core.backends.process import ProcessBackend
from gateway_core.config import ClusterConfig, Command, Memory, WorkerGroup, load_config
from gateway_core.context import GatewayContext
from gateway_core.events import ClusterEvent
from gateway_core.hookcaller import GatewayHooks
from gateway_core.hookspecs import hookimpl
from gateway_core.models import Cluster, ClusterStatus, User, WorkerStatus
from gateway_core.reconciler import WorkQueue, backoff_delay
from gateway_core.routes import Route
from gateway_core.store import Store
from gateway_core.testing import hooks as testing_hooks
from gateway_core.testing.driver import InProcessConfig, InProcessDriver
from gateway_core.testing.fake_scheduler import FakeScheduler

pytestmark = pytest.mark.unit

FAST: dict[str, Any] = {
    "cluster_start_timeout": 5.0,
    "worker_start_timeout": 5.0,
    "cluster_heartbeat_period": 1,
    "heartbeat_period": 0.05,
    "cluster_heartbeat_timeout": 3.0,
    "cluster_status_period": 0.05,
    "worker_status_period": 0.05,
    "check_timeouts_period": 0.02,
    "backoff_base_delay": 0.01,
    "backoff_max_delay": 0.2,
    "parallelism": 4,
}

ALICE = User(name="alice")


class Events:
    """An observer plugin collecting every cluster event."""

    def __init__(self) -> None:
        self.events: list[ClusterEvent] = []

    @hookimpl
    def gateway_cluster_event(self, event: ClusterEvent) -> None:
        self.events.append(event)

    def kinds(self, name: str | None = None) -> list[str]:
        return [e.kind for e in self.events if name is None or e.cluster_name == name]


class Gateway:
    """One backend with its driver, context and event log."""

    def __init__(
        self,
        *,
        gateway: dict[str, Any] | None = None,
        schedulers: dict[str, FakeScheduler] | None = None,
        **knobs: Any,
    ) -> None:
        pm = pluggy.PluginManager("gateway")
        pm.add_hookspecs(hookspecs)
        self.observer = Events()
        pm.register(self.observer)
        self.context = GatewayContext(
            config=load_config({"gateway": gateway or {}}, environ={}),
            hook=GatewayHooks.from_plugin_manager(pm),
            prefix="/gw",
        )
        self.config = InProcessConfig(**{**FAST, **knobs})
        self.driver = InProcessDriver(
            config=self.config, context=self.context, schedulers=schedulers
        )
        self.backend = ProcessBackend(
            config=self.config,
            cluster_config_class=ClusterConfig,
            context=self.context,
            driver=self.driver,
        )
        self.driver.deliver_to(self.backend)

    async def start(self, **config: Any) -> Cluster:
        name = await self.backend.start_cluster(
            user=ALICE, options={"size": 1}, config=ClusterConfig(**config)
        )
        cluster = await self.backend.get_cluster(name)
        assert cluster is not None
        return cluster

    async def running(self) -> Cluster:
        cluster = await self.start()
        await until(lambda: cluster.status == ClusterStatus.RUNNING)
        return cluster

    async def scale(self, cluster: Cluster, count: int) -> None:
        await self.backend.forward_to_scheduler(cluster, {"op": "scale", "count": count})

    def running_workers(self, cluster: Cluster) -> list[str]:
        return sorted(w.name for w in cluster.workers.values() if w.status == WorkerStatus.RUNNING)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    made: list[Gateway] = []

    async def factory(**kwargs: Any) -> Gateway:
        gw = Gateway(**kwargs)
        await gw.backend.setup()
        made.append(gw)
        return gw

    yield factory
    for gw in made:
        if gw.backend.reconciler.running:
            await gw.backend.cleanup()
        await gw.driver.shutdown()


# -------------------------------------------------------------------------------------------
# The work queue


def test_backoff_delay_doubles_up_to_the_maximum() -> None:
    delays = [backoff_delay(n, base=0.1, max_delay=1.0) for n in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff_delay(10_000, base=0.1, max_delay=300.0) == 300.0


async def test_work_queue_dedups_requeues_while_processing_and_backs_off() -> None:
    queue: WorkQueue[str] = WorkQueue(base_delay=0.02, max_delay=1.0)
    queue.put("a")
    queue.put("a")
    queue.put("b", delay=0.05)
    assert await queue.get() == "a"
    queue.put("a")  # while "a" is processed: it runs again afterwards, once
    queue.put("a")
    queue.done("a")
    assert await queue.get() == "a"
    queue.done("a")
    t0 = time.monotonic()
    assert await queue.get() == "b"
    assert time.monotonic() - t0 >= 0.03
    delays = []
    for _ in range(3):
        delays.append(queue.retry("b"))
        queue.done("b")
        queue.put("b")  # a put during the backoff does not cut it short
        t0 = time.monotonic()
        assert await queue.get() == "b"
        assert time.monotonic() - t0 >= delays[-1] * 0.8
    assert delays == pytest.approx([0.02, 0.04, 0.08])
    queue.forget("b")
    queue.done("b")
    assert queue.failures("b") == 0
    queue.close()


async def test_work_queue_lag_is_the_wait_of_the_oldest_ready_key() -> None:
    queue: WorkQueue[str] = WorkQueue(base_delay=0.02, max_delay=1.0)
    assert queue.lag() == 0.0
    queue.put("a")
    queue.put("later", delay=10.0)  # not ready yet: no lag, but queued (the depth)
    await asyncio.sleep(0.05)
    queue.put("b")
    assert queue.lag() >= 0.04
    assert len(queue) == 3
    assert await queue.get() == "a"
    assert queue.lag() < 0.04  # now the wait of "b"
    assert await queue.get() == "b"
    assert queue.lag() == 0.0
    queue.close()


# -------------------------------------------------------------------------------------------
# Starting, scaling, stopping


@pytest.mark.parametrize("style", ["generator", "awaitable"])
async def test_start_runs_the_cluster_and_puts_routes(
    make: Callable[..., Awaitable[Gateway]], style: str
) -> None:
    gw = await make(start_style=style, scheduler_start_delay=0.05)
    cluster = await gw.start(worker_cores=2)
    assert cluster.status == ClusterStatus.PENDING
    got = await gw.backend.get_cluster(cluster.name, wait=True)
    assert got is cluster and cluster.status == ClusterStatus.RUNNING
    scheduler = gw.driver.schedulers[cluster.name]
    assert cluster.scheduler_address == scheduler.scheduler_address
    assert cluster.api_address == scheduler.api_address
    assert cluster.state["port"] == scheduler.port
    if style == "generator":
        assert cluster.state["submitted"] is True
    assert cluster.tls_cert.startswith(b"-----BEGIN CERTIFICATE")
    assert cluster.tls_key.startswith(b"-----BEGIN PRIVATE KEY")
    assert cluster.config["worker_cores"] == 2
    assert gw.context.routes.get("PATH", f"/gw/clusters/{cluster.name}") == Route(
        kind="PATH", key=f"/gw/clusters/{cluster.name}", target=scheduler.dashboard_address
    )
    assert gw.context.routes.get("SNI", cluster.name) == Route(
        kind="SNI", key=cluster.name, target=scheduler.scheduler_address
    )
    assert cluster.to_json()["tls_cert"]
    assert await gw.backend.list_clusters(username="alice") == [cluster]
    assert await gw.backend.list_clusters(username="bob") == []
    assert await gw.backend.list_clusters(statuses=[ClusterStatus.STOPPED]) == []
    assert gw.observer.kinds(cluster.name) == ["running"]


async def test_scale_up_and_down_through_the_scheduler(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make(worker_connect_delay=0.02)
    cluster = await gw.running()
    await gw.scale(cluster, 3)
    scheduler = gw.driver.schedulers[cluster.name]
    assert scheduler.comm_log == [{"op": "scale", "count": 3}]
    await until(lambda: len(gw.running_workers(cluster)) == 3)
    assert cluster.count == 3
    assert sorted(scheduler.workers) == gw.running_workers(cluster)
    assert all(w.startswith(f"{cluster.name}-") for w in scheduler.workers)
    assert gw.observer.kinds(cluster.name).count("worker_running") == 3

    await gw.scale(cluster, 1)  # the scheduler retires two and reports them closed
    await until(lambda: len(gw.running_workers(cluster)) == 1)
    await until(
        lambda: sum(w.status == WorkerStatus.STOPPED for w in cluster.workers.values()) == 2
    )
    stopped = [w for w in cluster.workers.values() if w.status == WorkerStatus.STOPPED]
    assert all(w.close_expected and w.stop_time for w in stopped)
    assert gw.driver.calls["stop_worker"] == 2
    assert gw.driver.calls["start_worker"] == 3  # nothing replaced the retired workers
    assert gw.observer.kinds(cluster.name).count("worker_stopped") == 2

    await gw.backend.forward_to_scheduler(
        cluster, {"op": "adapt", "minimum": 1, "maximum": 4, "active": True}
    )
    assert scheduler.adapt == {"minimum": 1, "maximum": 4, "active": True}


async def test_forwarded_requests_reuse_one_connection_and_survive_a_restarted_scheduler(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make(worker_connect_delay=0.02)
    cluster = await gw.running()
    scheduler = gw.driver.schedulers[cluster.name]
    for minimum in (0, 1, 0, 1):
        await gw.backend.forward_to_scheduler(
            cluster, {"op": "adapt", "minimum": minimum, "maximum": 2, "active": True}
        )
    assert len(scheduler.comm_peers) == 4
    assert len(set(scheduler.comm_peers)) == 1, scheduler.comm_peers  # one kept connection

    # The scheduler goes away and comes back on its port: the kept connection is dead, and
    # the next request still arrives (over a new one).
    await scheduler.stop()
    await scheduler.start()
    await gw.backend.forward_to_scheduler(
        cluster, {"op": "adapt", "minimum": 2, "maximum": 3, "active": True}
    )
    assert scheduler.adapt == {"minimum": 2, "maximum": 3, "active": True}
    assert scheduler.comm_peers[-1] not in scheduler.comm_peers[:4]


async def test_a_kept_connection_the_scheduler_drops_while_reused_is_retried_once(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    """An agent that answers one request per connection and then drops the connection at
    the next request's arrival (the race a kept-alive connection can lose): the forwarded
    request is sent again on a new connection, not failed."""
    gw = await make(worker_connect_delay=0.02)
    cluster = await gw.running()
    answered: list[bytes] = []

    async def one_request_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        served = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                if served:
                    break  # dropped without an answer
                answered.append(body)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 2\r\n\r\n{}"
                )
                await writer.drain()
                served = True
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(one_request_per_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cluster.api_address = f"http://127.0.0.1:{port}"
    try:
        for count in (1, 2):
            await gw.backend.forward_to_scheduler(cluster, {"op": "scale", "count": count})
    finally:
        server.close()
        await server.wait_closed()
    assert [json.loads(b)["count"] for b in answered] == [1, 2]


async def test_worker_groups_scale_apart_with_their_own_settings(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make(worker_connect_delay=0.02)
    cluster = await gw.start(
        worker_cores=1,
        environment={"A": "1"},
        worker_groups={
            "gpu": WorkerGroup(
                worker_cores=4, worker_memory=Memory(8 << 30), environment={"B": "2"}
            )
        },
    )
    await until(lambda: cluster.status == ClusterStatus.RUNNING)
    scheduler = gw.driver.schedulers[cluster.name]
    await gw.scale(cluster, 2)
    await gw.backend.forward_to_scheduler(cluster, {"op": "scale", "count": 1, "group": "gpu"})
    await until(lambda: len(gw.running_workers(cluster)) == 3)
    assert (cluster.count, cluster.group_counts) == (2, {"gpu": 1})
    groups = {w.name: w.group for w in cluster.workers.values()}
    assert sorted(groups.values()) == ["default", "default", "gpu"]
    for name, group in groups.items():
        settings = gw.driver.worker_settings[name]
        if group == "gpu":
            assert name.startswith(f"{cluster.name}-gpu-")
            assert (settings.worker_cores, settings.threads) == (4, 4)
            assert settings.worker_memory == 8 << 30
            assert settings.environment == {"A": "1", "B": "2"}
        else:
            assert (settings.worker_cores, settings.environment) == (1, {"A": "1"})
    assert cluster.workers_per_group() == {
        "default": {"count": 2, "pending": 0, "running": 2, "stopping": 0},
        "gpu": {"count": 1, "pending": 0, "running": 1, "stopping": 0},
    }

    # Scaling the group down retires its worker only; the default group keeps its two.
    await gw.backend.forward_to_scheduler(cluster, {"op": "scale", "count": 0, "group": "gpu"})
    await until(lambda: len(gw.running_workers(cluster)) == 2)
    assert all(groups[w] == "default" for w in gw.running_workers(cluster))
    assert cluster.group_counts == {}  # a group at 0 is dropped
    assert sorted(scheduler.workers) == gw.running_workers(cluster)
    assert gw.driver.calls["start_worker"] == 3


async def test_surplus_pending_workers_of_a_group_are_stopped(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make(workers_connect=False)
    cluster = await gw.start(worker_groups={"big": WorkerGroup(worker_cores=2)})
    await until(lambda: cluster.status == ClusterStatus.RUNNING)
    await gw.scale(cluster, 1)
    await gw.backend.forward_to_scheduler(cluster, {"op": "scale", "count": 3, "group": "big"})
    await until(lambda: gw.driver.calls["start_worker"] == 4)
    await gw.backend.forward_to_scheduler(cluster, {"op": "scale", "count": 1, "group": "big"})
    await until(lambda: gw.driver.calls["stop_worker"] == 2)
    active = [w for w in cluster.workers.values() if w.target == WorkerStatus.RUNNING]
    assert sorted(w.group for w in active) == ["big", "default"]


async def test_surplus_pending_workers_are_stopped(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make(workers_connect=False)
    cluster = await gw.running()
    await gw.scale(cluster, 3)
    await until(lambda: gw.driver.calls["start_worker"] == 3)
    await gw.scale(cluster, 1)
    await until(
        lambda: sum(w.status == WorkerStatus.STOPPED for w in cluster.workers.values()) == 2
    )
    assert [w.status for w in cluster.workers.values()].count(WorkerStatus.PENDING) == 1


async def test_stop_stops_workers_and_scheduler_and_deletes_routes(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make()
    cluster = await gw.running()
    await gw.scale(cluster, 2)
    await until(lambda: len(gw.running_workers(cluster)) == 2)
    scheduler = gw.driver.schedulers[cluster.name]
    await gw.backend.stop_cluster(cluster.name)
    await gw.backend.stop_cluster(cluster.name)  # idempotent
    await gw.backend.stop_cluster("no-such-cluster")
    await until(lambda: cluster.status == ClusterStatus.STOPPED)
    assert cluster.stop_time is not None
    assert all(w.status == WorkerStatus.STOPPED for w in cluster.workers.values())
    assert gw.driver.calls["stop_scheduler"] == 1
    assert cluster.name not in gw.driver.schedulers
    assert gw.context.routes.routes() == []
    assert cluster.to_json()["tls_key"] is None
    kinds = gw.observer.kinds(cluster.name)
    assert kinds[-1] == "stopped" and kinds.count("worker_stopped") == 2
    with pytest.raises(ClusterConflict, match="not active"):
        await gw.backend.on_cluster_heartbeat(cluster.name, scheduler.message())
    with pytest.raises(ClusterConflict, match="not running"):
        await gw.scale(cluster, 1)


async def test_a_normal_stop_logs_no_cancelled_start(
    make: Callable[..., Awaitable[Gateway]], caplog: pytest.LogCaptureFixture
) -> None:
    # The start operation still watches the scheduler when the stop comes (as the local
    # backend's does): ending it is part of a normal stop, not an interrupted start.
    gw = await make(start_style="generator", scheduler_watch=30.0)
    caplog.set_level(logging.INFO, logger="gateway")
    cluster = await gw.running()
    runtime = gw.backend.reconciler.runtimes.find(cluster.name)
    assert runtime is not None and runtime.start is not None  # still watching
    await gw.backend.stop_cluster(cluster.name)
    await until(lambda: cluster.status == ClusterStatus.STOPPED)
    assert gw.backend.reconciler.runtimes.find(cluster.name) is None  # forgotten in one step
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert f"Stopping cluster {cluster.name}" in messages
    assert not [m for m in messages if "cancelled" in m], messages


async def test_stop_while_starting_cancels_the_start(
    make: Callable[..., Awaitable[Gateway]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    gw = await make(scheduler_start_delay=10.0)
    cluster = await gw.start()
    await until(lambda: gw.driver.calls["start_scheduler"] == 1)
    waiter = asyncio.create_task(gw.backend.get_cluster(cluster.name, wait=True))
    await gw.backend.stop_cluster(cluster.name)
    assert await asyncio.wait_for(waiter, 2.0) is cluster
    await until(lambda: cluster.status == ClusterStatus.STOPPED)
    assert gw.driver.calls["stop_scheduler"] == 1
    assert cluster.state == {"submitted": True}  # stored at once, seen by stop_scheduler
    interrupted = f"Start of cluster {cluster.name} cancelled before its scheduler registered"
    assert interrupted in [r.getMessage() for r in caplog.records]


# -------------------------------------------------------------------------------------------
# Failures


async def test_cluster_start_timeout_fails_the_cluster(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make(scheduler_heartbeats=False, cluster_start_timeout=0.3)
    cluster = await gw.start()
    await until(lambda: cluster.status == ClusterStatus.FAILED)
    assert cluster.reason is not None and "cluster_start_timeout" in cluster.reason
    assert gw.driver.calls["stop_scheduler"] == 1
    assert gw.observer.kinds(cluster.name) == ["failed"]
    assert gw.observer.events[-1].detail["reason"] == cluster.reason


async def test_scheduler_start_error_fails_the_cluster_with_its_message(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make(scheduler_start_error="sbatch: invalid partition 'gpu'")
    cluster = await gw.start()
    got = await gw.backend.get_cluster(cluster.name, wait=True)
    assert got is not None
    await until(lambda: cluster.status == ClusterStatus.FAILED)
    assert cluster.reason is not None
    assert "sbatch: invalid partition 'gpu'" in cluster.reason


async def test_failing_stop_is_retried_with_growing_delays(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make(stop_scheduler_failures=4, backoff_base_delay=0.02, backoff_max_delay=1.0)
    cluster = await gw.running()
    await gw.backend.stop_cluster(cluster.name)
    await until(lambda: cluster.status == ClusterStatus.STOPPED)
    times = [t for t, op, _ in gw.driver.call_times if op == "stop_scheduler"]
    assert len(times) == 5
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, expected in zip(gaps, [0.02, 0.04, 0.08, 0.16], strict=True):
        assert gap >= expected * 0.9  # each retry waits twice as long as the one before
    assert gw.backend.reconciler.queue.failures((cluster.name, "")) == 0  # reset on success


async def test_worker_start_failure_limit_fails_the_cluster(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make(worker_start_failures=100, worker_start_failure_limit=2)
    cluster = await gw.running()
    await gw.scale(cluster, 1)
    await until(lambda: cluster.status == ClusterStatus.FAILED)
    assert gw.driver.calls["start_worker"] == 3
    assert cluster.reason is not None
    assert "worker_start_failure_limit (2)" in cluster.reason
    assert "fake worker start failure" in cluster.reason
    assert gw.observer.kinds(cluster.name).count("worker_failed") == 3


async def test_worker_failures_are_forgiven_after_a_successful_start(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make(worker_start_failures=2, worker_start_failure_limit=2)
    cluster = await gw.running()
    await gw.scale(cluster, 1)
    await until(lambda: len(gw.running_workers(cluster)) == 1)
    assert cluster.worker_start_failures == 0
    assert cluster.status == ClusterStatus.RUNNING
    failed = [w for w in cluster.workers.values() if w.status == WorkerStatus.FAILED]
    assert len(failed) == 2 and all("fake worker start failure" in (w.reason or "") for w in failed)


async def test_worker_start_timeout_replaces_the_worker(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make(workers_connect=False, worker_start_timeout=0.2, worker_start_failure_limit=0)
    cluster = await gw.running()
    await gw.scale(cluster, 1)
    await until(lambda: gw.driver.calls["start_worker"] >= 3)
    assert cluster.status == ClusterStatus.RUNNING  # timeouts do not count as failures
    timed_out = [w for w in cluster.workers.values() if w.status == WorkerStatus.FAILED]
    assert timed_out and "worker_start_timeout" in (timed_out[0].reason or "")
    assert gw.driver.calls["stop_worker"] >= 2


async def test_heartbeat_timeout_fails_the_cluster(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make(cluster_heartbeat_timeout=0.3)
    cluster = await gw.running()
    gw.driver.schedulers[cluster.name].pause()
    await until(lambda: cluster.status == ClusterStatus.FAILED)
    assert cluster.reason is not None and "heartbeat" in cluster.reason


async def test_dead_cluster_fails_with_the_drivers_reason(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make()
    cluster = await gw.running()
    gw.driver.kill_cluster(cluster.name, reason="job 17 was OOM killed")
    await until(lambda: cluster.status == ClusterStatus.FAILED)
    assert cluster.reason == "job 17 was OOM killed"
    assert gw.context.routes.routes() == []


async def test_dead_worker_is_replaced(make: Callable[..., Awaitable[Gateway]]) -> None:
    gw = await make()
    cluster = await gw.running()
    await gw.scale(cluster, 1)
    await until(lambda: len(gw.running_workers(cluster)) == 1)
    (first,) = gw.running_workers(cluster)
    gw.driver.dead_workers.add(first)
    await until(lambda: cluster.workers[first].status == WorkerStatus.FAILED)
    await until(lambda: len(gw.running_workers(cluster)) == 1)
    assert gw.running_workers(cluster) != [first]
    assert cluster.status == ClusterStatus.RUNNING


async def test_a_failing_check_fails_nobody(make: Callable[..., Awaitable[Gateway]]) -> None:
    gw = await make()
    cluster = await gw.running()
    gw.driver.check_clusters_errors = 1
    gw.driver.check_workers_errors = 1
    calls = gw.driver.calls["check_clusters"]
    await until(lambda: gw.driver.calls["check_clusters"] >= calls + 3)
    assert gw.driver.check_clusters_errors == 0
    assert cluster.status == ClusterStatus.RUNNING


async def test_an_answer_of_the_wrong_length_fails_nobody(
    make: Callable[..., Awaitable[Gateway]], caplog: pytest.LogCaptureFixture
) -> None:
    gw = await make()
    cluster = await gw.running()
    await gw.scale(cluster, 1)
    await until(lambda: len(gw.running_workers(cluster)) == 1)
    asked: list[str] = []

    async def too_few(batch: Sequence[Any]) -> list[bool]:
        asked.append(type(batch[0]).__name__)
        return []  # a driver bug: no answer for the item it was asked about

    gw.driver.check_clusters = too_few  # type: ignore[method-assign]
    gw.driver.check_workers = too_few  # type: ignore[method-assign]
    await until(lambda: {"Cluster", "tuple"} <= set(asked))
    assert cluster.status == ClusterStatus.RUNNING
    assert len(gw.running_workers(cluster)) == 1
    assert "check_clusters answered 0 results for 1 clusters" in caplog.text
    assert "check_workers answered 0 results for 1 workers" in caplog.text


async def test_one_batched_check_per_period(make: Callable[..., Awaitable[Gateway]]) -> None:
    gw = await make(cluster_status_period=0.1)
    clusters = [await gw.start() for _ in range(6)]
    await until(lambda: all(c.status == ClusterStatus.RUNNING for c in clusters))
    before = gw.driver.calls["check_clusters"]
    t0 = time.monotonic()
    await asyncio.sleep(0.55)
    calls = gw.driver.calls["check_clusters"] - before
    periods = (time.monotonic() - t0) / 0.1
    assert 2 <= calls <= periods + 1  # one per period, not one per cluster
    assert gw.driver.check_batches[-calls:] == [6] * calls


async def test_malformed_heartbeat_is_refused(make: Callable[..., Awaitable[Gateway]]) -> None:
    gw = await make()
    cluster = await gw.running()
    with pytest.raises(ClusterConflict, match="count"):
        await gw.backend.on_cluster_heartbeat(cluster.name, {"count": -1})
    with pytest.raises(ClusterConflict, match="does not exist"):
        await gw.backend.on_cluster_heartbeat("nope", {})


async def test_forward_to_an_unreachable_scheduler_is_a_conflict(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make()
    cluster = await gw.running()
    scheduler = gw.driver.schedulers[cluster.name]
    scheduler.pause()
    await scheduler.stop()
    with pytest.raises(ClusterConflict, match="Cannot reach the scheduler"):
        await gw.scale(cluster, 2)


async def test_logs_come_from_the_driver_and_a_failing_driver_is_a_503(
    make: Callable[..., Awaitable[Gateway]], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await make()
    cluster = await gw.start()
    asked: list[tuple[list[str], int, int]] = []
    behaviour = {"mode": "answer"}

    async def cluster_logs(
        c: Cluster, *, components: Sequence[str], tail: int, max_bytes: int
    ) -> dict[str, str]:
        asked.append((list(components), tail, max_bytes))
        if behaviour["mode"] == "fail":
            raise RuntimeError("sudo: a password is required")
        if behaviour["mode"] == "hang":
            await asyncio.sleep(30)
        return {"scheduler": "hello"}

    monkeypatch.setattr(gw.driver, "cluster_logs", cluster_logs)
    logs = await gw.backend.cluster_logs(cluster, components=["scheduler"], tail=5, max_bytes=100)
    assert logs == {"scheduler": "hello"} and asked == [(["scheduler"], 5, 100)]

    behaviour["mode"] = "fail"
    with pytest.raises(BackendUnavailable, match=f"logs of cluster {cluster.name}: sudo: a pass"):
        await gw.backend.cluster_logs(cluster, components=["scheduler"], tail=5, max_bytes=100)

    behaviour["mode"] = "hang"
    gw.backend.logs_timeout = 0.05  # type: ignore[misc]
    with pytest.raises(BackendUnavailable, match=r"took longer than 0\.05 s"):
        await gw.backend.cluster_logs(cluster, components=["scheduler"], tail=5, max_bytes=100)


# -------------------------------------------------------------------------------------------
# Records, shutdown and restart


async def test_store_writes_do_not_block_the_event_loop(
    make: Callable[..., Awaitable[Gateway]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every SQL statement takes 0.2 s; asyncio's debug mode reports any callback over 50 ms.
    settings = {
        "db_url": f"sqlite:///{tmp_path / 'gateway.sqlite'}",
        "db_encrypt_keys": [base64.b64encode(os.urandom(32)).decode()],
    }
    patient = {"cluster_start_timeout": 60.0, "worker_start_timeout": 60.0}
    gw = await make(gateway=settings, cluster_heartbeat_timeout=60.0, **patient)
    store = gw.backend.store

    @sqlalchemy.event.listens_for(store.engine, "before_cursor_execute")
    def crawl(*args: Any) -> None:
        time.sleep(0.2)

    loop = asyncio.get_running_loop()
    caplog.set_level(logging.WARNING, logger="asyncio")
    loop.set_debug(True)
    loop.slow_callback_duration = 0.05
    try:
        cluster = await gw.start()  # create, credentials, start state, running
        await until(lambda: cluster.status == ClusterStatus.RUNNING, timeout=60)
        await gw.scale(cluster, 2)  # heartbeats: count, workers created, started, running
        await until(lambda: len(gw.running_workers(cluster)) == 2, timeout=60)
        await gw.backend.stop_cluster(cluster.name)
        await until(lambda: cluster.status == ClusterStatus.STOPPED, timeout=60)
    finally:
        loop.set_debug(False)
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert slow == [], "the event loop was blocked:\n" + "\n".join(slow)

    await gw.backend.cleanup()  # waits for the queued writes
    sqlalchemy.event.remove(store.engine, "before_cursor_execute", crawl)
    again = Store(url=settings["db_url"], encrypt_keys=settings["db_encrypt_keys"])
    try:
        (stored,) = again.load()
        assert stored.status == ClusterStatus.STOPPED and stored.state == cluster.state
        assert stored.workers == cluster.workers and len(stored.workers) == 2
    finally:
        again.close()


async def test_old_finished_clusters_are_purged(make: Callable[..., Awaitable[Gateway]]) -> None:
    gw = await make(gateway={"db_cleanup_period": 0.05, "db_cluster_max_age": 0.1})
    cluster = await gw.running()
    await gw.backend.stop_cluster(cluster.name)
    await until(lambda: cluster.status == ClusterStatus.STOPPED)
    assert await gw.backend.get_cluster(cluster.name) is cluster
    await until(lambda: gw.backend.store.get(cluster.name) is None)
    assert await gw.backend.list_clusters() == []


async def test_cleanup_stops_clusters_by_default(make: Callable[..., Awaitable[Gateway]]) -> None:
    gw = await make()
    clusters = [await gw.running() for _ in range(2)]
    await gw.backend.cleanup()
    assert all(c.status == ClusterStatus.STOPPED for c in clusters)
    assert gw.driver.schedulers == {}


async def test_restart_from_a_persistent_store(
    make: Callable[..., Awaitable[Gateway]], tmp_path: Path
) -> None:
    settings = {
        "db_url": f"sqlite:///{tmp_path / 'gateway.sqlite'}",
        "db_encrypt_keys": [base64.b64encode(os.urandom(32)).decode()],
        "stop_clusters_on_shutdown": False,
    }
    first = await make(gateway=settings)
    cluster = await first.running()
    await first.scale(cluster, 2)
    await until(lambda: len(first.running_workers(cluster)) == 2)
    token, workers = cluster.token, first.running_workers(cluster)
    await first.backend.cleanup()
    assert first.driver.calls["stop_scheduler"] == 0  # left running
    scheduler = first.driver.schedulers[cluster.name]
    # While no gateway runs, a heartbeat is "try again" (503), not "unknown cluster" (409),
    # which would make the scheduler shut itself down.
    with pytest.raises(BackendUnavailable):
        await first.backend.on_cluster_heartbeat(cluster.name, scheduler.message())

    second = await make(gateway=settings, schedulers=first.driver.schedulers)
    again = await second.backend.get_cluster(cluster.name)
    assert again is not None and again is not cluster
    assert again.status == ClusterStatus.RUNNING and again.token == token
    assert second.running_workers(again) == workers
    await until(lambda: second.context.routes.get("SNI", again.name) is not None)
    route = second.context.routes.get("PATH", f"/gw/clusters/{again.name}")
    assert route is not None and route.target == scheduler.dashboard_address
    await second.scale(again, 3)
    await until(lambda: len(second.running_workers(again)) == 3)
    await asyncio.sleep(0.2)  # checks and heartbeats keep it healthy
    assert again.status == ClusterStatus.RUNNING
    await second.backend.stop_cluster(again.name)
    await until(lambda: again.status == ClusterStatus.STOPPED)
    assert second.driver.calls["stop_worker"] == 3


async def test_restart_resumes_a_pending_cluster_waiting_for_its_heartbeat(
    make: Callable[..., Awaitable[Gateway]], tmp_path: Path
) -> None:
    settings = {
        "db_url": f"sqlite:///{tmp_path / 'gateway.sqlite'}",
        "db_encrypt_keys": [base64.b64encode(os.urandom(32)).decode()],
        "stop_clusters_on_shutdown": False,
    }
    first = await make(gateway=settings, scheduler_heartbeats=False)
    cluster = await first.start()
    await until(lambda: cluster.name in first.driver.schedulers and "port" in cluster.state)
    await first.backend.cleanup()
    second = await make(gateway=settings, schedulers=first.driver.schedulers)
    first.driver.schedulers[cluster.name].resume()
    again = await second.backend.get_cluster(cluster.name, wait=True)
    assert again is not None and again.status == ClusterStatus.RUNNING
    assert second.driver.calls["start_scheduler"] == 0  # its start had already run


@pytest.mark.parametrize("may_rerun", [True, False])
async def test_restart_reruns_a_start_that_launched_nothing_when_the_driver_says_so(
    make: Callable[..., Awaitable[Gateway]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    may_rerun: bool,
) -> None:
    """A gateway killed after a start began (credentials written) but before the driver stored
    anything: with `ClusterDriver.start_may_rerun` the restarted gateway starts it again; without
    it, the cluster is checked as started, found dead and failed (nothing else can tell)."""
    from gateway_core.testing.driver import InProcessDriver

    settings = {
        "db_url": f"sqlite:///{tmp_path / 'gateway.sqlite'}",
        "db_encrypt_keys": [base64.b64encode(os.urandom(32)).decode()],
        "stop_clusters_on_shutdown": False,
    }
    first = await make(gateway=settings, scheduler_heartbeats=False)
    cluster = await first.start()
    await until(lambda: cluster.name in first.driver.schedulers and "port" in cluster.state)
    await first.driver.schedulers.pop(cluster.name).stop()  # it never launched, as it were
    first.backend.store.update_cluster(cluster, state={})
    await first.backend.cleanup()

    monkeypatch.setattr(
        InProcessDriver, "start_may_rerun", lambda self, cluster: "port" not in cluster.state
    )
    if not may_rerun:
        monkeypatch.undo()
    second = await make(gateway=settings, schedulers=first.driver.schedulers)
    again = await second.backend.get_cluster(cluster.name)
    assert again is not None and again.status == ClusterStatus.PENDING and again.tls_cert
    if may_rerun:
        await until(lambda: again.status == ClusterStatus.RUNNING)
        assert second.driver.calls["start_scheduler"] == 1
    else:
        await until(lambda: again.status == ClusterStatus.FAILED)
        assert second.driver.calls["start_scheduler"] == 0
        assert again.reason == "The scheduler stopped unexpectedly"


async def test_a_stored_config_that_no_longer_fits_fails_that_cluster_only(
    make: Callable[..., Awaitable[Gateway]], tmp_path: Path
) -> None:
    """The cluster config class changed between restarts (here: a key it no longer has)."""
    settings = {
        "db_url": f"sqlite:///{tmp_path / 'gateway.sqlite'}",
        "db_encrypt_keys": [base64.b64encode(os.urandom(32)).decode()],
        "stop_clusters_on_shutdown": False,
    }
    first = await make(gateway=settings)
    fits, unfit = await first.running(), await first.running()
    first.backend.store.update_cluster(unfit, config={**unfit.config, "retired_key": 1})
    await first.backend.cleanup()

    second = await make(gateway=settings, schedulers=first.driver.schedulers)
    kept = await second.backend.get_cluster(fits.name)
    failed = await second.backend.get_cluster(unfit.name)
    assert kept is not None and failed is not None
    await until(lambda: failed.status == ClusterStatus.FAILED)
    assert failed.reason is not None and "cluster.retired_key: unknown key" in failed.reason
    assert second.driver.calls["stop_scheduler"] == 1, "its processes are stopped"
    assert kept.status == ClusterStatus.RUNNING
    assert isinstance(kept.typed_config, ClusterConfig), "structured once, when loaded"
    assert second.backend.cluster_config(kept) is kept.typed_config


async def test_the_typed_config_a_cluster_starts_with_is_what_the_driver_gets(
    make: Callable[..., Awaitable[Gateway]],
) -> None:
    gw = await make()
    config = ClusterConfig(worker_cores=3)
    name = await gw.backend.start_cluster(user=ALICE, options={}, config=config)
    cluster = await gw.backend.get_cluster(name)
    assert cluster is not None
    assert gw.driver.cluster_config(cluster) is config  # kept, not converted again
    assert cluster.config["worker_cores"] == 3  # the plain form, for the store


# -------------------------------------------------------------------------------------------
# Helpers for drivers, registration


async def test_cluster_env_and_config_round_trip(make: Callable[..., Awaitable[Gateway]]) -> None:
    gw = await make()
    gw.context.api_url = "http://127.0.0.1:9/api"
    cluster = await gw.start(
        environment={"FOO": "bar", "DASK_GATEWAY_API_URL": "overridden"},
        worker_memory=Memory(2**30),
        scheduler_cmd=Command(["my-scheduler", "--x"]),
        cluster_max_cores=8.0,
    )
    env = cluster_env(cluster, gw.context)
    assert env == {
        "FOO": "bar",
        "DASK_GATEWAY_API_URL": "http://127.0.0.1:9/api",
        "DASK_GATEWAY_API_TOKEN": cluster.token,
        "DASK_GATEWAY_CLUSTER_NAME": cluster.name,
    }
    config = gw.backend.cluster_config(cluster)
    assert config.worker_memory == 2**30 and isinstance(config.worker_memory, Memory)
    assert config.scheduler_cmd == ["my-scheduler", "--x"]
    assert config.cluster_max_cores == 8.0


def test_the_testing_hooks_register_the_inprocess_and_simulated_backends() -> None:
    from gateway_core.testing.simulated import SimulatedConfig, SimulatedDriver

    pm = pluggy.PluginManager("gateway")
    pm.add_hookspecs(hookspecs)
    pm.register(testing_hooks)
    (specs,) = pm.hook.gateway_register_backends()
    by_name = {spec.name: spec for spec in specs}
    assert sorted(by_name) == ["inprocess", "simulated"]
    spec = by_name["inprocess"]
    assert spec.driver is InProcessDriver and spec.config is InProcessConfig
    spec = by_name["simulated"]
    assert spec.driver is SimulatedDriver and spec.config is SimulatedConfig


async def test_settled_workers_are_batched_per_cluster_and_a_dead_one_is_still_found(
    make: Callable[..., Awaitable[Gateway]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker check's per-period work: clusters whose workers are all settled add them
    without the per-worker Python test (`_checkable`); a worker in transition makes its
    cluster take that test; a dead settled worker is still replaced."""
    from gateway_core.reconciler import checks as checks_module

    gw = await make(worker_status_period=3600.0)
    clusters = [await gw.running() for _ in range(3)]
    for cluster in clusters:
        await gw.scale(cluster, 3)
    await until(lambda: all(len(gw.running_workers(c)) == 3 for c in clusters))
    await until(lambda: not any(gw.backend.reconciler.runtimes.starting(c.name) for c in clusters))
    per_worker: list[str] = []
    original = checks_module._checkable

    def counted(worker: Any, runtime: Any) -> bool:
        per_worker.append(worker.name)
        return original(worker, runtime)

    monkeypatch.setattr(checks_module, "_checkable", counted)
    asked: list[list[str]] = []
    answer_dead: set[str] = set()

    async def check(batch: Sequence[Any]) -> list[bool]:
        asked.append(sorted(w.name for _, w in batch))
        return [w.name not in answer_dead for _, w in batch]

    gw.driver.check_workers = check  # type: ignore[method-assign]
    checks = gw.backend.reconciler.checks
    await checks.workers_alive()
    every = sorted(w for c in clusters for w in gw.running_workers(c))
    assert asked == [every] and per_worker == []  # all 9 asked, none tested one by one

    # A pending worker in the first cluster: that cluster alone goes worker by worker.
    first = clusters[0]
    pending = sorted(first.workers)[0]
    first.workers[pending].status = WorkerStatus.PENDING
    await checks.workers_alive()
    assert sorted(per_worker) == sorted(first.workers) and asked[-1] == every
    first.workers[pending].status = WorkerStatus.RUNNING

    per_worker.clear()
    victim = gw.running_workers(clusters[1])[0]
    answer_dead.add(victim)
    await checks.workers_alive()
    assert per_worker == []
    assert clusters[1].workers[victim].target == WorkerStatus.FAILED
    await until(lambda: clusters[1].workers[victim].status == WorkerStatus.FAILED)

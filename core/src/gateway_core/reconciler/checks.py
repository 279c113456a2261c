"""The reconciler's periodic checks: timeouts and lifetimes, batched liveness checks, the purge.

Owns `Checks`: each method is one period's pass, run by `Reconciler` on its own timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from itertools import compress, repeat
from operator import attrgetter, not_
from typing import TYPE_CHECKING, TypeVar, cast

from ..config import ConfigError
from ..models import ClusterStatus, WorkerStatus, now_ms
from ..units import format_duration

if TYPE_CHECKING:
    from ..metrics import GatewayMetrics
    from ..models import Cluster, Worker
    from .runtime import ClusterRuntime, WorkerRuntime
    from .shared import Shared
    from .workers import WorkerMachine

log = logging.getLogger("gateway.reconciler")

T = TypeVar("T")

YIELD_EVERY = 500
"""Clusters a periodic pass visits between two returns to the event loop (each slice a few
milliseconds), so that requests are answered while it goes over thousands of clusters."""


class Checks:
    """The periodic checks of the clusters and workers in ``shared.store``."""

    def __init__(self, *, shared: Shared, workers: WorkerMachine) -> None:
        self.shared = shared
        self.workers = workers

    async def timeouts(self) -> None:
        """Fail clusters that did not start or stopped heartbeating; replace workers that did
        not connect in time (timeouts do not count against the worker failure limit); warn
        about, then stop, clusters reaching their ``max_lifetime``."""
        shared = self.shared
        cfg = shared.config
        now_s = time.time()
        now = now_ms()
        for i, cluster in enumerate(shared.store.clusters_with_status(_STARTING_OR_RUNNING)):
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # let requests in: the loop is never held for long
            if cluster.target != ClusterStatus.RUNNING or not shared.owns(cluster.name):
                continue
            if self._lifetime(cluster, now):
                continue
            if cluster.status == ClusterStatus.PENDING:
                if now - cluster.start_time > cfg.cluster_start_timeout * 1000:
                    shared.request_stop(
                        cluster.name,
                        failed=True,
                        reason=(
                            f"The cluster did not start within cluster_start_timeout "
                            f"({cfg.cluster_start_timeout:g} s)"
                        ),
                    )
                continue
            if cluster.status != ClusterStatus.RUNNING:
                continue
            last = cluster.last_heartbeat
            if last is not None and now_s - last > cfg.heartbeat_timeout:
                if await self._heard_elsewhere(cluster, now_s):
                    continue
                if not shared.owns(cluster.name) or cluster.target != ClusterStatus.RUNNING:
                    continue  # changed hands or was stopped while the database was read
                shared.request_stop(
                    cluster.name,
                    failed=True,
                    reason=(
                        f"No heartbeat from the scheduler for more than "
                        f"{cfg.heartbeat_timeout:g} s (cluster_heartbeat_timeout)"
                    ),
                )
                continue
            if WorkerStatus.PENDING not in map(_STATUS, cluster.workers.values()):
                continue  # searched in C: no Python step per worker when none is pending
            for worker in list(cluster.workers.values()):
                if (
                    worker.status == WorkerStatus.PENDING
                    and worker.target == WorkerStatus.RUNNING
                    and now - worker.start_time > cfg.worker_start_timeout * 1000
                ):
                    self.workers.start_failed(
                        cluster,
                        worker,
                        f"The worker did not connect within worker_start_timeout "
                        f"({cfg.worker_start_timeout:g} s)",
                        count=False,
                    )

    async def _heard_elsewhere(self, cluster: Cluster, now_s: float) -> bool:
        """Whether another replica recorded a heartbeat of ``cluster`` within the timeout
        that this one has not synced yet (then taken as this one's); False with one gateway.
        A read that fails counts as no news: the cluster is failed as it would have been."""
        try:
            recorded = await self.shared.recorded_heartbeat(cluster.name)
        except Exception:  # the database may be away: decide on what we know
            log.warning("Reading the last heartbeat of %s failed", cluster.name, exc_info=True)
            return False
        if recorded is None or now_s - recorded > self.shared.config.heartbeat_timeout:
            return False
        if cluster.last_heartbeat is None or recorded > cluster.last_heartbeat:
            cluster.last_heartbeat = recorded
        log.debug("Cluster %s: a heartbeat another replica recorded keeps it", cluster.name)
        return True

    def _lifetime(self, cluster: Cluster, now: int) -> bool:
        """Emit the ``lifetime_warning`` event once the warning is due, and stop the cluster
        (with a reason the user sees) once its ``max_lifetime`` since creation has passed;
        True when it was stopped. Reads the typed config only: no driver call."""
        try:
            config = self.shared.driver.cluster_config(cluster)
        except ConfigError:
            return False  # a config that no longer fits fails the cluster elsewhere
        lifetime = config.max_lifetime
        warn_at = config.lifetime_warning_at
        if lifetime is None or warn_at is None:
            return False
        age = (now - cluster.start_time) / 1000
        if age >= lifetime:
            self.shared.request_stop(
                cluster.name,
                reason=f"stopped: maximum lifetime of {format_duration(lifetime)} reached",
            )
            return True
        runtime = self.shared.runtimes.cluster(cluster.name)
        if age >= warn_at and not runtime.lifetime_warned:
            runtime.lifetime_warned = True
            stop_time = cluster.start_time + int(lifetime * 1000)
            log.info(
                "Cluster %s reaches its maximum lifetime of %s in %s",
                cluster.name,
                format_duration(lifetime),
                format_duration(round(lifetime - age, 1)),
            )
            self.shared.events.emit(
                "lifetime_warning", cluster, max_lifetime=float(lifetime), stop_time=stop_time
            )
        return False

    async def clusters(self) -> None:
        """One batched `ClusterDriver.check_clusters` call for every started cluster; a dead
        one fails with the driver's reason. A check that raises is logged and skipped."""
        shared = self.shared
        batch = []
        for c in shared.store.clusters.values():
            runtime = shared.runtimes.find(c.name)
            if (
                c.target == ClusterStatus.RUNNING
                and c.status in (ClusterStatus.PENDING, ClusterStatus.RUNNING)
                and shared.owns(c.name)
                and runtime is not None
                and runtime.started
                and runtime.start is None
            ):
                batch.append(c)
        for cluster in await _ask(
            shared.driver.check_clusters, batch, "cluster", shared.context.metrics
        ):
            if cluster.target != ClusterStatus.RUNNING or not cluster.status.is_active:
                continue
            reason: str | None = None
            try:
                with shared.context.metrics.driver_call("failure_reason"):
                    reason = await shared.driver.failure_reason(cluster)
            except Exception:
                log.warning("failure_reason(%s) raised", cluster.name, exc_info=True)
            shared.request_stop(
                cluster.name, failed=True, reason=reason or "The scheduler stopped unexpectedly"
            )

    async def workers_alive(self) -> None:
        """One batched `ClusterDriver.check_workers` call for every started worker of running
        clusters; a dead worker is replaced.

        The batch is built cluster by cluster: a cluster whose workers are all settled (RUNNING
        or finished, none starting) adds its running ones in a few passes made in C
        (`_settled_workers`); only a cluster with a worker in transition visits its workers
        one by one in Python (`_checkable`). The driver's answers are searched for the dead in
        C as well, so a period over 100,000 settled workers costs per cluster, not per worker.
        """
        shared = self.shared
        runtimes = shared.runtimes
        batch: list[tuple[Cluster, Worker]] = []
        for i, c in enumerate(shared.store.clusters_with_status(_RUNNING_ONLY)):
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # let requests in: the loop is never held for long
            if c.target != ClusterStatus.RUNNING or not c.workers or not shared.owns(c.name):
                continue
            runtime = runtimes.find(c.name)
            if runtime is None:
                continue
            settled = _settled_workers(c, runtime)
            if settled is not None:
                batch.extend(zip(repeat(c, len(settled)), settled, strict=True))
            else:
                batch.extend((c, w) for w in c.workers.values() if _checkable(w, runtime))
        for cluster, worker in await _ask(
            shared.driver.check_workers, batch, "worker", shared.context.metrics
        ):
            if worker.target != WorkerStatus.RUNNING or not worker.status.is_active:
                continue
            if cluster.target != ClusterStatus.RUNNING:
                continue
            if worker.status == WorkerStatus.PENDING:
                self.workers.start_failed(
                    cluster, worker, "The worker exited before connecting", count=True
                )
            else:
                self.workers.start_failed(
                    cluster, worker, "The worker stopped unexpectedly", count=False
                )

    async def purge(self) -> None:
        """Delete records of clusters finished longer ago than ``db_cluster_max_age``."""
        shared = self.shared
        deleted = shared.store.purge(shared.context.config.gateway.db_cluster_max_age)
        if deleted:
            log.info("Purged %d finished cluster record(s)", deleted)


async def _ask(
    check: Callable[[Sequence[T]], Awaitable[list[bool]]],
    batch: Sequence[T],
    what: str,
    metrics: GatewayMetrics,
) -> list[T]:
    """The items of ``batch`` the driver answered dead, from one batched call; empty when
    there is nothing to ask, or when the driver cannot answer (logged: the check waits a
    period, and nothing is failed for it). The answers are searched in C: a period where
    all are alive costs no Python step per item."""
    if not batch:
        return []
    try:
        with metrics.driver_call(f"check_{what}s"):
            alive = await check(batch)
    except Exception:
        log.warning("Checking %d %s(s) failed; trying next period", len(batch), what, exc_info=True)
        return []
    if len(alive) != len(batch):
        log.error("check_%ss answered %d results for %d %ss", what, len(alive), len(batch), what)
        return []
    return list(compress(batch, map(not_, alive)))


_RUNNING_ONLY = (ClusterStatus.RUNNING,)
_STARTING_OR_RUNNING = (ClusterStatus.PENDING, ClusterStatus.RUNNING)
_STATUS = attrgetter("status")
_TARGET = attrgetter("target")
_NAME = attrgetter("name")
_STARTED = attrgetter("started")
_START = attrgetter("start")
_IS_RUNNING = WorkerStatus.RUNNING.__eq__


def _checkable(worker: Worker, runtime: ClusterRuntime) -> bool:
    """Whether ``worker`` is asked about: meant to run, PENDING or RUNNING, started by this
    process (or resumed), and no start operation of it running now."""
    if worker.target != WorkerStatus.RUNNING or worker.status not in _LIVE:
        return False
    found = runtime.workers.get(worker.name)
    return found is not None and found.started and found.start is None


_LIVE = (WorkerStatus.PENDING, WorkerStatus.RUNNING)


def _settled_workers(cluster: Cluster, runtime: ClusterRuntime) -> list[Worker] | None:
    """The workers of ``cluster`` to ask about when every one of them is settled: RUNNING
    with target RUNNING, started and with no start operation running, or finished (STOPPED,
    FAILED). None when any is in transition (then `_checkable` decides worker by worker).

    Gives what `_checkable` would select, by whole-list passes (``map``, ``count``,
    ``compress``) that run in C: no Python step per worker.
    """
    workers = list(cluster.workers.values())
    statuses = list(map(_STATUS, workers))
    running = statuses.count(WorkerStatus.RUNNING)
    finished = statuses.count(WorkerStatus.STOPPED) + statuses.count(WorkerStatus.FAILED)
    if running + finished != len(workers):
        return None  # a worker is PENDING or STOPPING
    if finished:
        workers = list(compress(workers, map(_IS_RUNNING, statuses)))
    if list(map(_TARGET, workers)).count(WorkerStatus.RUNNING) != running:
        return None  # a running worker is being stopped
    found = list(map(runtime.workers.get, map(_NAME, workers)))
    if None in found:
        return None  # not started by this process (yet)
    runtimes = cast("list[WorkerRuntime]", found)
    if list(map(_STARTED, runtimes)).count(True) != running:
        return None
    if list(map(_START, runtimes)).count(None) != running:
        return None  # a start operation still runs
    return workers

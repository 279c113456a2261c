"""The cluster state machine: start, running, scaling, stop.

Owns `ClusterMachine`: what the reconciler does for one cluster key, from the first start of
its scheduler to its final STOPPED or FAILED record (stopping its workers on the way).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..models import DEFAULT_GROUP, ClusterStatus, Worker, WorkerStatus, now_ms, worker_name
from .credentials import has_credentials, issue_credentials
from .runtime import cancel_start
from .shared import describe, run_start_operation

if TYPE_CHECKING:
    from ..models import Cluster
    from .shared import Shared
    from .workers import WorkerMachine

log = logging.getLogger("gateway.reconciler")


class ClusterMachine:
    """Drives clusters to their targets; see `Reconciler`."""

    def __init__(self, *, shared: Shared, workers: WorkerMachine) -> None:
        self.shared = shared
        self.workers = workers

    async def reconcile(self, cluster: Cluster) -> None:
        if not cluster.status.is_active:
            return
        if cluster.target != ClusterStatus.RUNNING:
            await self.stop(cluster)
            return
        if cluster.status == ClusterStatus.PENDING:
            if not self.shared.runtimes.cluster(cluster.name).started:
                # First, even before a heartbeat is acted on: a start resumed with no launch
                # stored must find (adopt) a scheduler that registered meanwhile.
                self._begin_start(cluster)
                return
            if not cluster.scheduler_address:
                return
            self._running(cluster)
        self.shared.routes.put(cluster)
        self._scale_workers(cluster)

    # ---------------------------------------------------------------------------------------
    # Starting

    def _begin_start(self, cluster: Cluster) -> None:
        if not has_credentials(cluster):
            # Kept when a start runs again: a scheduler launched by the first attempt, which
            # the driver may adopt, serves with them.
            issue_credentials(self.shared.store, cluster)
        runtime = self.shared.runtimes.cluster(cluster.name)
        runtime.started = True
        log.info("Starting cluster %s", cluster.name)
        runtime.start = asyncio.create_task(
            self._run_start(cluster), name=f"gateway-start-{cluster.name}"
        )

    async def _run_start(self, cluster: Cluster) -> None:
        shared = self.shared
        try:
            # Durability point: the credentials, which tell a restarted gateway that this
            # start began, are written before the driver starts anything.
            await shared.store.flush()
            if not await shared.fence(cluster.name):
                return  # another replica has the cluster now: it resumes the start
            with shared.context.metrics.driver_call("start_scheduler"):
                await run_start_operation(
                    shared.driver.start_scheduler(cluster),
                    lambda state: shared.store.update_cluster(
                        cluster, state={**cluster.state, **state}
                    ),
                    shared.store.flush,
                )
        except asyncio.CancelledError:
            if cluster.scheduler_address:
                # The scheduler registered: the driver was only watching it a while longer.
                log.debug("Start step of cluster %s ended by its stop", cluster.name)
            else:
                log.info(
                    "Start of cluster %s cancelled before its scheduler registered", cluster.name
                )
            raise
        except Exception as exc:
            log.warning("Scheduler of cluster %s failed to start", cluster.name, exc_info=True)
            shared.request_stop(
                cluster.name,
                failed=True,
                reason=f"The scheduler failed to start: {describe(exc)}",
            )
        else:
            # A fast scheduler can register before the start step returns (the local backend
            # watches for an early exit a while longer): say so, not "waiting".
            if cluster.status == ClusterStatus.PENDING:
                log.info(
                    "Scheduler of cluster %s started; waiting for it to register", cluster.name
                )
            else:
                log.debug("Start step of cluster %s done (%s)", cluster.name, cluster.status.name)
        finally:
            runtime = shared.runtimes.find(cluster.name)
            if runtime is not None and runtime.start is asyncio.current_task():
                runtime.start = None

    def _running(self, cluster: Cluster) -> None:
        self.shared.store.update_cluster(
            cluster,
            status=ClusterStatus.RUNNING,
            last_heartbeat=cluster.last_heartbeat or time.time(),
        )
        log.info("Cluster %s is running at %s", cluster.name, cluster.scheduler_address)
        self.shared.events.emit("running", cluster)
        self.shared.events.notify(cluster.name)

    # ---------------------------------------------------------------------------------------
    # Scaling

    def _scale_workers(self, cluster: Cluster) -> None:
        """Per worker group: create workers up to its count (``cluster.count`` for the default
        group, ``cluster.group_counts`` for named ones); stop surplus workers that are still
        pending (running ones are retired by the scheduler, which then reports them closed)."""
        shared = self.shared
        wanted_by_group: dict[str, list[Worker]] = {DEFAULT_GROUP: []}
        wanted_by_group.update({g: [] for g in cluster.group_counts})
        for w in cluster.workers.values():
            if w.target == WorkerStatus.RUNNING and w.status.is_active:
                wanted_by_group.setdefault(w.group, []).append(w)
        missing = {g: cluster.count_of(g) - len(ws) for g, ws in wanted_by_group.items()}
        if any(n > 0 for n in missing.values()):
            loop = asyncio.get_running_loop()
            runtime = shared.runtimes.find(cluster.name)
            hold = 0.0 if runtime is None else runtime.worker_hold
            if loop.time() < hold:
                shared.enqueue(cluster.name, hold - loop.time())
                missing = {g: n for g, n in missing.items() if n < 0}
        for group, n in missing.items():
            if n > 0:
                for _ in range(n):
                    worker = Worker(
                        name=worker_name(cluster.name, group),
                        cluster_name=cluster.name,
                        group=group,
                    )
                    shared.store.create_worker(worker)
                    shared.queue.put((cluster.name, worker.name))
            elif n < 0:
                pending = sorted(
                    (w for w in wanted_by_group[group] if w.status == WorkerStatus.PENDING),
                    key=lambda w: w.start_time,
                    reverse=True,
                )
                for worker in pending[:-n]:
                    shared.store.update_worker(worker, target=WorkerStatus.STOPPED)
                    shared.queue.put((cluster.name, worker.name))

    # ---------------------------------------------------------------------------------------
    # Stopping

    async def stop(self, cluster: Cluster) -> None:
        """Stop a cluster whose target is STOPPED or FAILED: its start, its workers, its
        scheduler; then record the final status and forget its runtime state."""
        shared = self.shared
        name = cluster.name
        if not await shared.fence(name):
            return  # another replica has the cluster now: it does the stop
        if cluster.status != ClusterStatus.STOPPING:
            shared.store.update_cluster(cluster, status=ClusterStatus.STOPPING)
            shared.events.notify(name)
        shared.routes.delete(cluster)
        await cancel_start(shared.runtimes.find(name))

        async def stop_one(worker: Worker) -> None:
            async with self.workers.lock(cluster, worker):
                if not worker.status.is_active:
                    return
                if worker.target == WorkerStatus.RUNNING:
                    shared.store.update_worker(worker, target=WorkerStatus.STOPPED)
                await self.workers.stop(cluster, worker)

        active = [w for w in cluster.workers.values() if w.status.is_active]
        results = await asyncio.gather(*(stop_one(w) for w in active), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise RuntimeError(
                f"{len(errors)} worker(s) of cluster {name} could not be stopped"
            ) from errors[0]
        with shared.context.metrics.driver_call("stop_scheduler"):
            await shared.driver.stop_scheduler(cluster)
        failed = cluster.target == ClusterStatus.FAILED
        final = ClusterStatus.FAILED if failed else ClusterStatus.STOPPED
        shared.store.update_cluster(cluster, status=final, stop_time=now_ms())
        log.info("Cluster %s %s", name, final.name.lower())
        shared.events.emit("failed" if failed else "stopped", cluster, reason=cluster.reason)
        shared.runtimes.drop(name)  # wakes the status waiters, then forgets it all

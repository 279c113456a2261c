"""The worker state machine: start, running, failed start, stop.

Owns `WorkerMachine`: what the reconciler does for one worker key, with the worker's lock held,
and the bookkeeping of failed starts (the cluster's failure counter and its backoff).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..models import ClusterStatus, WorkerStatus, now_ms
from .runtime import cancel_start
from .shared import describe, run_start_operation
from .workqueue import backoff_delay

if TYPE_CHECKING:
    from ..models import Cluster, Worker
    from .shared import Shared

log = logging.getLogger("gateway.reconciler")


class WorkerMachine:
    """Drives workers to their targets; see `Reconciler`."""

    def __init__(self, *, shared: Shared) -> None:
        self.shared = shared

    def lock(self, cluster: Cluster, worker: Worker) -> asyncio.Lock:
        """The lock held while ``worker`` is reconciled or stopped."""
        return self.shared.runtimes.worker(cluster.name, worker.name).lock

    async def reconcile(self, cluster: Cluster, worker: Worker) -> None:
        if not worker.status.is_active:
            return
        if cluster.target != ClusterStatus.RUNNING or cluster.status != ClusterStatus.RUNNING:
            return  # stopping the cluster stops its workers
        async with self.lock(cluster, worker):
            if not worker.status.is_active:
                return
            if worker.target == WorkerStatus.RUNNING:
                runtime = self.shared.runtimes.worker(cluster.name, worker.name)
                # Not started: new, or resumed with no launch stored, which a heartbeat may
                # have marked RUNNING meanwhile (the launch the gateway died in connected).
                if not runtime.started:
                    runtime.started = True
                    runtime.start = asyncio.create_task(
                        self._run_start(cluster, worker), name=f"gateway-start-{worker.name}"
                    )
                return
            if not await self.shared.fence(cluster.name):
                return  # another replica has the cluster now: it stops the worker
            await self.stop(cluster, worker)
        self.shared.enqueue(cluster.name)

    async def _run_start(self, cluster: Cluster, worker: Worker) -> None:
        shared = self.shared
        try:
            # Durability point: the worker's record is written before anything is started.
            await shared.store.flush()
            if not await shared.fence(cluster.name):
                return  # another replica has the cluster now: it resumes this worker
            with shared.context.metrics.driver_call("start_worker"):
                await run_start_operation(
                    shared.driver.start_worker(cluster, worker),
                    lambda state: shared.store.update_worker(
                        worker, state={**worker.state, **state}
                    ),
                    shared.store.flush,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("Worker %s failed to start", worker.name, exc_info=True)
            if worker.target == WorkerStatus.RUNNING and worker.status == WorkerStatus.PENDING:
                self.start_failed(
                    cluster, worker, f"The worker failed to start: {describe(exc)}", count=True
                )
        finally:
            runtime = shared.runtimes.find_worker(cluster.name, worker.name)
            if runtime is not None and runtime.start is asyncio.current_task():
                runtime.start = None
            shared.queue.put((cluster.name, worker.name))

    def running(self, cluster: Cluster, worker: Worker) -> None:
        """The scheduler reports ``worker`` connected."""
        store = self.shared.store
        store.update_worker(worker, status=WorkerStatus.RUNNING)
        if cluster.worker_start_failures:
            store.update_cluster(cluster, worker_start_failures=0)
        runtime = self.shared.runtimes.find(cluster.name)
        if runtime is not None:
            runtime.worker_hold = 0.0
        log.info("Worker %s is running", worker.name)
        self.shared.events.emit("worker_running", cluster, worker=worker.name)

    def start_failed(self, cluster: Cluster, worker: Worker, reason: str, *, count: bool) -> None:
        """Give up on a starting worker (it is stopped, then replaced). With ``count``, the
        cluster's failure counter goes up; past ``worker_start_failure_limit`` the cluster
        fails, otherwise the replacement waits for the backoff delay."""
        shared = self.shared
        shared.store.update_worker(worker, target=WorkerStatus.FAILED, reason=reason)
        shared.queue.put((cluster.name, worker.name))
        if count:
            failures = cluster.worker_start_failures + 1
            shared.store.update_cluster(cluster, worker_start_failures=failures)
            limit = shared.config.worker_start_failure_limit
            if failures > limit:
                shared.request_stop(
                    cluster.name,
                    failed=True,
                    reason=(
                        f"{failures} workers in a row failed to start, more than "
                        f"worker_start_failure_limit ({limit}); the last: {reason}"
                    ),
                )
                return
            delay = backoff_delay(
                failures - 1,
                base=shared.config.backoff_base_delay,
                max_delay=shared.config.backoff_max_delay,
            )
            hold = asyncio.get_running_loop().time() + delay
            shared.runtimes.cluster(cluster.name).worker_hold = hold
        shared.enqueue(cluster.name)

    async def stop(self, cluster: Cluster, worker: Worker) -> None:
        """Stop one worker whose target is STOPPED or FAILED; the caller holds its lock."""
        shared = self.shared
        await cancel_start(shared.runtimes.find_worker(cluster.name, worker.name))
        with shared.context.metrics.driver_call("stop_worker"):
            await shared.driver.stop_worker(cluster, worker)
        failed = worker.target == WorkerStatus.FAILED
        final = WorkerStatus.FAILED if failed else WorkerStatus.STOPPED
        shared.store.update_worker(worker, status=final, stop_time=now_ms())
        shared.runtimes.drop_worker(cluster.name, worker.name)
        log.info("Worker %s %s", worker.name, final.name.lower())
        shared.events.emit(
            "worker_failed" if failed else "worker_stopped",
            cluster,
            worker=worker.name,
            reason=worker.reason,
        )

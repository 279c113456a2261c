"""`Reconciler`: the reconciler's life cycle, its queue workers, its timers and its entry points.

Owns the order of things (resume the stored records, run the queue, stop) and hands each key to
the cluster or worker state machine; the jobs themselves live in the sibling modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..errors import BackendUnavailable, ClusterConflict
from ..models import Cluster, ClusterStatus, Worker, WorkerStatus
from .checks import Checks
from .clusters import ClusterMachine
from .credentials import has_credentials
from .events import ClusterEvents
from .heartbeat import Heartbeat
from .replicas import Replicas
from .routes import ClusterRoutes
from .runtime import Runtimes
from .shared import Shared
from .workers import WorkerMachine
from .workqueue import Key, WorkQueue, describe_key

if TYPE_CHECKING:
    from ..backends.base import ClusterDriver
    from ..config import ProcessBackendConfig
    from ..context import GatewayContext
    from ..store import Store

log = logging.getLogger("gateway.reconciler")


def default_replica_id(context: GatewayContext) -> str:
    """``<host name>:<proxy address>``: stable across restarts (a restarted replica takes its
    own shard leases back at once) and unique on a host (two gateways cannot share a port);
    a random suffix when the proxy's port is unknown or chosen at start."""
    address = context.public_address or str(context.config.proxy.get("address", ""))
    name = f"{socket.gethostname()}:{address}"
    if not address or address.endswith(":0"):
        name += f":{uuid.uuid4().hex[:8]}"
    return name


class Reconciler:
    """Drives the clusters and workers in ``store`` to their targets through ``driver``.

    Every change is made by setting a record's ``target`` (or storing what a heartbeat said) and
    queueing its key; ``config.parallelism`` tasks take keys off the queue and do what the record
    needs (start, mark running, scale, stop). A handler that raises is retried with exponential
    backoff. Driver start operations run as their own tasks, so a stop can cancel them.
    """

    def __init__(
        self,
        *,
        store: Store,
        driver: ClusterDriver,
        config: ProcessBackendConfig,
        context: GatewayContext,
    ) -> None:
        self.store = store
        self.driver = driver
        self.config = config
        self.context = context
        self.queue: WorkQueue[Key] = WorkQueue(
            base_delay=config.backoff_base_delay, max_delay=config.backoff_max_delay
        )
        self.runtimes = Runtimes()
        self.events = ClusterEvents(context=context, store=store, runtimes=self.runtimes)
        self.shared = Shared(
            store=store,
            driver=driver,
            config=config,
            context=context,
            queue=self.queue,
            runtimes=self.runtimes,
            events=self.events,
            routes=ClusterRoutes(context=context),
        )
        self.replicas: Replicas | None = None
        """Set when the store's database is shared with other replicas (PostgreSQL)."""
        if store.shared:
            gateway = context.config.gateway
            self.replicas = Replicas(
                reconciler=self,
                replica_id=gateway.replica_id,
                lease_ttl=gateway.lease_ttl,
                sync_period=gateway.replica_sync_period,
            )
            self.shared.owns = self.replicas.owns
            self.shared.fence = self.replicas.fence
            self.shared.recorded_heartbeat = self.replicas.recorded_heartbeat
        self.workers = WorkerMachine(shared=self.shared)
        self.clusters = ClusterMachine(shared=self.shared, workers=self.workers)
        self.checks = Checks(shared=self.shared, workers=self.workers)
        self.running = False
        self._tasks: list[asyncio.Task[None]] = []

    # ---------------------------------------------------------------------------------------
    # Life cycle

    def start(self) -> None:
        """Resume the loaded records and start the queue workers and periodic checks."""
        self.running = True
        if self.replicas is not None:
            if not self.replicas.replica_id:
                self.replicas.replica_id = default_replica_id(self.context)
            taken = self.replicas.take()  # blocks once, at start, before anything is resumed
            log.info(
                "Replica %s holds %d of the cluster shards",
                self.replicas.replica_id,
                len(taken),
            )
        self._resume()
        gateway = self.context.config.gateway
        for i in range(max(1, self.config.parallelism)):
            self._spawn(self._work_loop(), f"reconcile-{i}")
        periodic: list[tuple[Callable[[], Coroutine[Any, Any, None]], float, str]] = [
            (self.check_timeouts, self.config.timeouts_period, "timeouts"),
            (self.check_clusters, self.config.cluster_status_period, "check-clusters"),
            (self.check_workers, self.config.worker_status_period, "check-workers"),
            (self.purge, gateway.db_cleanup_period, "purge"),
        ]
        for fn, period, name in periodic:
            self._spawn(self._periodic(fn, period), name)
        if self.replicas is not None:
            self._spawn(self.replicas.run_leases(), "leases")
            self._spawn(self.replicas.run_sync(), "replica-sync")

    async def stop(self, *, stop_clusters: bool, timeout: float) -> None:
        """Stop reconciling. With ``stop_clusters``, first stop every active cluster and wait
        (up to ``timeout`` seconds) for them to finish; otherwise leave them running."""
        if stop_clusters and self.running:
            active = [
                c
                for c in self.store.clusters.values()
                if c.status.is_active and self.shared.owns(c.name)
            ]
            for cluster in active:
                self.request_stop(cluster.name, reason="The gateway shut down")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    for cluster in active:
                        await self.events.wait_finished(cluster)
            left = [c.name for c in active if c.status.is_active]
            if left:
                log.warning("Clusters still stopping at shutdown: %s", ", ".join(left))
        self.running = False
        tasks = [*self._tasks, *self.runtimes.start_tasks()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self.queue.close()
        if self.replicas is not None:
            await asyncio.to_thread(self.replicas.release)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=f"gateway-{name}"))

    def _resume(self) -> None:
        """Pick up records loaded from the store (a restart): PENDING clusters whose start
        already ran wait for their heartbeat, RUNNING ones get a fresh heartbeat grace period
        and their routes back, stopping ones finish stopping."""
        for cluster in self.store.clusters.values():
            if not cluster.status.is_active:
                continue
            if self.shared.owns(cluster.name):
                self.resume_one(cluster)
            elif cluster.status == ClusterStatus.RUNNING:
                self.shared.routes.put(cluster)  # another replica's: this proxy routes to it

    def resume_one(self, cluster: Cluster) -> None:
        """Pick up one active cluster this process did not start (a restart, a takeover)."""
        now = time.time()
        if has_credentials(cluster):
            if (
                cluster.status == ClusterStatus.PENDING
                and not cluster.scheduler_address
                and cluster.target == ClusterStatus.RUNNING
                and self.driver.start_may_rerun(cluster)
            ):
                # Killed between "start began" and the driver's first launch: start again.
                log.info(
                    "The start of cluster %s had launched nothing when the gateway "
                    "stopped; starting it again",
                    cluster.name,
                )
            else:
                self.runtimes.cluster(cluster.name).started = True
        if cluster.status == ClusterStatus.RUNNING:
            cluster.last_heartbeat = now
        for worker in cluster.workers.values():
            if worker.status.is_active:
                self.resume_worker(cluster, worker)
        self.enqueue(cluster.name)

    def resume_worker(self, cluster: Cluster, worker: Worker) -> None:
        """Pick up one active worker this process did not start: watched as stored, or, when
        its stored state shows no launch (`ClusterDriver.worker_start_may_rerun`), started
        again, the driver adopting what the killed attempt launched."""
        rerun = worker.target == WorkerStatus.RUNNING and self.driver.worker_start_may_rerun(
            cluster, worker
        )
        self.runtimes.worker(cluster.name, worker.name).started = not rerun
        self.queue.put((cluster.name, worker.name))

    # ---------------------------------------------------------------------------------------
    # Requests

    def enqueue(self, cluster_name: str, delay: float = 0.0) -> None:
        """Queue cluster ``cluster_name`` to be reconciled after ``delay`` seconds."""
        self.shared.enqueue(cluster_name, delay)

    def request_stop(self, name: str, *, failed: bool = False, reason: str | None = None) -> None:
        """Set the target of cluster ``name`` to STOPPED (or FAILED) and queue it; a cluster
        already finished or already being stopped is left alone."""
        self.shared.request_stop(name, failed=failed, reason=reason)

    def handle_heartbeat(self, name: str, msg: dict[str, Any]) -> None:
        """Record what the scheduler of ``name`` reports and queue the work it implies.

        Raises ClusterConflict when the cluster is unknown, not active, being stopped, or the
        message is malformed.
        """
        if not self.running:
            raise BackendUnavailable("the gateway is starting or stopping; heartbeat not taken")
        cluster = self.store.get(name)
        if cluster is None:
            raise ClusterConflict(f"Cluster {name} does not exist")
        if not cluster.status.is_active or cluster.target != ClusterStatus.RUNNING:
            raise ClusterConflict(
                f"Cluster {name} is not active (status {cluster.status.name}); heartbeat rejected"
            )
        try:
            beat = Heartbeat.parse(msg)
        except ValueError as exc:
            raise ClusterConflict(f"Malformed heartbeat from cluster {name}: {exc}") from None
        now = time.time()
        if self.replicas is not None and not self.replicas.owns(name):
            self.replicas.record_heartbeat(cluster, beat, now)  # for the owner to read
            return
        changes = beat.changes_for(cluster)
        if changes:
            self.store.update_cluster(cluster, last_heartbeat=now, **changes)
        else:
            # Liveness only: kept in memory (a restart grants a fresh grace period anyway).
            cluster.last_heartbeat = now
        for worker_name in beat.active_workers:
            worker = cluster.workers.get(worker_name)
            if (
                worker is not None
                and worker.status == WorkerStatus.PENDING
                and worker.target == WorkerStatus.RUNNING
            ):
                self.workers.running(cluster, worker)
        for worker_name in beat.closing_workers | beat.closed_workers:
            worker = cluster.workers.get(worker_name)
            if (
                worker is not None
                and worker.status.is_active
                and worker.target == WorkerStatus.RUNNING
            ):
                self.store.update_worker(worker, target=WorkerStatus.STOPPED, close_expected=True)
                self.queue.put((name, worker_name))
        self.enqueue(name)

    async def wait_while_pending(self, name: str, timeout: float) -> None:
        """Return once cluster ``name`` is no longer PENDING (or gone), or after ``timeout``."""
        await self.events.wait_while_pending(name, timeout)

    # ---------------------------------------------------------------------------------------
    # Periodic checks (each one period's pass; see `Checks`)

    async def check_timeouts(self) -> None:
        """Fail clusters that did not start or stopped heartbeating; replace workers that did
        not connect in time."""
        await self.checks.timeouts()

    async def check_clusters(self) -> None:
        """One batched liveness check of every started cluster; dead ones fail."""
        await self.checks.clusters()

    async def check_workers(self) -> None:
        """One batched liveness check of every started worker; dead ones are replaced."""
        await self.checks.workers_alive()

    async def purge(self) -> None:
        """Delete records of clusters finished longer ago than ``db_cluster_max_age``."""
        await self.checks.purge()

    # ---------------------------------------------------------------------------------------
    # The queue

    async def _work_loop(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self._reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception:
                delay = self.queue.retry(key)
                log.exception("Reconciling %s failed; retrying in %.2f s", describe_key(key), delay)
            else:
                self.queue.forget(key)
            finally:
                self.queue.done(key)

    async def _periodic(self, fn: Callable[[], Coroutine[Any, Any, None]], period: float) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Periodic %s failed; trying again in %g s", fn.__name__, period)

    async def _reconcile(self, key: Key) -> None:
        cluster_name, worker_name = key
        cluster = self.store.get(cluster_name)
        if cluster is None or not self.shared.owns(cluster_name):
            return
        if not worker_name:
            await self.clusters.reconcile(cluster)
            return
        worker = cluster.workers.get(worker_name)
        if worker is not None:
            await self.workers.reconcile(cluster, worker)

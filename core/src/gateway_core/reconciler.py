"""The reconciler of process-style backends: drives every cluster and worker to its target.

Owns the keyed work queue with per-key exponential backoff, and `Reconciler`: starting, running,
scaling and stopping clusters through a `ClusterDriver`, heartbeats, timeout checks, batched
status checks and the purge of old records.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from attrs import define

from .errors import BackendUnavailable, ClusterConflict
from .events import ClusterEvent, EventKind
from .models import Cluster, ClusterStatus, Worker, WorkerStatus, now_ms
from .routes import Route
from .tls import new_cluster_credentials

if TYPE_CHECKING:
    from .backends.base import ClusterDriver, StateUpdates
    from .config import ProcessBackendConfig
    from .context import GatewayContext
    from .store import Store

log = logging.getLogger("gateway.reconciler")

K = TypeVar("K", bound=Hashable)

Key = tuple[str, str]
"""A work item: ``(cluster name, "")`` for a cluster, ``(cluster name, worker name)``."""

_MAX_EXPONENT = 62


def backoff_delay(failures: int, *, base: float, max_delay: float) -> float:
    """Seconds to wait before retry number ``failures + 1``:
    ``min(max_delay, base * 2 ** failures)``."""
    return min(max_delay, base * 2.0 ** min(max(failures, 0), _MAX_EXPONENT))


class WorkQueue(Generic[K]):
    """A de-duplicating queue of keys with delayed puts and per-key backoff.

    A key is queued at most once; a key put while it is being processed is processed again once
    its handler calls `done`. After `retry`, the key is held back for its backoff delay (every
    put in between is merged into that one later run) until `forget` records a success.
    """

    def __init__(self, *, base_delay: float, max_delay: float) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._hold: dict[K, float] = {}
        self._failures: dict[K, int] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._queued) + len(self._timers)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def put(self, key: K, delay: float = 0.0) -> None:
        """Queue ``key`` to run after ``delay`` seconds (and not before its backoff ends)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        when = max(now + delay, self._hold.get(key, 0.0))
        if when <= now:
            timer = self._timers.pop(key, None)
            if timer is not None:
                timer.cancel()
            self._add(key)
            return
        if key in self._queued:
            return
        timer = self._timers.get(key)
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def retry(self, key: K) -> float:
        """Record a failure of ``key`` and queue it after its backoff; return the delay."""
        failures = self._failures.get(key, 0)
        delay = backoff_delay(failures, base=self.base_delay, max_delay=self.max_delay)
        self._failures[key] = failures + 1
        self._hold[key] = asyncio.get_running_loop().time() + delay
        self._dirty.discard(key)
        self.put(key)
        return delay

    def forget(self, key: K) -> None:
        """Record a success of ``key``: its next failure starts the backoff afresh."""
        self._failures.pop(key, None)
        self._hold.pop(key, None)

    async def get(self) -> K:
        """The next ready key; it counts as being processed until `done`."""
        key = await self._ready.get()
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.put(key)

    def close(self) -> None:
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _add(self, key: K) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.put_nowait(key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        if self._hold.get(key, 0.0) <= asyncio.get_running_loop().time():
            self._hold.pop(key, None)
        self._add(key)


@define(kw_only=True, frozen=True)
class Heartbeat:
    """A scheduler's heartbeat message (PROTOCOL.md), checked."""

    scheduler_address: str = ""
    dashboard_address: str = ""
    api_address: str = ""
    count: int | None = None
    active_workers: frozenset[str] = frozenset()
    closing_workers: frozenset[str] = frozenset()
    closed_workers: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, msg: Any) -> Heartbeat:
        """Build from the JSON message; raise ValueError naming the first bad field."""
        if not isinstance(msg, dict):
            raise ValueError("a heartbeat must be a JSON object")
        values: dict[str, Any] = {}
        for name in ("scheduler_address", "dashboard_address", "api_address"):
            value = msg.get(name) or ""
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
            values[name] = value
        count = msg.get("count")
        if count is not None and (type(count) is not int or count < 0):
            raise ValueError("count must be a non-negative integer")
        values["count"] = count
        for name in ("active_workers", "closing_workers", "closed_workers"):
            names = msg.get(name) or []
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{name} must be a list of worker names")
            values[name] = frozenset(names)
        return cls(**values)


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
        self.running = False
        self._tasks: list[asyncio.Task[None]] = []
        self._cluster_starts: dict[str, asyncio.Task[None]] = {}
        self._worker_starts: dict[Key, asyncio.Task[None]] = {}
        self._started_clusters: set[str] = set()
        self._started_workers: set[Key] = set()
        self._worker_locks: dict[Key, asyncio.Lock] = {}
        self._worker_hold: dict[str, float] = {}
        self._status_events: dict[str, asyncio.Event] = {}

    # ---------------------------------------------------------------------------------------
    # Life cycle

    def start(self) -> None:
        """Resume the loaded records and start the queue workers and periodic checks."""
        self.running = True
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

    async def stop(self, *, stop_clusters: bool, timeout: float) -> None:
        """Stop reconciling. With ``stop_clusters``, first stop every active cluster and wait
        (up to ``timeout`` seconds) for them to finish; otherwise leave them running."""
        if stop_clusters and self.running:
            active = [c for c in self.store.clusters.values() if c.status.is_active]
            for cluster in active:
                self.request_stop(cluster.name, reason="The gateway shut down")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    for cluster in active:
                        await self._wait_finished(cluster)
            left = [c.name for c in active if c.status.is_active]
            if left:
                log.warning("Clusters still stopping at shutdown: %s", ", ".join(left))
        self.running = False
        tasks = [*self._tasks, *self._cluster_starts.values(), *self._worker_starts.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self.queue.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=f"gateway-{name}"))

    def _resume(self) -> None:
        """Pick up records loaded from the store (a restart): PENDING clusters whose start
        already ran wait for their heartbeat, RUNNING ones get a fresh heartbeat grace period
        and their routes back, stopping ones finish stopping."""
        now = time.time()
        for cluster in self.store.clusters.values():
            if not cluster.status.is_active:
                continue
            if cluster.tls_cert:
                self._started_clusters.add(cluster.name)
            if cluster.status == ClusterStatus.RUNNING:
                cluster.last_heartbeat = now
            for worker in cluster.workers.values():
                if worker.status.is_active:
                    key = (cluster.name, worker.name)
                    self._started_workers.add(key)
                    self.queue.put(key)
            self.enqueue(cluster.name)

    # ---------------------------------------------------------------------------------------
    # Requests

    def enqueue(self, cluster_name: str, delay: float = 0.0) -> None:
        self.queue.put((cluster_name, ""), delay)

    def request_stop(self, name: str, *, failed: bool = False, reason: str | None = None) -> None:
        """Set the target of cluster ``name`` to STOPPED (or FAILED) and queue it; a cluster
        already finished or already being stopped is left alone."""
        cluster = self.store.get(name)
        if cluster is None or not cluster.status.is_active:
            return
        if cluster.target != ClusterStatus.RUNNING:
            return
        target = ClusterStatus.FAILED if failed else ClusterStatus.STOPPED
        if failed:
            log.warning("Cluster %s failed: %s", name, reason)
        else:
            log.info("Stopping cluster %s", name)
        self.store.update_cluster(
            cluster, target=target, reason=reason if reason is not None else cluster.reason
        )
        self.enqueue(name)

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
        changes: dict[str, Any] = {}
        for field in ("scheduler_address", "dashboard_address", "api_address"):
            value = getattr(beat, field)
            if value and value != getattr(cluster, field):
                changes[field] = value
        if beat.count is not None and beat.count != cluster.count:
            changes["count"] = beat.count
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
                self._worker_running(cluster, worker)
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

    async def _wait_finished(self, cluster: Cluster) -> None:
        while cluster.status.is_active:
            await self._status_events.setdefault(cluster.name, asyncio.Event()).wait()

    async def wait_while_pending(self, name: str, timeout: float) -> None:
        """Return once cluster ``name`` is no longer PENDING (or gone), or after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            cluster = self.store.get(name)
            if cluster is None or cluster.status != ClusterStatus.PENDING:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            event = self._status_events.setdefault(name, asyncio.Event())
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                return

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
                log.exception(
                    "Reconciling %s failed; retrying in %.2f s", _describe_key(key), delay
                )
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
        if cluster is None:
            return
        if not worker_name:
            await self._reconcile_cluster(cluster)
            return
        worker = cluster.workers.get(worker_name)
        if worker is not None:
            await self._reconcile_worker(cluster, worker)

    # ---------------------------------------------------------------------------------------
    # Clusters

    async def _reconcile_cluster(self, cluster: Cluster) -> None:
        if not cluster.status.is_active:
            return
        if cluster.target != ClusterStatus.RUNNING:
            await self._stop_cluster(cluster)
            return
        if cluster.status == ClusterStatus.PENDING:
            if cluster.scheduler_address:
                self._cluster_running(cluster)
            elif cluster.name not in self._started_clusters:
                self._begin_cluster_start(cluster)
                return
            else:
                return
        self._put_routes(cluster)
        self._scale_workers(cluster)

    def _begin_cluster_start(self, cluster: Cluster) -> None:
        cert, key = new_cluster_credentials(cluster.name)
        self.store.update_cluster(cluster, tls_cert=cert, tls_key=key)
        self._started_clusters.add(cluster.name)
        log.info("Starting cluster %s", cluster.name)
        self._cluster_starts[cluster.name] = asyncio.create_task(
            self._run_cluster_start(cluster), name=f"gateway-start-{cluster.name}"
        )

    async def _run_cluster_start(self, cluster: Cluster) -> None:
        try:
            await _consume(
                self.driver.start_scheduler(cluster),
                lambda state: self.store.update_cluster(cluster, state={**cluster.state, **state}),
            )
        except asyncio.CancelledError:
            log.info("Start of cluster %s cancelled", cluster.name)
            raise
        except Exception as exc:
            log.warning("Scheduler of cluster %s failed to start", cluster.name, exc_info=True)
            self.request_stop(
                cluster.name,
                failed=True,
                reason=f"The scheduler failed to start: {_describe(exc)}",
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
            self._cluster_starts.pop(cluster.name, None)

    def _cluster_running(self, cluster: Cluster) -> None:
        self.store.update_cluster(
            cluster,
            status=ClusterStatus.RUNNING,
            last_heartbeat=cluster.last_heartbeat or time.time(),
        )
        log.info("Cluster %s is running at %s", cluster.name, cluster.scheduler_address)
        self._emit("running", cluster)
        self._notify(cluster.name)

    def _route_path(self, cluster: Cluster) -> str:
        return f"{self.context.prefix}/clusters/{cluster.name}"

    def _put_routes(self, cluster: Cluster) -> None:
        routes = self.context.routes
        if cluster.dashboard_address:
            routes.put(
                Route(kind="PATH", key=self._route_path(cluster), target=cluster.dashboard_address)
            )
        if cluster.scheduler_address:
            routes.put(Route(kind="SNI", key=cluster.name, target=cluster.scheduler_address))

    def _delete_routes(self, cluster: Cluster) -> None:
        self.context.routes.delete("PATH", self._route_path(cluster))
        self.context.routes.delete("SNI", cluster.name)

    def _scale_workers(self, cluster: Cluster) -> None:
        """Create workers up to ``cluster.count``; stop surplus workers that are still pending
        (running ones are retired by the scheduler, which then reports them closed)."""
        wanted = [
            w
            for w in cluster.workers.values()
            if w.target == WorkerStatus.RUNNING and w.status.is_active
        ]
        missing = cluster.count - len(wanted)
        if missing > 0:
            loop = asyncio.get_running_loop()
            hold = self._worker_hold.get(cluster.name, 0.0)
            if loop.time() < hold:
                self.enqueue(cluster.name, hold - loop.time())
                return
            for _ in range(missing):
                worker = Worker(
                    name=f"{cluster.name}-{secrets.token_hex(5)}", cluster_name=cluster.name
                )
                self.store.create_worker(worker)
                self.queue.put((cluster.name, worker.name))
        elif missing < 0:
            pending = sorted(
                (w for w in wanted if w.status == WorkerStatus.PENDING),
                key=lambda w: w.start_time,
                reverse=True,
            )
            for worker in pending[:-missing]:
                self.store.update_worker(worker, target=WorkerStatus.STOPPED)
                self.queue.put((cluster.name, worker.name))

    async def _stop_cluster(self, cluster: Cluster) -> None:
        name = cluster.name
        if cluster.status != ClusterStatus.STOPPING:
            self.store.update_cluster(cluster, status=ClusterStatus.STOPPING)
            self._notify(name)
        self._delete_routes(cluster)
        start = self._cluster_starts.pop(name, None)
        if start is not None:
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)

        async def stop_one(worker: Worker) -> None:
            async with self._lock((name, worker.name)):
                if not worker.status.is_active:
                    return
                if worker.target == WorkerStatus.RUNNING:
                    self.store.update_worker(worker, target=WorkerStatus.STOPPED)
                await self._stop_worker(cluster, worker)

        active = [w for w in cluster.workers.values() if w.status.is_active]
        results = await asyncio.gather(*(stop_one(w) for w in active), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise RuntimeError(
                f"{len(errors)} worker(s) of cluster {name} could not be stopped"
            ) from errors[0]
        await self.driver.stop_scheduler(cluster)
        failed = cluster.target == ClusterStatus.FAILED
        final = ClusterStatus.FAILED if failed else ClusterStatus.STOPPED
        self.store.update_cluster(cluster, status=final, stop_time=now_ms())
        self._started_clusters.discard(name)
        self._worker_hold.pop(name, None)
        for key in [k for k in self._started_workers if k[0] == name]:
            self._started_workers.discard(key)
            self._worker_locks.pop(key, None)
        log.info("Cluster %s %s", name, final.name.lower())
        self._emit("failed" if failed else "stopped", cluster, reason=cluster.reason)
        self._notify(name)

    # ---------------------------------------------------------------------------------------
    # Workers

    def _lock(self, key: Key) -> asyncio.Lock:
        lock = self._worker_locks.get(key)
        if lock is None:
            lock = self._worker_locks[key] = asyncio.Lock()
        return lock

    async def _reconcile_worker(self, cluster: Cluster, worker: Worker) -> None:
        if not worker.status.is_active:
            return
        if cluster.target != ClusterStatus.RUNNING or cluster.status != ClusterStatus.RUNNING:
            return  # stopping the cluster stops its workers
        key = (cluster.name, worker.name)
        async with self._lock(key):
            if not worker.status.is_active:
                return
            if worker.target == WorkerStatus.RUNNING:
                if worker.status == WorkerStatus.PENDING and key not in self._started_workers:
                    self._started_workers.add(key)
                    self._worker_starts[key] = asyncio.create_task(
                        self._run_worker_start(cluster, worker),
                        name=f"gateway-start-{worker.name}",
                    )
                return
            await self._stop_worker(cluster, worker)
        self.enqueue(cluster.name)

    async def _run_worker_start(self, cluster: Cluster, worker: Worker) -> None:
        key = (cluster.name, worker.name)
        try:
            await _consume(
                self.driver.start_worker(cluster, worker),
                lambda state: self.store.update_worker(worker, state={**worker.state, **state}),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("Worker %s failed to start", worker.name, exc_info=True)
            if worker.target == WorkerStatus.RUNNING and worker.status == WorkerStatus.PENDING:
                self._worker_start_failed(
                    cluster, worker, f"The worker failed to start: {_describe(exc)}", count=True
                )
        finally:
            self._worker_starts.pop(key, None)
            self.queue.put(key)

    def _worker_running(self, cluster: Cluster, worker: Worker) -> None:
        self.store.update_worker(worker, status=WorkerStatus.RUNNING)
        if cluster.worker_start_failures:
            self.store.update_cluster(cluster, worker_start_failures=0)
        self._worker_hold.pop(cluster.name, None)
        log.info("Worker %s is running", worker.name)
        self._emit("worker_running", cluster, worker=worker.name)

    def _worker_start_failed(
        self, cluster: Cluster, worker: Worker, reason: str, *, count: bool
    ) -> None:
        """Give up on a starting worker (it is stopped, then replaced). With ``count``, the
        cluster's failure counter goes up; past ``worker_start_failure_limit`` the cluster
        fails, otherwise the replacement waits for the backoff delay."""
        self.store.update_worker(worker, target=WorkerStatus.FAILED, reason=reason)
        self.queue.put((cluster.name, worker.name))
        if count:
            failures = cluster.worker_start_failures + 1
            self.store.update_cluster(cluster, worker_start_failures=failures)
            limit = self.config.worker_start_failure_limit
            if failures > limit:
                self.request_stop(
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
                base=self.config.backoff_base_delay,
                max_delay=self.config.backoff_max_delay,
            )
            self._worker_hold[cluster.name] = asyncio.get_running_loop().time() + delay
        self.enqueue(cluster.name)

    async def _stop_worker(self, cluster: Cluster, worker: Worker) -> None:
        """Stop one worker whose target is STOPPED or FAILED; the caller holds its lock."""
        key = (cluster.name, worker.name)
        start = self._worker_starts.pop(key, None)
        if start is not None:
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
        await self.driver.stop_worker(cluster, worker)
        failed = worker.target == WorkerStatus.FAILED
        final = WorkerStatus.FAILED if failed else WorkerStatus.STOPPED
        self.store.update_worker(worker, status=final, stop_time=now_ms())
        self._started_workers.discard(key)
        self._worker_locks.pop(key, None)  # anyone still waiting finds the worker finished
        log.info("Worker %s %s", worker.name, final.name.lower())
        self._emit(
            "worker_failed" if failed else "worker_stopped",
            cluster,
            worker=worker.name,
            reason=worker.reason,
        )

    # ---------------------------------------------------------------------------------------
    # Periodic work

    async def check_timeouts(self) -> None:
        """Fail clusters that did not start or stopped heartbeating; replace workers that did
        not connect in time (timeouts do not count against the worker failure limit)."""
        cfg = self.config
        now_s = time.time()
        now = now_ms()
        for cluster in list(self.store.clusters.values()):
            if cluster.target != ClusterStatus.RUNNING:
                continue
            if cluster.status == ClusterStatus.PENDING:
                if now - cluster.start_time > cfg.cluster_start_timeout * 1000:
                    self.request_stop(
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
                self.request_stop(
                    cluster.name,
                    failed=True,
                    reason=(
                        f"No heartbeat from the scheduler for more than "
                        f"{cfg.heartbeat_timeout:g} s (cluster_heartbeat_timeout)"
                    ),
                )
                continue
            for worker in list(cluster.workers.values()):
                if (
                    worker.status == WorkerStatus.PENDING
                    and worker.target == WorkerStatus.RUNNING
                    and now - worker.start_time > cfg.worker_start_timeout * 1000
                ):
                    self._worker_start_failed(
                        cluster,
                        worker,
                        f"The worker did not connect within worker_start_timeout "
                        f"({cfg.worker_start_timeout:g} s)",
                        count=False,
                    )

    async def check_clusters(self) -> None:
        """One batched `ClusterDriver.check_clusters` call for every started cluster; a dead
        one fails with the driver's reason. A check that raises is logged and skipped."""
        batch = [
            c
            for c in self.store.clusters.values()
            if c.target == ClusterStatus.RUNNING
            and c.status in (ClusterStatus.PENDING, ClusterStatus.RUNNING)
            and c.name in self._started_clusters
            and c.name not in self._cluster_starts
        ]
        if not batch:
            return
        try:
            alive = await self.driver.check_clusters(batch)
        except Exception:
            log.warning(
                "Checking %d cluster(s) failed; trying next period", len(batch), exc_info=True
            )
            return
        if len(alive) != len(batch):
            log.error("check_clusters answered %d results for %d clusters", len(alive), len(batch))
            return
        for cluster, ok in zip(batch, alive, strict=True):
            if ok or cluster.target != ClusterStatus.RUNNING or not cluster.status.is_active:
                continue
            reason: str | None = None
            try:
                reason = await self.driver.failure_reason(cluster)
            except Exception:
                log.warning("failure_reason(%s) raised", cluster.name, exc_info=True)
            self.request_stop(
                cluster.name, failed=True, reason=reason or "The scheduler stopped unexpectedly"
            )

    async def check_workers(self) -> None:
        """One batched `ClusterDriver.check_workers` call for every started worker of running
        clusters; a dead worker is replaced."""
        batch = [
            (c, w)
            for c in self.store.clusters.values()
            if c.target == ClusterStatus.RUNNING and c.status == ClusterStatus.RUNNING
            for w in c.workers.values()
            if w.target == WorkerStatus.RUNNING
            and w.status in (WorkerStatus.PENDING, WorkerStatus.RUNNING)
            and (c.name, w.name) in self._started_workers
            and (c.name, w.name) not in self._worker_starts
        ]
        if not batch:
            return
        try:
            alive = await self.driver.check_workers(batch)
        except Exception:
            log.warning(
                "Checking %d worker(s) failed; trying next period", len(batch), exc_info=True
            )
            return
        if len(alive) != len(batch):
            log.error("check_workers answered %d results for %d workers", len(alive), len(batch))
            return
        for (cluster, worker), ok in zip(batch, alive, strict=True):
            if ok or worker.target != WorkerStatus.RUNNING or not worker.status.is_active:
                continue
            if cluster.target != ClusterStatus.RUNNING:
                continue
            if worker.status == WorkerStatus.PENDING:
                self._worker_start_failed(
                    cluster, worker, "The worker exited before connecting", count=True
                )
            else:
                self._worker_start_failed(
                    cluster, worker, "The worker stopped unexpectedly", count=False
                )

    async def purge(self) -> None:
        """Delete records of clusters finished longer ago than ``db_cluster_max_age``."""
        deleted = self.store.purge(self.context.config.gateway.db_cluster_max_age)
        if deleted:
            log.info("Purged %d finished cluster record(s)", deleted)

    # ---------------------------------------------------------------------------------------
    # Helpers

    def _emit(self, kind: EventKind, cluster: Cluster, **detail: Any) -> None:
        self.context.emit(
            ClusterEvent(
                kind=kind,
                cluster_name=cluster.name,
                username=cluster.username,
                detail={k: v for k, v in detail.items() if v is not None},
            )
        )

    def _notify(self, name: str) -> None:
        event = self._status_events.pop(name, None)
        if event is not None:
            event.set()


async def _consume(updates: StateUpdates, save: Callable[[dict[str, Any]], None]) -> None:
    """Run a driver start operation, saving each state it returns or yields at once."""
    if isinstance(updates, AsyncIterator):
        try:
            async for state in updates:
                if state:
                    save(dict(state))
        finally:
            aclose = getattr(updates, "aclose", None)
            if aclose is not None:
                await aclose()
    elif inspect.isawaitable(updates):
        result = await updates
        if result:
            save(dict(result))
    else:
        raise TypeError(
            f"a driver start operation returned {type(updates).__name__}; expected an "
            "awaitable or an async generator of state dicts"
        )


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _describe_key(key: Key) -> str:
    cluster, worker = key
    return f"worker {worker} of cluster {cluster}" if worker else f"cluster {cluster}"

"""What the reconciler keeps about a cluster or worker while it runs, beyond the stored record.

Owns `ClusterRuntime`, `WorkerRuntime` and `Runtimes`, the one place they are held: a cluster's
runtime state (start task, worker backoff, status waiters, its workers' locks) goes in one step.
"""

from __future__ import annotations

import asyncio

from attrs import define, field


async def cancel_start(runtime: WorkerRuntime | ClusterRuntime | None) -> None:
    """Cancel the start operation ``runtime`` holds, if any, and wait until it has ended."""
    start = None if runtime is None else runtime.start
    if runtime is not None:
        runtime.start = None
    if start is not None:
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)


@define(kw_only=True, eq=False)
class WorkerRuntime:
    """One worker as this gateway process knows it."""

    started: bool = False
    """The driver's start_worker ran (or the worker was resumed from the store)."""
    start: asyncio.Task[None] | None = None
    """The start operation while it runs; a stop cancels it (`cancel_start`)."""
    lock: asyncio.Lock = field(factory=asyncio.Lock)
    """Held while the worker is reconciled or stopped."""


@define(kw_only=True, eq=False)
class ClusterRuntime:
    """One cluster as this gateway process knows it."""

    started: bool = False
    """The driver's start_scheduler ran (or the cluster was resumed with its credentials)."""
    start: asyncio.Task[None] | None = None
    """The start operation while it runs; a stop cancels it (`cancel_start`)."""
    worker_hold: float = 0.0
    """Loop time before which no new worker is made (backoff after failed worker starts)."""
    lifetime_warned: bool = False
    """The ``lifetime_warning`` event was emitted (once per gateway process)."""
    status_changed: asyncio.Event | None = None
    """Set (and replaced) when the cluster's status changes; made when someone waits."""
    workers: dict[str, WorkerRuntime] = field(factory=dict)

    def notify(self) -> None:
        """Wake everyone waiting for a status change."""
        event, self.status_changed = self.status_changed, None
        if event is not None:
            event.set()

    async def wait_changed(self) -> None:
        """Wait for the next `notify`."""
        if self.status_changed is None:
            self.status_changed = asyncio.Event()
        await self.status_changed.wait()


class Runtimes:
    """The runtime records of every cluster and worker, by name; made on first use."""

    def __init__(self) -> None:
        self._clusters: dict[str, ClusterRuntime] = {}

    def cluster(self, name: str) -> ClusterRuntime:
        found = self._clusters.get(name)
        if found is None:
            found = self._clusters[name] = ClusterRuntime()
        return found

    def find(self, name: str) -> ClusterRuntime | None:
        return self._clusters.get(name)

    def worker(self, cluster_name: str, worker_name: str) -> WorkerRuntime:
        workers = self.cluster(cluster_name).workers
        found = workers.get(worker_name)
        if found is None:
            found = workers[worker_name] = WorkerRuntime()
        return found

    def find_worker(self, cluster_name: str, worker_name: str) -> WorkerRuntime | None:
        cluster = self._clusters.get(cluster_name)
        return None if cluster is None else cluster.workers.get(worker_name)

    def drop(self, name: str) -> None:
        """Forget a finished cluster and its workers (waiters are woken first)."""
        found = self._clusters.pop(name, None)
        if found is not None:
            found.notify()

    def drop_worker(self, cluster_name: str, worker_name: str) -> None:
        """Forget a finished worker; anyone still waiting for its old lock finds it finished."""
        cluster = self._clusters.get(cluster_name)
        if cluster is not None:
            cluster.workers.pop(worker_name, None)

    def starting(self, name: str) -> bool:
        """Whether a start operation of cluster ``name`` or of one of its workers runs."""
        found = self._clusters.get(name)
        if found is None:
            return False
        return found.start is not None or any(w.start is not None for w in found.workers.values())

    def start_tasks(self) -> list[asyncio.Task[None]]:
        """Every start operation still running."""
        tasks: list[asyncio.Task[None]] = []
        for cluster in self._clusters.values():
            if cluster.start is not None:
                tasks.append(cluster.start)
            tasks.extend(w.start for w in cluster.workers.values() if w.start is not None)
        return tasks

    def __contains__(self, name: object) -> bool:
        return name in self._clusters

    def __len__(self) -> int:
        return len(self._clusters)

"""What every job of the reconciler works with, and the requests that change a target.

Owns `Shared` (store, driver, settings, queue, runtime records, events and routes, plus
`Shared.enqueue` and `Shared.request_stop`) and `run_start_operation`, which drives a driver's
start operation and makes each state it yields durable before the driver goes on.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from attrs import define

from ..models import ClusterStatus

if TYPE_CHECKING:
    from ..backends.base import ClusterDriver, StateUpdates
    from ..config import ProcessBackendConfig
    from ..context import GatewayContext
    from ..store import Store
    from .events import ClusterEvents
    from .routes import ClusterRoutes
    from .runtime import Runtimes
    from .workqueue import Key, WorkQueue

log = logging.getLogger("gateway.reconciler")


def _everything(name: str) -> bool:
    return True


async def _unfenced(name: str) -> bool:
    return True


async def _no_other_heartbeats(name: str) -> float | None:
    return None


@define(kw_only=True, eq=False)
class Shared:
    """The services the reconciler's parts share; built once by `Reconciler`."""

    store: Store
    driver: ClusterDriver
    config: ProcessBackendConfig
    context: GatewayContext
    queue: WorkQueue[Key]
    runtimes: Runtimes
    events: ClusterEvents
    routes: ClusterRoutes
    owns: Callable[[str], bool] = _everything
    """Whether this replica reconciles the named cluster (always, with one gateway)."""
    fence: Callable[[str], Awaitable[bool]] = _unfenced
    """Awaited just before a driver call that must not run twice for the named cluster: False
    when this replica lost the cluster (the call must not be made)."""
    recorded_heartbeat: Callable[[str], Awaitable[float | None]] = _no_other_heartbeats
    """The last heartbeat of the named cluster as the database has it now (other replicas
    record the heartbeats the load balancer sends them); None with one gateway. Asked before
    a cluster is failed for silence, so a heartbeat not synced yet does not fail it."""

    def enqueue(self, cluster_name: str, delay: float = 0.0) -> None:
        """Queue cluster ``cluster_name`` to be reconciled after ``delay`` seconds."""
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


async def run_start_operation(
    updates: StateUpdates,
    save: Callable[[dict[str, Any]], None],
    flush: Callable[[], Awaitable[None]],
) -> None:
    """Run a driver start operation, saving each state it returns or yields at once.

    A durability point: after each yielded state, the generator resumes only once ``flush``
    says the state is written, so a gateway killed after the driver acted on it (submitted a
    job, started a process) finds the job id or pid on restart.
    """
    if isinstance(updates, AsyncIterator):
        try:
            async for state in updates:
                if state:
                    save(dict(state))
                    await flush()
        finally:
            aclose = getattr(updates, "aclose", None)
            if aclose is not None:
                await aclose()
    elif inspect.isawaitable(updates):
        result = await updates
        if result:
            save(dict(result))
            await flush()
    else:
        raise TypeError(
            f"a driver start operation returned {type(updates).__name__}; expected an "
            "awaitable or an async generator of state dicts"
        )


def describe(exc: BaseException) -> str:
    """An exception as a reason: its message, or its type when it has none."""
    return str(exc) or type(exc).__name__

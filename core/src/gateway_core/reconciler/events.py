"""Telling others what happened to a cluster: observer events and in-process status waiters.

Owns `ClusterEvents`: ``emit`` (a `ClusterEvent` for observer plugins), ``notify`` (wake whoever
waits for a status change) and the waits built on it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..events import ClusterEvent, EventKind
from ..models import ClusterStatus

if TYPE_CHECKING:
    from ..context import GatewayContext
    from ..models import Cluster
    from ..store import Store
    from .runtime import Runtimes


class ClusterEvents:
    """Events and status waiters of the clusters in ``store``."""

    def __init__(self, *, context: GatewayContext, store: Store, runtimes: Runtimes) -> None:
        self.context = context
        self.store = store
        self.runtimes = runtimes

    def emit(self, kind: EventKind, cluster: Cluster, **detail: Any) -> None:
        """Tell observer plugins; details that are None are left out."""
        self.context.emit(
            ClusterEvent(
                kind=kind,
                cluster_name=cluster.name,
                username=cluster.username,
                detail={k: v for k, v in detail.items() if v is not None},
            )
        )

    def notify(self, name: str) -> None:
        """The status of cluster ``name`` changed: wake its waiters."""
        runtime = self.runtimes.find(name)
        if runtime is not None:
            runtime.notify()

    async def wait_finished(self, cluster: Cluster) -> None:
        """Return once ``cluster`` is no longer active."""
        while cluster.status.is_active:
            await self.runtimes.cluster(cluster.name).wait_changed()

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
            try:
                async with asyncio.timeout(remaining):
                    await self.runtimes.cluster(name).wait_changed()
            except TimeoutError:
                return

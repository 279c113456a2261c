"""A `ClusterDriver` that starts nothing: clusters and workers exist only as store records.

Owns `SimulatedConfig` and `SimulatedDriver`, the ``simulated`` backend of the scale benchmark.
"""

# What a start "launches" is one line in a spool file (when ``spool`` is set), so that whoever
# plays the schedulers (bench/scale_bench.py) learns each cluster's name and token, and each
# worker's name, as a real scheduler or worker would from its environment:
#
#     {"cluster": NAME, "token": TOKEN}                 a scheduler start
#     {"cluster": NAME, "worker": WORKER}               a worker start
#
# The cluster turns RUNNING on its first heartbeat (the gateway's heartbeat route, with the
# cluster's token) and its workers when a heartbeat lists them active, as for any backend.
# Nothing can die: every liveness check answers alive, stops do nothing.

from __future__ import annotations

import json
import os
import threading
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from attrs import define

from ..backends.base import ClusterDriver, StateUpdates
from ..config import ClusterConfig, ProcessBackendConfig

if TYPE_CHECKING:
    from ..context import GatewayContext
    from ..models import Cluster, Worker


@define(kw_only=True, frozen=True)
class SimulatedConfig(ProcessBackendConfig):
    """`[backend.simulated]`: the reconciler's settings plus where starts are announced."""

    spool: str = ""
    """File each scheduler and worker start appends one JSON line to; empty: none."""


class SimulatedDriver(ClusterDriver[SimulatedConfig, ClusterConfig]):
    """Starts no process, opens no port: each start writes a line to the spool file (if any)
    and counts itself in ``calls``; every check answers alive; stops do nothing."""

    def __init__(self, *, config: SimulatedConfig, context: GatewayContext, **kwargs: Any) -> None:
        super().__init__(config=config, context=context, **kwargs)
        self.calls: dict[str, int] = dict.fromkeys(
            ("start_scheduler", "stop_scheduler", "start_worker", "stop_worker"), 0
        )
        self._spool_lock = threading.Lock()
        self._spool_fd: int | None = None
        if config.spool:
            # O_APPEND: one write per line, so concurrent readers never see half a line.
            self._spool_fd = os.open(config.spool, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _announce(self, record: dict[str, str]) -> None:
        if self._spool_fd is None:
            return
        line = (json.dumps(record) + "\n").encode()
        with self._spool_lock:
            os.write(self._spool_fd, line)

    def start_scheduler(self, cluster: Cluster) -> StateUpdates:
        self.calls["start_scheduler"] += 1
        return self._start({"cluster": cluster.name, "token": cluster.token})

    def start_worker(self, cluster: Cluster, worker: Worker) -> StateUpdates:
        self.calls["start_worker"] += 1
        return self._start({"cluster": cluster.name, "worker": worker.name})

    async def _start(self, record: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        self._announce(record)
        yield {"simulated": True}

    async def stop_scheduler(self, cluster: Cluster) -> None:
        self.calls["stop_scheduler"] += 1

    async def stop_worker(self, cluster: Cluster, worker: Worker) -> None:
        self.calls["stop_worker"] += 1

    async def check_clusters(self, clusters: Sequence[Cluster]) -> list[bool]:
        return [True] * len(clusters)

    async def check_workers(self, workers: Sequence[tuple[Cluster, Worker]]) -> list[bool]:
        return [True] * len(workers)

    def start_may_rerun(self, cluster: Cluster) -> bool:
        # A start that never announced itself (no state stored) can simply be done again.
        return not cluster.state.get("simulated")

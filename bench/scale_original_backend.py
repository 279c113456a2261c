"""The do-nothing backend the scale benchmark gives the original `dask-gateway-server`.
Owns `NullBackend`: a `DBBackendBase` whose operations start nothing and announce starts in a spool.
"""

# The counterpart of our `gateway_core.testing.simulated` backend, for the original server
# (loaded by its config as ``scale_original_backend.NullBackend``, with bench/ on PYTHONPATH):
# every start appends one JSON line to ``NullBackend.spool`` — ``{"cluster", "token"}`` for a
# scheduler, ``{"cluster", "worker"}`` for a worker — and yields an empty state; stops do
# nothing; every liveness check answers alive. The cluster turns RUNNING on the first heartbeat
# the benchmark sends with its token, as with a real scheduler.

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

from dask_gateway_server.backends.db_base import DBBackendBase
from traitlets import Unicode


class NullBackend(DBBackendBase):
    """Starts nothing; announces each start as one line in ``spool``."""

    spool = Unicode("", help="File each start appends one JSON line to", config=True)

    _spool_fd: int | None = None

    def _announce(self, record: dict[str, str]) -> None:
        if not self.spool:
            return
        if self._spool_fd is None:
            self._spool_fd = os.open(self.spool, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(self._spool_fd, (json.dumps(record) + "\n").encode())

    async def do_start_cluster(self, cluster: Any) -> AsyncIterator[dict[str, Any]]:
        self._announce({"cluster": cluster.name, "token": cluster.token})
        yield {}

    async def do_stop_cluster(self, cluster: Any) -> None:
        return None

    async def do_check_clusters(self, clusters: list[Any]) -> list[bool]:
        return [True] * len(clusters)

    async def do_start_worker(self, worker: Any) -> AsyncIterator[dict[str, Any]]:
        self._announce({"cluster": worker.cluster.name, "worker": worker.name})
        yield {}

    async def do_stop_worker(self, worker: Any) -> None:
        return None

    async def do_check_workers(self, workers: list[Any]) -> list[bool]:
        return [True] * len(workers)

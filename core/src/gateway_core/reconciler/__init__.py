"""The reconciler of process-style backends: drives every cluster and worker to its target.

Split along its jobs: `workqueue` (keyed queue, backoff), `heartbeat` (message parsing),
`credentials`, `routes` (a cluster's proxy routes), `events` (observers, status waiters),
`runtime` (per-cluster/worker runtime records), `clusters` and `workers` (the state machine),
`checks` (periodic work) and `runner` (`Reconciler`: life cycle and entry points).
"""

from .heartbeat import Heartbeat
from .runner import Reconciler
from .runtime import ClusterRuntime, Runtimes, WorkerRuntime
from .workqueue import Key, WorkQueue, backoff_delay

__all__ = [
    "ClusterRuntime",
    "Heartbeat",
    "Key",
    "Reconciler",
    "Runtimes",
    "WorkQueue",
    "WorkerRuntime",
    "backoff_delay",
]

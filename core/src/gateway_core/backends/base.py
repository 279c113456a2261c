"""The two interfaces a backend plugin implements: `Backend` (all of it) or `ClusterDriver`.

Owns the contracts only. `Backend` is what the API calls; `ClusterDriver` is the six operations
a process-style backend (local, Slurm, PBS, YARN, third parties) supplies to core's
`gateway_core.backends.process.ProcessBackend`, which keeps the store and the reconciler.
`ClusterConflict` and `BackendUnavailable` live in `gateway_core.errors` and are re-exported here.
Both interfaces also have optional operations with defaults (`ClusterDriver.failure_reason`,
`cluster_logs` on both).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar, cast

from ..config import DEFAULT_GROUP, BackendConfig, ClusterConfig, structure
from ..errors import BackendUnavailable, ClusterConflict
from ..sharing import is_sharee

__all__ = [
    "SCHEDULER_COMPONENT",
    "Backend",
    "BackendUnavailable",
    "ClusterConflict",
    "ClusterDriver",
    "StateUpdates",
]

if TYPE_CHECKING:
    from ..context import GatewayContext
    from ..models import Cluster, ClusterStatus, User, Worker

ConfigT = TypeVar("ConfigT", bound=BackendConfig)
"""A driver's backend config class (`BackendSpec.config`)."""
ClusterConfigT = TypeVar("ClusterConfigT", bound=ClusterConfig)
"""A driver's cluster config class (`BackendSpec.cluster_config`)."""

StateUpdates: TypeAlias = "AsyncIterator[dict[str, Any]] | Awaitable[dict[str, Any] | None]"
"""What a driver's start operation returns: an awaitable of the driver's state, or an async
generator yielding state as it goes (each yield is stored at once, so a gateway killed
mid-start still knows e.g. the job id it must cancel)."""

SCHEDULER_COMPONENT = "scheduler"
"""The log component naming a cluster's scheduler (`Backend.cluster_logs`); any other
component is the name of one of its workers."""


async def _nothing_to_wait_for() -> None:
    return None


class Backend(abc.ABC):
    """Everything the REST API needs from where clusters run.

    Core builds one instance per gateway with keyword arguments; implement this class directly
    only when the platform keeps cluster state itself (Kubernetes keeps it in custom resources).
    Otherwise write a `ClusterDriver` and let `ProcessBackend` do the rest.
    """

    def __init__(
        self,
        *,
        config: BackendConfig,
        cluster_config_class: type[ClusterConfig],
        context: GatewayContext,
        **kwargs: Any,
    ) -> None:
        self.config = config
        self.cluster_config_class = cluster_config_class
        self.context = context

    async def setup(self) -> None:  # noqa: B027 - optional hook
        """Start background work (connect to services, load state). Called once before serving."""

    async def cleanup(self) -> None:  # noqa: B027 - optional hook
        """Stop background work; stop clusters if ``stop_clusters_on_shutdown``."""

    @abc.abstractmethod
    async def list_clusters(
        self,
        *,
        username: str | None = None,
        statuses: Collection[ClusterStatus] | None = None,
    ) -> list[Cluster]:
        """Clusters of ``username`` (all users when None) whose status is in ``statuses``
        (all statuses when None).

        Each `Cluster`'s ``target`` must say where the cluster is being driven: RUNNING until
        someone asks it to stop, then STOPPED (or FAILED) at once, while its ``status`` may
        still be STOPPING. The API's default list (no ``status`` query, as in the original
        gateway) asks for the active statuses and keeps the clusters whose target is RUNNING,
        so a cluster asked to stop leaves it at once."""

    async def list_shared_clusters(
        self, user: User, *, statuses: Collection[ClusterStatus] | None = None
    ) -> list[Cluster]:
        """Other users' clusters shared with ``user`` (by its name or one of its groups, see
        `gateway_core.sharing.is_sharee`) whose status is in ``statuses`` (all when None),
        oldest first; never ``user``'s own.

        The default filters `list_clusters` (every user's clusters); a backend that can find
        them without visiting the others (`ProcessBackend`, through the store's sharee
        indexes) overrides it.
        """
        return [
            c
            for c in await self.list_clusters(statuses=statuses)
            if c.username != user.name and is_sharee(user, c)
        ]

    @abc.abstractmethod
    async def get_cluster(self, name: str, *, wait: bool = False) -> Cluster | None:
        """The cluster called ``name``, or None. With ``wait``, block (up to the gateway's
        ``wait_timeout``) while it is PENDING."""

    @abc.abstractmethod
    async def start_cluster(
        self, *, user: User, options: dict[str, Any], config: ClusterConfig
    ) -> str:
        """Create a cluster for ``user`` with resolved ``config``; return its new name at once
        (starting goes on in the background)."""

    async def begin_cluster(
        self, *, user: User, options: dict[str, Any], config: ClusterConfig
    ) -> tuple[str, Callable[[], Awaitable[None]]]:
        """`start_cluster` in two steps, for the caller's quota lock: create the cluster, so
        that `list_clusters` counts it from now on, and return its name with a function whose
        awaitable returns once the cluster is durable (its name may be handed out only then).
        The API holds its quota lock for the first step only, so concurrent creates wait for
        durability together (`ProcessBackend`: one commit of the store for all of them).

        The default calls `start_cluster`, durable when it returns: nothing more to wait for.
        """
        name = await self.start_cluster(user=user, options=options, config=config)
        return name, _nothing_to_wait_for

    @abc.abstractmethod
    async def stop_cluster(
        self, name: str, *, failed: bool = False, reason: str | None = None
    ) -> None:
        """Begin stopping ``name``; idempotent, unknown names are ignored. Before returning,
        the cluster's ``target`` is STOPPED (FAILED with ``failed``), see `list_clusters`."""

    @abc.abstractmethod
    async def on_cluster_heartbeat(self, name: str, msg: dict[str, Any]) -> None:
        """Take a heartbeat from the cluster's scheduler (PROTOCOL.md). The token was already
        checked. Raise `ClusterConflict` to answer 409."""

    @abc.abstractmethod
    async def forward_to_scheduler(self, cluster: Cluster, msg: dict[str, Any]) -> None:
        """Send ``msg`` (``{"op": "scale", ...}`` or ``{"op": "adapt", ...}``) to the cluster's
        scheduler. Raise `ClusterConflict` when the scheduler cannot take it."""

    async def cluster_logs(
        self, cluster: Cluster, *, components: Sequence[str], tail: int, max_bytes: int
    ) -> dict[str, str]:
        """The end of the output of each of ``components`` of ``cluster`` (the API's
        ``GET /api/v2/clusters/{name}/logs``): `SCHEDULER_COMPONENT` or the name of one of its
        workers (core checked they are its), each the last ``tail`` lines of at most its last
        ``max_bytes`` bytes.

        Answer component → text for every component the backend can say something about; a
        log that cannot be had (not written yet, removed when the cluster stopped) is a short
        message in parentheses, never an error. Core answers for components left out, and
        cuts any text longer than ``max_bytes``. Raise only when the platform cannot be asked
        at all (the API answers 503 with the message). The default keeps no logs (``{}``):
        backends that can, override it.
        """
        return {}

    async def set_sharing(
        self,
        name: str,
        *,
        shared_users: Sequence[str] | None = None,
        shared_groups: Sequence[str] | None = None,
    ) -> None:
        """Replace whom cluster ``name`` is shared with (None leaves a list as it is); core
        validated the names and the caller's right. Before returning, the cluster records
        `get_cluster` and `list_clusters` give have the new lists, durably where the backend
        keeps state.

        The default sets them on the record `get_cluster` returns, which suits backends that
        keep their records in memory; `ProcessBackend` also stores them. A backend that builds
        its records afresh on each read must override it.
        """
        cluster = await self.get_cluster(name)
        if cluster is None:
            return
        if shared_users is not None:
            cluster.shared_users = list(shared_users)
        if shared_groups is not None:
            cluster.shared_groups = list(shared_groups)


class ClusterDriver(abc.ABC, Generic[ConfigT, ClusterConfigT]):
    """The six operations that start, stop and watch schedulers and workers on one platform.

    Core's `ProcessBackend` calls these from its reconciler, with retries and timeouts, and
    stores whatever state they return. A driver keeps no state of its own between calls that it
    cannot rebuild from ``cluster.state`` and ``worker.state``: after a restart it is handed the
    records it stored before.

    A driver is generic over its two config classes, which its `BackendSpec` names (the one
    source of them): ``class SlurmDriver(JobQueueDriver[SlurmConfig, SlurmClusterConfig])``.
    ``self.config`` is the backend's section, typed; ``self.cluster_config(cluster)`` the
    cluster's resolved config, typed, converted once by `ProcessBackend`. ``cluster.token``,
    ``cluster.tls_cert`` and ``cluster.tls_key`` are the credentials to hand to the processes;
    `gateway_core.backends.kit` has the helpers for environments, accounts, commands and
    processes.
    """

    def __init__(
        self,
        *,
        config: ConfigT,
        context: GatewayContext,
        cluster_config_class: type[ClusterConfigT] | None = None,
        name: str = "",
        **kwargs: Any,
    ) -> None:
        self.config: ConfigT = config
        """`[backend.<name>]`, structured as the spec's ``config`` class."""
        self.context = context
        self.cluster_config_class: type[ClusterConfig] = cluster_config_class or ClusterConfig
        """The spec's ``cluster_config`` class (`BackendSpec.make_driver` passes it)."""
        self.name = name
        """The backend's registered name, for log lines; empty for a driver made by hand."""

    def cluster_config(self, cluster: Cluster) -> ClusterConfigT:
        """The resolved config of ``cluster``, typed. `ProcessBackend` converts it once (when
        the cluster is created, or loaded from the store) and keeps it on the record; a record
        made some other way (a test) is structured here, once, with ``cluster_config_class``."""
        if cluster.typed_config is None:
            cluster.typed_config = structure(
                cluster.config, self.cluster_config_class, path="cluster"
            )
        return cast("ClusterConfigT", cluster.typed_config)

    def worker_config(self, cluster: Cluster, worker: Worker) -> ClusterConfigT:
        """The config ``worker`` starts with: `cluster_config` with the settings of the
        worker's group over it (its cores, memory, environment and backend extras; the
        default group's is `cluster_config` itself). Use it in ``start_worker``."""
        settings = self.cluster_config(cluster)
        if worker.group == DEFAULT_GROUP:
            return settings
        if worker.group not in settings.worker_groups:
            raise RuntimeError(
                f"worker {worker.name}: cluster {cluster.name} has no worker group "
                f"{worker.group!r} (its groups: {', '.join(settings.group_names(all_groups=True))})"
            )
        return cast("ClusterConfigT", settings.for_group(worker.group))

    async def setup(self) -> None:
        """Prepare (check commands exist, open sessions). Called once before any operation."""

    async def cleanup(self) -> None:
        """Release what ``setup`` took. Called once at shutdown, after clusters were handled."""

    @abc.abstractmethod
    def start_scheduler(self, cluster: Cluster) -> StateUpdates:
        """Launch the scheduler of ``cluster``; return (or yield, as it goes) the driver state
        to store, e.g. ``{"pid": 1234}`` or ``{"job_id": "17"}``. The cluster becomes RUNNING
        when its scheduler heartbeats, not when this returns. Raise to fail the attempt (the
        message is shown to the user)."""

    @abc.abstractmethod
    async def stop_scheduler(self, cluster: Cluster) -> None:
        """Stop the scheduler and release everything the cluster holds. Must succeed when the
        scheduler is already gone or never started (``cluster.state`` may be empty)."""

    @abc.abstractmethod
    def start_worker(self, cluster: Cluster, worker: Worker) -> StateUpdates:
        """Launch ``worker`` (its name is chosen by core and must be passed to the process as
        its Dask worker name); return or yield the driver state, as for the scheduler."""

    @abc.abstractmethod
    async def stop_worker(self, cluster: Cluster, worker: Worker) -> None:
        """Stop ``worker``; must succeed when it is already gone."""

    @abc.abstractmethod
    async def check_clusters(self, clusters: Sequence[Cluster]) -> list[bool]:
        """For each cluster, is its scheduler still alive? One batched call per period (one
        ``squeue`` for all clusters, not one per cluster). Raise when the platform cannot be
        asked: the check is retried later and nobody is failed for it."""

    @abc.abstractmethod
    async def check_workers(self, workers: Sequence[tuple[Cluster, Worker]]) -> list[bool]:
        """For each (cluster, worker) pair, is the worker still alive? Batched like
        `check_clusters`."""

    def start_may_rerun(self, cluster: Cluster) -> bool:
        """After a gateway restart, for a PENDING cluster whose start began (its credentials
        were written) but whose scheduler never registered: True when the state the first
        attempt stored shows it launched nothing yet, so the reconciler runs `start_scheduler`
        again instead of waiting for a heartbeat that cannot come (and then failing the cluster
        as dead). The new attempt gets the state the first one left, and must cope with it
        (e.g. a half-made directory). Default False: wait, and let `check_clusters` decide.

        Example (a driver that stores ``{"pid": ...}`` once the process exists)::

            def start_may_rerun(self, cluster):
                return "pid" not in cluster.state
        """
        return False

    def worker_start_may_rerun(self, cluster: Cluster, worker: Worker) -> bool:
        """After a gateway restart or a takeover, for an active worker meant to run: True when
        the state its start stored shows it launched nothing the gateway knows of, so the
        reconciler runs `start_worker` again. That second attempt must first look for a
        process the first one launched after its last write (the gateway was killed in
        between) and return its state (adopt it) instead of launching another, or the worker
        runs twice; a `stop_worker` given such a record must likewise find what may have been
        launched. Default False: the worker is watched as stored, and `check_workers` decides.
        """
        return False

    async def failure_reason(self, cluster: Cluster) -> str | None:
        """Why the scheduler died, for the user (e.g. the last lines of its log); None if
        unknown. Called when a cluster fails."""
        return None

    async def cluster_logs(
        self, cluster: Cluster, *, components: Sequence[str], tail: int, max_bytes: int
    ) -> dict[str, str]:
        """The end of the output of each of ``components`` (`SCHEDULER_COMPONENT` or names of
        workers in ``cluster.workers``): the last ``tail`` lines of at most the last
        ``max_bytes`` bytes of each, as `Backend.cluster_logs` describes (a log that is gone
        is a message in parentheses, not an error; raise only when the platform cannot be
        asked). `ProcessBackend.cluster_logs` calls it. The default keeps no logs (``{}``):
        drivers that can, override it."""
        return {}

"""The `Backend` that every process-style backend shares: store and reconciler around a driver.

Owns `ProcessBackend`: the API's view of clusters run by a `ClusterDriver`, and the one place a
cluster's config is converted to its typed form (`Cluster.typed_config`). The helpers drivers use
to launch processes are in `gateway_core.backends.kit`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp

from ..config import ClusterConfig, ConfigError, ProcessBackendConfig, structure, unstructure
from ..errors import BackendUnavailable, ClusterConflict, GatewayError
from ..models import Cluster, ClusterStatus, User, new_name, new_token
from ..reconciler import Reconciler
from ..store import Store
from .base import Backend, ClusterDriver

if TYPE_CHECKING:
    from ..config import BackendConfig
    from ..context import GatewayContext

log = logging.getLogger("gateway.backend")


class ProcessBackend(Backend):
    """Clusters run by a `ClusterDriver`, with core's store and reconciler.

    Build with ``ProcessBackend(config=..., cluster_config_class=..., context=...,
    driver=...)``; ``config`` is the driver's `ProcessBackendConfig` subclass, and the driver
    must have been made for the same ``cluster_config_class`` (`BackendSpec.make_driver`). The
    store comes from ``[gateway] db_url``/``db_encrypt_keys``/``db_debug``. State a driver
    returns (or yields) from a start operation is merged into ``cluster.state`` /
    ``worker.state`` and stored at once.

    Each cluster's config is converted once: the typed object `start_cluster` is given is kept
    on the record (``cluster.typed_config``) beside its plain form for the store, and the
    active records loaded from the store are structured once in `setup`. A stored config that
    no longer structures (the cluster config class changed between restarts) fails that
    cluster, with a reason naming the bad key, instead of stopping the gateway.
    """

    shutdown_timeout: ClassVar[float] = 30.0
    """Seconds `cleanup` waits for clusters to stop when ``stop_clusters_on_shutdown``."""

    comm_timeout: ClassVar[float] = 10.0
    """Seconds a forwarded scale/adapt request may take."""

    comm_keepalive: ClassVar[float] = 15.0
    """Seconds an idle connection to a scheduler's agent is kept for the next request."""

    logs_timeout: ClassVar[float] = 120.0
    """Seconds the driver's `ClusterDriver.cluster_logs` may take for one request."""

    def __init__(
        self,
        *,
        config: BackendConfig,
        cluster_config_class: type[ClusterConfig],
        context: GatewayContext,
        driver: ClusterDriver[Any, Any],
        **kwargs: Any,
    ) -> None:
        if not isinstance(config, ProcessBackendConfig):
            raise TypeError(
                f"ProcessBackend needs a ProcessBackendConfig, got {type(config).__name__}"
            )
        if driver.cluster_config_class is not cluster_config_class:
            raise TypeError(
                f"ProcessBackend: the driver {type(driver).__name__} was made for "
                f"{driver.cluster_config_class.__name__}, the backend for "
                f"{cluster_config_class.__name__}; make it with BackendSpec.make_driver"
            )
        super().__init__(
            config=config, cluster_config_class=cluster_config_class, context=context, **kwargs
        )
        self.driver = driver
        gateway = context.config.gateway
        self.store = Store(
            url=gateway.db_url, encrypt_keys=gateway.db_encrypt_keys, debug=gateway.db_debug
        )
        self.reconciler = Reconciler(
            store=self.store, driver=driver, config=config, context=context
        )
        self._session: aiohttp.ClientSession | None = None

    # ---------------------------------------------------------------------------------------
    # Life cycle

    async def setup(self) -> None:
        clusters = self.store.load()
        active = [c for c in clusters if c.status.is_active]
        if active:
            log.info("Resuming %d active cluster(s) from the store", len(active))
        unfit = {c.name: problems for c in active if (problems := self._type_config(c))}
        # Keep-alive to the schedulers' agents: a few idle connections per scheduler, dropped
        # after `comm_keepalive` s, so a burst of scale/adapt requests reuses one connection
        # (a scheduler that went away costs one retry, see `forward_to_scheduler`).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=4, keepalive_timeout=self.comm_keepalive
            ),
            timeout=aiohttp.ClientTimeout(total=self.comm_timeout),
        )
        await self.driver.setup()
        for name, problems in unfit.items():
            self.reconciler.request_stop(
                name,
                failed=True,
                reason="The cluster's stored config no longer fits this gateway's cluster "
                f"config ({problems}); the config changed since it started",
            )
        self.reconciler.start()

    def _type_config(self, cluster: Cluster) -> str:
        """Set ``cluster.typed_config`` from its stored config; what is wrong ("" if
        nothing)."""
        try:
            cluster.typed_config = structure(
                cluster.config, self.cluster_config_class, path="cluster"
            )
        except ConfigError as exc:
            return "; ".join(exc.problems)
        return ""

    async def cleanup(self) -> None:
        stop = self.context.config.gateway.stop_clusters_on_shutdown
        try:
            await self.reconciler.stop(stop_clusters=stop, timeout=self.shutdown_timeout)
            await self.driver.cleanup()
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None
            await self.store.aclose()

    # ---------------------------------------------------------------------------------------
    # The API's operations

    async def list_clusters(
        self,
        *,
        username: str | None = None,
        statuses: Collection[ClusterStatus] | None = None,
    ) -> list[Cluster]:
        """From the store's owner or status index: a user's listing costs what that user
        holds, whatever the other users hold."""
        if username is not None:
            found = self.store.clusters_of(username, statuses)
        elif statuses is not None:
            found = self.store.clusters_with_status(statuses)
        else:
            found = list(self.store.clusters.values())
        return sorted(found, key=lambda c: c.start_time)

    async def list_shared_clusters(
        self, user: User, *, statuses: Collection[ClusterStatus] | None = None
    ) -> list[Cluster]:
        """From the store's sharee indexes (see `Backend.list_shared_clusters`)."""
        found = self.store.clusters_shared_with(user.name, user.groups, statuses)
        return sorted((c for c in found if c.username != user.name), key=lambda c: c.start_time)

    async def get_cluster(self, name: str, *, wait: bool = False) -> Cluster | None:
        found = self.store.get(name)
        replicas = self.reconciler.replicas
        if found is None and replicas is not None:
            # Made on another replica since this one last read the database: read it now.
            found = await replicas.find(name)
        if wait and found is not None:
            await self.reconciler.wait_while_pending(name, self.context.config.gateway.wait_timeout)
            found = self.store.get(name)
        return found

    async def start_cluster(
        self, *, user: User, options: dict[str, Any], config: ClusterConfig
    ) -> str:
        name, durable = await self.begin_cluster(user=user, options=options, config=config)
        await durable()
        return name

    async def begin_cluster(
        self, *, user: User, options: dict[str, Any], config: ClusterConfig
    ) -> tuple[str, Callable[[], Awaitable[None]]]:
        """The record in memory (counted by `list_clusters` at once) and its insert queued
        ahead of the store's backlog; `Store.flush_ahead` makes it durable: awaited by
        concurrent creates, it is one commit, which does not wait for the writes of the
        clusters and workers being started meanwhile."""
        cluster = Cluster(
            name=new_name(),
            username=user.name,
            token=new_token(),
            options=dict(options),
            config=unstructure(config),
            typed_config=config,
        )
        self.store.create_cluster(cluster, ahead=True)  # a new name: no write precedes it
        log.info("Created cluster %s for %s", cluster.name, user.name)
        self.reconciler.enqueue(cluster.name)
        return cluster.name, self.store.flush_ahead  # durable before its name is handed out

    async def stop_cluster(
        self, name: str, *, failed: bool = False, reason: str | None = None
    ) -> None:
        self.reconciler.request_stop(name, failed=failed, reason=reason)
        await self.store.flush()  # a stop the API acknowledged survives a restart

    async def set_sharing(
        self,
        name: str,
        *,
        shared_users: Sequence[str] | None = None,
        shared_groups: Sequence[str] | None = None,
    ) -> None:
        cluster = self.store.get(name)
        if cluster is None:
            return
        changes: dict[str, Any] = {}
        if shared_users is not None:
            changes["shared_users"] = list(shared_users)
        if shared_groups is not None:
            changes["shared_groups"] = list(shared_groups)
        self.store.update_cluster(cluster, **changes)
        await self.store.flush()  # a change the API acknowledged survives a restart

    async def on_cluster_heartbeat(self, name: str, msg: dict[str, Any]) -> None:
        self.reconciler.handle_heartbeat(name, msg)

    async def forward_to_scheduler(self, cluster: Cluster, msg: dict[str, Any]) -> None:
        op = msg.get("op", "request")
        if cluster.status != ClusterStatus.RUNNING or not cluster.api_address:
            raise ClusterConflict(
                f"Cluster {cluster.name} is not running (status {cluster.status.name}); "
                f"cannot {op} it now"
            )
        if self._session is None:
            raise ClusterConflict("The gateway backend is not running")
        url = f"{cluster.api_address.rstrip('/')}/api/comm"
        headers = {"Authorization": f"token {cluster.token}"}
        try:
            try:
                status, text = await self._post(url, msg, headers)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # A kept connection the scheduler closed (it restarted, or dropped it idle)
                # just as it was reused: scale and adapt set targets, so sending again is safe.
                status, text = await self._post(url, msg, headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClusterConflict(
                f"Cannot reach the scheduler of cluster {cluster.name} to {op}: "
                f"{str(exc) or type(exc).__name__}"
            ) from exc
        if status >= 400:
            raise ClusterConflict(
                f"The scheduler of cluster {cluster.name} refused {op}: "
                f"HTTP {status} {text[:200]}".rstrip()
            )

    async def _post(
        self, url: str, msg: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, str]:
        assert self._session is not None
        async with self._session.post(url, json=msg, headers=headers) as resp:
            return resp.status, await resp.text()  # read whole: the connection is reused

    async def cluster_logs(
        self, cluster: Cluster, *, components: Sequence[str], tail: int, max_bytes: int
    ) -> dict[str, str]:
        """The driver's `ClusterDriver.cluster_logs`, within `logs_timeout`; a driver that
        fails is `BackendUnavailable` (503) naming the cluster and what went wrong."""
        try:
            async with asyncio.timeout(self.logs_timeout):
                return await self.driver.cluster_logs(
                    cluster, components=components, tail=tail, max_bytes=max_bytes
                )
        except TimeoutError:
            raise BackendUnavailable(
                f"reading the logs of cluster {cluster.name} took longer than "
                f"{self.logs_timeout:g} s; try fewer components or fewer lines"
            ) from None
        except GatewayError:
            raise
        except Exception as exc:  # noqa: BLE001 - any driver failure is answered, not a 500
            log.warning("Reading the logs of cluster %s failed: %s", cluster.name, exc)
            raise BackendUnavailable(
                f"cannot read the logs of cluster {cluster.name}: {str(exc) or type(exc).__name__}"
            ) from None

    # ---------------------------------------------------------------------------------------
    # For drivers and tests

    def cluster_config(self, cluster: Cluster) -> ClusterConfig:
        """The typed config of ``cluster`` (as its driver sees it)."""
        return self.driver.cluster_config(cluster)

"""The `Backend` that every process-style backend shares: store and reconciler around a driver.

Owns `ProcessBackend` (the API's view of clusters run by a `ClusterDriver`) and the helpers
drivers use to launch processes (`cluster_env`, `ProcessBackend.cluster_config`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp

from ..config import ClusterConfig, ProcessBackendConfig, structure, unstructure
from ..models import Cluster, ClusterStatus, User, new_name, new_token
from ..reconciler import Reconciler
from ..store import Store
from .base import Backend, ClusterConflict, ClusterDriver

if TYPE_CHECKING:
    from ..config import BackendConfig
    from ..context import GatewayContext

log = logging.getLogger("gateway.backend")


def cluster_env(cluster: Cluster, context: GatewayContext) -> dict[str, str]:
    """Environment for a cluster's scheduler and workers: the cluster config's
    ``environment``, then what the gateway's scheduler agent needs to reach the API."""
    env = {str(k): str(v) for k, v in (cluster.config.get("environment") or {}).items()}
    env.update(
        {
            "DASK_GATEWAY_API_URL": context.api_url,
            "DASK_GATEWAY_API_TOKEN": cluster.token,
            "DASK_GATEWAY_CLUSTER_NAME": cluster.name,
        }
    )
    return env


class ProcessBackend(Backend):
    """Clusters run by a `ClusterDriver`, with core's store and reconciler.

    Build with ``ProcessBackend(config=..., cluster_config_class=..., context=...,
    driver=...)``; ``config`` is the driver's `ProcessBackendConfig` subclass. The store comes
    from ``[gateway] db_url``/``db_encrypt_keys``/``db_debug``. State a driver returns (or
    yields) from a start operation is merged into ``cluster.state`` / ``worker.state`` and
    stored at once.
    """

    shutdown_timeout: ClassVar[float] = 30.0
    """Seconds `cleanup` waits for clusters to stop when ``stop_clusters_on_shutdown``."""

    comm_timeout: ClassVar[float] = 10.0
    """Seconds a forwarded scale/adapt request may take."""

    def __init__(
        self,
        *,
        config: BackendConfig,
        cluster_config_class: type[ClusterConfig],
        context: GatewayContext,
        driver: ClusterDriver,
        **kwargs: Any,
    ) -> None:
        if not isinstance(config, ProcessBackendConfig):
            raise TypeError(
                f"ProcessBackend needs a ProcessBackendConfig, got {type(config).__name__}"
            )
        super().__init__(
            config=config, cluster_config_class=cluster_config_class, context=context, **kwargs
        )
        self.process_config: ProcessBackendConfig = config
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
        active = sum(1 for c in clusters if c.status.is_active)
        if active:
            log.info("Resuming %d active cluster(s) from the store", active)
        # No keep-alive: requests are rare, and schedulers come and go.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=self.comm_timeout),
        )
        await self.driver.setup()
        self.reconciler.start()

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
        found = [
            c
            for c in self.store.clusters.values()
            if (username is None or c.username == username)
            and (statuses is None or c.status in statuses)
        ]
        return sorted(found, key=lambda c: c.start_time)

    async def get_cluster(self, name: str, *, wait: bool = False) -> Cluster | None:
        if wait:
            await self.reconciler.wait_while_pending(name, self.context.config.gateway.wait_timeout)
        return self.store.get(name)

    async def start_cluster(
        self, *, user: User, options: dict[str, Any], config: ClusterConfig
    ) -> str:
        cluster = Cluster(
            name=new_name(),
            username=user.name,
            token=new_token(),
            options=dict(options),
            config=unstructure(config),
        )
        self.store.create_cluster(cluster)
        log.info("Created cluster %s for %s", cluster.name, user.name)
        self.reconciler.enqueue(cluster.name)
        await self.store.flush()  # durable before its name is handed out
        return cluster.name

    async def stop_cluster(
        self, name: str, *, failed: bool = False, reason: str | None = None
    ) -> None:
        self.reconciler.request_stop(name, failed=failed, reason=reason)
        await self.store.flush()  # a stop the API acknowledged survives a restart

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
            async with self._session.post(url, json=msg, headers=headers) as resp:
                if resp.status >= 400:
                    text = (await resp.text())[:200]
                    raise ClusterConflict(
                        f"The scheduler of cluster {cluster.name} refused {op}: "
                        f"HTTP {resp.status} {text}".rstrip()
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClusterConflict(
                f"Cannot reach the scheduler of cluster {cluster.name} to {op}: "
                f"{str(exc) or type(exc).__name__}"
            ) from exc

    # ---------------------------------------------------------------------------------------
    # For drivers

    def cluster_config(self, cluster: Cluster) -> ClusterConfig:
        """``cluster.config`` structured back into this backend's cluster config class."""
        return structure(cluster.config, self.cluster_config_class, path="cluster")

"""The gateway side of the Kubernetes backend: clusters are DaskCluster resources.

Owns `KubeBackend`: the API's operations on the resources (create with a credentials Secret,
list and get from an informer's cache, scale through the scheduler, stop by deleting), the
proxy routes fed from the resources' status, and the scheduler heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from attrs import define, field

from gateway_core.backends.base import Backend
from gateway_core.config import ClusterConfig, ConfigError, structure, unstructure
from gateway_core.errors import BackendUnavailable, ClusterConflict
from gateway_core.models import DEFAULT_GROUP, Cluster, ClusterStatus, User, new_name
from gateway_core.reconciler.heartbeat import Heartbeat
from gateway_core.reconciler.routes import ClusterRoutes

from . import logs, objects
from .config import KubeBackendConfig, KubeClusterConfig
from .kube import CLUSTERS, SECRETS, Informer, KubeClient, KubeError, load_api_client

if TYPE_CHECKING:
    from gateway_core.context import GatewayContext

log = logging.getLogger("gateway.k8s")

PHASES = {
    "Pending": ClusterStatus.PENDING,
    "Running": ClusterStatus.RUNNING,
    "Stopping": ClusterStatus.STOPPING,
    "Stopped": ClusterStatus.STOPPED,
    "Failed": ClusterStatus.FAILED,
}


def _ms(timestamp: str | None) -> int:
    if not timestamp:
        return int(time.time() * 1000)
    moment = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _replicas_patch(spec: dict[str, Any], beat: Heartbeat) -> dict[str, Any]:
    """The change to a DaskCluster's spec a heartbeat asks for: the default group's target in
    ``worker.replicas``, each named group's in ``workerGroups.<group>.replicas`` (a group the
    agent has no target for wants none: its targets start at 0). Groups the spec does not
    have are not the cluster's (the API refuses to scale them) and are ignored."""
    out: dict[str, Any] = {}
    replicas = int((spec.get("worker") or {}).get("replicas") or 0)
    if beat.count is not None and beat.count != replicas:
        out["worker"] = {"replicas": beat.count}
    if beat.group_counts is not None:
        groups: dict[str, Any] = {}
        for group, template in (spec.get("workerGroups") or {}).items():
            wanted = beat.group_counts.get(group, 0)
            if wanted != int(template.get("replicas") or 0):
                groups[group] = {"replicas": wanted}
        unknown = sorted(set(beat.group_counts) - set(spec.get("workerGroups") or {}))
        if unknown:
            log.warning("Heartbeat names worker groups the cluster lacks: %s", unknown)
        if groups:
            out["workerGroups"] = groups
    return out


@define(kw_only=True)
class KubeCluster(Cluster):
    """A cluster as its DaskCluster shows it: no worker records (the gateway reads no pods),
    the controller's counts per group (``status.groups``) instead."""

    observed: dict[str, dict[str, int]] = field(factory=dict)
    """Per group, the controller's ``requested``, ``pending`` and ``running`` worker pods."""

    def workers_per_group(self) -> dict[str, dict[str, int]]:
        """Per group, the workers the scheduler wants (``count``) and the pods the controller
        saw: those beyond what it was asked for are ``stopping`` (not started ones first: the
        controller deletes those first, running ones the scheduler retires)."""
        out: dict[str, dict[str, int]] = {}
        for group in dict.fromkeys([DEFAULT_GROUP, *self.group_counts, *self.observed]):
            seen = self.observed.get(group, {})
            pending, running = seen.get("pending", 0), seen.get("running", 0)
            excess = max(0, pending + running - seen.get("requested", 0))
            stop_pending = min(excess, pending)
            out[group] = {
                "count": self.count_of(group),
                "pending": pending - stop_pending,
                "running": running - (excess - stop_pending),
                "stopping": excess,
            }
        return out


class KubeBackend(Backend):
    """Every cluster is a DaskCluster in ``[backend.kubernetes] namespace``, or the namespace
    its ``[cluster] namespace`` template gives (`gateway_k8s.namespaces`); the controller
    (`gateway k8s controller`) turns it into pods. Nothing but stopped clusters' last words is
    kept in memory, so a restarted gateway (or a second replica) finds every cluster again."""

    comm_timeout = 10.0

    def __init__(
        self,
        *,
        config: Any,
        cluster_config_class: type[ClusterConfig],
        context: GatewayContext,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            config=config, cluster_config_class=cluster_config_class, context=context, **kwargs
        )
        assert isinstance(config, KubeBackendConfig)
        self.kconfig: KubeBackendConfig = config
        self.policy = config.policy
        self.namespace_of: dict[str, str] = {}
        """The namespace of each cluster's DaskCluster (cluster names are unique across them)."""
        self.client: KubeClient | None = None
        self.clusters: Informer | None = None
        self.credentials: dict[str, tuple[str, bytes, bytes]] = {}
        """Token, certificate and key of each cluster, read once by name (they never change)."""
        self.routes = ClusterRoutes(context=context)
        self.stopped: dict[str, Cluster] = {}
        self.heartbeats: dict[str, float] = {}
        self.refused: dict[str, str] = {}
        """Per cluster, why its credentials Secret may not be read (a 403 to ``get secrets``,
        naming verb, resource and namespace): its reason."""
        self.typed_configs: dict[str, ClusterConfig | None] = {}
        """Each cluster's config (its resource's annotation) structured once: it never changes.
        None when it no longer fits the config class."""
        self.refused_reads: dict[str, str] = {}
        """Per namespace, the last refused read of a Secret there, until one works: logged
        at ERROR once, listed by `health`."""
        self.workers = logs.WorkerNames()
        self.pod_logs: logs.PodLogs | None = None
        self._changed = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    # --- life cycle ----------------------------------------------------------------------

    async def setup(self) -> None:
        c = self.kconfig
        api = await asyncio.to_thread(
            load_api_client, server=c.server, kubeconfig=c.kubeconfig, context=c.context
        )
        self.client = KubeClient(api, threads=c.api_threads, qps=c.api_qps, burst=c.api_burst)
        self.pod_logs = logs.PodLogs(self.client)
        self.clusters = Informer(
            self.client,
            CLUSTERS,
            namespace=self.policy.watch_namespace,
            labels=objects.SELECTOR,
            handler=self._on_cluster,
            accept=self.policy.allows,
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=self.comm_timeout),
        )
        self.clusters.start()
        where = self.policy.watch_namespace
        scope = f"namespace {where!r}" if where else "all namespaces"
        try:
            async with asyncio.timeout(30):
                # A refusal (403) is final until an administrator grants it: said at once.
                while not self.clusters.synced.is_set() and self.clusters.refused is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.clusters.synced.wait(), 0.2)
        except TimeoutError:
            why = f": {self.clusters.last_error}" if self.clusters.last_error else ""
            raise BackendUnavailable(
                f"cannot list DaskClusters in {scope} within 30 s{why}"
            ) from None
        refused = self.clusters.refused
        if refused is not None and not self.clusters.synced.is_set():
            raise BackendUnavailable(
                f"the gateway may not {refused.verb} {refused.resource} in {scope}: "
                f"{refused.message or refused}"
            )

    def health(self) -> dict[str, Any]:
        """Fails while the DaskClusters may not be listed or watched (the gateway's view of
        every cluster is stale); a refused read of a cluster's Secret is listed (that
        cluster is unusable, the others are fine)."""
        out: dict[str, Any] = {"status": "pass"}
        refused = self.clusters.refused if self.clusters is not None else None
        if refused is not None:
            out["status"] = "fail"
            out["reason"] = (
                f"the gateway may not {refused.verb} {refused.resource}: "
                f"{refused.message or refused}"
            )
        if self.refused_reads:
            out["refused"] = [self.refused_reads[ns] for ns in sorted(self.refused_reads)]
        return out

    async def cleanup(self) -> None:
        if self.context.config.gateway.stop_clusters_on_shutdown and self.clusters is not None:
            for obj in self.clusters.items():
                await self.stop_cluster(objects.cluster_name(obj["metadata"]["name"]))
        if self.clusters is not None:
            await self.clusters.stop()
        if self._session is not None:
            await self._session.close()
        if self.client is not None:
            self.client.close()

    # --- records -------------------------------------------------------------------------

    def _resource(self, name: str) -> dict[str, Any] | None:
        assert self.clusters is not None
        namespace = self.namespace_of.get(name, self.kconfig.namespace)
        return self.clusters.get(namespace, objects.resource_name(name))

    def _record(self, obj: dict[str, Any]) -> Cluster:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        resource = meta["name"]
        name = objects.cluster_name(resource)
        annotations = meta.get("annotations") or {}
        token, cert, key = self.credentials.get(name, ("", b"", b""))
        phase = PHASES.get(status.get("phase", "Pending"), ClusterStatus.PENDING)
        if phase == ClusterStatus.RUNNING and objects.ANNOTATION_REGISTERED not in annotations:
            # The pod runs, but its scheduler has not reached the gateway yet: a client told
            # RUNNING now could find nothing listening.
            phase = ClusterStatus.PENDING
        if meta.get("deletionTimestamp") and phase.is_active:
            phase = ClusterStatus.STOPPING
        address = status.get("schedulerAddress") or ""
        host = address.rpartition("://")[2].rpartition(":")[0]
        sharing = json.loads(annotations.get(objects.ANNOTATION_SHARING) or "{}")
        cluster = KubeCluster(
            name=name,
            username=spec.get("user", ""),
            token=token,
            options=json.loads(annotations.get(objects.ANNOTATION_OPTIONS) or "{}"),
            config=json.loads(annotations.get(objects.ANNOTATION_CONFIG) or "{}"),
            status=phase,
            target=ClusterStatus.RUNNING if phase.is_active else phase,
            count=int((spec.get("worker") or {}).get("replicas") or 0),
            group_counts={
                group: int(template.get("replicas") or 0)
                for group, template in (spec.get("workerGroups") or {}).items()
                if template.get("replicas")
            },
            observed={
                str(group): {k: int(v or 0) for k, v in (counts or {}).items()}
                for group, counts in (status.get("groups") or {}).items()
            },
            scheduler_address=address if phase == ClusterStatus.RUNNING else "",
            dashboard_address=status.get("dashboardAddress") or "",
            api_address=f"http://{host}:{objects.API_PORT}" if host else "",
            tls_cert=cert,
            tls_key=key,
            start_time=_ms(meta.get("creationTimestamp")),
            last_heartbeat=self.heartbeats.get(name),
            reason=status.get("reason")
            or self.refused.get(name)
            or self._no_controller(meta, status, phase),
            shared_users=list(sharing.get("users") or []),
            shared_groups=list(sharing.get("groups") or []),
        )
        cluster.workers = self.workers.of(name)
        cluster.typed_config = self._typed_config(name, cluster.config)
        return cluster

    def _no_controller(
        self, meta: dict[str, Any], status: dict[str, Any], phase: ClusterStatus
    ) -> str | None:
        """Why a cluster without any status after `controller_timeout` seconds is stuck: no
        controller wrote one (none runs, or it may not patch the status subresource)."""
        if status.get("phase") or phase != ClusterStatus.PENDING:
            return None
        waited = time.time() - _ms(meta.get("creationTimestamp")) / 1000
        if waited < self.kconfig.controller_timeout:
            return None
        return (
            f"no controller has recorded this cluster's status in {waited:.0f} s: none is "
            f"running (gateway k8s controller), or it may not patch daskclusters/status in "
            f"namespace {meta['namespace']!r} (its /readyz names what it is refused)"
        )

    def _typed_config(self, name: str, config: dict[str, Any]) -> ClusterConfig | None:
        """The cluster's config typed (core's metrics count cores and memory from it, and
        each worker group's from its `for_group`), structured once per cluster."""
        if name not in self.typed_configs:
            try:
                self.typed_configs[name] = structure(config, self.cluster_config_class)
            except ConfigError as exc:
                log.warning("Config of cluster %s does not fit: %s", name, "; ".join(exc.problems))
                self.typed_configs[name] = None
        return self.typed_configs[name]

    async def _load_credentials(self, objs: list[dict[str, Any]]) -> None:
        """Read the credentials Secrets (by name: the gateway may not list Secrets) of
        ``objs`` not read yet; the controller writes them, so one may not exist yet."""
        assert self.client is not None
        client = self.client

        async def load(obj: dict[str, Any]) -> None:
            meta = obj["metadata"]
            name = objects.cluster_name(meta["name"])
            try:
                secret = await client.get(
                    SECRETS, meta["namespace"], objects.secret_name(meta["name"])
                )
            except KubeError as exc:
                if exc.status != 403:
                    raise
                namespace = meta["namespace"]
                why = (
                    f"the gateway may not {exc.verb} {exc.resource} in namespace "
                    f"{namespace!r}: {exc.message or exc}"
                )
                if namespace not in self.refused_reads:  # once, not for every cluster
                    log.error("Cannot read cluster credentials: %s", why)
                self.refused_reads[namespace] = why
                self.refused[name] = why
                return
            self.refused.pop(name, None)
            if self.refused_reads.pop(meta["namespace"], None) is not None:
                log.info("Reading credentials in namespace %r is granted again", meta["namespace"])
            if secret is not None:
                self.credentials[objects.cluster_name(meta["name"])] = (
                    objects.secret_value(secret, objects.TOKEN_KEY).decode(),
                    objects.secret_value(secret, objects.CERT_KEY),
                    objects.secret_value(secret, objects.PRIVATE_KEY),
                )

        missing = [
            o for o in objs if objects.cluster_name(o["metadata"]["name"]) not in self.credentials
        ]
        if missing:
            await asyncio.gather(*(load(o) for o in missing))

    async def _on_cluster(self, type_: str, obj: dict[str, Any]) -> None:
        """Routes follow the resources (also right after a restart: the first list);
        a resource that failed or stopped is remembered, then deleted."""
        name = objects.cluster_name(obj["metadata"]["name"])
        if type_ == "DELETED":
            self.namespace_of.pop(name, None)
            self.credentials.pop(name, None)
            self.refused.pop(name, None)
            self.typed_configs.pop(name, None)
            self.workers.forget(name)  # a stopped cluster's record keeps its own copy
        else:
            self.namespace_of[name] = obj["metadata"]["namespace"]
            await self._load_credentials([obj])
        record = self._record(obj)
        if (
            type_ != "DELETED"
            and name in self.refused
            and record.status == ClusterStatus.PENDING
            and name not in self.stopped
        ):
            # Without its token no scheduler of it can reach the gateway, nor a client the
            # scheduler: it cannot start, and its user is waiting (as for refused creates).
            await self.stop_cluster(name, failed=True, reason=f"cannot start: {self.refused[name]}")
            self._changed.set()
            return
        if type_ != "DELETED" and record.status == ClusterStatus.RUNNING:
            self.routes.put(record)
        else:
            self.routes.delete(record)
        if type_ != "DELETED" and not record.status.is_active:
            if name not in self.stopped:
                record.stop_time = int(time.time() * 1000)
                self.stopped[name] = record
            assert self.client is not None
            await self.client.delete(
                CLUSTERS, obj["metadata"]["namespace"], obj["metadata"]["name"]
            )
        self._changed.set()

    def _forget_old(self) -> None:
        horizon = (time.time() - self.kconfig.stopped_retention) * 1000
        for name, cluster in list(self.stopped.items()):
            if (cluster.stop_time or 0) < horizon:
                del self.stopped[name]

    # --- the API's operations ------------------------------------------------------------

    async def list_clusters(
        self,
        *,
        username: str | None = None,
        statuses: Collection[ClusterStatus] | None = None,
    ) -> list[Cluster]:
        assert self.clusters is not None
        self._forget_old()
        objs = self.clusters.items()
        await self._load_credentials(objs)
        found = {c.name: c for c in map(self._record, objs)}
        found.update(self.stopped)
        return sorted(
            (
                c
                for c in found.values()
                if (username is None or c.username == username)
                and (statuses is None or c.status in statuses)
            ),
            key=lambda c: c.start_time,
        )

    async def get_cluster(self, name: str, *, wait: bool = False) -> Cluster | None:
        deadline = time.monotonic() + self.context.config.gateway.wait_timeout
        while True:
            if name in self.stopped:
                return self.stopped[name]
            obj = self._resource(name)
            if obj is not None:
                await self._load_credentials([obj])
            cluster = self._record(obj) if obj is not None else None
            if not wait or cluster is None or cluster.status != ClusterStatus.PENDING:
                return cluster
            left = deadline - time.monotonic()
            if left <= 0:
                return cluster
            self._changed.clear()
            try:
                async with asyncio.timeout(min(left, 1.0)):
                    await self._changed.wait()
            except TimeoutError:
                pass

    async def start_cluster(
        self, *, user: User, options: dict[str, Any], config: ClusterConfig
    ) -> str:
        assert self.client is not None and self.clusters is not None
        assert isinstance(config, KubeClusterConfig)
        namespace = self.policy.for_cluster(config.namespace, user.name)
        name = new_name()
        gateway_env = {
            "DASK_GATEWAY_API_URL": self.context.api_url,
            "DASK_GATEWAY_CLUSTER_NAME": name,
            "DASK_GATEWAY_HEARTBEAT_PERIOD": str(self.kconfig.cluster_heartbeat_period),
            "DASK_GATEWAY_ADAPTIVE_PERIOD": f"{config.adaptive_period:g}",
        }
        body = objects.cluster_resource(
            name=name,
            namespace=namespace,
            username=user.name,
            config=config,
            gateway_env=gateway_env,
            options_json=json.dumps(options),
            config_json=json.dumps(unstructure(config)),
        )
        try:
            created = await self.client.create(CLUSTERS, namespace, body)
        except KubeError as exc:
            raise BackendUnavailable(f"cannot create the cluster's resources: {exc}") from None
        self.namespace_of[name] = namespace
        self.clusters.put(created)
        log.info("Created DaskCluster %s/%s for %s", namespace, body["metadata"]["name"], user.name)
        return name

    async def stop_cluster(
        self, name: str, *, failed: bool = False, reason: str | None = None
    ) -> None:
        assert self.client is not None
        obj = self._resource(name)
        if obj is None:
            return
        record = self._record(obj)
        if record.status.is_active:
            record.status = ClusterStatus.FAILED if failed else ClusterStatus.STOPPED
            record.reason = reason or record.reason
        record.target = record.status
        record.stop_time = int(time.time() * 1000)
        record.scheduler_address = record.dashboard_address = ""
        self.stopped.setdefault(name, record)
        self.routes.delete(record)
        try:
            await self.client.delete(
                CLUSTERS, obj["metadata"]["namespace"], obj["metadata"]["name"]
            )
        except KubeError as exc:
            raise BackendUnavailable(f"cannot delete cluster {name}: {exc}") from None

    async def set_sharing(
        self, name: str, *, shared_users: Any = None, shared_groups: Any = None
    ) -> None:
        assert self.client is not None
        obj = self._resource(name)
        if obj is None:
            return
        current = self._record(obj)
        sharing = {
            "users": list(shared_users if shared_users is not None else current.shared_users),
            "groups": list(shared_groups if shared_groups is not None else current.shared_groups),
        }
        patch = {"metadata": {"annotations": {objects.ANNOTATION_SHARING: json.dumps(sharing)}}}
        updated = await self.client.patch(
            CLUSTERS, obj["metadata"]["namespace"], obj["metadata"]["name"], patch
        )
        assert self.clusters is not None
        self.clusters.put(updated)

    async def on_cluster_heartbeat(self, name: str, msg: dict[str, Any]) -> None:
        """The scheduler's target count becomes the default group's ``replicas``, its target
        per named group (``group_counts``) that group's ``replicas``."""
        obj = self._resource(name)
        if obj is None or name in self.stopped:
            raise ClusterConflict(f"Cluster {name} is not running")
        try:
            beat = Heartbeat.parse(msg)
        except ValueError as exc:
            raise ClusterConflict(f"bad heartbeat: {exc}") from None
        self.heartbeats[name] = time.time()
        self.workers.record(name, beat)
        patch: dict[str, Any] = {}
        spec_patch = _replicas_patch(obj["spec"], beat)
        if spec_patch:
            patch["spec"] = spec_patch
        if objects.ANNOTATION_REGISTERED not in (obj["metadata"].get("annotations") or {}):
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            patch["metadata"] = {"annotations": {objects.ANNOTATION_REGISTERED: stamp}}
        if patch:
            assert self.client is not None and self.clusters is not None
            updated = await self.client.patch(
                CLUSTERS, obj["metadata"]["namespace"], obj["metadata"]["name"], patch
            )
            self.clusters.put(updated)
            self._changed.set()

    async def cluster_logs(
        self, cluster: Cluster, *, components: Sequence[str], tail: int, max_bytes: int
    ) -> dict[str, str]:
        """The ends of the scheduler's and workers' container logs (`pods/log`), while their
        pods exist (a stopped cluster's pods are gone, and so are their logs)."""
        obj = self._resource(cluster.name)
        if obj is None or cluster.name in self.stopped:
            gone = "(no log: the cluster stopped and its pods were deleted)"
            return dict.fromkeys(components, gone)
        assert self.pod_logs is not None
        return await logs.cluster_logs(
            self.pod_logs,
            namespace=obj["metadata"]["namespace"],
            resource=obj["metadata"]["name"],
            components=components,
            tail=tail,
            max_bytes=max_bytes,
        )

    async def forward_to_scheduler(self, cluster: Cluster, msg: dict[str, Any]) -> None:
        op = msg.get("op", "request")
        if cluster.status != ClusterStatus.RUNNING or not cluster.api_address:
            raise ClusterConflict(
                f"Cluster {cluster.name} is not running (status {cluster.status.name}); "
                f"cannot {op} it now"
            )
        assert self._session is not None
        url = f"{cluster.api_address}/api/comm"
        try:
            async with self._session.post(
                url, json=msg, headers={"Authorization": f"token {cluster.token}"}
            ) as resp:
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

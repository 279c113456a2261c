"""The gateway's Prometheus metrics: one registry per gateway, its instruments and collectors.

Owns `GatewayMetrics` (the per-gateway `CollectorRegistry`, the counters and histograms the API,
the reconciler and driver calls update, and the collectors that read clusters, the reconciler
queue and the proxy's traffic at scrape time) and `ProxyTraffic`, what a proxy may expose.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import ClusterConfig, ConfigError
from .models import DEFAULT_GROUP, Cluster, ClusterStatus, WorkerStatus

if TYPE_CHECKING:
    from .backends.base import Backend

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "ProxyTraffic"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The content type of the text exposition format `GatewayMetrics.scrape` returns."""

UNMATCHED_ROUTE = "unmatched"
"""The ``route`` label of requests no API route matched (404s, 405s)."""

AUTH_KINDS = ("user", "cluster", "proxy", "metrics")
"""The ``kind`` label values of ``gateway_auth_failures_total``."""

_API_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_DRIVER_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@runtime_checkable
class ProxyTraffic(Protocol):
    """What a proxy exposes for ``gateway_proxy_*``: per face (``"http"``, ``"tls_sni"``), the
    counts since it started: ``connections`` (accepted), ``open`` (now), ``bytes_received``
    (from clients) and ``bytes_sent`` (to clients). Missing keys are left out."""

    def traffic(self) -> Mapping[str, Mapping[str, int]]: ...


class GatewayMetrics:
    """The metrics of one gateway, in its own `CollectorRegistry` (never the global one, so
    two gateways in one process do not clash).

    Counters and histograms are updated where things happen (`observe_request`,
    `auth_failure`, `driver_call`); gauges are read at scrape time from the backend's
    clusters, the reconciler's queue and the proxy (`scrape`).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.backend_name = ""
        """The ``backend`` label; set by the gateway to its backend's plugin name."""
        self._backend: Backend | None = None
        self._proxy: Any = None
        self._clusters: Sequence[Cluster] = ()
        reg = self.registry
        self.api_requests = Counter(
            "gateway_api_requests",
            "API requests answered, by route pattern, method and status code.",
            ["route", "method", "code"],
            registry=reg,
        )
        self.api_latency = Histogram(
            "gateway_api_request_duration_seconds",
            "Time to answer an API request, by route pattern, method and status code.",
            ["route", "method", "code"],
            buckets=_API_BUCKETS,
            registry=reg,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures",
            "Requests refused for missing or wrong credentials (401), by kind of caller: "
            "user, cluster, proxy, metrics.",
            ["kind"],
            registry=reg,
        )
        self.driver_latency = Histogram(
            "gateway_driver_call_duration_seconds",
            "Time of calls to the backend's driver, by backend and operation.",
            ["backend", "operation"],
            buckets=_DRIVER_BUCKETS,
            registry=reg,
        )
        self.driver_failures = Counter(
            "gateway_driver_call_failures",
            "Calls to the backend's driver that raised, by backend and operation.",
            ["backend", "operation"],
            registry=reg,
        )
        reg.register(_StateCollector(self))

    # ---------------------------------------------------------------------------------------
    # What the gateway tells it

    def watch_backend(self, backend: Backend) -> None:
        """Read clusters (and, for process backends, the reconciler queue) from ``backend``."""
        self._backend = backend

    def watch_proxy(self, proxy: Any) -> None:
        """Read ``gateway_proxy_*`` from ``proxy`` when it is a `ProxyTraffic`; None stops."""
        self._proxy = proxy if isinstance(proxy, ProxyTraffic) else None

    # ---------------------------------------------------------------------------------------
    # Instrumentation points

    def observe_request(self, *, route: str, method: str, code: int, seconds: float) -> None:
        labels = (route, method, str(code))
        self.api_requests.labels(*labels).inc()
        self.api_latency.labels(*labels).observe(seconds)

    def auth_failure(self, kind: str) -> None:
        """Count a refused credential; ``kind`` is one of `AUTH_KINDS`."""
        if kind not in AUTH_KINDS:
            raise ValueError(f"unknown auth failure kind {kind!r}; one of {AUTH_KINDS}")
        self.auth_failures.labels(kind).inc()

    @contextlib.contextmanager
    def driver_call(self, operation: str) -> Iterator[None]:
        """Time the driver call inside the block; count it as failed if the block raises
        (cancellation is neither: a stop cancels start operations on purpose)."""
        labels = (self.backend_name or "unnamed", operation)
        start = time.perf_counter()
        try:
            yield
        except Exception:
            self.driver_failures.labels(*labels).inc()
            self.driver_latency.labels(*labels).observe(time.perf_counter() - start)
            raise
        self.driver_latency.labels(*labels).observe(time.perf_counter() - start)

    # ---------------------------------------------------------------------------------------
    # Scraping

    async def scrape(self) -> bytes:
        """The text exposition of every metric, reading the backend's clusters now."""
        clusters: Sequence[Cluster] = ()
        if self._backend is not None:
            clusters = await self._backend.list_clusters()
        self._clusters = clusters  # read by the collector in generate_latest, no await between
        try:
            return generate_latest(self.registry)
        finally:
            self._clusters = ()

    # Read by _StateCollector

    def _cluster_metrics(self) -> Iterator[Metric]:
        backend = self.backend_name or "unnamed"
        by_status = GaugeMetricFamily(
            "gateway_clusters",
            "Clusters known to the gateway (finished ones until purged), by backend and status.",
            labels=["backend", "status"],
        )
        counts = {status: 0 for status in ClusterStatus}
        workers = GaugeMetricFamily(
            "gateway_workers",
            "Active workers (pending, running, stopping) of active clusters, by user, worker "
            "group and status.",
            labels=["user", "group", "status"],
        )
        cores = GaugeMetricFamily(
            "gateway_cores_in_use",
            "CPU cores of the active schedulers and workers of each user.",
            labels=["user"],
        )
        memory = GaugeMetricFamily(
            "gateway_memory_in_use_bytes",
            "Memory of the active schedulers and workers of each user, in bytes.",
            labels=["user"],
        )
        per_worker: dict[tuple[str, str, str], int] = {}
        per_user: dict[str, list[float]] = {}
        for cluster in self._clusters:
            counts[cluster.status] += 1
            if not cluster.status.is_active:
                continue
            active = _active_per_group(cluster)
            for (group, status_name), count in active.items():
                key = (cluster.username, group, status_name)
                per_worker[key] = per_worker.get(key, 0) + count
            usage = per_user.setdefault(cluster.username, [0.0, 0.0])
            config = cluster.typed_config
            if config is not None:
                usage[0] += config.scheduler_cores
                usage[1] += config.scheduler_memory
                for group, count in _sum_by_group(active).items():
                    shape = _group_config(config, group)
                    usage[0] += count * shape.worker_cores
                    usage[1] += count * shape.worker_memory
        for status, count in counts.items():
            by_status.add_metric([backend, status.name.lower()], count)
        for (user, group, status_name), count in sorted(per_worker.items()):
            workers.add_metric([user, group, status_name], count)
        for user, (n_cores, n_bytes) in sorted(per_user.items()):
            cores.add_metric([user], n_cores)
            memory.add_metric([user], n_bytes)
        yield from (by_status, workers, cores, memory)

    def _queue_metrics(self) -> Iterator[Metric]:
        reconciler = getattr(self._backend, "reconciler", None)
        queue = getattr(reconciler, "queue", None)
        if queue is None:
            return
        yield GaugeMetricFamily(
            "gateway_reconciler_queue_depth",
            "Clusters and workers queued for the reconciler (ready or waiting for a retry).",
            value=len(queue),
        )
        yield GaugeMetricFamily(
            "gateway_reconciler_queue_lag_seconds",
            "How long the oldest ready item has waited for a reconciler task (0 when none).",
            value=queue.lag(),
        )

    def _proxy_metrics(self) -> Iterator[Metric]:
        proxy = self._proxy
        if proxy is None:
            return
        connections = CounterMetricFamily(
            "gateway_proxy_connections",
            "Client connections the proxy accepted, by face (http, tls_sni).",
            labels=["face"],
        )
        open_now = GaugeMetricFamily(
            "gateway_proxy_open_connections",
            "Client connections open now, by face.",
            labels=["face"],
        )
        sent = CounterMetricFamily(
            "gateway_proxy_bytes",
            "Bytes the proxy relayed, by face and direction (received from or sent to clients).",
            labels=["face", "direction"],
        )
        for face, counts in sorted(proxy.traffic().items()):
            if "connections" in counts:
                connections.add_metric([face], counts["connections"])
            if "open" in counts:
                open_now.add_metric([face], counts["open"])
            if "bytes_received" in counts:
                sent.add_metric([face, "received"], counts["bytes_received"])
            if "bytes_sent" in counts:
                sent.add_metric([face, "sent"], counts["bytes_sent"])
        yield from (connections, open_now, sent)


class _StateCollector(Collector):
    """The gauges read at scrape time (clusters, users' usage, queue, proxy)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # names are not known ahead (the proxy's may be absent); never clash

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics._cluster_metrics()
        yield from self.metrics._queue_metrics()
        yield from self.metrics._proxy_metrics()


_ACTIVE = ("pending", "running", "stopping")


def _active_per_group(cluster: Cluster) -> dict[tuple[str, str], int]:
    """(group, status) -> active workers of ``cluster``, from `Cluster.workers_per_group`
    (its worker records, or a backend's own counts where its `Cluster` class overrides that
    method, as the Kubernetes backend's from its resources' status); a backend that has
    neither counts what its scheduler wants of each group as running."""
    groups = cluster.workers_per_group()
    out = {
        (group, status): entry.get(status, 0)
        for group, entry in groups.items()
        for status in _ACTIVE
        if entry.get(status, 0)
    }
    own_counts = type(cluster).workers_per_group is not Cluster.workers_per_group
    if not out and not cluster.workers and not own_counts:
        running = WorkerStatus.RUNNING.name.lower()
        out = {(group, running): e["count"] for group, e in groups.items() if e.get("count")}
    return out


def _sum_by_group(active: dict[tuple[str, str], int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (group, _), count in active.items():
        out[group] = out.get(group, 0) + count
    return out


def _group_config(config: ClusterConfig, group: str) -> ClusterConfig:
    """The config a group's workers run with; the cluster's for a group it no longer has."""
    if group == DEFAULT_GROUP or group not in config.worker_groups:
        return config
    try:
        return config.for_group(group)
    except ConfigError:
        return config

"""The Prometheus metrics at ``/metrics``: exposition, gauges, request and failure counts, access.

Every scrape goes through the gateway's public address (the built-in proxy), as Prometheus's
would, and is parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_core.api.metrics import DISABLED
from gateway_core.config import ConfigError, load_config
from gateway_core.metrics import GatewayMetrics
from gateway_core.models import ClusterStatus, WorkerStatus

pytestmark = pytest.mark.unit

TOKEN = "s3cret-metrics-token"

FAST = {
    "backend": {
        "inprocess": {
            "heartbeat_period": 0.05,
            "cluster_status_period": 0.2,
            "worker_status_period": 0.2,
            "backoff_base_delay": 0.01,
        }
    },
    "cluster": {"worker_cores": 2, "worker_memory": "1 GiB", "scheduler_memory": "1 GiB"},
    "metrics": {"public": True},
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def parse(text: str) -> tuple[dict[str, Any], Samples]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples: Samples = {}
    for family in families.values():
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: Any, token: str | None = None) -> tuple[dict[str, Any], Samples]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    response = await client.get("/metrics", auth=False, headers=headers)
    assert response.status == 200, response.body
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(response.body)


async def test_the_gauges_show_a_created_and_scaled_cluster(
    make_gateway: Any, make_api_client: Any
) -> None:
    gw = await make_gateway(FAST)
    alice = make_api_client(gw, "alice")
    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    assert (await alice.get(f"/api/v1/clusters/{name}?wait")).body["status"] == "RUNNING"
    assert (await alice.post(f"/api/v1/clusters/{name}/scale", {"count": 3})).status == 200
    cluster = await gw.backend.get_cluster(name)
    await eventually(
        lambda: sum(w.status == WorkerStatus.RUNNING for w in cluster.workers.values()) == 3
    )

    # A worker may connect before its start call has returned and been timed: wait for the
    # third start_worker timing before reading the rest.
    count = "gateway_driver_call_duration_seconds_count"
    for _ in range(100):
        families, samples = await scrape(alice)
        if value(samples, count, backend="inprocess", operation="start_worker") == 3:
            break
        await asyncio.sleep(0.1)
    assert families["gateway_clusters"].type == "gauge"
    assert value(samples, "gateway_clusters", backend="inprocess", status="running") == 1
    assert value(samples, "gateway_clusters", backend="inprocess", status="pending") == 0
    assert value(samples, "gateway_workers", user="alice", group="default", status="running") == 3
    # One scheduler (1 core, 1 GiB) and three workers (2 cores, 1 GiB each).
    assert value(samples, "gateway_cores_in_use", user="alice") == 1 + 3 * 2
    assert value(samples, "gateway_memory_in_use_bytes", user="alice") == 4 * 2**30
    # The driver calls it took, timed by backend and operation.
    assert value(samples, count, backend="inprocess", operation="start_scheduler") == 1
    assert value(samples, count, backend="inprocess", operation="start_worker") == 3
    assert "gateway_reconciler_queue_depth" in families
    assert samples[("gateway_reconciler_queue_lag_seconds", frozenset())] >= 0

    assert (await alice.delete(f"/api/v1/clusters/{name}")).status == 204
    await eventually(lambda: cluster.status == ClusterStatus.STOPPED)
    _, samples = await scrape(alice)
    assert value(samples, "gateway_clusters", backend="inprocess", status="running") == 0
    assert value(samples, "gateway_clusters", backend="inprocess", status="stopped") == 1
    assert ("gateway_cores_in_use", frozenset({("user", "alice")})) not in samples
    assert value(samples, count, backend="inprocess", operation="stop_scheduler") == 1


async def test_driver_failures_are_counted_by_operation(
    make_gateway: Any, make_api_client: Any
) -> None:
    config = {**FAST, "backend": {"inprocess": {"scheduler_start_error": "partition full"}}}
    gw = await make_gateway(config)
    alice = make_api_client(gw, "alice")
    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    assert (await alice.get(f"/api/v1/clusters/{name}?wait")).body["status"] == "FAILED"
    _, samples = await scrape(alice)
    failures = "gateway_driver_call_failures_total"
    assert value(samples, failures, backend="inprocess", operation="start_scheduler") == 1
    assert value(samples, "gateway_clusters", backend="inprocess", status="failed") == 1


async def test_requests_are_counted_by_route_pattern_and_code(
    make_gateway: Any, make_api_client: Any
) -> None:
    gw = await make_gateway(FAST)
    alice = make_api_client(gw, "alice")
    assert (await alice.get("/api/v1/clusters/no-such-cluster")).status == 404
    assert (await alice.get("/api/v1/clusters/")).status == 200
    assert (await alice.get("/api/v1/no-such-route")).status == 404

    families, samples = await scrape(alice)
    requests = "gateway_api_requests_total"
    assert families["gateway_api_requests"].type == "counter"
    pattern = "/api/v1/clusters/{name}"
    assert value(samples, requests, route=pattern, method="GET", code="404") == 1
    assert value(samples, requests, route="/api/v1/clusters/", method="GET", code="200") == 1
    assert value(samples, requests, route="unmatched", method="GET", code="404") == 1
    latency = "gateway_api_request_duration_seconds_count"
    assert value(samples, latency, route=pattern, method="GET", code="404") == 1
    assert families["gateway_api_request_duration_seconds"].type == "histogram"


async def test_auth_failures_are_counted_by_kind(make_gateway: Any, make_api_client: Any) -> None:
    config = {**FAST, "auth": {"simple": {"password": "right"}}}
    gw = await make_gateway(config)
    wrong = make_api_client(gw, "alice", password="wrong")
    assert (await wrong.get("/api/v1/clusters/")).status == 401
    routes = await wrong.get("/api/v1/routes", auth=False, headers={"Authorization": "token x"})
    assert routes.status == 401
    right = make_api_client(gw, "alice", password="right")
    assert (await right.get("/api/v1/clusters/")).status == 200

    families, samples = await scrape(right)
    assert families["gateway_auth_failures"].type == "counter"
    assert value(samples, "gateway_auth_failures_total", kind="user") == 1
    assert value(samples, "gateway_auth_failures_total", kind="proxy") == 1


async def test_metrics_are_refused_until_enabled(make_gateway: Any, make_api_client: Any) -> None:
    gw = await make_gateway()
    client = make_api_client(gw, "alice")
    refused = await client.get("/metrics", auth=False)
    assert refused.status == 403
    assert refused.body == {"error": DISABLED}
    assert "[metrics] token" in DISABLED and "public = true" in DISABLED


async def test_the_token_is_required_and_checked(make_gateway: Any, make_api_client: Any) -> None:
    gw = await make_gateway({"metrics": {"token": TOKEN}})
    client = make_api_client(gw, "alice")
    missing = await client.get("/metrics", auth=False)
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in missing.body["error"]
    wrong = await client.get("/metrics", auth=False, headers={"Authorization": "Bearer nope"})
    assert (wrong.status, wrong.body) == (401, {"error": "invalid metrics token"})
    basic = await client.get("/metrics")  # a user's own credentials are not the token
    assert basic.status == 401
    _, samples = await scrape(client, TOKEN)
    assert value(samples, "gateway_auth_failures_total", kind="metrics") == 3


async def test_metrics_are_served_under_the_proxy_prefix(
    make_gateway: Any, make_api_client: Any
) -> None:
    gw = await make_gateway({**FAST, "proxy": {"prefix": "/gateway"}})
    client = make_api_client(gw, "alice")  # its address ends with the prefix
    families, _ = await scrape(client)
    assert "gateway_clusters" in families


async def test_proxy_connections_and_bytes_by_face(make_gateway: Any, make_api_client: Any) -> None:
    gw = await make_gateway(FAST)
    client = make_api_client(gw, "alice")
    assert (await client.get("/api/health", auth=False)).status == 200
    families, samples = await scrape(client)
    assert families["gateway_proxy_connections"].type == "counter"
    assert value(samples, "gateway_proxy_connections_total", face="http") >= 1
    assert value(samples, "gateway_proxy_open_connections", face="http") >= 1
    received = value(samples, "gateway_proxy_bytes_total", face="http", direction="received")
    sent = value(samples, "gateway_proxy_bytes_total", face="http", direction="sent")
    assert received > 0 and sent > 0
    assert ("gateway_proxy_connections_total", frozenset({("face", "tls_sni")})) in samples


async def test_two_gateways_in_one_process_keep_their_own_metrics(
    make_gateway: Any, make_api_client: Any
) -> None:
    first = await make_gateway(FAST)
    second = await make_gateway(FAST)
    assert first.context.metrics.registry is not second.context.metrics.registry
    one = make_api_client(first, "alice")
    two = make_api_client(second, "alice")
    name = (await one.post("/api/v1/clusters/", {})).body["name"]
    await one.get(f"/api/v1/clusters/{name}?wait")
    _, first_samples = await scrape(one)
    _, second_samples = await scrape(two)
    running = {"backend": "inprocess", "status": "running"}
    assert value(first_samples, "gateway_clusters", **running) == 1
    assert value(second_samples, "gateway_clusters", **running) == 0
    create = {"route": "/api/v1/clusters/", "method": "POST", "code": "201"}
    assert value(first_samples, "gateway_api_requests_total", **create) == 1
    assert value(second_samples, "gateway_api_requests_total", **create) == 0


async def test_no_label_holds_a_cluster_name(make_gateway: Any, make_api_client: Any) -> None:
    gw = await make_gateway(FAST)
    alice = make_api_client(gw, "alice")
    names = []
    for _ in range(2):
        name = (await alice.post("/api/v1/clusters/", {})).body["name"]
        await alice.get(f"/api/v1/clusters/{name}?wait")
        await alice.post(f"/api/v1/clusters/{name}/scale", {"count": 1})
        await alice.get(f"/api/v2/clusters/{name}/reason")
        names.append(name)
    cluster = await gw.backend.get_cluster(names[-1])
    await eventually(lambda: any(w.status.is_active for w in cluster.workers.values()))
    response = await alice.get("/metrics", auth=False)
    _, samples = parse(response.body)
    label_values = {v for _, labels in samples for _, v in labels}
    assert not any(name in v for name in names for v in label_values)
    assert "/api/v2/clusters/{name}/reason" in label_values


def test_a_fresh_registry_per_gateway_never_the_global_one() -> None:
    from prometheus_client import REGISTRY

    before = set(REGISTRY._names_to_collectors)
    metrics = GatewayMetrics()
    assert metrics.registry is not REGISTRY
    assert set(REGISTRY._names_to_collectors) == before
    GatewayMetrics()  # a second one registers the same names without clashing


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"token": "t", "public": True}, "metrics.public: true serves /metrics to anyone"),
        ({"token": "   "}, "metrics.token: is only blanks"),
        ({"public": "yes"}, "metrics.public"),
        ({"tokn": "t"}, "metrics"),
    ],
)
def test_bad_metrics_sections_are_named(section: dict[str, Any], needle: str) -> None:
    from gateway_core.configcheck import resolve_config
    from gateway_core.plugins import Registry, make_plugin_manager
    from gateway_core.testing import hooks

    with pytest.raises(ConfigError) as err:
        config = load_config({"metrics": section}, environ={})
        pm = make_plugin_manager(extra_plugins=[hooks])
        resolve_config(config, Registry.from_plugin_manager(pm))
    assert any(needle in p for p in err.value.problems), err.value.problems


def test_the_token_may_come_from_the_environment() -> None:
    config = load_config({}, environ={"GATEWAY_METRICS_TOKEN": TOKEN})
    assert config.metrics.token == TOKEN
    assert TOKEN not in repr(config.metrics)


def test_worker_counts_by_group_come_from_workers_per_group() -> None:
    """Records count by group and status; a Cluster class with counts of its own (the
    Kubernetes backend's) is taken at its word, pending included; one with neither has what
    its scheduler wants of each group counted as running."""
    from attrs import define

    from gateway_core.metrics import _active_per_group
    from gateway_core.models import Cluster, Worker

    records = Cluster(name="c", username="u", token="t", count=1, group_counts={"gpu": 2})
    for name, group, status in (
        ("c-1", "default", WorkerStatus.RUNNING),
        ("c-gpu-1", "gpu", WorkerStatus.RUNNING),
        ("c-gpu-2", "gpu", WorkerStatus.PENDING),
        ("c-2", "default", WorkerStatus.STOPPED),
    ):
        records.workers[name] = Worker(name=name, cluster_name="c", group=group, status=status)
    assert _active_per_group(records) == {
        ("default", "running"): 1,
        ("gpu", "running"): 1,
        ("gpu", "pending"): 1,
    }

    @define(kw_only=True)
    class Counted(Cluster):
        def workers_per_group(self) -> dict[str, dict[str, int]]:
            return {
                "default": {"count": 1, "pending": 1, "running": 0, "stopping": 0},
                "gpu": {"count": 2, "pending": 0, "running": 0, "stopping": 0},
            }

    counted = Counted(name="k", username="u", token="t", count=1, group_counts={"gpu": 2})
    assert _active_per_group(counted) == {("default", "pending"): 1}
    bare = Cluster(name="b", username="u", token="t", count=3, group_counts={"gpu": 2})
    assert _active_per_group(bare) == {("default", "running"): 3, ("gpu", "running"): 2}

"""The whole core assembled: plugin manager, config, API, proxy (when installed), reconciler.

A user's full flow over real HTTP against `Gateway` built from a TOML-shaped config, with the
in-process driver standing in for processes; plus start-up refusals of bad configurations.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway_core.app import Gateway
from gateway_core.config import ConfigError, load_config
from gateway_core.models import ClusterStatus, WorkerStatus

pytestmark = pytest.mark.unit

FAST = {
    "backend": {
        "inprocess": {
            "heartbeat_period": 0.05,
            "cluster_status_period": 0.2,
            "worker_status_period": 0.2,
            "backoff_base_delay": 0.01,
        }
    },
    "cluster": {"cluster_max_workers": 3},
    "options": {
        "worker_cores": {"type": "int", "default": 1, "min": 1, "max": 4, "label": "Worker Cores"}
    },
}


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_users_whole_flow_over_http(make_gateway: Any, make_api_client: Any) -> None:
    gw = await make_gateway(FAST)
    alice = make_api_client(gw, "alice")

    health = await alice.get("/api/health", auth=False)
    assert (health.status, health.body["status"]) == (200, "pass")

    form = await alice.get("/api/v1/options")
    assert form.body["cluster_options"][0]["field"] == "worker_cores"

    created = await alice.post("/api/v1/clusters/", {"cluster_options": {"worker_cores": 2}})
    assert created.status == 201
    name = created.body["name"]

    report = await alice.get(f"/api/v1/clusters/{name}?wait")
    assert report.status == 200
    assert report.body["status"] == "RUNNING"
    assert report.body["options"] == {"worker_cores": 2}
    assert report.body["tls_cert"].startswith("-----BEGIN CERTIFICATE-----")
    assert report.body["dashboard_route"] == f"/clusters/{name}/status"
    cluster = await gw.backend.get_cluster(name)
    assert cluster.config["worker_cores"] == 2  # the option reached its target

    # The routes the proxy serves for this cluster, read from the feed as a standalone proxy.
    feed = await alice.get(
        "/api/v1/routes", auth=False, headers={"Authorization": f"token {gw.proxy_token}"}
    )
    routes = {(r["kind"], r.get("sni") or r.get("path")) for r in feed.body["routes"]}
    assert ("SNI", name) in routes and ("PATH", f"/clusters/{name}") in routes

    # Asking for more than the limit is clamped, and said so.
    scaled = await alice.post(f"/api/v1/clusters/{name}/scale", {"count": 5})
    assert scaled.status == 200
    assert scaled.body["ok"] is False and "3" in scaled.body["msg"]
    await eventually(
        lambda: sum(w.status == WorkerStatus.RUNNING for w in cluster.workers.values()) == 3
    )

    listed = await alice.get("/api/v1/clusters/?status=running")
    assert list(listed.body) == [name]

    bob = make_api_client(gw, "bob")
    assert (await bob.get(f"/api/v1/clusters/{name}")).status == 403
    assert (await bob.get("/api/v1/clusters/")).body == {}

    assert (await alice.delete(f"/api/v1/clusters/{name}")).status == 204
    await eventually(lambda: cluster.status == ClusterStatus.STOPPED)
    stopped = await alice.get(f"/api/v1/clusters/{name}")
    assert stopped.body["status"] == "STOPPED"
    assert stopped.body["tls_key"] is None and stopped.body["stop_time"] is not None
    assert gw.context.routes.get("SNI", name) is None


async def test_a_failed_start_reports_its_reason(make_gateway: Any, make_api_client: Any) -> None:
    config = {"backend": {"inprocess": {"scheduler_start_error": "partition 'gpu' is full"}}}
    gw = await make_gateway(config)
    alice = make_api_client(gw, "alice")
    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    report = await alice.get(f"/api/v1/clusters/{name}?wait")
    assert report.body["status"] == "FAILED"
    reason = await alice.get(f"/api/v2/clusters/{name}/reason")
    assert "partition 'gpu' is full" in reason.body["reason"]


async def test_observer_plugins_see_cluster_events(make_gateway: Any, make_api_client: Any) -> None:
    from gateway_core import hookimpl

    seen: list[tuple[str, str]] = []

    class Audit:
        @hookimpl
        def gateway_cluster_event(self, event: Any) -> None:
            seen.append((event.kind, event.username))

    gw = await make_gateway(FAST, plugins=[Audit()])
    alice = make_api_client(gw, "alice")
    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    await alice.get(f"/api/v1/clusters/{name}?wait")
    await alice.delete(f"/api/v1/clusters/{name}")
    await eventually(lambda: ("stopped", "alice") in seen)
    assert ("created", "alice") in seen and ("running", "alice") in seen


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"gateway": {"backend": "nope"}}, "nope"),
        ({"gateway": {"authenticator": "nope"}}, "nope"),
        ({"cluster": {"worker_cores": "two"}}, "cluster.worker_cores: expected int, got str"),
        ({"backend": {"inprocess": {"parallelism": "x"}}}, "backend.inprocess.parallelism"),
        ({"gateway": {"db_url": "sqlite:////tmp/gw-no-key.sqlite"}}, "db_encrypt_keys"),
    ],
)
async def test_bad_configs_refuse_to_start_with_the_reason(
    config: dict[str, Any], needle: str
) -> None:
    from gateway_core.testing import hooks
    from gateway_core.testing.harness import TEST_DEFAULTS, merge

    with pytest.raises(Exception) as info:
        gw = Gateway.create(
            load_config(merge(TEST_DEFAULTS, config), environ={}), extra_plugins=[hooks]
        )
        await gw.start()
        await gw.stop()
    assert needle in str(info.value)
    if isinstance(info.value, ConfigError):
        assert all(": " in line for line in info.value.problems)


@pytest.mark.unit
def test_serve_event_loop_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """``[gateway] event_loop``: auto takes uvloop when installed, asyncio on request or when
    uvloop is missing; asking for a missing uvloop is a config error naming the key."""
    import sys

    import uvloop  # part of gateway-core[local], which the core tests install

    from gateway_core.app import loop_factory

    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is asyncio.new_event_loop
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    assert loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(ConfigError, match=r"gateway\.event_loop: uvloop is not installed"):
        loop_factory("uvloop")
    with pytest.raises(ConfigError, match=r"gateway\.event_loop: expected one of 'auto', "):
        load_config(data={"gateway": {"event_loop": "fast"}})


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_serve_runs_the_gateway_on_the_configured_loop(
    kind: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway_core import app

    seen: list[str] = []

    async def fake_run(config: Any) -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    monkeypatch.setattr(app, "run_until_stopped", fake_run)
    path = tmp_path / "gateway.toml"
    path.write_text(f'[gateway]\nevent_loop = "{kind}"\n')
    app.serve(str(path))
    assert len(seen) == 1 and seen[0].startswith(kind)

"""Integration tests of whole gateways on the YARN simulator, beyond the scenario suite: a
gateway killed with SIGKILL with two running applications resumes them; one skein status
listing per period, and one that fails once fails nothing; an unknown user's YARN diagnostics
reach the client.

Needs root (throwaway accounts; the simulator runs containers as them).
"""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import GatewayProcess, applications_of, free_port, yarn_test_config
from yarn_sim.server import YarnSimulator

from gateway_core.models import ClusterStatus
from gateway_core.testing.harness import merge
from gateway_core.testing.scenarios import eventually, running_workers

pytestmark = pytest.mark.integration


def test_a_gateway_killed_with_two_running_applications_resumes_them(
    yarn_sim: YarnSimulator,
    job_python: str,
    make_user: Callable[[], Any],
    gateway_process: Callable[[dict[str, Any]], GatewayProcess],
    tmp_path: Path,
) -> None:
    from gateway_client import BasicAuth, Gateway

    user = make_user().pw_name
    key = base64.b64encode(os.urandom(32)).decode()
    config = merge(
        yarn_test_config(yarn_sim, tmp_path / "yarn", python=job_python),
        {
            "gateway": {
                "db_url": f"sqlite:///{tmp_path / 'gateway.sqlite'}",
                "db_encrypt_keys": [key],
                "stop_clusters_on_shutdown": False,
            },
            "proxy": {"address": f"127.0.0.1:{free_port()}"},
        },
    )
    server = gateway_process(config)
    server.start()
    with Gateway(server.address, auth=BasicAuth(user)) as gateway:
        names = [str(gateway.submit()) for _ in range(2)]
        deadline = time.monotonic() + 90
        while {c.status.name for c in gateway.list_clusters()} != {"RUNNING"}:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
        first = gateway.connect(names[0])
        first.scale(1)
        client = first.get_client(set_as_default=False)
        client.wait_for_workers(1, timeout=90)
        client.close()
        first.close()
    apps = {name: applications_of(yarn_sim, name)[0].id for name in names}

    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    assert server.proc.wait(timeout=30) == -signal.SIGKILL
    assert all(yarn_sim.apps[a].state == "RUNNING" for a in apps.values())

    server.start()
    with Gateway(server.address, auth=BasicAuth(user)) as gateway:
        listed = {c.name: c.status.name for c in gateway.list_clusters()}
        assert listed == dict.fromkeys(names, "RUNNING"), server.log_tail()
        first = gateway.connect(names[0])
        first.scale(2)
        client = first.get_client(set_as_default=False)
        try:
            client.wait_for_workers(2, timeout=90)
            assert client.submit(sum, range(10)).result(timeout=60) == 45
        finally:
            client.close()
        for name in names:
            gateway.stop_cluster(name)
    deadline = time.monotonic() + 30
    while any(yarn_sim.apps[a].active for a in apps.values()):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.2)
    assert {yarn_sim.apps[a].final_status for a in apps.values()} == {"SUCCEEDED"}
    # The first application kept its containers: the worker from before was adopted.
    assert len(yarn_sim.apps[apps[names[0]]].containers) == 2, server.log_tail()


async def test_one_listing_per_status_period_and_a_failing_one_fails_nothing(
    yarn_sim: YarnSimulator,
    job_python: str,
    make_user: Callable[[], Any],
    make_gateway: Any,
    make_api_client: Any,
    tmp_path: Path,
) -> None:
    user = make_user().pw_name
    gateway = await make_gateway(yarn_test_config(yarn_sim, tmp_path / "yarn", python=job_python))
    api = make_api_client(gateway, user)
    names = [
        (await api.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
        for _ in range(2)
    ]
    clusters = [gateway.backend.store.get(n) for n in names]
    await eventually(
        lambda: all(c.status == ClusterStatus.RUNNING for c in clusters), what="both running"
    )
    await api.post(f"/api/v1/clusters/{names[0]}/scale", json={"count": 1})
    await eventually(lambda: len(running_workers(clusters[0])) == 1, what="a running worker")

    before = yarn_sim.calls["getApplications"]
    await asyncio_sleep(5.5)
    listings = yarn_sim.calls["getApplications"] - before
    assert 4 <= listings <= 7, listings  # 1 s period: one listing for both clusters

    [worker] = running_workers(clusters[0])
    yarn_sim.failures["getApplications"] = 1
    await eventually(lambda: not yarn_sim.failures["getApplications"], what="the failure")
    await asyncio_sleep(3)
    assert [c.status for c in clusters] == [ClusterStatus.RUNNING] * 2
    assert running_workers(clusters[0]) == [worker]
    for name in names:
        assert (await api.delete(f"/api/v1/clusters/{name}")).status == 204


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


async def test_an_unknown_users_yarn_diagnostics_reach_the_user(
    yarn_sim: YarnSimulator,
    job_python: str,
    make_gateway: Any,
    make_api_client: Any,
    tmp_path: Path,
) -> None:
    gateway = await make_gateway(yarn_test_config(yarn_sim, tmp_path / "yarn", python=job_python))
    api = make_api_client(gateway, "nosuchuser7")
    name = (await api.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
    cluster = gateway.backend.store.get(name)
    await eventually(lambda: cluster.status == ClusterStatus.FAILED, what="the cluster failed")
    shown = await api.get(f"/api/v2/clusters/{name}/reason")
    assert "User nosuchuser7 not found" in shown.body["reason"], shown.body
    assert "exited with exitCode: -1000" in shown.body["reason"]

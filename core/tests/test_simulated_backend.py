"""The ``simulated`` test backend (`gateway_core.testing.simulated`) of the scale benchmark.

It starts no process; its starts are announced in a spool file; a heartbeat sent with the
cluster's token makes the cluster RUNNING and a heartbeat listing workers makes them RUNNING.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from gateway_core.models import ClusterStatus, WorkerStatus

pytestmark = pytest.mark.unit


def spooled(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_starts_nothing_and_a_heartbeat_makes_it_running(
    make_gateway: Any, make_api_client: Any, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.jsonl"
    gw = await make_gateway(
        {
            "gateway": {"backend": "simulated"},
            "backend": {"simulated": {"spool": str(spool), "backoff_base_delay": 0.01}},
        }
    )
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    threads_before = threading.active_count()
    alice = make_api_client(gw, "alice")

    created = await alice.post("/api/v1/clusters/", {"cluster_options": {}})
    assert created.status == 201
    name = created.body["name"]
    await eventually(lambda: any(r.get("cluster") == name for r in spooled(spool)))
    (start,) = spooled(spool)
    assert start["cluster"] == name and start["token"]
    report = await alice.get(f"/api/v1/clusters/{name}")
    assert report.body["status"] == "PENDING"  # started, but no heartbeat yet

    url = f"{gw.api_url}/v1/clusters/{name}/heartbeat"
    beat = {
        "scheduler_address": "tls://127.0.0.1:1",
        "dashboard_address": "",
        "api_address": "http://127.0.0.1:2",
        "count": 2,
        "active_workers": [],
        "closing_workers": [],
        "closed_workers": [],
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=beat, headers={"Authorization": "token wrong"}) as resp:
            assert resp.status in (401, 403)
        token = {"Authorization": f"token {start['token']}"}
        async with http.post(url, json=beat, headers=token) as resp:
            assert resp.status == 200
        report = await alice.get(f"/api/v1/clusters/{name}?wait")
        assert report.body["status"] == "RUNNING"

        # The count asked for two workers: each announced in the spool, then reported active.
        await eventually(lambda: len([r for r in spooled(spool) if "worker" in r]) == 2)
        workers = [r["worker"] for r in spooled(spool) if "worker" in r]
        async with http.post(url, json={**beat, "active_workers": workers}, headers=token) as resp:
            assert resp.status == 200
    cluster = gw.backend.store.get(name)
    assert cluster.status == ClusterStatus.RUNNING
    assert {w.name: w.status for w in cluster.workers.values()} == dict.fromkeys(
        workers, WorkerStatus.RUNNING
    )
    driver = gw.backend.driver
    assert driver.calls["start_scheduler"] == 1 and driver.calls["start_worker"] == 2
    # Nothing was started: no child process, no thread beyond the store's writer.
    assert {p.pid for p in me.children(recursive=True)} == children_before
    assert threading.active_count() <= threads_before + 1

    await alice.delete(f"/api/v1/clusters/{name}")
    await eventually(lambda: cluster.status == ClusterStatus.STOPPED)
    assert driver.calls["stop_scheduler"] == 1 and driver.calls["stop_worker"] == 2

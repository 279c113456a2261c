"""End-to-end tests: a whole gateway (the `make_gateway` fixture of `gateway_core.testing`) with
the command-template backend, launching real processes.

The scheduler and workers are core's fake scheduler (`gateway_core.testing.fake_scheduler`) run
as processes: it speaks the gateway's scheduler protocol (heartbeats, scale) without Dask.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway_core.backends.kit import read_stat
from gateway_core.models import Cluster, ClusterStatus, WorkerStatus

pytestmark = pytest.mark.integration

FAKE = [sys.executable, "-m", "gateway_core.testing.fake_scheduler"]


def is_alive(pid: int) -> bool:
    """Is ``pid`` running (not exited, not a zombie)?"""
    st = read_stat(pid)
    return st is not None and st.running


def gateway_config(tmp_path: Path, **gateway: Any) -> dict[str, Any]:
    return {
        "gateway": {"backend": "command-template", **gateway},
        "backend": {
            "command-template": {
                "clusters_directory": str(tmp_path / "clusters"),
                "worker_template": [
                    "{cmd}",
                    "worker",
                    "--name",
                    "{worker_name}",
                    "--scheduler-api",
                    "{api_address}",
                ],
                "stop_timeout": 2.0,
                "cluster_heartbeat_period": 1,
                "cluster_status_period": 0.5,
                "worker_status_period": 0.5,
            }
        },
        "cluster": {
            "scheduler_cmd": [*FAKE, "--heartbeat-period", "0.2"],
            "worker_cmd": FAKE,
        },
    }


async def eventually(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def stored(gateway: Any, name: str) -> Cluster:
    cluster: Cluster | None = gateway.backend.store.get(name)
    assert cluster is not None
    return cluster


def running_worker_pids(cluster: Cluster) -> list[int]:
    return [
        w.state["pid"]
        for w in cluster.workers.values()
        if w.status == WorkerStatus.RUNNING and "pid" in w.state
    ]


async def test_a_cluster_runs_scales_and_stops_as_real_processes(
    make_gateway: Any, make_api_client: Any, tmp_path: Path
) -> None:
    gateway = await make_gateway(gateway_config(tmp_path))
    alice = make_api_client(gateway, "alice")

    created = await alice.post("/api/v1/clusters/", json={"cluster_options": {}})
    assert created.status == 201, created.body
    name = created.body["name"]
    cluster = await alice.get(f"/api/v1/clusters/{name}?wait")
    assert cluster.body["status"] == "RUNNING", cluster.body

    record = stored(gateway, name)
    scheduler_pid = record.state["pid"]
    directory = Path(record.state["directory"])
    assert is_alive(scheduler_pid)
    assert (directory / "dask.pem").read_bytes() == record.tls_key

    scaled = await alice.post(f"/api/v1/clusters/{name}/scale", json={"count": 2})
    assert scaled.status == 200, scaled.body
    await eventually(lambda: len(running_worker_pids(stored(gateway, name))) == 2)
    worker_pids = running_worker_pids(stored(gateway, name))
    assert all(is_alive(pid) for pid in worker_pids)
    for worker in stored(gateway, name).workers.values():
        assert (directory / f"worker-{worker.name}.log").exists()

    deleted = await alice.delete(f"/api/v1/clusters/{name}")
    assert deleted.status == 204
    await eventually(lambda: stored(gateway, name).status == ClusterStatus.STOPPED)
    for pid in [scheduler_pid, *worker_pids]:
        assert not is_alive(pid)
    await eventually(lambda: not directory.exists())


async def test_a_scheduler_killed_outside_the_gateway_fails_its_cluster(
    make_gateway: Any, make_api_client: Any, tmp_path: Path
) -> None:
    gateway = await make_gateway(gateway_config(tmp_path))
    bob = make_api_client(gateway, "bob")
    name = (await bob.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
    assert (await bob.get(f"/api/v1/clusters/{name}?wait")).body["status"] == "RUNNING"

    os.killpg(stored(gateway, name).state["pid"], 9)
    await eventually(lambda: stored(gateway, name).status == ClusterStatus.FAILED)
    shown = await bob.get("/api/v1/clusters/?status=FAILED")
    assert name in shown.body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_clusters_survive_a_gateway_restart(
    make_gateway: Any, make_api_client: Any, tmp_path: Path
) -> None:
    """With a persistent store and ``stop_clusters_on_shutdown = false``, a restarted gateway
    takes its clusters back from the driver's stored state and can still stop them."""
    port = free_port()
    key = base64.b64encode(os.urandom(32)).decode()
    config = gateway_config(
        tmp_path,
        db_url=f"sqlite:///{tmp_path / 'gateway.sqlite'}",
        db_encrypt_keys=[key],
        stop_clusters_on_shutdown=False,
    )
    config["proxy"] = {"address": f"127.0.0.1:{port}"}

    first = await make_gateway(config)
    alice = make_api_client(first, "alice")
    name = (await alice.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
    assert (await alice.get(f"/api/v1/clusters/{name}?wait")).body["status"] == "RUNNING"
    scheduler_pid = stored(first, name).state["pid"]
    await first.stop()
    assert is_alive(scheduler_pid), "the scheduler outlives the gateway"

    second = await make_gateway(config)
    alice = make_api_client(second, "alice")
    shown = await alice.get(f"/api/v1/clusters/{name}")
    assert shown.body["status"] == "RUNNING"
    before = stored(second, name).last_heartbeat
    await eventually(lambda: stored(second, name).last_heartbeat != before)

    assert (await alice.delete(f"/api/v1/clusters/{name}")).status == 204
    await eventually(lambda: stored(second, name).status == ClusterStatus.STOPPED)
    assert not is_alive(scheduler_pid)

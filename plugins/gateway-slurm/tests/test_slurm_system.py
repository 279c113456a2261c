"""System tests: real Dask clusters on a real Slurm, through the gateway, its proxy and the
user-facing client, for throwaway users.

Needs root (accounts are created, the gateway switches to them) and Slurm (started by
ci/start-slurm.sh when ``sinfo`` does not answer). Each test uses short status periods (1 s).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import slurm_config

from gateway_core.models import Cluster, ClusterStatus, WorkerStatus

DETECTED_WITHIN = 1.0 + 12.0
"""Status period plus slack: far below cluster_heartbeat_timeout (30 s in slurm_config)."""

pytestmark = [pytest.mark.system, pytest.mark.usefixtures("job_python")]


async def eventually(
    predicate: Callable[[], bool], *, timeout: float = 60, what: str = "condition"
) -> float:
    """Wait for ``predicate``; the seconds it took."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
    return time.monotonic() - began


def squeue(*args: str) -> list[list[str]]:
    out = subprocess.run(
        ["squeue", "-h", "--states=all", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    return [line.split() for line in out.stdout.splitlines() if line.strip()]


def job_of(job_id: str) -> tuple[str, str] | None:
    """(user, state) of a Slurm job, or None once Slurm forgot it."""
    rows = squeue(f"--jobs={job_id}", "-o", "%u %t")
    return (rows[0][0], rows[0][1]) if rows else None


def scancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], check=True, capture_output=True)


def client_for(gw: Any, username: str) -> Any:
    from gateway_client import BasicAuth, Gateway

    return Gateway(f"http://{gw.public_address}", auth=BasicAuth(username))


@pytest.mark.parametrize("switch_user", ["setuid", "sudo"])
async def test_a_dask_cluster_runs_as_the_requesting_user_and_computes_through_the_proxy(
    make_gateway: Any, make_user: Callable[[], pwd.struct_passwd], switch_user: str
) -> None:
    user = make_user()
    gw = await make_gateway(slurm_config(backend={"switch_user": switch_user}))
    driver = gw.backend.driver
    seen: dict[str, Any] = {}

    def user_flow() -> None:
        with client_for(gw, user.pw_name) as gateway:
            cluster = gateway.new_cluster()
            seen["name"] = cluster.name
            cluster.scale(2)
            client = cluster.get_client(set_as_default=False)
            try:
                client.wait_for_workers(2, timeout=90)
                seen["sum"] = client.submit(sum, range(100)).result(timeout=60)
                seen["scheduler_uid"] = client.run_on_scheduler(os.getuid)
                seen["worker_uids"] = sorted(client.run(os.getuid).values())
                seen["task_uid"] = client.submit(os.getuid, pure=False).result(timeout=60)
                seen["cwd"] = client.run_on_scheduler(os.getcwd)
                record = gw.backend.store.get(cluster.name)
                seen["jobs"] = [record.state["job_id"]] + [
                    w.state["job_id"] for w in record.workers.values() if w.status.is_active
                ]
                seen["staging"] = Path(record.state["staging_dir"])
                staging: Path = seen["staging"]
                seen["modes"] = {
                    p.name: (stat.S_IMODE(p.stat().st_mode), p.stat().st_uid)
                    for p in [staging, *staging.iterdir()]
                }
                seen["queue"] = {j: job_of(j) for j in seen["jobs"]}
            finally:
                client.close()
                cluster.shutdown()

    await asyncio.to_thread(user_flow)

    assert seen["sum"] == 4950
    # Every process of the cluster, scheduler and workers, is the user's.
    assert seen["scheduler_uid"] == user.pw_uid
    assert seen["worker_uids"] == [user.pw_uid, user.pw_uid]
    assert seen["task_uid"] == user.pw_uid
    assert len(seen["jobs"]) == 3
    assert all(seen["queue"][j] == (user.pw_name, "R") for j in seen["jobs"]), seen["queue"]
    # The staging directory: the user's, private, with the TLS files and the jobs' output.
    staging = seen["staging"]
    assert staging.parent == Path(user.pw_dir) / ".dask-gateway"
    assert seen["cwd"] == str(staging)
    modes = seen["modes"]
    assert modes[staging.name] == (0o700, user.pw_uid)
    assert modes["dask.crt"] == (0o600, user.pw_uid)
    assert modes["dask.pem"] == (0o600, user.pw_uid)
    assert f"dask-scheduler-{seen['name']}.log" in modes
    # Stopped: jobs cancelled, staging directory gone.
    cluster = gw.backend.store.get(seen["name"])
    await eventually(lambda: cluster.status == ClusterStatus.STOPPED, what="the cluster stopped")
    assert not staging.exists()
    await eventually(
        lambda: all(job_of(j) in (None,) or job_of(j)[1] in ("CA", "CD") for j in seen["jobs"]),
        timeout=30,
        what="the jobs ended",
    )
    assert driver.status_calls > 0


async def test_a_submit_slurm_refuses_fails_the_cluster_with_sbatchs_error(
    make_gateway: Any, make_user: Callable[[], pwd.struct_passwd]
) -> None:
    from gateway_client import GatewayClusterError

    user = make_user()
    gw = await make_gateway(slurm_config(cluster={"partition": "no-such-partition"}))

    def user_flow() -> str:
        with client_for(gw, user.pw_name) as gateway:
            with pytest.raises(GatewayClusterError) as info:
                gateway.new_cluster()
            return str(info.value)

    message = await asyncio.to_thread(user_flow)
    assert "sbatch failed (exit 1)" in message
    assert "invalid partition specified: no-such-partition" in message.lower()
    [cluster] = await gw.backend.list_clusters()
    assert cluster.status == ClusterStatus.FAILED
    assert "job_id" not in cluster.state
    assert not await asyncio.to_thread(Path(cluster.state["staging_dir"]).exists)


async def test_a_scheduler_that_dies_fails_the_cluster_with_the_end_of_its_output(
    make_gateway: Any, make_user: Callable[[], pwd.struct_passwd]
) -> None:
    from gateway_client import GatewayClusterError

    user = make_user()
    setup = 'echo "loading the environment"; echo "no such environment: /opt/nowhere" >&2; exit 3'
    gw = await make_gateway(slurm_config(cluster={"scheduler_setup": setup}))

    def user_flow() -> str:
        with client_for(gw, user.pw_name) as gateway:
            with pytest.raises(GatewayClusterError) as info:
                gateway.new_cluster()
            return str(info.value)

    message = await asyncio.to_thread(user_flow)
    assert "Slurm job" in message and "(state F: failed)" in message
    assert "loading the environment\nno such environment: /opt/nowhere" in message


async def test_jobs_cancelled_behind_the_gateways_back_are_detected_within_the_period(
    make_gateway: Any, make_user: Callable[[], pwd.struct_passwd], make_api_client: Any
) -> None:
    user = make_user()
    gw = await make_gateway(slurm_config())
    api = make_api_client(gw, user.pw_name)
    name = (await api.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
    cluster: Cluster = gw.backend.store.get(name)
    await eventually(lambda: cluster.status == ClusterStatus.RUNNING, what="the cluster running")
    assert (await api.post(f"/api/v1/clusters/{name}/scale", json={"count": 1})).status == 200

    def running_workers() -> list[Any]:
        return [w for w in cluster.workers.values() if w.status == WorkerStatus.RUNNING]

    await eventually(lambda: len(running_workers()) == 1, what="a running worker")
    [first] = running_workers()
    scancel(first.state["job_id"])
    # The worker is replaced by a new job; the cluster keeps running.
    took = await eventually(
        lambda: first.status == WorkerStatus.FAILED or first.status == WorkerStatus.STOPPED,
        timeout=10,
        what="the cancelled worker noticed",
    )
    # Well under the 30 s heartbeat timeout, so it was the 1 s status check that noticed; the
    # slack covers Slurm's own cancellation on a busy 2-core machine (6 s seen under load).
    assert took < DETECTED_WITHIN
    await eventually(
        lambda: len(running_workers()) == 1 and running_workers()[0] is not first,
        what="a replacement worker",
    )
    assert running_workers()[0].state["job_id"] != first.state["job_id"]
    assert cluster.status == ClusterStatus.RUNNING

    scancel(cluster.state["job_id"])
    took = await eventually(
        lambda: cluster.status == ClusterStatus.FAILED, timeout=10, what="the cluster failed"
    )
    assert took < DETECTED_WITHIN
    assert f"The scheduler's Slurm job {cluster.state['job_id']} ended" in cluster.reason
    assert "CA: cancelled" in cluster.reason
    reason = (await api.get(f"/api/v2/clusters/{name}/reason")).body["reason"]
    assert reason == cluster.reason


async def test_a_status_command_failing_once_fails_nothing(
    make_gateway: Any,
    make_user: Callable[[], pwd.struct_passwd],
    make_api_client: Any,
    tmp_path: Path,
) -> None:
    user = make_user()
    flag = tmp_path / "failed-once"
    flaky = tmp_path / "flaky-squeue"
    flaky.write_text(
        "#!/bin/sh\n"
        f"if [ -e {flag} ] && [ ! -e {flag}.done ]; then\n"
        f"  touch {flag}.done\n"
        '  echo "squeue: error: slurm_load_jobs error: Socket timed out" >&2\n'
        "  exit 1\n"
        "fi\n"
        'exec squeue "$@"\n'
    )
    flaky.chmod(0o755)
    gw = await make_gateway(slurm_config(backend={"status_command": str(flaky)}))
    driver = gw.backend.driver
    api = make_api_client(gw, user.pw_name)
    name = (await api.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
    cluster: Cluster = gw.backend.store.get(name)
    await eventually(lambda: cluster.status == ClusterStatus.RUNNING, what="the cluster running")
    before = driver.status_calls
    flag.touch()
    await eventually(lambda: Path(f"{flag}.done").exists(), timeout=10, what="the failure")
    await eventually(lambda: driver.status_calls >= before + 3, timeout=10, what="more checks")
    assert cluster.status == ClusterStatus.RUNNING
    assert (await api.delete(f"/api/v1/clusters/{name}")).status == 204
    await eventually(lambda: cluster.status == ClusterStatus.STOPPED, what="the cluster stopped")


async def test_a_user_without_an_account_fails_before_anything_is_submitted(
    make_gateway: Any, make_api_client: Any, slurm: None
) -> None:
    gw = await make_gateway(slurm_config())
    nobody = f"nosuchuser{secrets.token_hex(3)}"
    api = make_api_client(gw, nobody)
    name = (await api.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
    cluster: Cluster = gw.backend.store.get(name)
    await eventually(lambda: cluster.status == ClusterStatus.FAILED, what="the cluster failed")
    assert f"User {nobody!r} has no account on the gateway's host" in cluster.reason
    assert "nothing was submitted" in cluster.reason
    assert cluster.state == {}
    assert squeue(f"--name=dask-scheduler-{name}", "-o", "%i") == []

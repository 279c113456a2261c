"""Integration tests: real Dask clusters through the gateway, its proxy and the user-facing
client, as PBS jobs of throwaway users on the PBS simulator (tests/pbs_sim).

Needs root (accounts are created, the gateway switches to them). Status periods are 1 s.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import jobs_of, pbs_config
from pbs_sim.install import SimulatedPBS

from gateway_core.models import Cluster, ClusterStatus, WorkerStatus

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("job_python")]


async def eventually(
    predicate: Callable[[], bool], *, timeout: float = 60, what: str = "condition"
) -> float:
    """Wait for ``predicate``; the seconds it took."""
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
    return time.monotonic() - began


def client_for(gw: Any, username: str) -> Any:
    from gateway_client import BasicAuth, Gateway

    return Gateway(f"http://{gw.public_address}", auth=BasicAuth(username))


def qstat_state(sim: SimulatedPBS, job_id: str) -> str:
    out = subprocess.run(
        [sim.program("qstat"), "-x", job_id], capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()[2].split()[4]


def qdel(sim: SimulatedPBS, job_id: str) -> None:
    """Delete a job behind the gateway's back (as root, like an operator)."""
    subprocess.run([sim.program("qdel"), job_id], capture_output=True, check=True)


@pytest.mark.parametrize(("switch_user", "use_stagein"), [("setuid", True), ("sudo", False)])
async def test_a_dask_cluster_runs_as_pbs_jobs_of_the_user_and_computes_through_the_proxy(
    make_gateway: Any,
    make_user: Callable[[], pwd.struct_passwd],
    pbs: SimulatedPBS,
    switch_user: str,
    use_stagein: bool,
) -> None:
    user = make_user()
    gw = await make_gateway(
        pbs_config(
            backend={"switch_user": switch_user},
            cluster={"use_stagein": use_stagein, "queue": "debug", "project": "p42"},
        )
    )
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
                seen["cwd"] = client.run_on_scheduler(os.getcwd)
                seen["pbs_jobid"] = client.run_on_scheduler(lambda: os.environ["PBS_JOBID"])
                record = gw.backend.store.get(cluster.name)
                seen["jobs"] = [record.state["job_id"]] + [
                    w.state["job_id"] for w in record.workers.values() if w.status.is_active
                ]
                seen["staging"] = Path(record.state["staging_dir"])
                seen["states"] = {j: qstat_state(pbs, j) for j in seen["jobs"]}
            finally:
                client.close()
                cluster.shutdown()

    await asyncio.to_thread(user_flow)

    assert seen["sum"] == 4950
    assert seen["scheduler_uid"] == user.pw_uid
    assert seen["worker_uids"] == [user.pw_uid, user.pw_uid]
    assert len(seen["jobs"]) == 3
    assert set(seen["states"].values()) == {"R"}, seen["states"]
    assert seen["pbs_jobid"] == seen["jobs"][0]
    staging: Path = seen["staging"]
    if use_stagein:
        # The scheduler runs in its private sandbox, where the TLS files were staged in.
        assert seen["cwd"] == f"{user.pw_dir}/pbs.{seen['jobs'][0]}.x8z"
    else:
        assert seen["cwd"] == user.pw_dir  # PBS starts jobs in the home directory
    records = {j["id"]: j for j in jobs_of(pbs, user.pw_name)}
    scheduler = records[seen["jobs"][0]]
    assert scheduler["name"] == f"dask-scheduler-{seen['name']}"
    assert (scheduler["queue"], scheduler["project"]) == ("debug", "p42")
    assert scheduler["resources"]["mem"] == "1024mb"
    cluster: Cluster = gw.backend.store.get(seen["name"])
    await eventually(lambda: cluster.status == ClusterStatus.STOPPED, what="the cluster stopped")
    assert not await asyncio.to_thread(staging.exists)
    await eventually(
        lambda: all(qstat_state(pbs, j) == "F" for j in seen["jobs"]),
        timeout=30,
        what="the jobs finished",
    )


async def test_an_unknown_queue_fails_the_cluster_with_qsubs_error(
    make_gateway: Any, make_user: Callable[[], pwd.struct_passwd], pbs: SimulatedPBS
) -> None:
    from gateway_client import GatewayClusterError

    user = make_user()
    gw = await make_gateway(pbs_config(cluster={"queue": "no-such-queue"}))

    def user_flow() -> str:
        with client_for(gw, user.pw_name) as gateway:
            with pytest.raises(GatewayClusterError) as info:
                gateway.new_cluster()
            return str(info.value)

    message = await asyncio.to_thread(user_flow)
    assert "qsub failed (exit 170): qsub: Unknown queue" in message
    [cluster] = await gw.backend.list_clusters()
    assert cluster.status == ClusterStatus.FAILED
    assert "job_id" not in cluster.state
    assert not await asyncio.to_thread(Path(cluster.state["staging_dir"]).exists)
    assert jobs_of(pbs, user.pw_name) == []


async def test_a_scheduler_that_dies_fails_the_cluster_with_the_end_of_its_output(
    make_gateway: Any, make_user: Callable[[], pwd.struct_passwd], pbs: SimulatedPBS
) -> None:
    from gateway_client import GatewayClusterError

    user = make_user()
    setup = 'echo "loading the environment"; echo "no such environment: /opt/nowhere" >&2; exit 3'
    gw = await make_gateway(pbs_config(cluster={"scheduler_setup": setup}))

    def user_flow() -> str:
        with client_for(gw, user.pw_name) as gateway:
            with pytest.raises(GatewayClusterError) as info:
                gateway.new_cluster()
            return str(info.value)

    message = await asyncio.to_thread(user_flow)
    assert "The scheduler's PBS job" in message
    assert "F: finished" in message or "E: exiting" in message
    assert "loading the environment\nno such environment: /opt/nowhere" in message


async def test_jobs_qdeled_behind_the_gateways_back_are_detected_with_one_qstat_per_check(
    make_user: Callable[[], pwd.struct_passwd],
    make_gateway: Any,
    make_api_client: Any,
    pbs: SimulatedPBS,
    tmp_path: Path,
) -> None:
    user = make_user()
    calls = tmp_path / "qstat-calls"
    counting = tmp_path / "qstat"
    counting.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {pbs.program("qstat")} "$@"\n')
    counting.chmod(0o755)
    gw = await make_gateway(pbs_config(backend={"status_command": str(counting)}))
    api = make_api_client(gw, user.pw_name)
    name = (await api.post("/api/v1/clusters/", json={"cluster_options": {}})).body["name"]
    cluster: Cluster = gw.backend.store.get(name)
    await eventually(lambda: cluster.status == ClusterStatus.RUNNING, what="the cluster running")
    assert (await api.post(f"/api/v1/clusters/{name}/scale", json={"count": 2})).status == 200

    def running_workers() -> list[Any]:
        return [w for w in cluster.workers.values() if w.status == WorkerStatus.RUNNING]

    await eventually(lambda: len(running_workers()) == 2, what="two running workers")

    # Each check asks one qstat for all its jobs: the worker check of a period one call for
    # both workers, the cluster check one for the scheduler (the two checks have their own
    # timers; questions asked together are merged into one call).
    before = calls.read_text().splitlines() if calls.exists() else []
    await asyncio.sleep(5.5)
    during = [line.split() for line in calls.read_text().splitlines()[len(before) :]]
    scheduler_job = cluster.state["job_id"]
    worker_jobs = {w.state["job_id"] for w in running_workers()}
    assert all(argv[0] == "-x" for argv in during), during
    with_workers = [argv for argv in during if worker_jobs & set(argv)]
    with_scheduler = [argv for argv in during if scheduler_job in argv]
    assert all(worker_jobs <= set(argv) for argv in with_workers), during
    assert 4 <= len(with_workers) <= 7, during
    assert 4 <= len(with_scheduler) <= 7, during
    assert len(during) <= 2 * 7, during

    first = running_workers()[0]
    await asyncio.to_thread(qdel, pbs, first.state["job_id"])
    took = await eventually(
        lambda: first.status in (WorkerStatus.FAILED, WorkerStatus.STOPPED),
        timeout=10,
        what="the deleted worker noticed",
    )
    assert took < 1.0 + 3.0
    await eventually(
        lambda: len(running_workers()) == 2 and first not in running_workers(),
        what="a replacement worker",
    )
    assert cluster.status == ClusterStatus.RUNNING

    await asyncio.to_thread(qdel, pbs, cluster.state["job_id"])
    took = await eventually(
        lambda: cluster.status == ClusterStatus.FAILED, timeout=10, what="the cluster failed"
    )
    assert took < 1.0 + 3.0
    assert f"The scheduler's PBS job {cluster.state['job_id']} ended" in cluster.reason
    assert "F: finished" in cluster.reason
    await eventually(
        lambda: all(j["state"] == "F" for j in jobs_of(pbs, user.pw_name)),
        timeout=30,
        what="every job finished",
    )

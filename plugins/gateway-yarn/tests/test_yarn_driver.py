"""Tests of the YARN driver: the application it submits and its config checks (unit), and its
six operations against the YARN simulator through the real skein client (integration): the
status listing, workers as containers, failure reasons, resuming from stored state.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
import skein
from yarn_sim.server import YarnSimulator

from gateway_core.config import ConfigError
from gateway_core.models import Worker
from gateway_core.testing.units import unit_cluster, unit_driver
from gateway_yarn.backend import YarnDriver, mebibytes
from gateway_yarn.hooks import gateway_register_backends

SPEC = gateway_register_backends()[0]
SLEEPING = ["/bin/sh", "-c", "sleep 600", "sh"]
"""A scheduler/worker command that just runs (the Dask arguments become $1...)."""


def sim_settings(sim: YarnSimulator, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cert, key = tmp_path / "skein.crt", tmp_path / "skein.pem"
    cert.write_bytes(sim.security._get_bytes("cert"))
    key.write_bytes(sim.security._get_bytes("key"))
    return {
        "driver_address": sim.address,
        "driver_certificate": str(cert),
        "driver_key": str(key),
        "files_directory": str(tmp_path / "files"),
        "backoff_base_delay": 0.05,
        **extra,
    }


async def wait_for(predicate: Any, *, timeout: float = 20.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def start(driver: YarnDriver, cluster: Any) -> None:
    async for update in driver.start_scheduler(cluster):
        cluster.state.update(update)


# ---------------------------------------------------------------------------------------------
# Unit


@pytest.mark.unit
def test_the_application_runs_the_scheduler_in_the_master_and_workers_as_a_service(
    tmp_path: Path,
) -> None:
    driver = unit_driver(SPEC, YarnDriver, job_host="0.0.0.0", cluster_heartbeat_period=7)
    cluster = unit_cluster(
        SPEC,
        queue="science",
        scheduler_setup="source environment/bin/activate",
        worker_setup="module load dask",
        localize_files={"environment": {"source": "hdfs:///envs/d.tar.gz", "visibility": "public"}},
        scheduler_memory="1 GiB",
        worker_memory="1500 MiB",
        worker_cores=2,
        environment={"SITE": "x"},
    )
    spec = driver.application_spec(cluster, tmp_path)
    assert (spec.name, spec.queue, spec.user) == ("dask-gateway", "science", "alice")
    assert spec.master.resources == skein.Resources(memory=1024, vcores=1)
    script = spec.master.script.splitlines()
    assert script[0] == "source environment/bin/activate"
    assert script[1].startswith("exec dask scheduler --protocol tls")
    assert "--dg-heartbeat-period 7" in script[1]
    assert spec.master.env["DASK_GATEWAY_CLUSTER_NAME"] == cluster.name
    assert spec.master.env["DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT"] == "dask.crt"
    assert spec.master.env["SITE"] == "x"
    env_file = spec.master.files["environment"]
    assert (env_file.type, env_file.visibility) == ("ARCHIVE", "PUBLIC")
    assert spec.master.files["dask.pem"].source == f"file://{tmp_path}/dask.pem"
    [name] = spec.services
    worker = spec.services[name]
    assert (name, worker.instances, worker.max_restarts) == ("dask.worker", 0, 0)
    assert worker.resources == skein.Resources(memory=1500, vcores=2)
    assert worker.script.splitlines() == [
        "module load dask",
        'exec dask worker "$DASK_GATEWAY_SCHEDULER_ADDRESS" --dashboard-address 0.0.0.0:0 '
        '--name "$DASK_GATEWAY_WORKER_NAME" --nthreads 2 --memory-limit 1572864000',
    ]
    assert worker.env["DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY"] == "dask.pem"


@pytest.mark.unit
def test_bad_settings_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        unit_driver(
            SPEC,
            YarnDriver,
            principal="gw@EXAMPLE.COM",
            driver_certificate="/x.crt",
            app_client_cache_max_size=0,
            driver_address="nohost",
        )
    text = str(info.value)
    for expected in (
        "backend.yarn.principal, keytab: give both",
        "driver_certificate, driver_key: give both",
        "app_client_cache_max_size: must be at least 1",
        "driver_address: expected host:port",
    ):
        assert expected in text, text
    with pytest.raises(ConfigError, match=r"localize_files\.dask\.crt: not a usable local name"):
        unit_cluster(SPEC, localize_files={"dask.crt": "/x"})
    with pytest.raises(ConfigError, match="queue: must not be empty"):
        unit_cluster(SPEC, queue=" ")


@pytest.mark.unit
def test_memory_is_whole_mebibytes_rounded_up() -> None:
    assert mebibytes(2**30) == 1024
    assert mebibytes(2**20 + 1) == 2
    assert mebibytes(1) == 1


# ---------------------------------------------------------------------------------------------
# Against the simulator


@pytest.fixture
async def driver(yarn_sim: YarnSimulator, tmp_path: Path) -> Any:
    d = unit_driver(SPEC, YarnDriver, **sim_settings(yarn_sim, tmp_path))
    await d.setup()
    yield d
    await d.cleanup()


def sim_cluster(name: str = "abc123", **config: Any) -> Any:
    return unit_cluster(
        SPEC,
        name=name,
        username=os.environ.get("USER") or "root",
        scheduler_cmd=SLEEPING,
        worker_cmd=SLEEPING,
        **config,
    )


@pytest.mark.integration
async def test_a_cluster_is_an_application_and_its_workers_are_containers(
    yarn_sim: YarnSimulator, driver: YarnDriver, tmp_path: Path
) -> None:
    cluster = sim_cluster()
    await start(driver, cluster)
    app_id = cluster.state["app_id"]
    assert not (tmp_path / "files" / cluster.name).exists(), "TLS files left after submission"
    await wait_for(lambda: driver.check_clusters([cluster]), what="the application listed")
    assert yarn_sim.apps[app_id].spec.user == cluster.username
    await wait_for(
        lambda: asyncio.sleep(0, yarn_sim.apps[app_id].state == "RUNNING"), what="running"
    )
    workers = [Worker(name=f"w{i}", cluster_name=cluster.name) for i in range(2)]
    for w in workers:
        w.state.update(await driver.start_worker(cluster, w))
    assert [w.state["container_id"] for w in workers] == ["dask.worker_0", "dask.worker_1"]
    pairs = [(cluster, w) for w in workers]
    assert await driver.check_workers(pairs) == [True, True]
    env = yarn_sim.apps[app_id].containers["dask.worker_1"].env
    assert env["DASK_GATEWAY_WORKER_NAME"] == "w1"
    assert env["DASK_GATEWAY_SCHEDULER_ADDRESS"] == cluster.scheduler_address

    await driver.stop_worker(cluster, workers[0])
    await driver.stop_worker(cluster, workers[0])  # already gone: fine
    assert await driver.check_workers(pairs) == [False, True]

    await driver.stop_scheduler(cluster)
    assert yarn_sim.apps[app_id].final_status == "SUCCEEDED"
    assert await driver.check_clusters([cluster]) == [False]
    assert await driver.check_workers(pairs) == [False, False]
    await driver.stop_scheduler(cluster)  # already ended: fine
    await driver.stop_worker(cluster, workers[1])


@pytest.mark.integration
async def test_one_listing_answers_every_cluster_and_a_failing_one_is_retried(
    yarn_sim: YarnSimulator, driver: YarnDriver
) -> None:
    clusters = [sim_cluster(f"c{i}") for i in range(3)]
    for c in clusters:
        await start(driver, c)
    before = yarn_sim.calls["getApplications"]
    assert await driver.check_clusters(clusters) == [True, True, True]
    assert yarn_sim.calls["getApplications"] == before + 1
    yarn_sim.failures["getApplications"] = 2
    assert await driver.check_clusters(clusters) == [True, True, True]
    yarn_sim.failures["getApplications"] = 3
    with pytest.raises(RuntimeError, match="listing the YARN applications failed"):
        await driver.check_clusters(clusters)
    yarn_sim.kill_application(clusters[1].state["app_id"])
    assert await driver.check_clusters(clusters) == [True, False, True]
    for c in clusters:
        await driver.stop_scheduler(c)


@pytest.mark.integration
async def test_failure_reasons_carry_yarns_diagnostics_and_the_masters_output(
    yarn_sim: YarnSimulator, driver: YarnDriver
) -> None:
    refused = sim_cluster("refused", queue="no-such-queue")
    dying = sim_cluster("dying", scheduler_setup="echo preparing; echo it broke >&2; exit 4")
    for c in (refused, dying):
        await start(driver, c)

    async def both_dead() -> bool:
        return await driver.check_clusters([refused, dying]) == [False, False]

    await wait_for(both_dead, what="both applications ended")
    reason = await driver.failure_reason(refused)
    assert reason is not None
    assert "FAILED (final status FAILED): Application" in reason
    assert "to unknown queue: no-such-queue" in reason
    reason = await driver.failure_reason(dying)
    assert reason is not None
    assert "exited with exit code 4" in reason
    assert reason.endswith("The end of its scheduler's output:\npreparing\nit broke"), reason
    gone = sim_cluster("gone")
    gone.state["app_id"] = "application_1_0099"
    assert (
        await driver.failure_reason(gone)
        == "YARN no longer knows the application application_1_0099"
    )
    await driver.stop_scheduler(gone)  # unknown to YARN: nothing to stop


@pytest.mark.integration
async def test_a_new_driver_resumes_from_the_stored_state(
    yarn_sim: YarnSimulator, driver: YarnDriver, tmp_path: Path
) -> None:
    cluster = sim_cluster()
    await start(driver, cluster)
    await wait_for(
        lambda: asyncio.sleep(0, yarn_sim.apps[cluster.state["app_id"]].state == "RUNNING"),
        what="running",
    )
    worker = Worker(name="w", cluster_name=cluster.name)
    worker.state.update(await driver.start_worker(cluster, worker))

    other = unit_driver(SPEC, YarnDriver, **sim_settings(yarn_sim, tmp_path / "2"))
    await other.setup()
    try:
        assert await other.check_clusters([cluster]) == [True]
        assert await other.check_workers([(cluster, worker)]) == [True]
        await other.stop_worker(cluster, worker)
        assert await driver.check_workers([(cluster, worker)]) == [False]
        await other.stop_scheduler(cluster)
        assert await driver.check_clusters([cluster]) == [False]
    finally:
        await other.cleanup()


@pytest.mark.integration
async def test_application_clients_are_cached_up_to_the_limit(
    yarn_sim: YarnSimulator, tmp_path: Path
) -> None:
    driver = unit_driver(
        SPEC, YarnDriver, **sim_settings(yarn_sim, tmp_path, app_client_cache_max_size=2)
    )
    await driver.setup()
    try:
        clusters = [sim_cluster(f"c{i}") for i in range(3)]
        for c in clusters:
            await start(driver, c)
        for c in clusters:
            app_id = c.state["app_id"]
            await wait_for(
                lambda app_id=app_id: asyncio.sleep(0, yarn_sim.apps[app_id].state == "RUNNING")
            )
            await driver.app_client(app_id)
        assert list(driver._app_clients) == [c.state["app_id"] for c in clusters[1:]]
        statuses = yarn_sim.calls["getStatus"]
        await driver.app_client(clusters[2].state["app_id"])
        assert yarn_sim.calls["getStatus"] == statuses, "a cached client asked the driver again"
        for c in clusters:
            await driver.stop_scheduler(c)
    finally:
        await driver.cleanup()


@pytest.mark.integration
async def test_an_unreachable_driver_stops_setup_with_the_address(
    yarn_sim: YarnSimulator, tmp_path: Path
) -> None:
    settings = sim_settings(yarn_sim, tmp_path, driver_address="127.0.0.1:1")
    driver = unit_driver(SPEC, YarnDriver, **settings)
    with pytest.raises(RuntimeError, match=r"cannot reach the skein driver at 127\.0\.0\.1:1"):
        await driver.setup()

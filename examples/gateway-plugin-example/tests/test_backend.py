"""Tests of the command-template driver on real, short-lived local processes.

Each test builds the driver as the gateway would (config structured from TOML-shaped data) and
calls its six operations directly, with `sh` and `sleep` standing in for Dask.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway_core.backends.kit import ProcessRef, read_stat
from gateway_core.config import ClusterConfig, ConfigError, load_config, structure, unstructure
from gateway_core.context import GatewayContext
from gateway_core.models import Cluster, Worker, new_name, new_token
from gateway_plugin_example.backend import (
    CommandTemplateConfig,
    CommandTemplateDriver,
    expand,
)

pytestmark = pytest.mark.integration

API_URL = "http://127.0.0.1:9/api"


def make_driver(tmp_path: Path, **settings: Any) -> CommandTemplateDriver:
    config = structure(
        {"clusters_directory": str(tmp_path / "clusters"), **settings},
        CommandTemplateConfig,
        path="backend.command-template",
    )
    context = GatewayContext(config=load_config({}, environ={}), hook=None, api_url=API_URL)
    return CommandTemplateDriver(config=config, context=context)


def make_cluster(**cluster: Any) -> Cluster:
    config = structure(cluster, ClusterConfig)
    return Cluster(
        name=new_name(),
        username="alice",
        token=new_token(),
        config=unstructure(config),
        tls_cert=b"-----BEGIN CERTIFICATE-----\nfake\n",
        tls_key=b"-----BEGIN PRIVATE KEY-----\nfake\n",
    )


async def start_scheduler(driver: CommandTemplateDriver, cluster: Cluster) -> None:
    """Run the start operation as the reconciler does: store every state it yields."""
    async for update in driver.start_scheduler(cluster):
        cluster.state.update(update)


def is_alive(pid: int) -> bool:
    """Is ``pid`` running (not exited, not a zombie)?"""
    st = read_stat(pid)
    return st is not None and st.running


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def exists(path: Path) -> bool:
    return path.exists()


async def eventually(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def started() -> AsyncIterator[list[int]]:
    """Pids started by a test; any still alive at the end are killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if is_alive(pid):
            os.killpg(pid, signal.SIGKILL)
            await eventually(lambda pid=pid: not is_alive(pid))


# --------------------------------------------------------------------------------------------
# Templates and config
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_expand_splices_cmd_verbatim_and_formats_the_rest() -> None:
    argv = expand(
        ["nice", "-n", "{cores}", "{cmd}", "--name={worker_name}", "{{literal}}"],
        ["python", "-c", "print({1: 2})"],
        {"cores": 2, "worker_name": "w1"},
    )
    assert argv == ["nice", "-n", "2", "python", "-c", "print({1: 2})", "--name=w1", "{literal}"]


@pytest.mark.unit
def test_config_refuses_bad_templates_and_signals_with_one_line_each() -> None:
    with pytest.raises(ConfigError) as info:
        structure(
            {
                "scheduler_template": ["run", "{worker_name}", "x{cmd}"],
                "worker_template": ["{cmd}", "{nope", "{scheduler_address}"],
                "stop_signal": "TERM",
                "stop_timeout": -1,
            },
            CommandTemplateConfig,
            path="backend.command-template",
        )
    problems = info.value.problems
    assert problems[0] == (
        "backend.command-template.stop_signal: unknown signal 'TERM'; use a name such as "
        "SIGTERM, SIGINT or SIGQUIT"
    )
    assert "backend.command-template.stop_timeout: must not be negative, got -1.0" in problems
    assert any(
        p.startswith(
            "backend.command-template.scheduler_template[1]: unknown placeholder {worker_name}"
        )
        for p in problems
    )
    assert (
        "backend.command-template.scheduler_template[2]: {cmd} must be a whole argument, "
        "not part of 'x{cmd}'"
    ) in problems
    assert any(p.startswith("backend.command-template.worker_template[1]: ") for p in problems)
    assert len(problems) == 5


@pytest.mark.unit
def test_config_accepts_a_shell_string_template() -> None:
    config = structure({"worker_template": "taskset -c 0-3 {cmd}"}, CommandTemplateConfig)
    assert config.worker_template == ["taskset", "-c", "0-3", "{cmd}"]
    assert config.signal is signal.SIGTERM


# --------------------------------------------------------------------------------------------
# The scheduler
# --------------------------------------------------------------------------------------------


async def test_scheduler_runs_in_its_directory_with_the_cluster_environment(
    tmp_path: Path, started: list[int]
) -> None:
    driver = make_driver(tmp_path, scheduler_template=["sh", "-c", "{cmd}", "--", "{memory}"])
    await driver.setup()
    script = (
        'echo "$DASK_GATEWAY_CLUSTER_NAME $DASK_GATEWAY_API_URL $EXTRA $1" > env.txt; '
        'cat "$DASK_GATEWAY_TLS_CERT" > cert-copy.txt; exec sleep 30'
    )
    cluster = make_cluster(
        scheduler_cmd=[script], scheduler_memory="1 GiB", environment={"EXTRA": "yes"}
    )
    await start_scheduler(driver, cluster)
    started.append(cluster.state["pid"])
    directory = Path(cluster.state["directory"])
    assert directory == tmp_path / "clusters" / cluster.name
    assert mode(directory) == 0o700
    key_file = directory / "dask.pem"
    assert key_file.read_bytes() == cluster.tls_key
    assert mode(key_file) == 0o600

    await eventually(lambda: (directory / "cert-copy.txt").exists())
    await eventually(lambda: (directory / "env.txt").read_text().strip() != "")
    assert (directory / "env.txt").read_text().split() == [
        cluster.name,
        API_URL,
        "yes",
        str(2**30),
    ]
    assert await driver.check_clusters([cluster]) == [True]

    await driver.stop_scheduler(cluster)
    assert await driver.check_clusters([cluster]) == [False]
    assert not exists(directory), "the cluster's directory is removed on stop"


async def test_a_scheduler_that_exits_is_reported_dead_with_its_output(
    tmp_path: Path, started: list[int]
) -> None:
    driver = make_driver(tmp_path)
    cluster = make_cluster(scheduler_cmd=["sh", "-c", "echo cannot bind port 8786 >&2; exit 3"])
    await start_scheduler(driver, cluster)
    started.append(cluster.state["pid"])
    await eventually(lambda: not is_alive(cluster.state["pid"]))
    assert await driver.check_clusters([cluster]) == [False]
    reason = await driver.failure_reason(cluster)
    assert reason is not None
    assert "cannot bind port 8786" in reason
    await driver.stop_scheduler(cluster)  # stopping a dead scheduler succeeds


async def test_a_missing_command_fails_the_start_with_its_name(tmp_path: Path) -> None:
    driver = make_driver(tmp_path)
    cluster = make_cluster(scheduler_cmd=["gw-no-such-scheduler-command"])
    with pytest.raises(RuntimeError, match="cannot run 'gw-no-such-scheduler-command'"):
        await start_scheduler(driver, cluster)
    assert "directory" in cluster.state, "the directory was stored before it was created"
    await driver.stop_scheduler(cluster)
    assert not exists(Path(cluster.state["directory"]))


async def test_stopping_a_never_started_scheduler_succeeds(tmp_path: Path) -> None:
    driver = make_driver(tmp_path)
    cluster = make_cluster()
    await driver.stop_scheduler(cluster)
    assert await driver.check_clusters([cluster]) == [False]
    assert await driver.failure_reason(cluster) is None


async def test_a_process_ignoring_the_stop_signal_is_killed_after_the_timeout(
    tmp_path: Path, started: list[int]
) -> None:
    driver = make_driver(tmp_path, stop_timeout=0.3)
    cluster = make_cluster(
        scheduler_cmd=["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"]
    )
    await start_scheduler(driver, cluster)
    pid = cluster.state["pid"]
    started.append(pid)
    log = Path(cluster.state["directory"]) / "scheduler.log"
    await eventually(lambda: log.exists() and "ready" in log.read_text())
    begun = time.monotonic()
    await driver.stop_scheduler(cluster)
    assert time.monotonic() - begun >= 0.3
    assert not is_alive(pid)


async def test_a_new_driver_finds_processes_from_the_stored_state_alone(
    tmp_path: Path, started: list[int]
) -> None:
    """What a gateway restart looks like: the process is no child of this driver, and all
    that is left of the old one is the state it returned."""
    shell = await asyncio.create_subprocess_exec(
        "sh", "-c", "setsid sleep 30 >/dev/null 2>&1 & echo $!", stdout=subprocess.PIPE
    )
    out, _ = await shell.communicate()
    pid = int(out)
    started.append(pid)
    await eventually(lambda: os.getpgid(pid) == pid)  # setsid made it a group leader
    directory = tmp_path / "clusters" / "restored"
    directory.mkdir(parents=True)
    cluster = make_cluster()
    cluster.name = "restored"
    ref = ProcessRef.of(pid)
    assert ref is not None
    cluster.state = {**ref.to_state(), "directory": str(directory)}

    driver = make_driver(tmp_path)
    assert await driver.check_clusters([cluster]) == [True]
    await driver.stop_scheduler(cluster)
    assert await driver.check_clusters([cluster]) == [False]
    assert not is_alive(pid)
    assert not exists(directory)


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


async def test_workers_get_their_name_and_stop_with_the_configured_signal(
    tmp_path: Path, started: list[int]
) -> None:
    driver = make_driver(
        tmp_path,
        worker_template=["{cmd}", "{worker_name}", "{threads}"],
        stop_signal="SIGINT",
    )
    cluster = make_cluster(
        scheduler_cmd=["sleep", "30"],
        worker_cores=3,
        worker_cmd=[
            "sh",
            "-c",
            'echo "$1 $2 $DASK_GATEWAY_WORKER_NAME" > "args-$1.txt"; '
            "trap 'echo interrupted > \"stopped-$1.txt\"; exit 0' INT; "
            "while :; do sleep 0.05; done",
            "sh",
        ],
    )
    await start_scheduler(driver, cluster)
    started.append(cluster.state["pid"])
    cluster.scheduler_address = "tls://127.0.0.1:8786"
    directory = Path(cluster.state["directory"])

    workers = [Worker(name=f"w{i}", cluster_name=cluster.name) for i in range(2)]
    for worker in workers:
        worker.state.update(await driver.start_worker(cluster, worker))
        started.append(worker.state["pid"])
    for worker in workers:
        args = directory / f"args-{worker.name}.txt"
        await eventually(lambda args=args: args.exists() and args.read_text().strip() != "")
        assert args.read_text().split() == [worker.name, "3", worker.name]
    pairs = [(cluster, w) for w in workers]
    assert await driver.check_workers(pairs) == [True, True]

    await driver.stop_worker(cluster, workers[0])
    assert (directory / "stopped-w0.txt").read_text() == "interrupted\n"
    assert await driver.check_workers(pairs) == [False, True]
    await driver.stop_worker(cluster, workers[0])  # again: already gone is fine

    await driver.stop_worker(cluster, workers[1])
    await driver.stop_scheduler(cluster)
    assert await driver.check_workers(pairs) == [False, False]


async def test_stopping_a_worker_stops_what_it_started(tmp_path: Path, started: list[int]) -> None:
    driver = make_driver(tmp_path)
    cluster = make_cluster(
        scheduler_cmd=["sleep", "30"],
        worker_cmd=["sh", "-c", "sleep 30 & echo $! > child.pid; wait"],
    )
    await start_scheduler(driver, cluster)
    started.append(cluster.state["pid"])
    worker = Worker(name="w0", cluster_name=cluster.name)
    worker.state.update(await driver.start_worker(cluster, worker))
    started.append(worker.state["pid"])
    child_file = Path(cluster.state["directory"]) / "child.pid"
    await eventually(lambda: child_file.exists() and child_file.read_text().strip() != "")
    child = int(child_file.read_text())

    await driver.stop_worker(cluster, worker)
    await eventually(lambda: not is_alive(child))
    await driver.stop_scheduler(cluster)


async def test_logs_are_the_processes_log_files_until_the_cluster_stops(
    tmp_path: Path, started: list[int]
) -> None:
    driver = make_driver(tmp_path)
    cluster = make_cluster(
        scheduler_cmd=["sh", "-c", "echo scheduler one; echo; echo scheduler two; sleep 30"],
        worker_cmd=["sh", "-c", 'echo "worker $DASK_GATEWAY_WORKER_NAME" >&2; sleep 30'],
    )
    logs = await driver.cluster_logs(cluster, components=["scheduler"], tail=5, max_bytes=999)
    assert logs == {"scheduler": "(no log: the cluster has not started yet)"}
    await start_scheduler(driver, cluster)
    started.append(cluster.state["pid"])
    cluster.scheduler_address = "tls://127.0.0.1:8786"
    worker = Worker(name="w0", cluster_name=cluster.name)
    worker.state.update(await driver.start_worker(cluster, worker))
    started.append(worker.state["pid"])
    directory = Path(cluster.state["directory"])
    await eventually(lambda: "two" in (directory / "scheduler.log").read_text())
    await eventually(lambda: "w0" in (directory / "worker-w0.log").read_text())

    components = ["scheduler", "w0", "w1"]
    logs = await driver.cluster_logs(cluster, components=components, tail=5, max_bytes=999)
    assert logs["scheduler"] == "scheduler one\n\nscheduler two"
    assert logs["w0"] == "worker w0"  # stderr too
    assert logs["w1"].startswith("(no log: ") and "worker-w1.log cannot be read" in logs["w1"]
    logs = await driver.cluster_logs(cluster, components=["scheduler"], tail=1, max_bytes=999)
    assert logs == {"scheduler": "scheduler two"}

    await driver.stop_worker(cluster, worker)
    await driver.stop_scheduler(cluster)
    logs = await driver.cluster_logs(cluster, components=["scheduler"], tail=5, max_bytes=999)
    assert logs["scheduler"] == f"(no log: {directory} was removed when the cluster stopped)"


@pytest.fixture(autouse=True)
def _no_leftover_directories(tmp_path: Path) -> Iterator[None]:
    yield
    clusters = tmp_path / "clusters"
    if clusters.exists():
        assert [p.name for p in clusters.iterdir()] == [], "a test left a cluster directory behind"

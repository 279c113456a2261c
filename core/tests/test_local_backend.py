"""Tests of the ``local`` and ``unsafe-local`` backends with real processes: real Dask schedulers
and workers (warm from the fork server and cold), and small scripts standing in for them.

Every test checks that no process it caused is left (the test process becomes a child subreaper,
so even orphans of the fork server are seen). Tests of ``local`` create a throwaway user account
and need root, as CI has; elsewhere they fail saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import gateway_core.builtin
from gateway_core.backends.forkserver import ForkServer, ForkServerError, LaunchRefused
from gateway_core.backends.kit import (
    DEFAULT_INHERITED_ENVIRONMENT,
    ProcessRef,
    all_stats,
    boot_id,
    read_stat,
)
from gateway_core.backends.local import (
    GatewayUser,
    LocalBackendConfig,
    LocalDriver,
    RequestingUser,
)
from gateway_core.config import BackendConfig, ClusterConfig, ConfigError, load_config, structure
from gateway_core.context import GatewayContext
from gateway_core.models import Cluster, ClusterStatus, WorkerStatus

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_process_left_behind")]

PYTHON = sys.executable
BIN = os.path.dirname(os.path.abspath(PYTHON))


PLUGINS: list[object] = []
"""Core's built-in plugin registers both backends."""

FAST: dict[str, Any] = {
    "cluster_start_timeout": 40.0,
    "worker_start_timeout": 40.0,
    "cluster_heartbeat_period": 1,
    "cluster_status_period": 0.2,
    "worker_status_period": 0.2,
    "backoff_base_delay": 0.01,
    "backoff_max_delay": 0.2,
    "sigint_timeout": 5.0,
    "sigterm_timeout": 2.0,
    "sigkill_timeout": 2.0,
    "early_exit_window": 1.0,
}


def config_for(
    backend: str, tmp_path: Path, *, cluster: dict[str, Any] | None = None, **knobs: Any
) -> dict[str, Any]:
    return {
        "gateway": {"backend": backend},
        "backend": {backend: {**FAST, "clusters_directory": str(tmp_path / "clusters"), **knobs}},
        "cluster": cluster or {},
    }


async def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what or check}")
        await asyncio.sleep(0.02)


def script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# -------------------------------------------------------------------------------------------
# No process left behind


@pytest.fixture
def dask_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dask`` on PATH is this environment's (what the fork server runs warm)."""
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _pid_alive(pid: int) -> bool:
    st = read_stat(pid)
    return st is not None and st.running


# File checks are plain blocking calls on local files, kept in these sync helpers.


def _text(path: str | Path) -> str:
    return Path(path).read_text()


def _gone(path: str | Path) -> bool:
    return not os.path.lexists(path)


def _start_ticks(pid: int) -> int:
    st = read_stat(pid)
    assert st is not None, f"no process {pid}"
    return st.start_ticks


def _check_private(workdir: Path, cluster: Cluster, *, uid: int, gid: int) -> None:
    """The working directory and its files belong to ``uid``/``gid``, for them alone."""
    assert (workdir / "dask.crt").read_bytes() == cluster.tls_cert
    assert (workdir / "dask.pem").read_bytes() == cluster.tls_key
    expected = {".": 0o700, "dask.crt": 0o600, "dask.pem": 0o600, "scheduler.log": 0o600}
    for name, mode in expected.items():
        st = (workdir / name).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode), name


def _child_of(pid: int) -> int:
    for st in all_stats():
        if st.ppid != pid or not st.running:
            continue
        try:
            cmdline = Path(f"/proc/{st.pid}/cmdline").read_bytes()
        except OSError:
            continue
        # The worker process, forked by the nanny (not its multiprocessing resource tracker).
        if b"resource_tracker" not in cmdline:
            return st.pid
    raise AssertionError(f"no worker process under the nanny {pid}")


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


# -------------------------------------------------------------------------------------------
# Real Dask


async def test_a_real_cluster_starts_warm_runs_a_worker_and_leaves_nothing(
    make_gateway: Any,
    make_api_client: Any,
    tmp_path: Path,
    dask_on_path: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GW_TEST_INHERITED", "yes")
    monkeypatch.setenv("GW_TEST_NOT_INHERITED", "secret")
    config = config_for(
        "unsafe-local",
        tmp_path,
        inherited_environment=[*DEFAULT_INHERITED_ENVIRONMENT, "GW_TEST_INHERITED"],
        cluster={
            "environment": {
                "GW_TEST_MARK": "from-config",
                "DASK_DISTRIBUTED__ADMIN__LOG_FORMAT": "GWTEST %(name)s %(message)s",
                # The config may send the nanny back to spawning its worker (the default on
                # the warm path is fork); a spawned worker's environment can be read in /proc.
                "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD": "spawn",
            }
        },
    )
    gw = await make_gateway(config, plugins=PLUGINS)
    driver = gw.backend.driver
    alice = make_api_client(gw, "alice")

    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    report = await alice.get(f"/api/v1/clusters/{name}?wait")
    cluster = gw.backend.store.get(name)
    assert report.body["status"] == "RUNNING", cluster.reason
    assert cluster.state["method"] == "fork", driver.warm_disabled
    assert cluster.scheduler_address.startswith("tls://127.0.0.1:")

    # The working directory: private, with the TLS files and the scheduler's log.
    workdir = Path(cluster.state["workdir"])
    assert workdir.parent == tmp_path / "clusters"
    _check_private(workdir, cluster, uid=os.getuid(), gid=os.getgid())
    # The warm scheduler re-read the Dask config from its own environment (log format).
    scheduler_log = _text(workdir / "scheduler.log")
    assert "GWTEST distributed.scheduler" in scheduler_log, scheduler_log

    scaled = await alice.post(f"/api/v1/clusters/{name}/scale", {"count": 1})
    assert scaled.status == 200
    await eventually(
        lambda: any(w.status == WorkerStatus.RUNNING for w in cluster.workers.values()),
        timeout=40,
        what="a worker connected",
    )
    (worker,) = cluster.workers.values()
    assert worker.state["method"] == "fork"
    assert "GWTEST distributed.nanny" in _text(workdir / worker.state["log"])
    # The nanny (forked) started its worker process with its own environment: read it there.
    process = _child_of(worker.state["pid"])
    assert os.readlink(f"/proc/{process}/cwd") == str(workdir)
    seen = _environ_of(process)
    assert seen["GW_TEST_MARK"] == "from-config"
    assert seen["GW_TEST_INHERITED"] == "yes"
    assert "GW_TEST_NOT_INHERITED" not in seen
    assert "PYTHONNOUSERSITE" not in seen  # the template's own settings are not the process's
    assert seen["USER"] == "alice"
    assert seen["DASK_GATEWAY_CLUSTER_NAME"] == name
    assert seen["DASK_GATEWAY_API_TOKEN"] == cluster.token
    assert seen["DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY"] == str(workdir / "dask.pem")
    assert seen["DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"] == "spawn"
    assert await driver.check_workers([(cluster, worker)]) == [True]

    pids = [cluster.state["pid"], worker.state["pid"]]
    await gw.stop()  # stop_clusters_on_shutdown is true by default
    assert cluster.status == ClusterStatus.STOPPED
    assert _gone(workdir)
    assert not any(_pid_alive(p) for p in pids)


async def test_worker_groups_with_their_own_cores_scale_apart(
    make_gateway: Any, tmp_path: Path, dask_on_path: None
) -> None:
    """Through this repository's client: a default group of 1-thread workers and a "wide"
    group of 2-thread workers, scaled each on its own, seen by Dask, one scaled down."""
    from gateway_client import BasicAuth, Gateway

    config = config_for(
        "unsafe-local",
        tmp_path,
        cluster={
            "worker_cores": 1,
            "worker_memory": "512 MiB",
            "worker_groups": {"wide": {"worker_cores": 2, "environment": {"GW_GROUP": "wide"}}},
        },
    )
    gw = await make_gateway(config, plugins=PLUGINS)
    address = f"http://{gw.public_address}"
    async with Gateway(address, auth=BasicAuth("alice", ""), asynchronous=True) as gateway:
        cluster: Any = await gateway.new_cluster()
        async with cluster:
            await cluster.scale(1)
            await cluster.scale(1, group="wide")
            async with cluster.get_client(set_as_default=False) as client:

                async def sees(wanted: list[int]) -> None:
                    deadline = time.monotonic() + 60
                    threads: dict[str, int] = {}
                    while time.monotonic() < deadline:
                        threads = await client.nthreads()
                        if sorted(threads.values()) == wanted:
                            return
                        await asyncio.sleep(0.2)
                    raise AssertionError(f"workers' threads {threads}, expected {wanted}")

                await sees([1, 2])
                record = gw.backend.store.get(cluster.name)
                wide = [w for w in record.workers.values() if w.group == "wide"]
                assert len(wide) == 1 and wide[0].name.startswith(f"{cluster.name}-wide-")
                assert await client.submit(sum, [1, 2, 3]) == 6

                # Dask sees a worker a moment before the gateway does: the scheduler's agent
                # reports it in its next heartbeat (sent on the change, after a 0.1 s gather).
                async def both_running() -> bool:
                    groups = await cluster.worker_groups()
                    return (groups["default"]["running"], groups["wide"]["running"]) == (1, 1)

                deadline = time.monotonic() + 30
                while not await both_running():
                    assert time.monotonic() < deadline, await cluster.worker_groups()
                    await asyncio.sleep(0.1)

                await cluster.scale(0, group="wide")
                await sees([1])
                await eventually(
                    lambda: wide[0].status == WorkerStatus.STOPPED, what="wide worker stopped"
                )
                assert record.count == 1 and record.group_counts == {}
            await cluster.shutdown()


async def test_a_real_scheduler_starts_cold_and_stops_on_request(
    make_gateway: Any, make_api_client: Any, tmp_path: Path, dask_on_path: None
) -> None:
    config = config_for(
        "unsafe-local",
        tmp_path,
        start_method="spawn",
        cluster={"environment": {"DASK_DISTRIBUTED__ADMIN__LOG_FORMAT": "COLD %(message)s"}},
    )
    gw = await make_gateway(config, plugins=PLUGINS)
    alice = make_api_client(gw, "alice")
    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    report = await alice.get(f"/api/v1/clusters/{name}?wait")
    cluster = gw.backend.store.get(name)
    assert report.body["status"] == "RUNNING", cluster.reason
    assert cluster.state["method"] == "spawn"
    workdir = Path(cluster.state["workdir"])
    lines = _text(workdir / "scheduler.log").splitlines()
    assert any(line.startswith("COLD") and "Scheduler at:" in line for line in lines), lines
    pid = cluster.state["pid"]
    assert _pid_alive(pid) and os.getpgid(pid) == pid  # leads its own process group

    assert (await alice.delete(f"/api/v1/clusters/{name}")).status == 204
    await eventually(lambda: cluster.status == ClusterStatus.STOPPED, what="stopped")
    assert _gone(workdir)
    assert not _pid_alive(pid)


async def test_the_logs_route_reads_a_real_schedulers_and_workers_output(
    make_gateway: Any, make_api_client: Any, tmp_path: Path, dask_on_path: None
) -> None:
    config = config_for(
        "unsafe-local",
        tmp_path,
        cluster={"environment": {"DASK_DISTRIBUTED__ADMIN__LOG_FORMAT": "LOGS %(message)s"}},
    )
    gw = await make_gateway(config, plugins=PLUGINS)
    alice = make_api_client(gw, "alice")
    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    report = await alice.get(f"/api/v1/clusters/{name}?wait")
    cluster = gw.backend.store.get(name)
    assert report.body["status"] == "RUNNING", cluster.reason
    assert (await alice.post(f"/api/v1/clusters/{name}/scale", {"count": 1})).status == 200
    await eventually(
        lambda: any(w.status == WorkerStatus.RUNNING for w in cluster.workers.values()),
        timeout=40,
        what="a worker connected",
    )
    (worker,) = cluster.workers.values()
    workdir = Path(cluster.state["workdir"])
    await eventually(
        lambda: "Registered to" in _text(workdir / worker.state["log"]), what="worker log"
    )
    path = f"/api/v2/clusters/{name}/logs"

    logs = await alice.get(path)
    assert logs.status == 200, logs.body
    assert list(logs.body) == ["scheduler", worker.name]
    scheduler_lines = logs.body["scheduler"].splitlines()
    assert any(ln.startswith("LOGS") and "Scheduler at:" in ln for ln in scheduler_lines)
    assert "LOGS" in logs.body[worker.name] and "Registered to" in logs.body[worker.name]

    short = await alice.get(f"{path}?component={worker.name}&tail=2")
    assert list(short.body) == [worker.name]
    # Two lines of the log, its last ones then (the worker may have written more since).
    last_two = short.body[worker.name].splitlines()
    assert len(last_two) == 2 and last_two[1] in _text(workdir / worker.state["log"]), last_two
    stranger = await make_api_client(gw, "bob").get(path)
    assert stranger.status == 403, stranger.body

    assert (await alice.delete(f"/api/v1/clusters/{name}")).status == 204
    await eventually(lambda: cluster.status == ClusterStatus.STOPPED, what="stopped")
    # The working directory is gone with the cluster: the answer says so, it is no error.
    gone = await alice.get(f"{path}?component=scheduler")
    assert gone.status == 200, gone.body
    assert gone.body["scheduler"].startswith("(no log: the working directory"), gone.body
    assert "removed when the cluster stops" in gone.body["scheduler"]


# -------------------------------------------------------------------------------------------
# Scripts standing in for Dask


STUBBORN = """
    import os, signal, sys, time

    record = os.environ["GW_TEST_SIGNALS"]

    def note(sig, frame):
        with open(record, "a") as f:
            f.write(f"{os.getpid()} {signal.Signals(sig).name}\\n")

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)
    child = os.fork()  # just as stubborn, in the same process group
    if child == 0:
        while True:
            time.sleep(0.05)
    with open(record + ".pids", "w") as f:
        f.write(f"{os.getpid()} {child}")
    while True:
        time.sleep(0.05)
"""


async def test_stopping_escalates_from_sigint_to_sigterm_to_sigkill(
    make_gateway: Any, make_api_client: Any, tmp_path: Path
) -> None:
    record = tmp_path / "signals"
    config = config_for(
        "unsafe-local",
        tmp_path,
        start_method="spawn",
        sigint_timeout=0.4,
        sigterm_timeout=0.4,
        sigkill_timeout=2.0,
        cluster={
            "scheduler_cmd": [PYTHON, script(tmp_path, "stubborn.py", STUBBORN)],
            "environment": {"GW_TEST_SIGNALS": str(record)},
        },
    )
    gw = await make_gateway(config, plugins=PLUGINS)
    alice = make_api_client(gw, "alice")
    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    pids_file = f"{record}.pids"
    await eventually(lambda: not _gone(pids_file), what="the stubborn scheduler is up")
    leader, child = map(int, _text(pids_file).split())
    cluster = gw.backend.store.get(name)
    assert cluster.state["pid"] == leader

    began = time.monotonic()
    assert (await alice.delete(f"/api/v1/clusters/{name}")).status == 204
    await eventually(lambda: cluster.status == ClusterStatus.STOPPED, what="stopped")
    took = time.monotonic() - began
    # The process itself got SIGINT, then SIGTERM, each ignored for its timeout; SIGKILL went
    # to the whole group and took the child too.
    assert _text(record).split("\n")[:2] == [f"{leader} SIGINT", f"{leader} SIGTERM"]
    assert took >= 0.8
    assert not _pid_alive(leader) and not _pid_alive(child)


@pytest.mark.parametrize("when", ["at once", "later"])
async def test_a_dead_scheduler_fails_the_cluster_with_the_end_of_its_log(
    make_gateway: Any, make_api_client: Any, tmp_path: Path, when: str
) -> None:
    delay = 0.0 if when == "at once" else 1.2
    dying = script(
        tmp_path,
        "dying.py",
        f"""
        import sys, time
        print("loading the flux capacitor")
        print("error: out of plutonium", file=sys.stderr, flush=True)
        time.sleep({delay})
        sys.exit(4)
        """,
    )
    config = config_for(
        "unsafe-local",
        tmp_path,
        start_method="spawn",
        early_exit_window=0.6,
        cluster={"scheduler_cmd": [PYTHON, dying]},
    )
    gw = await make_gateway(config, plugins=PLUGINS)
    alice = make_api_client(gw, "alice")
    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    cluster = gw.backend.store.get(name)
    await eventually(lambda: cluster.status == ClusterStatus.FAILED, what="the cluster failed")
    reason = (await alice.get(f"/api/v2/clusters/{name}/reason")).body["reason"]
    assert "The scheduler exited with status 4" in reason
    assert "error: out of plutonium" in reason and "flux capacitor" in reason
    if when == "at once":
        assert reason.startswith("The scheduler failed to start")
    assert os.listdir(tmp_path / "clusters") == []  # the working directory went too


FAKE_SCHEDULER = """
    from gateway_core.testing.fake_scheduler import main

    main(["--heartbeat-period", "0.2"])  # the gateway's dask arguments are ignored
"""


async def test_a_worker_that_exits_at_once_fails_the_cluster_with_its_log(
    make_gateway: Any, make_api_client: Any, tmp_path: Path
) -> None:
    broken_worker = "import sys; print('ImportError: no module named lasers'); sys.exit(3)"
    config = config_for(
        "unsafe-local",
        tmp_path,
        start_method="spawn",
        worker_start_failure_limit=1,
        cluster={
            "scheduler_cmd": [PYTHON, script(tmp_path, "fake.py", FAKE_SCHEDULER)],
            "worker_cmd": [PYTHON, "-c", broken_worker],
        },
    )
    gw = await make_gateway(config, plugins=PLUGINS)
    alice = make_api_client(gw, "alice")
    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    assert (await alice.get(f"/api/v1/clusters/{name}?wait")).body["status"] == "RUNNING"
    assert (await alice.post(f"/api/v1/clusters/{name}/scale", {"count": 1})).status == 200
    cluster = gw.backend.store.get(name)
    await eventually(lambda: cluster.status == ClusterStatus.FAILED, what="the cluster failed")
    reason = (await alice.get(f"/api/v2/clusters/{name}/reason")).body["reason"]
    assert "workers in a row failed to start" in reason
    assert "The worker exited with status 3" in reason
    assert "ImportError: no module named lasers" in reason
    assert all(w.status == WorkerStatus.FAILED for w in cluster.workers.values())


async def test_a_scheduler_that_never_heartbeats_times_out_and_is_cleaned_up(
    make_gateway: Any, make_api_client: Any, tmp_path: Path
) -> None:
    silent = "import time; print('waiting for nothing', flush=True); time.sleep(600)"
    config = config_for(
        "unsafe-local",
        tmp_path,
        start_method="spawn",
        cluster_start_timeout=1.5,
        cluster={"scheduler_cmd": [PYTHON, "-c", silent]},
    )
    gw = await make_gateway(config, plugins=PLUGINS)
    alice = make_api_client(gw, "alice")
    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    cluster = gw.backend.store.get(name)
    await eventually(lambda: "pid" in cluster.state, what="the scheduler launched")
    pid, workdir = cluster.state["pid"], cluster.state["workdir"]
    assert _pid_alive(pid)
    report = await alice.get(f"/api/v1/clusters/{name}?wait")
    assert report.body["status"] in {"STOPPING", "FAILED"}  # no longer pending: failing
    await eventually(lambda: cluster.status == ClusterStatus.FAILED, what="the cluster failed")
    reason = (await alice.get(f"/api/v2/clusters/{name}/reason")).body["reason"]
    assert "did not start within cluster_start_timeout (1.5 s)" in reason
    await eventually(lambda: not _pid_alive(pid), what="the silent scheduler was stopped")
    await eventually(lambda: _gone(workdir), what="its working directory was removed")


async def test_clusters_outlive_a_gateway_that_leaves_them_and_a_new_one_stops_them(
    make_gateway: Any, make_api_client: Any, tmp_path: Path
) -> None:
    from cryptography.fernet import Fernet

    config = config_for(
        "unsafe-local",
        tmp_path,
        start_method="spawn",
        cluster={"scheduler_cmd": [PYTHON, script(tmp_path, "fake.py", FAKE_SCHEDULER)]},
    )
    config["gateway"].update(
        db_url=f"sqlite:///{tmp_path / 'gateway.db'}",
        db_encrypt_keys=[Fernet.generate_key().decode()],
        stop_clusters_on_shutdown=False,
    )
    first = await make_gateway(config, plugins=PLUGINS)
    alice = make_api_client(first, "alice")
    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    assert (await alice.get(f"/api/v1/clusters/{name}?wait")).body["status"] == "RUNNING"
    state = dict(first.backend.store.get(name).state)
    await first.stop()
    assert _pid_alive(state["pid"]) and not _gone(state["workdir"])

    # The new gateway did not start the process: it knows it only by its stored pid.
    second = await make_gateway(config, plugins=PLUGINS)
    cluster = second.backend.store.get(name)
    assert cluster.status == ClusterStatus.RUNNING
    assert await second.backend.driver.check_clusters([cluster]) == [True]
    assert (await make_api_client(second, "alice").delete(f"/api/v1/clusters/{name}")).status == 204
    await eventually(lambda: cluster.status == ClusterStatus.STOPPED, what="stopped")
    assert not _pid_alive(state["pid"])
    assert _gone(state["workdir"])


async def test_an_adopted_scheduler_that_died_fails_its_cluster_saying_its_status_is_unknown(
    make_gateway: Any, make_api_client: Any, tmp_path: Path
) -> None:
    from cryptography.fernet import Fernet

    config = config_for(
        "unsafe-local",
        tmp_path,
        start_method="spawn",
        cluster={"scheduler_cmd": [PYTHON, script(tmp_path, "fake.py", FAKE_SCHEDULER)]},
    )
    config["gateway"].update(
        db_url=f"sqlite:///{tmp_path / 'gateway.db'}",
        db_encrypt_keys=[Fernet.generate_key().decode()],
        stop_clusters_on_shutdown=False,
    )
    first = await make_gateway(config, plugins=PLUGINS)
    name = (await make_api_client(first, "alice").post("/api/v1/clusters/", {})).body["name"]
    alice = make_api_client(first, "alice")
    assert (await alice.get(f"/api/v1/clusters/{name}?wait")).body["status"] == "RUNNING"
    state = dict(first.backend.store.get(name).state)
    await first.stop()
    os.kill(state["pid"], signal.SIGKILL)  # dies while no gateway watches it
    await eventually(lambda: not _pid_alive(state["pid"]), what="the scheduler died")

    second = await make_gateway(config, plugins=PLUGINS)
    cluster = second.backend.store.get(name)
    await eventually(lambda: cluster.status == ClusterStatus.FAILED, what="the cluster failed")
    reason = (await make_api_client(second, "alice").get(f"/api/v2/clusters/{name}/reason")).body[
        "reason"
    ]
    assert "The scheduler exited (exit status unknown: it is not this gateway process's" in reason
    await eventually(lambda: _gone(state["workdir"]), what="its working directory was removed")


async def test_dask_is_found_beside_the_gateways_python_when_path_lacks_it(
    make_gateway: Any, make_api_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway started as ``/venv/bin/gateway serve`` without activating the venv."""
    bare = os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"])
    assert shutil.which("dask", path=bare) is None, "this test needs a PATH without dask"
    monkeypatch.setenv("PATH", bare)
    gw = await make_gateway(config_for("unsafe-local", tmp_path, start_method="spawn"))
    alice = make_api_client(gw, "alice")
    name = (await alice.post("/api/v1/clusters/", {})).body["name"]
    report = await alice.get(f"/api/v1/clusters/{name}?wait")
    cluster = gw.backend.store.get(name)
    assert report.body["status"] == "RUNNING", cluster.reason
    # The gateway's bin is appended: what the site's PATH provides still comes first.
    assert _environ_of(cluster.state["pid"])["PATH"] == os.pathsep.join([bare, BIN])
    assert (await alice.delete(f"/api/v1/clusters/{name}")).status == 204
    await eventually(lambda: cluster.status == ClusterStatus.STOPPED, what="stopped")


def _driver(**knobs: Any) -> LocalDriver:
    context = GatewayContext(config=load_config({}, environ={}), hook=None)
    config = LocalBackendConfig(**{**FAST, **knobs})
    return LocalDriver(config=config, context=context, owner=GatewayUser())


def test_warm_nannies_fork_their_workers_unless_the_config_says_otherwise(tmp_path: Path) -> None:
    cluster = Cluster(name=secrets.token_hex(16), username="alice", token="t")
    var = "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"
    warm, cold = _driver(start_method="fork"), _driver(start_method="spawn")
    env = warm.process_env(cluster, role="worker", workdir=str(tmp_path), run_as=None)
    assert env[var] == "fork"
    assert var not in warm.process_env(cluster, role="scheduler", workdir="w", run_as=None)
    assert var not in cold.process_env(cluster, role="worker", workdir="w", run_as=None)
    cluster.config = {"environment": {var: "spawn"}}
    assert warm.process_env(cluster, role="worker", workdir="w", run_as=None)[var] == "spawn"


async def test_a_reused_pid_is_neither_alive_nor_signalled() -> None:
    driver = _driver(sigint_timeout=0.2, sigterm_timeout=0.2, sigkill_timeout=1.0)
    sleeper = await asyncio.create_subprocess_exec("sleep", "30", start_new_session=True)
    try:
        ticks = _start_ticks(sleeper.pid)
        real = ProcessRef(pid=sleeper.pid, start_ticks=ticks, boot_id=boot_id())
        # Same pid, another start time (or another boot): a later process given that pid.
        impostors = [
            ProcessRef(pid=sleeper.pid, start_ticks=ticks - 1, boot_id=boot_id()),
            ProcessRef(pid=sleeper.pid, start_ticks=ticks, boot_id="another-boot"),
        ]

        def cluster(ref: ProcessRef) -> Cluster:
            name = secrets.token_hex(16)
            return Cluster(name=name, username="alice", token="t", state=ref.to_state())

        checked = await driver.check_clusters([cluster(real), *map(cluster, impostors)])
        assert checked == [True, False, False]
        for ref in impostors:
            await driver.stop_scheduler(cluster(ref))
        assert sleeper.returncode is None and _pid_alive(sleeper.pid)  # not signalled
        # The real one: stopped, though this driver never started it (a gateway restart).
        await driver.stop_scheduler(cluster(real))
        assert await asyncio.wait_for(sleeper.wait(), 5) == -signal.SIGINT
        assert await driver.check_clusters([cluster(real)]) == [False]
    finally:
        if sleeper.returncode is None:
            sleeper.kill()
            await sleeper.wait()


def test_the_config_refuses_bad_values() -> None:
    with pytest.raises(ConfigError) as info:
        structure(
            {"start_method": "vfork", "sigint_timeout": -1, "clusters_directory": "rel/dir"},
            LocalBackendConfig,
            path="backend.local",
        )
    problems = "\n".join(info.value.problems)
    assert "start_method: expected fork or spawn, got 'vfork'" in problems
    assert "sigint_timeout: must not be negative" in problems
    assert "clusters_directory: must be an absolute path" in problems
    defaults = LocalBackendConfig()
    assert (defaults.sigint_timeout, defaults.sigterm_timeout, defaults.sigkill_timeout) == (
        10,
        5,
        5,
    )
    assert defaults.clusters_directory == "" and defaults.start_method == "fork"


# -------------------------------------------------------------------------------------------
# The fork server


def test_a_fork_server_whose_gateway_died_while_it_started_exits_quietly() -> None:
    """The chaos test's finding: a gateway SIGKILLed while its fork server imported left a
    BrokenPipeError traceback in its log when the server said it was ready; now it just ends."""
    import socket

    ours, theirs = socket.socketpair()
    ours.close()  # the gateway is gone before the server reports
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gateway_core.backends.forkserver", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        theirs.close()
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


async def test_the_fork_server_refuses_to_start_with_threads(tmp_path: Path) -> None:
    script(
        tmp_path,
        "gw_thready.py",
        """
        import threading, time
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        """,
    )
    server = ForkServer(env={"PYTHONPATH": str(tmp_path)}, preload=["gw_thready"])
    with pytest.raises(ForkServerError, match="2 threads are running after the imports"):
        await server.start()
    assert not server.alive


async def test_what_the_fork_server_forked_outlives_its_end_and_its_exit_handlers(
    tmp_path: Path,
) -> None:
    """The template ends on the end of its control socket, as when the gateway is killed; its
    children live on, in their own sessions, and no exit handler of a preloaded module runs in
    the template (this one would kill every child it has, and leaves a mark if it runs)."""
    mark = tmp_path / "exit-handler-ran"
    script(
        tmp_path,
        "gw_reaper.py",
        f"""
        import atexit, os, signal

        def end_my_children():
            open({str(mark)!r}, "w").close()
            me = str(os.getpid())
            for entry in os.listdir("/proc"):
                try:
                    with open(f"/proc/{{entry}}/stat") as f:
                        ppid = f.read().rpartition(")")[2].split()[1]
                except (OSError, IndexError):
                    continue
                if ppid == me:
                    os.kill(int(entry), signal.SIGKILL)

        atexit.register(end_my_children)
        """,
    )
    sleeper = script(tmp_path, "sleeper.py", "import time; time.sleep(60)")
    server = ForkServer(env={"PYTHONPATH": str(tmp_path)}, preload=["gw_reaper"])
    await server.start()
    template = server.pid
    assert template is not None
    fd = os.open(tmp_path / "sleeper.log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        pid, ticks = await server.spawn(
            argv=["sleeper"], path=sleeper, env={}, cwd=str(tmp_path), log_fd=fd
        )
    finally:
        os.close(fd)
    ref = ProcessRef(pid=pid, start_ticks=ticks, boot_id=boot_id())
    st = read_stat(pid)
    assert st is not None and st.ppid == template and st.pgrp == pid
    await server.close()  # end of file on the control socket: the template exits
    await eventually(lambda: not _pid_alive(template), what="the template exited")
    await asyncio.sleep(0.5)
    assert ref.running(), "the forked process died with the fork server"
    assert not mark.exists(), "an exit handler of a preloaded module ran in the template"
    st = read_stat(pid)
    assert st is not None and st.ppid != template  # re-parented (to us: the subreaper)
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: not ref.running(), what="the forked process was killed")


# -------------------------------------------------------------------------------------------
# local: as the requesting user


@pytest.fixture
def throwaway_user() -> Iterator[tuple[pwd.struct_passwd, int]]:
    """A system account made for one test (plus an extra group), removed afterwards."""
    if os.geteuid() != 0:
        pytest.fail(
            "this test creates a user account and runs processes as it, which needs root: "
            "run the integration tests as root (CI does)"
        )
    name = f"gwt{secrets.token_hex(4)}"
    extra = f"{name}x"
    subprocess.run(["groupadd", "--system", extra], check=True, capture_output=True)
    try:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                f"/nonexistent/{name}",
                "--shell",
                "/usr/sbin/nologin",
                "--groups",
                extra,
                name,
            ],
            check=True,
            capture_output=True,
        )
        try:
            yield pwd.getpwnam(name), grp.getgrnam(extra).gr_gid
        finally:
            subprocess.run(["userdel", name], check=True, capture_output=True)
    finally:
        subprocess.run(["groupdel", extra], check=False, capture_output=True)


SHOW_IDENTITY = (
    'echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"; echo "pwd=$(pwd)"; '
    'echo "home=$HOME user=$USER logname=$LOGNAME shell=$SHELL"; exec sleep 60'
)


async def test_local_runs_the_scheduler_as_the_requesting_user(
    make_gateway: Any,
    make_api_client: Any,
    tmp_path: Path,
    throwaway_user: tuple[pwd.struct_passwd, int],
) -> None:
    user, extra_gid = throwaway_user
    config = config_for(
        "local",
        tmp_path,
        start_method="spawn",
        sigint_timeout=1.0,
        cluster={"scheduler_cmd": ["/bin/sh", "-c", SHOW_IDENTITY, "scheduler"]},
    )
    gw = await make_gateway(config, plugins=PLUGINS)
    client = make_api_client(gw, user.pw_name)
    name = (await client.post("/api/v1/clusters/", {})).body["name"]
    cluster = gw.backend.store.get(name)
    await eventually(lambda: "pid" in cluster.state, what="the scheduler launched")
    workdir = Path(cluster.state["workdir"])
    log_file = workdir / "scheduler.log"
    await eventually(lambda: "shell=" in _text(log_file), what="the script's output")
    assert cluster.status == ClusterStatus.PENDING

    pid = cluster.state["pid"]
    assert _uid_of(pid) == user.pw_uid
    shown = _text(log_file)
    assert f"uid={user.pw_uid} gid={user.pw_gid}" in shown
    assert str(extra_gid) in shown.split("groups=")[1].split()
    assert f"pwd={workdir}" in shown
    assert f"home={user.pw_dir} user={user.pw_name} logname={user.pw_name} shell=" in shown
    _check_private(workdir, cluster, uid=user.pw_uid, gid=user.pw_gid)

    assert (await client.delete(f"/api/v1/clusters/{name}")).status == 204
    await eventually(lambda: cluster.status == ClusterStatus.STOPPED, what="stopped")
    assert not _pid_alive(pid)
    assert _gone(workdir)


async def test_local_fails_a_cluster_of_an_unknown_user_before_starting_anything(
    make_gateway: Any, make_api_client: Any, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.fail("the local backend needs root: run the integration tests as root (CI does)")
    gw = await make_gateway(config_for("local", tmp_path, start_method="spawn"), plugins=PLUGINS)
    nobody = make_api_client(gw, f"no-such-user-{secrets.token_hex(3)}")
    name = (await nobody.post("/api/v1/clusters/", {})).body["name"]
    cluster = gw.backend.store.get(name)
    await eventually(lambda: cluster.status == ClusterStatus.FAILED, what="the cluster failed")
    reason = (await nobody.get(f"/api/v2/clusters/{name}/reason")).body["reason"]
    assert "has no account on the gateway's host" in reason
    clusters_dir = tmp_path / "clusters"
    assert _gone(clusters_dir) or os.listdir(clusters_dir) == []


def test_local_and_unsafe_local_are_one_driver_with_two_owners() -> None:
    specs = {spec.name: spec for spec in gateway_core.builtin.gateway_register_backends()}
    context = GatewayContext(config=load_config({}, environ={}), hook=None)
    made = {
        name: specs[name].make_driver(config=LocalBackendConfig(), context=context)
        for name in ("local", "unsafe-local")
    }
    assert {type(driver) for driver in made.values()} == {LocalDriver}
    assert isinstance(made["local"].owner, RequestingUser)
    assert isinstance(made["unsafe-local"].owner, GatewayUser)
    assert made["local"].name == "local" and made["local"].cluster_config_class is ClusterConfig
    with pytest.raises(TypeError, match="backend 'local' needs a LocalBackendConfig"):
        specs["local"].make_driver(config=BackendConfig(), context=context)


async def test_local_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    context = GatewayContext(config=load_config({}, environ={}), hook=None)
    driver = LocalDriver(
        config=LocalBackendConfig(start_method="spawn"), context=context, owner=RequestingUser()
    )
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(RuntimeError, match="needs root; the gateway runs as uid 1000"):
        await driver.setup()


PROBE = """
    import ctypes, json, os, sys

    open_fds = []
    for fd in range(3, 256):
        try:
            os.fstat(fd)
        except OSError:
            continue
        open_fds.append(fd)
    print(json.dumps({
        "ids": [os.getuid(), os.geteuid(), os.getgid(), sorted(os.getgroups())],
        "sid": os.getsid(0), "pid": os.getpid(), "cwd": os.getcwd(),
        "env": dict(os.environ), "argv": sys.argv, "open_fds": open_fds,
        "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0),  # PR_GET_DUMPABLE
    }), flush=True)
"""


@pytest.fixture
async def fork_server() -> AsyncIterator[ForkServer]:
    server = ForkServer(env={"PATH": os.environ.get("PATH", os.defpath)})
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def shared_dir(throwaway_user: tuple[pwd.struct_passwd, int]) -> Iterator[Path]:
    """A directory the throwaway user can read (a forked child reads its script after dropping
    privileges), with the probe script and a home the user owns."""
    user, _ = throwaway_user
    shared = Path(tempfile.mkdtemp(prefix="gw-forkserver-test-"))
    try:
        shared.chmod(0o755)
        probe = shared / "probe.py"
        probe.write_text(textwrap.dedent(PROBE))
        probe.chmod(0o644)
        (shared / "home").mkdir(mode=0o700)
        os.chown(shared / "home", user.pw_uid, user.pw_gid)
        yield shared
    finally:
        shutil.rmtree(shared)


async def test_a_forked_child_becomes_the_user_with_nothing_of_the_template(
    fork_server: ForkServer, throwaway_user: tuple[pwd.struct_passwd, int], shared_dir: Path
) -> None:
    user, extra_gid = throwaway_user
    probe, home, out = shared_dir / "probe.py", shared_dir / "home", shared_dir / "out.log"
    groups = os.getgrouplist(user.pw_name, user.pw_gid)
    env = {"HOME": str(home), "USER": user.pw_name, "GW_TEST": "only this"}
    as_user: dict[str, Any] = {"uid": user.pw_uid, "gid": user.pw_gid, "groups": groups}
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        pid, _ticks = await fork_server.spawn(
            argv=["probe", "--flag"], path=str(probe), env=env, cwd=str(home), log_fd=fd, **as_user
        )
        await eventually(lambda: not _pid_alive(pid) and _text(out) != "", what="the probe ran")
        seen = json.loads(_text(out))
        # A directory the user cannot enter: refused by the child, the server lives on.
        with pytest.raises(LaunchRefused, match="Permission denied"):
            await fork_server.spawn(
                argv=["probe"], path=str(probe), env=env, cwd="/root", log_fd=fd, **as_user
            )
        assert fork_server.alive
    finally:
        os.close(fd)
    uid, euid, gid, seen_groups = seen["ids"]
    assert (uid, euid, gid) == (user.pw_uid, user.pw_uid, user.pw_gid)
    assert seen_groups == sorted(groups) and extra_gid in seen_groups
    assert seen["sid"] == seen["pid"] == pid  # its own session and process group
    assert seen["cwd"] == str(home)
    assert seen["env"] == env  # exactly: nothing of the template's environment
    assert seen["argv"] == [str(probe), "--flag"]
    assert seen["open_fds"] == []  # no descriptor of the template (its control socket least)
    assert seen["dumpable"] == 1  # its user may debug it, as after an exec


def test_a_start_the_gateway_died_in_is_cleared_before_it_runs_again(tmp_path: Path) -> None:
    """`start_may_rerun`: no pid stored means nothing the gateway knows of was launched; the
    next attempt kills what runs in the old directory (a fork that happened after the last
    write) and removes the directory, so `_make_workdir` can make it afresh."""
    from gateway_core.backends.kit import ProcessRef
    from gateway_core.backends.local import LocalDriver
    from gateway_core.testing.units import unit_cluster, unit_driver

    spec = next(
        s for s in gateway_core.builtin.gateway_register_backends() if s.name == "unsafe-local"
    )
    driver = unit_driver(spec, LocalDriver)
    cluster = unit_cluster(spec, name="c0ffee")
    workdir = tmp_path / "cluster-c0ffee"
    workdir.mkdir()
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], cwd=workdir, start_new_session=True
    )
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path, start_new_session=True
    )
    try:
        cluster.state = {"workdir": str(workdir)}
        assert driver.start_may_rerun(cluster)
        driver._clear_failed_attempt(cluster, str(workdir))
        assert stray.wait(timeout=10) == -signal.SIGKILL
        assert not workdir.exists()
        assert bystander.poll() is None  # another directory's process is left alone
        ref = ProcessRef.of(bystander.pid)
        cluster.state = {"workdir": str(workdir), **ref.to_state()}
        assert not driver.start_may_rerun(cluster)  # launched: wait for it, as before
    finally:
        for proc in (stray, bystander):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


SLEEPER_WITH_CHILD = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("child started", flush=True)
time.sleep(60)
"""


def _sleepers(
    code: str, workdir: Path, log_file: Path
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """``code`` twice in ``workdir``, each leading a new session: one writing to ``log_file``,
    one to /dev/null."""
    with log_file.open("wb") as out:
        leader = subprocess.Popen([PYTHON, code], stdout=out, cwd=workdir, start_new_session=True)
    bystander = subprocess.Popen(
        [PYTHON, code], stdout=subprocess.DEVNULL, cwd=workdir, start_new_session=True
    )
    return leader, bystander


async def test_a_worker_launched_but_never_recorded_is_found_by_its_log_and_stopped(
    tmp_path: Path,
) -> None:
    """The crash-safety net of `stop_worker` (and of adoption): with nothing in the worker's
    state, the process that writes to its log and leads its group is found
    (`launched_with_output`) and stopped with its group; what it started is not mistaken for
    another worker, and a process writing elsewhere is left alone."""
    from gateway_core.backends.kit import launched_with_output
    from gateway_core.backends.local import LocalDriver
    from gateway_core.models import Worker
    from gateway_core.testing.units import unit_cluster, unit_driver

    spec = next(
        s for s in gateway_core.builtin.gateway_register_backends() if s.name == "unsafe-local"
    )
    driver = unit_driver(spec, LocalDriver, sigint_timeout=0.5, sigterm_timeout=5.0)
    cluster = unit_cluster(spec, name="c0ffee")
    workdir = tmp_path / "cluster-c0ffee"
    workdir.mkdir()
    code = script(tmp_path, "sleeper.py", SLEEPER_WITH_CHILD)
    log_file = workdir / "worker-w1.log"
    leader, bystander = _sleepers(code, workdir, log_file)
    try:
        await eventually(lambda: "child started" in _text(log_file), what="the child started")
        child = _child_of(leader.pid)
        found = launched_with_output(log_file)
        assert [ref.pid for ref in found] == [leader.pid]  # not its child, not the bystander
        assert launched_with_output(workdir / "worker-w2.log") == []

        cluster.state = {"workdir": str(workdir)}
        worker = Worker(name="w1", cluster_name=cluster.name)
        assert driver.worker_start_may_rerun(cluster, worker)
        await driver.stop_worker(cluster, worker)
        assert leader.wait(timeout=10) is not None
        await eventually(lambda: not _pid_alive(child), what="its child is gone with it")
        assert bystander.poll() is None
        await driver.stop_worker(cluster, Worker(name="w2", cluster_name=cluster.name))
        assert bystander.poll() is None  # w2 never got as far as its log: nothing to stop
    finally:
        for proc in (leader, bystander):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # with the child it started
            proc.wait()


async def _first_state(updates: Any) -> dict[str, Any]:
    """The first state a start operation yields (the launch), the rest never run: what a
    gateway killed right after the launch, before storing it, leaves behind."""
    return dict(await updates.__anext__())


async def test_local_a_worker_launched_as_its_user_before_a_crash_is_adopted_then_stopped(
    throwaway_user: tuple[pwd.struct_passwd, int],
) -> None:
    """``local`` (as root, the worker as its user): a start whose launch was never stored is
    run again by a new driver (a restarted gateway); it adopts the running worker, found by
    its log, instead of launching a second one; a stop with nothing stored finds it too."""
    from gateway_core.backends.local import LocalDriver
    from gateway_core.models import Worker
    from gateway_core.testing.units import unit_cluster, unit_driver

    user, _ = throwaway_user
    spec = next(s for s in gateway_core.builtin.gateway_register_backends() if s.name == "local")
    base = tempfile.mkdtemp(prefix="gw-orphans-")
    os.chmod(base, 0o755)  # the user reaches its directory through it
    try:
        knobs = {"start_method": "spawn", "clusters_directory": base, "sigint_timeout": 1.0}
        first = unit_driver(spec, LocalDriver, **knobs)
        cluster = unit_cluster(
            spec,
            name="c0ffee",
            username=user.pw_name,
            worker_cmd=["/bin/sh", "-c", "exec sleep 60"],
        )
        run_as = await first.owner.account(cluster)
        workdir = os.path.join(base, cluster.name)
        first._make_workdir(cluster, workdir, run_as)
        cluster.state = {"workdir": workdir}
        worker = Worker(name="c0ffee-w1", cluster_name=cluster.name)
        launched = await _first_state(first.start_worker(cluster, worker))
        pid = launched["pid"]
        assert _uid_of(pid) == user.pw_uid
        assert worker.state == {}  # the crash: never stored

        second = unit_driver(spec, LocalDriver, **knobs)  # the restarted gateway's
        assert second.worker_start_may_rerun(cluster, worker)
        adopted = await _first_state(second.start_worker(cluster, worker))
        assert (adopted["pid"], adopted["method"]) == (pid, "adopted")
        assert adopted["start_ticks"] == _start_ticks(pid)
        assert [st.pid for st in all_stats() if st.pgrp == st.pid and _in(st.pid, workdir)] == [
            pid
        ], "a second worker was launched"

        await second.stop_worker(cluster, worker)  # nothing stored: found by its log
        await eventually(lambda: not _pid_alive(pid), what="the worker was stopped")
        await second.stop_scheduler(cluster)
        assert _gone(workdir)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _in(pid: int, directory: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(directory)
    except OSError:
        return False

"""Fixtures of the YARN tests: the YARN simulator (tests/yarn_sim) serving skein's gRPC
services on loopback, and a real ``skein.Client`` connected to it.

There is no Hadoop here: every test that talks to "YARN" talks to the simulator, through the
real skein client over mutual TLS.
"""

from __future__ import annotations

import os

# Before grpc is imported: the simulator forks container processes from a process serving
# gRPC on threads; grpc's fork handlers in such a child can crash it (SIGSEGV).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import skein
from yarn_sim.server import SimApplication, YarnSimulator

from gateway_core.models import Cluster, Worker
from gateway_core.testing.jobqueue import monorepo_packages, shared_tempdir
from gateway_core.testing.scenarios import BackendSetup, LiveJob, RunningCluster

PLUGIN = Path(__file__).resolve().parents[1]

QUEUES = ("default", "science")


@pytest.fixture
def yarn_sim() -> Iterator[YarnSimulator]:
    """A fresh simulated YARN (queues ``default`` and ``science``), stopped at teardown."""
    base = shared_tempdir("gw-yarn-sim-")
    sim = YarnSimulator(root=base, queues=QUEUES).start()
    yield sim
    sim.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def skein_client(yarn_sim: YarnSimulator) -> Iterator[skein.Client]:
    """The real skein client, connected to the simulator's driver."""
    client = skein.Client(address=yarn_sim.address, security=yarn_sim.security)
    yield client
    client.close()


def driver_settings(sim: YarnSimulator, directory: Path) -> dict[str, Any]:
    """``[backend.yarn]`` keys reaching ``sim``: its address, and its certificate and key
    written to ``directory`` (skein's mutual TLS)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "skein.crt", directory / "skein.pem"
    cert.write_bytes(sim.security._get_bytes("cert"))
    key.write_bytes(sim.security._get_bytes("key"))
    key.chmod(0o600)
    return {
        "driver_address": sim.address,
        "driver_certificate": str(cert),
        "driver_key": str(key),
        "files_directory": str(directory / "files"),
    }


def yarn_test_config(sim: YarnSimulator, directory: Path, *, python: str) -> dict[str, Any]:
    """A gateway config selecting the YARN backend on ``sim``, with about 1 s periods and
    small containers; containers run Dask from ``python``'s environment."""
    setup = f'export PATH="{os.path.dirname(python)}:$PATH"'
    return {
        "gateway": {"backend": "yarn"},
        "backend": {
            "yarn": {
                **driver_settings(sim, directory),
                "cluster_heartbeat_period": 1,
                "cluster_heartbeat_timeout": 30,
                "cluster_status_period": 1.0,
                "worker_status_period": 1.0,
                "cluster_start_timeout": 90,
                "worker_start_timeout": 90,
                "backoff_base_delay": 0.2,
                "backoff_max_delay": 2.0,
            }
        },
        "cluster": {
            "scheduler_setup": setup,
            "worker_setup": setup,
            "scheduler_memory": "1 G",
            "worker_memory": "768 M",
        },
    }


def applications_of(sim: YarnSimulator, cluster_name: str) -> list[SimApplication]:
    """The simulator's applications submitted for the gateway cluster ``cluster_name``."""
    with sim.lock:
        return [
            app
            for app in sim.apps.values()
            if app.spec.master.env.get("DASK_GATEWAY_CLUSTER_NAME") == cluster_name
        ]


def live_jobs(sim: YarnSimulator, cluster: Cluster) -> dict[str, LiveJob]:
    """Every process still running for ``cluster``: its master (the scheduler) and its worker
    containers, by YARN container id."""
    wanted = {app.id for app in applications_of(sim, cluster.name)}
    jobs: dict[str, LiveJob] = {}
    for app, container in sim.live_processes():
        if app.id in wanted:
            worker = container.env.get("DASK_GATEWAY_WORKER_NAME") if container.service else None
            jobs[container.yarn_id] = LiveJob(owner=app.user, running=True, worker=worker)
    return jobs


def end_job(sim: YarnSimulator, cluster: Cluster, worker: Worker | None) -> None:
    """As an operator: ``yarn application -kill`` for the scheduler; a worker's container
    process killed (as a node's OOM killer does)."""
    [app] = [a for a in applications_of(sim, cluster.name) if a.active]
    if worker is None:
        sim.kill_application(app.id, by="root")
        return
    [container] = [
        c for c in app.containers.values() if c.env.get("DASK_GATEWAY_WORKER_NAME") == worker.name
    ]
    sim.kill_container_process(app.id, container.skein_id)


@pytest.fixture(scope="session")
def job_python_packages() -> list[str]:
    return monorepo_packages(PLUGIN)


@pytest.fixture
def end_user_jobs(yarn_sim: YarnSimulator) -> Callable[[str], None]:
    def end(username: str) -> None:
        with yarn_sim.lock:
            ids = [a.id for a in yarn_sim.apps.values() if a.user == username and a.active]
        for app_id in ids:
            yarn_sim.kill_application(app_id)
        deadline = time.monotonic() + 30
        while any(app.user == username for app, _ in yarn_sim.live_processes()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)

    return end


@pytest.fixture
def gateway_backend_setup(yarn_sim: YarnSimulator, job_python: str, tmp_path: Path) -> BackendSetup:
    """The YARN backend for the scenario suite, on the simulator."""

    def inspect_running(running: RunningCluster) -> None:
        client, cluster = running.client, running.cluster
        app_id = cluster.state["app_id"]
        app = yarn_sim.apps[app_id]
        assert app.master is not None
        assert client.run_on_scheduler(lambda: os.environ["SKEIN_APPLICATION_ID"]) == app_id
        assert client.run_on_scheduler(lambda: os.environ["CONTAINER_ID"]) == app.master.yarn_id
        assert client.run_on_scheduler(os.getcwd) == str(app.master.workdir)
        assert (app.spec.queue, app.user) == ("science", running.username)
        assert app.spec.master.resources.memory == 1024
        containers = sorted(client.run(lambda: os.environ["SKEIN_CONTAINER_ID"]).values())
        assert containers == sorted(w.state["container_id"] for w in cluster.workers.values())

    def check_stopped(cluster: Cluster) -> None:
        app = yarn_sim.apps[cluster.state["app_id"]]
        assert (app.state, app.final_status) == ("FINISHED", "SUCCEEDED"), app.diagnostics

    return BackendSetup(
        backend="yarn",
        config=yarn_test_config(yarn_sim, tmp_path / "yarn", python=job_python),
        runs_as_user=True,
        variants={"queue science": {"cluster": {"queue": "science"}}},
        live_jobs=lambda cluster: live_jobs(yarn_sim, cluster),
        end_job=lambda cluster, worker: end_job(yarn_sim, cluster, worker),
        inspect_running=inspect_running,
        check_stopped=check_stopped,
        refused_option={"queue": "no-such-queue"},
        refused_reason=[
            r"YARN application application_\d+_\d+ FAILED",
            r"submitted by user \S+ to unknown queue: no-such-queue",
        ],
        dying_scheduler=lambda script: {"scheduler_setup": script},
        dead_scheduler_reason=[
            r"exited with exit code 3",
            r"The end of its scheduler's output:",
        ],
        ended_reason=lambda cluster: [
            rf"{cluster.state['app_id']} KILLED \(final status KILLED\)",
            r"was killed by user root",
        ],
        not_applicable={
            "unknown_user": "YARN runs containers as the user on its nodes, whose accounts the "
            "gateway's host need not have: an unknown user fails at YARN, and its diagnostics "
            "reach the client (test_yarn_gateway.py)",
            "status_command_fails_once": "no status command: one skein get_applications call "
            "per check, whose failure is retried (test_yarn_gateway.py)",
            "one_status_command_per_check": "no status command: one skein get_applications "
            "call per check (test_yarn_gateway.py counts the simulator's calls)",
            "logs": "YARN hands out a container's log only once the application ended (log "
            "aggregation); the failure reason includes the scheduler's",
        },
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml(config: dict[str, Any]) -> str:
    """The few shapes the test config has, as TOML."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []

    def table(name: str, body: dict[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for name, body in config.items():
        table(name, body)
    return "\n".join(lines) + "\n"


class GatewayProcess:
    """``gateway serve`` as a process of its own, so it can be killed with SIGKILL."""

    def __init__(self, folder: Path, config: Path, address: str) -> None:
        self.folder, self.config, self.address = folder, config, address
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.folder / "gateway.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway_core", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.address}/api/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, self.log_tail()
            assert time.monotonic() < deadline, "gateway did not start\n" + self.log_tail()
            time.sleep(0.2)

    def log_tail(self) -> str:
        return (self.folder / "gateway.log").read_text()[-4000:]


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], GatewayProcess]]:
    made: list[GatewayProcess] = []

    def make(config: dict[str, Any]) -> GatewayProcess:
        path = tmp_path / "gateway.toml"
        path.write_text(toml(config))
        port = int(config["proxy"]["address"].rsplit(":", 1)[1])
        made.append(GatewayProcess(tmp_path, path, f"http://127.0.0.1:{port}"))
        return made[-1]

    yield make
    for g in made:
        if g.proc is not None and g.proc.poll() is None:
            g.proc.kill()
            g.proc.wait()

"""The crash scenarios of job-queue backends: a real `gateway serve` killed with SIGKILL between
a submit and the write of its job id, restarted, ending with exactly one job for each worker.

Owns `GatewayProcess` (one gateway subprocess on a SQLite file store: start, ask its API as a
user, read its store, kill or stop it) and `JobQueueCrashScenarios`, which a job-queue plugin's
test module subclasses (with its ``gateway_backend_setup`` fixture, the same `BackendSetup` as
the scenario suite) to run them on its batch system. The crash points are
`gateway_core.crashpoints`' ``submitted:scheduler`` and ``submitted:worker``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from attrs import define, field

from ..cli import render_toml
from ..crashpoints import CRASH_VARIABLE
from ..models import ClusterStatus, WorkerStatus
from .harness import merge
from .scenarios import BackendSetup, LiveJob

WAIT = 120.0
"""Seconds any one wait of these scenarios may take (batch jobs on a loaded 2-core machine)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: Callable[[], Any], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting until {what}"
        time.sleep(0.25)


@define(kw_only=True)
class GatewayProcess:
    """One ``python -m gateway_core serve`` on a SQLite file store in ``folder``, its API and
    its clusters' routes on ``address``; `start` again after a kill is a restart."""

    folder: Path
    config: Mapping[str, Any]
    """The gateway config table (TOML-shaped); the store, keys and proxy address are added."""
    user: str
    """Whom `call` asks as (simple auth)."""
    env: dict[str, str] = field(factory=dict)
    """Set in its environment at the next `start` (a crash point)."""
    proc: subprocess.Popen[bytes] | None = None
    port: int = field(factory=_free_port)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.folder / "gateway.sqlite"

    @property
    def log(self) -> Path:
        return self.folder / "gateway.log"

    def write_config(self) -> Path:
        key = base64.b64encode(os.urandom(32)).decode()
        path = self.folder / "gateway.toml"
        if not path.exists():  # one key for every run: the store is encrypted with it
            table = merge(
                self.config,
                {
                    "gateway": {
                        "db_url": f"sqlite:///{self.db}",
                        "db_encrypt_keys": [key],
                        "stop_clusters_on_shutdown": False,
                    },
                    "proxy": {"address": f"127.0.0.1:{self.port}"},
                },
            )
            path.write_text(render_toml(table))
        return path

    def start(self) -> None:
        """Start it, and wait until it answers its health check."""
        config = self.write_config()
        bindir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), **self.env}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway_core", "serve", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                env=env,
            )

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            try:
                with urllib.request.urlopen(f"{self.address}/api/health", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        _wait("the gateway answers", healthy, timeout=60)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The API at ``/api<path>`` as `user`; raises HTTPError on >= 400, OSError when the
        gateway is gone."""
        request = urllib.request.Request(
            f"{self.address}/api{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={
                "Authorization": "Basic " + base64.b64encode(f"{self.user}:".encode()).decode(),
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            text = resp.read()
        return json.loads(text) if text else None

    def status(self, name: str) -> str:
        return str(self.call("GET", f"/v1/clusters/{name}")["status"])

    def wait_status(self, name: str, wanted: str) -> None:
        def there() -> bool:
            status = self.status(name)
            if status == "FAILED" and wanted != "FAILED":
                reason = self.call("GET", f"/v2/clusters/{name}/reason")["reason"]
                pytest.fail(f"cluster {name} failed: {reason}\n{self.log_tail()}")
            return status == wanted

        _wait(f"cluster {name} is {wanted}", there)

    def crashed(self, point: str) -> None:
        """It killed itself at ``point`` (and said so in its log)."""
        assert self.proc is not None
        assert self.proc.wait(timeout=WAIT) == -signal.SIGKILL, self.log_tail()
        assert f"Crashing at {point}" in self.log_tail(10**7)

    def stop(self) -> None:
        """SIGTERM, or SIGKILL if it does not exit within a minute."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # What its store holds (read while it runs or after it died)

    def _query(self, statement: str, *params: Any) -> list[Any]:
        db = sqlite3.connect(self.db, timeout=30)
        try:
            return list(db.execute(statement, params))
        finally:
            db.close()

    def cluster_names(self) -> list[str]:
        return [name for (name,) in self._query("SELECT name FROM clusters")]

    def cluster_state(self, name: str) -> dict[str, Any]:
        [(state,)] = self._query("SELECT state FROM clusters WHERE name = ?", name)
        return dict(json.loads(state))

    def workers(self, name: str) -> dict[str, tuple[WorkerStatus, dict[str, Any]]]:
        """Worker name → (status, driver state) of the cluster's workers."""
        rows = self._query("SELECT name, status, state FROM workers WHERE cluster_name = ?", name)
        return {w: (WorkerStatus(s), dict(json.loads(st))) for w, s, st in rows}

    def active_workers(self, name: str) -> dict[str, dict[str, Any]]:
        return {w: st for w, (s, st) in self.workers(name).items() if s.is_active}

    def record_stop(self, name: str) -> None:
        """Record a stop of cluster ``name`` and its workers in the store of a gateway that is
        down, as the API and the reconciler do (targets STOPPED), as if it came just before
        the crash."""
        db = sqlite3.connect(self.db, timeout=30)
        try:
            with db:
                db.execute(
                    "UPDATE clusters SET target = ? WHERE name = ?",
                    (ClusterStatus.STOPPED.value, name),
                )
                db.execute(
                    "UPDATE workers SET target = ? WHERE cluster_name = ?",
                    (WorkerStatus.STOPPED.value, name),
                )
        finally:
            db.close()


def compute(gateway: GatewayProcess, name: str, workers: int) -> int:
    """Connect to the cluster as its user through the gateway's proxy, wait for ``workers``
    workers, and run a task; its result."""
    from gateway_client import BasicAuth, Gateway

    with Gateway(gateway.address, auth=BasicAuth(gateway.user)) as client_gateway:
        cluster = client_gateway.connect(name)
        client = cluster.get_client(set_as_default=False)
        try:
            client.wait_for_workers(workers, timeout=WAIT)
            count = len(client.scheduler_info()["workers"])
            assert count == workers, f"the scheduler has {count} workers, not {workers}"
            return int(client.submit(sum, range(10)).result(timeout=WAIT))
        finally:
            client.close()
            cluster.close()


class JobQueueCrashScenarios:
    """The crash scenarios, one test each. Subclass it in a test module of a job-queue plugin
    (``class TestCrashes(JobQueueCrashScenarios): pass``) that has the scenario suite's
    ``gateway_backend_setup`` fixture; mark the module with its tier. The gateway runs the
    setup's first variant with ``switch_user = "sudo"``, as a throwaway user."""

    @pytest.fixture
    def gateway(
        self,
        gateway_backend_setup: BackendSetup,
        make_user: Callable[[], Any],
        tmp_path: Path,
    ) -> Iterator[GatewayProcess]:
        """A gateway process for a new user (made first, so removed after the gateway
        stopped); killed at teardown if it still runs."""
        setup = gateway_backend_setup
        user = make_user()
        variant = next(iter(setup.variants.values()))
        # Users are switched through sudo here (the setuid mode on uvloop, which gateway serve
        # runs, has its own test in core's test_jobqueue.py).
        sudo = {"backend": {setup.backend: {"switch_user": "sudo"}}}
        process = GatewayProcess(
            folder=tmp_path, config=merge(merge(setup.config, variant), sudo), user=user.pw_name
        )
        yield process
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()

    @staticmethod
    def live(setup: BackendSetup, gateway: GatewayProcess, name: str) -> Mapping[str, LiveJob]:
        """Job id → `LiveJob` of the cluster's scheduler and every worker the store has ever
        had, found by their job names (not by the ids the store holds)."""
        assert setup.live_jobs is not None, "JobQueueCrashScenarios needs BackendSetup.live_jobs"
        record = SimpleNamespace(name=name, workers=dict.fromkeys(gateway.workers(name)))
        return setup.live_jobs(record)  # type: ignore[arg-type]

    def test_a_worker_submitted_just_before_a_crash_is_adopted_not_doubled(
        self, gateway_backend_setup: BackendSetup, gateway: GatewayProcess
    ) -> None:
        setup = gateway_backend_setup
        gateway.env = {CRASH_VARIABLE: "submitted:worker"}
        gateway.start()
        name = gateway.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
        gateway.wait_status(name, "RUNNING")
        try:
            gateway.call("POST", f"/v1/clusters/{name}/scale", {"count": 1})
        except OSError:
            pass  # the answer may be cut short by the crash
        gateway.crashed("submitted:worker")

        # The window: the worker's job was submitted, and the store does not know its id.
        [(worker, state)] = gateway.active_workers(name).items()
        assert "job_id" not in state, state
        orphans = [j for j, job in self.live(setup, gateway, name).items() if job.worker]
        assert len(orphans) == 1, f"not one job for worker {worker}: {orphans}"

        gateway.env = {}
        gateway.start()
        assert compute(gateway, name, 1) == 45
        _wait(
            "the worker's record has its job id",
            lambda: gateway.active_workers(name).get(worker, {}).get("job_id") is not None,
        )
        assert gateway.active_workers(name)[worker]["job_id"] == orphans[0], "not adopted"
        time.sleep(3 * setup.status_period + 1)  # three status periods: nothing doubled since
        jobs = self.live(setup, gateway, name)
        assert sorted(j.worker or "" for j in jobs.values()) == ["", worker], jobs
        assert list(gateway.active_workers(name)) == [worker]
        assert "submitted before the gateway stopped but never recorded" in gateway.log_tail(10**7)
        self.stop_and_check_nothing_left(setup, gateway, name)

    def test_a_scheduler_submitted_just_before_a_crash_is_adopted_not_doubled(
        self, gateway_backend_setup: BackendSetup, gateway: GatewayProcess
    ) -> None:
        setup = gateway_backend_setup
        gateway.env = {CRASH_VARIABLE: "submitted:scheduler"}
        gateway.start()
        try:
            name = gateway.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
        except OSError:  # the crash came first: the name is in the store (durable before)
            name = ""
        gateway.crashed("submitted:scheduler")
        name = name or gateway.cluster_names()[0]
        state = gateway.cluster_state(name)
        assert "staging_dir" in state and "job_id" not in state, state
        orphans = list(self.live(setup, gateway, name))
        assert len(orphans) == 1, f"not one scheduler job after the crash: {orphans}"

        gateway.env = {}
        gateway.start()
        gateway.wait_status(name, "RUNNING")
        assert gateway.cluster_state(name)["job_id"] == orphans[0], "replaced, not adopted"
        gateway.call("POST", f"/v1/clusters/{name}/scale", {"count": 1})
        assert compute(gateway, name, 1) == 45
        jobs = self.live(setup, gateway, name)
        assert sorted(j.worker is None for j in jobs.values()) == [False, True], jobs
        assert orphans[0] in jobs
        self.stop_and_check_nothing_left(setup, gateway, name)

    def test_a_stop_cancels_a_job_whose_id_was_never_recorded(
        self, gateway_backend_setup: BackendSetup, gateway: GatewayProcess
    ) -> None:
        """Killed after a worker's submit; the cluster's stop was asked just before (recorded
        in the store while the gateway is down, targets STOPPED, so the worker's start is not
        run again): the restarted gateway stops the worker whose record has no job id by
        cancelling the job it finds by its name."""
        setup = gateway_backend_setup
        gateway.env = {CRASH_VARIABLE: "submitted:worker"}
        gateway.start()
        name = gateway.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
        gateway.wait_status(name, "RUNNING")
        try:
            gateway.call("POST", f"/v1/clusters/{name}/scale", {"count": 1})
        except OSError:
            pass
        gateway.crashed("submitted:worker")
        [(worker, state)] = gateway.active_workers(name).items()
        assert "job_id" not in state, state
        assert [j.worker for j in self.live(setup, gateway, name).values()].count(worker) == 1

        gateway.record_stop(name)
        gateway.env = {}
        gateway.start()
        gateway.wait_status(name, "STOPPED")
        _wait("every job of the cluster ended", lambda: not self.live(setup, gateway, name))
        log = gateway.log_tail(10**7)
        assert f"Stopping worker {worker}: found" in log, log[-3000:]
        gateway.stop()
        assert gateway.proc is not None and gateway.proc.returncode == 0, gateway.log_tail()

    def stop_and_check_nothing_left(
        self, setup: BackendSetup, gateway: GatewayProcess, name: str
    ) -> None:
        staging = gateway.cluster_state(name).get("staging_dir")
        gateway.call("DELETE", f"/v1/clusters/{name}")
        gateway.wait_status(name, "STOPPED")
        _wait("every job of the cluster ended", lambda: not self.live(setup, gateway, name))
        if staging:
            _wait("its staging directory removed", lambda: not Path(staging).exists())
        gateway.stop()
        assert gateway.proc is not None and gateway.proc.returncode == 0, gateway.log_tail()


__all__ = ["GatewayProcess", "JobQueueCrashScenarios", "compute"]

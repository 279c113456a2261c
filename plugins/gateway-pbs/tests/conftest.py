"""Fixtures of the PBS tests: the PBS simulator (tests/pbs_sim) installed where every user can
run it and put on PATH, throwaway user accounts, a Python those users can run, and a gateway
config for the ``pbs`` backend.

There is no real PBS here: the integration tests run against the simulator. A test that
cannot get what it needs (root, to create accounts) fails with the reason; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pbs_sim.install import SimulatedPBS, install

REPO = Path(__file__).resolve().parents[3]
JOB_PACKAGES = ["./proxy", "./client", "./core[local]", "./plugins/gateway-pbs"]
QUEUES = ("workq", "debug")
_job_python = {"path": sys.executable}
"""The Python the jobs and the launcher run (as throwaway users); set by `job_python`."""


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kw)


def _shared_tempdir(prefix: str) -> Path:
    """A temporary directory in /tmp every user can read and traverse."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    return base


@pytest.fixture(scope="session")
def pbs() -> Iterator[SimulatedPBS]:
    """The simulated PBS server (queues ``workq``, the default, and ``debug``), its commands
    first on this process's PATH for the whole session."""
    base = _shared_tempdir("gw-pbs-sim-")
    sim = install(base, queues=QUEUES)
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{sim.bin}:{old_path}"
    yield sim
    os.environ["PATH"] = old_path
    for record in sim.state.glob("jobs/*.json"):
        job = json.loads(record.read_text())
        if job["state"] != "F":
            _run([sim.program("qdel"), job["id"]])
    shutil.rmtree(base, ignore_errors=True)


def jobs_of(sim: SimulatedPBS, username: str) -> list[dict[str, Any]]:
    """The simulator's records of ``username``'s jobs."""
    jobs = [json.loads(p.read_text()) for p in sim.state.glob("jobs/*.json")]
    return [j for j in jobs if j["owner"] == username]


@pytest.fixture(scope="session")
def homes() -> Iterator[Path]:
    """A base directory for the throwaway users' homes, removed at the end."""
    base = _shared_tempdir("gw-pbs-homes-")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def make_user(pbs: SimulatedPBS, homes: Path) -> Iterator[Callable[[], pwd.struct_passwd]]:
    """``make_user()``: a new account for one test; its live jobs are deleted and the account
    removed at teardown."""
    if os.geteuid() != 0:
        pytest.fail("the PBS integration tests create user accounts, which needs root")
    made: list[str] = []

    def factory() -> pwd.struct_passwd:
        name = f"gwp{secrets.token_hex(4)}"
        done = _run(
            ["useradd", "--create-home", "--home-dir", str(homes / name), "-s", "/bin/sh", name]
        )
        if done.returncode != 0:
            pytest.fail(f"useradd {name} failed: {done.stderr}")
        made.append(name)
        return pwd.getpwnam(name)

    yield factory
    for name in made:
        live = [j["id"] for j in jobs_of(pbs, name) if j["state"] != "F"]
        if live:
            _run([pbs.program("qdel"), *live])
        _run(["pkill", "-KILL", "-u", name])
        _run(["userdel", "--force", name])


def _runs_as_nobody(python: str) -> bool:
    try:
        probe = subprocess.run(
            [python, "-c", "import distributed, gateway_client, gateway_core"],
            capture_output=True,
            check=False,
            cwd="/",
            user=65534,
            group=65534,
            extra_groups=[],
        )
    except OSError:
        return False
    return probe.returncode == 0


@pytest.fixture(scope="session")
def job_python(homes: Path) -> Iterator[str]:
    """A Python the throwaway users can run with Dask and our packages: this one when they can,
    else a virtual environment built for them from the system Python (installed, not
    editable, since the checkout may be unreadable to them)."""
    python = sys.executable
    if not _runs_as_nobody(python):
        venv = homes / "job-venv"
        python = str(venv / "bin" / "python")
        uv = shutil.which("uv")
        steps = (
            [
                [uv, "venv", "--quiet", "--python", "/usr/bin/python3", str(venv)],
                [uv, "pip", "install", "--quiet", "--python", python, *JOB_PACKAGES],
            ]
            if uv
            else [
                ["/usr/bin/python3", "-m", "venv", str(venv)],
                [python, "-m", "pip", "install", "--quiet", *JOB_PACKAGES],
            ]
        )
        for argv in steps:
            done = _run(argv, cwd=REPO, timeout=900)
            if done.returncode != 0:
                pytest.fail(f"building the jobs' venv failed: {argv}\n{done.stderr[-3000:]}")
        _run(["chmod", "-R", "a+rX", str(venv)])
        if not _runs_as_nobody(python):
            pytest.fail(f"other users cannot run {python} with Dask and the gateway's packages")
    _job_python["path"] = python
    yield python
    _job_python["path"] = sys.executable


def pbs_config(
    *, backend: dict[str, Any] | None = None, cluster: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A gateway config for the pbs backend with short periods and small jobs; the jobs put
    the job Python's environment first on PATH in their setup scripts."""
    setup = f'export PATH="{os.path.dirname(_job_python["path"])}:$PATH"'
    return {
        "gateway": {"backend": "pbs"},
        "backend": {
            "pbs": {
                "cluster_heartbeat_period": 1,
                "cluster_heartbeat_timeout": 30,
                "cluster_status_period": 1.0,
                "worker_status_period": 1.0,
                "cluster_start_timeout": 90,
                "worker_start_timeout": 90,
                "backoff_base_delay": 0.2,
                "backoff_max_delay": 2.0,
                "dask_gateway_jobqueue_launcher": [
                    _job_python["path"],
                    "-m",
                    "gateway_core.backends.jobqueue_launcher",
                ],
                **(backend or {}),
            }
        },
        "cluster": {
            "scheduler_setup": setup,
            "worker_setup": setup,
            "scheduler_memory": "1 G",
            "worker_memory": "768 M",
            **(cluster or {}),
        },
    }

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
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pbs_sim.install import SimulatedPBS, install

from gateway_core.testing.jobqueue import (
    JobTestSetupError,
    add_user,
    delete_user,
    jobqueue_test_config,
    shared_tempdir,
)
from gateway_core.testing.jobqueue import job_python as find_job_python

REPO = Path(__file__).resolve().parents[3]
JOB_PACKAGES = ["./proxy", "./client", "./core[local]", "./plugins/gateway-pbs"]
QUEUES = ("workq", "debug")
_job_python = {"path": sys.executable}
"""The Python the jobs and the launcher run (as throwaway users); set by `job_python`."""


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kw)


@pytest.fixture(scope="session")
def pbs() -> Iterator[SimulatedPBS]:
    """The simulated PBS server (queues ``workq``, the default, and ``debug``), its commands
    first on this process's PATH for the whole session."""
    base = shared_tempdir("gw-pbs-sim-")
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
    base = shared_tempdir("gw-pbs-homes-")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def make_user(pbs: SimulatedPBS, homes: Path) -> Iterator[Callable[[], pwd.struct_passwd]]:
    """``make_user()``: a new account for one test; its live jobs are deleted and the account
    removed at teardown."""
    made: list[str] = []

    def factory() -> pwd.struct_passwd:
        try:
            user = add_user("gwp", homes)
        except JobTestSetupError as exc:
            pytest.fail(str(exc))
        made.append(user.pw_name)
        return user

    yield factory
    for name in made:
        live = [j["id"] for j in jobs_of(pbs, name) if j["state"] != "F"]
        if live:
            _run([pbs.program("qdel"), *live])
        delete_user(name)


@pytest.fixture(scope="session")
def job_python(homes: Path) -> Iterator[str]:
    """A Python the throwaway users can run with Dask and our packages (see
    `gateway_core.testing.jobqueue.job_python`)."""
    try:
        python = find_job_python(packages=JOB_PACKAGES, base=homes, source=REPO)
    except JobTestSetupError as exc:
        pytest.fail(str(exc))
    _job_python["path"] = python
    yield python
    _job_python["path"] = sys.executable


def pbs_config(
    *, backend: dict[str, Any] | None = None, cluster: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A gateway config for the pbs backend with short periods and small jobs; the jobs put
    the job Python's environment first on PATH in their setup scripts."""
    return jobqueue_test_config("pbs", python=_job_python["path"], backend=backend, cluster=cluster)

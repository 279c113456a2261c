"""Fixtures of the Slurm tests: a real Slurm (started by ci/start-slurm.sh when it does not
answer), throwaway user accounts, and a gateway config for the ``slurm`` backend.

A system test that cannot get what it needs fails with the reason; nothing is skipped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway_core.testing.jobqueue import (
    JobTestSetupError,
    add_user,
    delete_user,
    jobqueue_test_config,
    shared_tempdir,
)
from gateway_core.testing.jobqueue import job_python as find_job_python

START_SLURM = Path(__file__).resolve().parent.parent / "ci" / "start-slurm.sh"
REPO = Path(__file__).resolve().parents[3]
JOB_PACKAGES = ["./proxy", "./client", "./core[local]", "./plugins/gateway-slurm"]
_job_python = {"path": sys.executable}
"""The Python jobs and the launcher run as the requesting user; set by the `job_python`
fixture (this interpreter when users can run it, else a venv built for them)."""


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kw)


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = _run(["sinfo", "-h", "-o", "%T"], timeout=20)
    return out.returncode == 0 and any(
        s.startswith(("idle", "mixed", "allocated", "completing")) for s in out.stdout.split()
    )


@pytest.fixture(scope="session")
def slurm() -> None:
    """A Slurm cluster that takes jobs: the one running, or one started by ci/start-slurm.sh."""
    if _slurm_answers():
        return
    if os.geteuid() != 0:
        pytest.fail(
            "Slurm does not answer (sinfo) and starting it needs root: run "
            f"`sudo {START_SLURM}` first, or run the tests as root (CI does)"
        )
    started = _run([str(START_SLURM)], timeout=600)
    if started.returncode != 0 or not _slurm_answers():
        pytest.fail(
            f"{START_SLURM} could not start Slurm (exit {started.returncode}):\n"
            f"{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        )


@pytest.fixture(scope="session")
def homes() -> Iterator[Path]:
    """A base directory for the throwaway users' homes, readable by them, removed at the end."""
    base = shared_tempdir("gw-slurm-homes-")
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _user_jobs(name: str) -> list[str]:
    out = _run(["squeue", "-h", "-u", name, "-o", "%i"], timeout=30)
    return out.stdout.split() if out.returncode == 0 else []


@pytest.fixture
def make_user(slurm: None, homes: Path) -> Iterator[Callable[[], pwd.struct_passwd]]:
    """``make_user()``: a new account (home under a temporary base) for one test; its jobs are
    cancelled and the account removed at teardown."""
    made: list[str] = []

    def factory() -> pwd.struct_passwd:
        try:
            user = add_user("gws", homes)
        except JobTestSetupError as exc:
            pytest.fail(str(exc))
        made.append(user.pw_name)
        return user

    yield factory
    for name in made:
        jobs = _user_jobs(name)
        if jobs:
            _run(["scancel", *jobs])
            deadline = time.monotonic() + 30
            while _user_jobs(name) and time.monotonic() < deadline:
                time.sleep(0.2)
        delete_user(name)


@pytest.fixture(scope="session")
def job_python(slurm: None, homes: Path) -> Iterator[str]:
    """A Python the requesting users can run with Dask and our packages (see
    `gateway_core.testing.jobqueue.job_python`)."""
    try:
        python = find_job_python(packages=JOB_PACKAGES, base=homes, source=REPO)
    except JobTestSetupError as exc:
        pytest.fail(str(exc))
    _job_python["path"] = python
    yield python
    _job_python["path"] = sys.executable


def slurm_config(
    *, backend: dict[str, Any] | None = None, cluster: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A gateway config for the slurm backend with short periods and small jobs."""
    return jobqueue_test_config(
        "slurm", python=_job_python["path"], backend=backend, cluster=cluster
    )

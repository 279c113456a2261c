"""Fixtures of the Slurm tests: a real Slurm (started by ci/start-slurm.sh when it does not
answer), throwaway user accounts, and a gateway config for the ``slurm`` backend.

A system test that cannot get what it needs fails with the reason; nothing is skipped.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

START_SLURM = Path(__file__).resolve().parent.parent / "ci" / "start-slurm.sh"
REPO = Path(__file__).resolve().parents[3]
JOB_PACKAGES = ["./proxy", "./client", "./core[local]", "./plugins/gateway-slurm"]
_job_python = {"path": sys.executable}
"""The Python jobs and the launcher run as the requesting user; set by the `job_python`
fixture (this interpreter when users can run it, else a venv built for them)."""


def job_setup() -> str:
    """The setup script of test jobs: the job Python's environment on PATH, as a site would
    activate one."""
    return f'export PATH="{os.path.dirname(_job_python["path"])}:$PATH"'


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
    base = Path(tempfile.mkdtemp(prefix="gw-slurm-homes-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _user_jobs(name: str) -> list[str]:
    out = _run(["squeue", "-h", "-u", name, "-o", "%i"], timeout=30)
    return out.stdout.split() if out.returncode == 0 else []


@pytest.fixture
def make_user(slurm: None, homes: Path) -> Iterator[Callable[[], Any]]:
    """``make_user()``: a new account (home under a temporary base) for one test; its jobs are
    cancelled and the account removed at teardown."""
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests create user accounts, which needs root (CI runs as root)")
    made: list[str] = []

    def factory() -> Any:
        import pwd

        name = f"gws{secrets.token_hex(4)}"
        home = homes / name
        done = _run(["useradd", "--create-home", "--home-dir", str(home), "-s", "/bin/sh", name])
        if done.returncode != 0:
            pytest.fail(f"useradd {name} failed: {done.stderr}")
        made.append(name)
        return pwd.getpwnam(name)

    yield factory
    for name in made:
        jobs = _user_jobs(name)
        if jobs:
            _run(["scancel", *jobs])
            deadline = time.monotonic() + 30
            while _user_jobs(name) and time.monotonic() < deadline:
                time.sleep(0.2)
        _run(["userdel", "--force", name])


def _usable_by_others(python: str) -> subprocess.CompletedProcess[str]:
    try:
        # As the gateway switches users (setuid mode): not setpriv, whose exec some sandboxes
        # let through where the gateway's is refused.
        probe = subprocess.run(
            [python, "-c", "import distributed, gateway_client, gateway_core"],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            user=65534,
            group=65534,
            extra_groups=[],
        )
    except OSError as exc:
        probe = subprocess.CompletedProcess([], 126, "", str(exc))
    return probe


def _build_job_venv(base: Path) -> str:
    """A virtual environment users can run, from the system Python, with our packages
    installed (not editable: the checkout may sit where users cannot read)."""
    venv = base / "job-venv"
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
            pytest.fail(f"building the jobs' venv failed: {' '.join(argv)}\n{done.stderr[-3000:]}")
    _run(["chmod", "-R", "a+rX", str(base)])
    return python


@pytest.fixture(scope="session")
def job_python(slurm: None, homes: Path) -> Iterator[str]:
    """A Python the requesting users can run with Dask and our packages: this interpreter when
    they can (a system Python), else a venv built for them from /usr/bin/python3 (a pyenv or
    uv-managed Python under /root is unreadable to them)."""
    python = sys.executable
    probe = _usable_by_others(python)
    if probe.returncode != 0:
        python = _build_job_venv(homes)
        probe = _usable_by_others(python)
    if probe.returncode != 0:
        pytest.fail(
            f"other users cannot run {python} with Dask: {probe.stderr.strip()[-500:]}. The "
            "Slurm jobs and the launcher run as throwaway users, so their Python must be "
            "readable by them."
        )
    _job_python["path"] = python
    yield python
    _job_python["path"] = sys.executable


def slurm_config(
    *, backend: dict[str, Any] | None = None, cluster: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A gateway config for the slurm backend with short periods and small jobs."""
    return {
        "gateway": {"backend": "slurm"},
        "backend": {
            "slurm": {
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
            "scheduler_setup": job_setup(),
            "worker_setup": job_setup(),
            "scheduler_memory": "1 G",
            "worker_memory": "768 M",
            **(cluster or {}),
        },
    }

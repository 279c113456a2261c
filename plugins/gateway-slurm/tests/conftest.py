"""Fixtures of the Slurm tests: a real Slurm (started by ci/start-slurm.sh when it does not
answer), and the Slurm backend for `gateway_core.testing`'s fixtures and scenario suite
(`gateway_backend_setup`, `end_user_jobs`, `job_python_packages`).

A system test that cannot get what it needs fails with the reason; nothing is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import pytest

from gateway_core.testing.jobqueue import (
    QueuedJob,
    end_jobs_of_user,
    jobqueue_backend_setup,
    monorepo_packages,
)
from gateway_core.testing.scenarios import BackendSetup, RunningCluster
from gateway_slurm.backend import SlurmDriver

START_SLURM = Path(__file__).resolve().parent.parent / "ci" / "start-slurm.sh"
PLUGIN = Path(__file__).resolve().parents[1]


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)


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


def find_jobs(names: Collection[str]) -> dict[str, QueuedJob]:
    """Slurm's jobs with these names, ended ones included while Slurm remembers them."""
    out = _run(["squeue", "-h", "--states=all", f"--name={','.join(names)}", "-o", "%i|%j|%u|%t"])
    jobs = {}
    for line in out.stdout.splitlines():
        if line.strip():
            job_id, name, owner, state = line.split("|")
            jobs[job_id] = QueuedJob(name=name, owner=owner, state=state)
    return jobs


def scancel(job_ids: Sequence[str], *, check: bool = True) -> None:
    """Cancel jobs behind the gateway's back (as root, like an operator); ``check``: fail when
    scancel does (a cleanup does not care about jobs that have just ended)."""
    subprocess.run(["scancel", *job_ids], check=check, capture_output=True)


def user_jobs(username: str) -> list[str]:
    out = _run(["squeue", "-h", "-u", username, "-o", "%i"])
    return out.stdout.split() if out.returncode == 0 else []


@pytest.fixture(scope="session")
def job_python_packages() -> list[str]:
    return monorepo_packages(PLUGIN)


@pytest.fixture
def end_user_jobs(slurm: None) -> Callable[[str], None]:
    return lambda username: end_jobs_of_user(
        username, user_jobs=user_jobs, end_jobs=lambda ids: scancel(ids, check=False)
    )


def inspect_running(running: RunningCluster) -> None:
    # Slurm jobs run in the staging directory, and write their output there as they go.
    staging = Path(running.cluster.state["staging_dir"])
    assert running.client.run_on_scheduler(os.getcwd) == str(staging)
    assert (staging / f"dask-scheduler-{running.cluster.name}.log").exists()


@pytest.fixture
def gateway_backend_setup(slurm: None, job_python: str) -> BackendSetup:
    """The Slurm backend for the scenario suite, on the real one-node Slurm."""
    return jobqueue_backend_setup(
        "slurm",
        python=job_python,
        states=SlurmDriver.states,
        running_state="R",
        stopped_states=("CA", "CD"),
        find_jobs=find_jobs,
        end_jobs=scancel,
        job_label=SlurmDriver.job_label,
        status_command="squeue",
        refused_option={"partition": "no-such-partition"},
        refused_reason=[
            r"sbatch failed \(exit 1\)",
            "invalid partition specified: no-such-partition",
        ],
        dead_state=r"\(state F: failed\)",
        ended_state="CA: cancelled",
        variants={
            "setuid": {"backend": {"slurm": {"switch_user": "setuid"}}},
            "sudo": {"backend": {"slurm": {"switch_user": "sudo"}}},
        },
        inspect_running=inspect_running,
        # Slurm's own cancellation takes seconds on a busy 2-core machine (6 s seen under load).
        detection_slack=12.0,
    )

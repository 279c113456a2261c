"""Fixtures of the PBS tests: the PBS simulator (tests/pbs_sim) installed where every user can
run it and put on PATH, and the PBS backend for `gateway_core.testing`'s fixtures and scenario
suite (`gateway_backend_setup`, `end_user_jobs`, `job_python_packages`).

There is no real PBS here: the integration tests run against the simulator. A test that
cannot get what it needs (root, to create accounts) fails with the reason; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pbs_sim.install import SimulatedPBS, install

from gateway_core.testing.jobqueue import (
    QueuedJob,
    end_jobs_of_user,
    jobqueue_backend_setup,
    monorepo_packages,
    shared_tempdir,
)
from gateway_core.testing.scenarios import BackendSetup, RunningCluster
from gateway_pbs.backend import PBSDriver

PLUGIN = Path(__file__).resolve().parents[1]
QUEUES = ("workq", "debug")


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
    live = [j["id"] for j in all_jobs(sim) if j["state"] != "F"]
    if live:
        subprocess.run([sim.program("qdel"), *live], capture_output=True, check=False)
    shutil.rmtree(base, ignore_errors=True)


def all_jobs(sim: SimulatedPBS) -> list[dict[str, Any]]:
    """The simulator's records of every job."""
    return [json.loads(p.read_text()) for p in sim.state.glob("jobs/*.json")]


def jobs_of(sim: SimulatedPBS, username: str) -> list[dict[str, Any]]:
    """The simulator's records of ``username``'s jobs."""
    return [j for j in all_jobs(sim) if j["owner"] == username]


def qdel(sim: SimulatedPBS, job_ids: Sequence[str], *, check: bool = True) -> None:
    """Delete jobs behind the gateway's back (as root, like an operator); ``check``: fail when
    qdel does (a cleanup does not care about jobs that have just finished)."""
    subprocess.run([sim.program("qdel"), *job_ids], capture_output=True, check=check)


@pytest.fixture(scope="session")
def job_python_packages() -> list[str]:
    return monorepo_packages(PLUGIN)


@pytest.fixture
def end_user_jobs(pbs: SimulatedPBS) -> Callable[[str], None]:
    def live(username: str) -> list[str]:
        return [j["id"] for j in jobs_of(pbs, username) if j["state"] != "F"]

    return lambda username: end_jobs_of_user(
        username, user_jobs=live, end_jobs=lambda ids: qdel(pbs, ids, check=False)
    )


@pytest.fixture
def gateway_backend_setup(pbs: SimulatedPBS, job_python: str) -> BackendSetup:
    """The PBS backend for the scenario suite, on the simulator."""

    def find_jobs(names: Collection[str]) -> dict[str, QueuedJob]:
        wanted = set(names)
        return {
            j["id"]: QueuedJob(name=j["name"], owner=j["owner"], state=j["state"])
            for j in all_jobs(pbs)
            if j["name"] in wanted
        }

    def inspect_running(running: RunningCluster) -> None:
        cluster, client = running.cluster, running.client
        scheduler_job = cluster.state["job_id"]
        assert client.run_on_scheduler(lambda: os.environ["PBS_JOBID"]) == scheduler_job
        home = Path(running.client.run_on_scheduler(os.path.expanduser, "~"))
        if running.variant == "setuid, stage-in":
            # The scheduler runs in its private sandbox, where the TLS files were staged in.
            assert client.run_on_scheduler(os.getcwd) == f"{home}/pbs.{scheduler_job}.x8z"
        else:
            assert client.run_on_scheduler(os.getcwd) == str(home)  # PBS starts jobs at home
        [record] = [j for j in all_jobs(pbs) if j["id"] == scheduler_job]
        assert record["name"] == f"dask-scheduler-{cluster.name}"
        assert (record["queue"], record["project"]) == ("debug", "p42")
        assert record["resources"]["mem"] == "1024mb"

    return jobqueue_backend_setup(
        "pbs",
        python=job_python,
        states=PBSDriver.states,
        running_state="R",
        stopped_states=("F",),
        find_jobs=find_jobs,
        end_jobs=lambda ids: qdel(pbs, ids),
        job_label=PBSDriver.job_label,
        status_command=pbs.program("qstat"),
        refused_option={"queue": "no-such-queue"},
        refused_reason=[r"qsub failed \(exit 170\): qsub: Unknown queue"],
        dead_state="F: finished|E: exiting",
        ended_state="F: finished",
        not_applicable={
            "logs": "PBS copies a job's output to the staging directory only when the job "
            "ends, and the staging directory goes with the cluster: the logs route answers "
            "that the output is not there yet (PBSDriver.missing_output_hint)",
        },
        variants={
            "setuid, stage-in": {
                "backend": {"pbs": {"switch_user": "setuid"}},
                "cluster": {"use_stagein": True, "queue": "debug", "project": "p42"},
            },
            "sudo, shared files": {
                "backend": {"pbs": {"switch_user": "sudo"}},
                "cluster": {"use_stagein": False, "queue": "debug", "project": "p42"},
            },
        },
        inspect_running=inspect_running,
    )

"""Test helpers for job-queue backend plugins: throwaway users, a Python they can run, and the
job-queue half of the scenario suite's setup.

Owns `shared_tempdir`, `add_user` / `delete_user` (real accounts, root only), `job_python`
(this interpreter if other users can run it with Dask, else a venv built for them),
`jobqueue_test_config` (a gateway config with short periods for a job-queue backend),
`monorepo_packages`, `end_jobs_of_user`, and `jobqueue_backend_setup` / `QueuedJob`: a
`BackendSetup` for a job-queue backend from what differs between schedulers (how to list, end
and name jobs). The Slurm and PBS plugins' tests use them; so can a third party's.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import define

from .scenarios import BackendSetup, LiveJob, RunningCluster

if TYPE_CHECKING:
    from ..backends.jobqueue import StateTable
    from ..models import Cluster, Worker


class JobTestSetupError(RuntimeError):
    """What a system test needs cannot be had here; the message says why (tests fail on it,
    they never skip)."""


def _run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, **kw)


def shared_tempdir(prefix: str) -> Path:
    """A new directory in /tmp that every user can read and traverse (mode 0755)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    return base


def add_user(prefix: str, homes: Path) -> pwd.struct_passwd:
    """A new account ``<prefix><8 hex>`` with its home under ``homes``; needs root."""
    if os.geteuid() != 0:
        raise JobTestSetupError("these tests create user accounts, which needs root (CI is root)")
    name = f"{prefix}{secrets.token_hex(4)}"
    done = _run(
        ["useradd", "--create-home", "--home-dir", str(homes / name), "-s", "/bin/sh", name]
    )
    if done.returncode != 0:
        raise JobTestSetupError(f"useradd {name} failed: {done.stderr.strip()}")
    return pwd.getpwnam(name)


def delete_user(name: str) -> None:
    """Kill what ``name`` still runs and remove the account (cancel its jobs first)."""
    _run(["pkill", "-KILL", "-u", name])
    _run(["userdel", "--force", name])


IMPORT_CHECK = "import distributed, gateway_client, gateway_core"


def runs_as_others(python: str) -> subprocess.CompletedProcess[str]:
    """Run ``python`` as nobody, importing Dask and the gateway's packages, the way the
    gateway switches users (setuid in the child, not a helper program)."""
    try:
        return subprocess.run(
            [python, "-c", IMPORT_CHECK],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            user=65534,
            group=65534,
            extra_groups=[],
        )
    except OSError as exc:
        return subprocess.CompletedProcess([python], 126, "", str(exc))


def job_python(*, packages: Sequence[str], base: Path, source: Path) -> str:
    """A Python other users can run with Dask and ``packages``: this interpreter when they can
    (a system Python), else a venv built in ``base`` from /usr/bin/python3 with ``packages``
    installed from ``source`` (not editable: the checkout may be unreadable to them; a pyenv
    or uv-managed Python under /root is). Raises `JobTestSetupError` with the reason."""
    python = sys.executable
    probe = runs_as_others(python)
    if probe.returncode == 0:
        return python
    venv = base / "job-venv"
    python = str(venv / "bin" / "python")
    uv = shutil.which("uv")
    steps = (
        [
            [uv, "venv", "--quiet", "--python", "/usr/bin/python3", str(venv)],
            [uv, "pip", "install", "--quiet", "--python", python, *packages],
        ]
        if uv
        else [
            ["/usr/bin/python3", "-m", "venv", str(venv)],
            [python, "-m", "pip", "install", "--quiet", *packages],
        ]
    )
    for argv in steps:
        done = _run(argv, cwd=source, timeout=900)
        if done.returncode != 0:
            raise JobTestSetupError(
                f"building the jobs' venv failed: {' '.join(argv)}\n{done.stderr[-3000:]}"
            )
    _run(["chmod", "-R", "a+rX", str(venv)])
    probe = runs_as_others(python)
    if probe.returncode != 0:
        raise JobTestSetupError(
            f"other users cannot run {python} with Dask: {probe.stderr.strip()[-500:]}. Jobs "
            "and the launcher run as throwaway users, so their Python must be readable by them."
        )
    return python


def monorepo_packages(plugin: Path) -> list[str]:
    """What `job_python` installs for a plugin of this monorepo: the checkout's ``proxy``,
    ``client`` and ``core[local]`` (the folders two levels above ``plugin``) and ``plugin``
    itself, as absolute paths (a plugin's ``job_python_packages`` fixture)."""
    plugin = plugin.resolve()
    root = plugin.parents[1]
    return [str(root / "proxy"), str(root / "client"), f"{root / 'core'}[local]", str(plugin)]


def jobqueue_test_config(
    backend_name: str,
    *,
    python: str,
    backend: Mapping[str, Any] | None = None,
    cluster: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A gateway config for a job-queue backend with short periods and small jobs; the
    launcher and the jobs run ``python`` (its environment goes first on the jobs' PATH)."""
    setup = f'export PATH="{os.path.dirname(python)}:$PATH"'
    return {
        "gateway": {"backend": backend_name},
        "backend": {
            backend_name: {
                "cluster_heartbeat_period": 1,
                "cluster_heartbeat_timeout": 30,
                "cluster_status_period": 1.0,
                "worker_status_period": 1.0,
                "cluster_start_timeout": 90,
                "worker_start_timeout": 90,
                "backoff_base_delay": 0.2,
                "backoff_max_delay": 2.0,
                "dask_gateway_jobqueue_launcher": [
                    python,
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


@define(kw_only=True, frozen=True)
class QueuedJob:
    """One job as the scheduler lists it (for `jobqueue_backend_setup`'s ``find_jobs``)."""

    name: str
    owner: str
    state: str
    """The scheduler's state code (``R``, ``PD``, ``F``)."""


def end_jobs_of_user(
    username: str,
    *,
    user_jobs: Callable[[str], Sequence[str]],
    end_jobs: Callable[[Sequence[str]], None],
    timeout: float = 30.0,
) -> None:
    """End the jobs ``user_jobs(username)`` lists (ids of jobs not ended) with
    ``end_jobs(ids)``, and wait up to ``timeout`` seconds for the list to empty: what an
    ``end_user_jobs`` fixture of a job-queue plugin does."""
    jobs = user_jobs(username)
    if not jobs:
        return
    end_jobs(jobs)
    deadline = time.monotonic() + timeout
    while user_jobs(username) and time.monotonic() < deadline:
        time.sleep(0.2)


def job_names(cluster: Cluster) -> dict[str, str | None]:
    """The job names the job-queue drivers give a cluster's scheduler and workers → the
    worker's name (None for the scheduler): ``dask-scheduler-<cluster>``,
    ``dask-worker-<worker>``."""
    names: dict[str, str | None] = {f"dask-scheduler-{cluster.name}": None}
    names.update({f"dask-worker-{w}": w for w in cluster.workers})
    return names


def check_staging_directory(running: RunningCluster) -> Path:
    """Assert the running cluster's staging directory is the user's and private (0700), under
    ``~/.dask-gateway``, with its TLS certificate and key (0600); returns it."""
    staging = Path(running.cluster.state["staging_dir"])
    home = Path(pwd.getpwnam(running.username).pw_dir)
    assert staging.parent == home / ".dask-gateway", staging
    info = staging.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, running.uid)
    for name in ("dask.crt", "dask.pem"):
        info = (staging / name).stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, running.uid), name
    return staging


def jobqueue_backend_setup(
    backend: str,
    *,
    python: str,
    states: StateTable,
    running_state: str,
    stopped_states: Collection[str],
    find_jobs: Callable[[Collection[str]], Mapping[str, QueuedJob]],
    end_jobs: Callable[[Sequence[str]], None],
    job_label: str,
    status_command: str,
    refused_option: Mapping[str, Any],
    refused_reason: Sequence[str],
    dead_state: str,
    ended_state: str,
    variants: Mapping[str, Mapping[str, Any]],
    inspect_running: Callable[[RunningCluster], None] | None = None,
    detection_slack: float = 3.0,
    not_applicable: Mapping[str, str] | None = None,
) -> BackendSetup:
    """The scenario suite's `BackendSetup` for a job-queue backend (`JobQueueDriver`).

    What every job-queue backend shares is filled in: `jobqueue_test_config` running
    ``python``, throwaway accounts, the staging directory as the cluster's files (checked by
    `check_staging_directory` while it runs, then ``inspect_running``), the setup script as a
    dying scheduler, the launcher's "no account" reason, ``status_command`` for the status
    scenarios. The scheduler-specific parts:

    - ``states``: the driver's state table (which codes mean ended); ``running_state``: the
      code of a running job; ``stopped_states``: the codes a job the gateway stopped may end
      with (cancelled, completed; not failed), if the scheduler still lists it.
    - ``find_jobs(names)``: job id → `QueuedJob` for the scheduler's jobs with those names,
      ended ones included or not.
    - ``end_jobs(ids)``: cancel jobs as an operator (root).
    - ``refused_option`` / ``refused_reason``: ``[cluster]`` keys the submit command refuses
      and regular expressions for its error; ``dead_state`` / ``ended_state``: regular
      expressions for the state words in the reason of a scheduler that died / was cancelled
      (``"F: failed"``, ``"CA: cancelled"``).
    """

    def live_jobs(cluster: Cluster) -> dict[str, LiveJob]:
        names = job_names(cluster)
        out = {}
        for job_id, job in find_jobs(list(names)).items():
            known = states.get(job.state)
            if job.name not in names or (known is not None and not known[0].alive):
                continue
            out[job_id] = LiveJob(
                owner=job.owner, running=job.state == running_state, worker=names[job.name]
            )
        return out

    def end_job(cluster: Cluster, worker: Worker | None) -> None:
        end_jobs([str((worker or cluster).state["job_id"])])

    def inspect(running: RunningCluster) -> None:
        check_staging_directory(running)
        assert running.gateway.backend.driver.status_calls > 0
        if inspect_running is not None:
            inspect_running(running)

    def check_stopped(cluster: Cluster) -> None:
        ended = {job_id: job.state for job_id, job in find_jobs(list(job_names(cluster))).items()}
        assert set(ended.values()) <= set(stopped_states), ended

    def staging(cluster: Cluster) -> list[Path]:
        directory = cluster.state.get("staging_dir")
        return [Path(directory)] if directory else []

    label = re.escape(job_label)
    return BackendSetup(
        backend=backend,
        config=jobqueue_test_config(backend, python=python),
        not_applicable=dict(not_applicable or {}),
        variants=variants,
        runs_as_user=True,
        live_jobs=live_jobs,
        end_job=end_job,
        cluster_files=staging,
        inspect_running=inspect,
        check_stopped=check_stopped,
        refused_option=refused_option,
        refused_reason=refused_reason,
        dying_scheduler=lambda script: {"scheduler_setup": script},
        dead_scheduler_reason=[rf"The scheduler's {label} \S+ ended", dead_state],
        ended_reason=lambda cluster: [
            re.escape(f"The scheduler's {job_label} {cluster.state['job_id']} ended"),
            ended_state,
        ],
        unknown_user_reason=["has no account on the gateway's host", "nothing was submitted"],
        status_command=status_command,
        status_period=1.0,
        detection_slack=detection_slack,
    )

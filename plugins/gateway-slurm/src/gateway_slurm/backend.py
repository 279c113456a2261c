"""The Slurm driver: Dask schedulers and workers as Slurm jobs of the requesting user.

Owns `SlurmClusterConfig` (partition, account, qos on top of the job-queue cluster settings),
`SlurmConfig` (`[backend.slurm]`) and `SlurmDriver`, which fills in the scheduler-specific
part of core's `gateway_core.backends.jobqueue.JobQueueDriver`: the ``sbatch`` command line,
``sbatch --parsable`` output, one ``squeue`` for every job, what Slurm's states mean, and the
``squeue`` finding a user's live jobs by name (a job submitted just before a crash).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from attrs import define

from gateway_core.backends.jobqueue import (
    GoneJobMessages,
    JobQueueClusterConfig,
    JobQueueConfig,
    JobQueueDriver,
    JobState,
    Submission,
)

if TYPE_CHECKING:
    from gateway_core.models import Cluster, Worker

STATES: dict[str, tuple[JobState, str]] = {
    "PD": (JobState.PENDING, "pending"),
    "CF": (JobState.PENDING, "configuring"),
    "RQ": (JobState.PENDING, "requeued"),
    "RF": (JobState.PENDING, "requeued by the federation"),
    "RH": (JobState.PENDING, "requeued and held"),
    "RD": (JobState.PENDING, "held (reservation deleted)"),
    "RS": (JobState.PENDING, "resizing"),
    "S": (JobState.PENDING, "suspended"),
    "ST": (JobState.PENDING, "stopped"),
    "R": (JobState.RUNNING, "running"),
    "CG": (JobState.RUNNING, "completing"),
    "SI": (JobState.RUNNING, "signaling"),
    "SO": (JobState.RUNNING, "staging out"),
    "CD": (JobState.FINISHED, "completed"),
    "F": (JobState.FINISHED, "failed"),
    "CA": (JobState.FINISHED, "cancelled"),
    "TO": (JobState.FINISHED, "timed out"),
    "NF": (JobState.FINISHED, "node failure"),
    "PR": (JobState.FINISHED, "preempted"),
    "OOM": (JobState.FINISHED, "out of memory"),
    "BF": (JobState.FINISHED, "boot failure"),
    "DL": (JobState.FINISHED, "deadline reached"),
    "SE": (JobState.FINISHED, "special exit"),
    "RV": (JobState.FINISHED, "revoked"),
}
"""Slurm's compact job state codes (``squeue -o %t``): what each means to the reconciler, and
in words. A code not listed counts as alive (the heartbeat timeout still catches a dead
scheduler)."""

GONE_MESSAGES = GoneJobMessages(
    unknown_job=("Invalid job id specified",),
    job_finished=("already completing or completed", "Job has finished"),
)
"""What ``squeue``/``scancel`` say, failing, about jobs Slurm has already forgotten, and what
``scancel`` says about jobs that have already ended. One id Slurm has forgotten fails the whole
``squeue`` (several are listed or left out), so its message means every job asked about has
ended."""


def slurm_memory(n: int) -> str:
    """Bytes as an ``sbatch --mem`` value: whole mebibytes, rounded up (``2048M``)."""
    return f"{max(1, math.ceil(n / 2**20))}M"


@define(kw_only=True, frozen=True)
class SlurmClusterConfig(JobQueueClusterConfig):
    """Per-cluster Slurm settings (seed 000's ``SlurmClusterConfig``); set in `[cluster]`,
    changeable per cluster through user options."""

    partition: str = ""
    """The partition to submit jobs to; empty: Slurm's default partition."""
    qos: str = ""
    """QOS string associated with each job."""
    account: str = ""
    """Account string associated with each job."""


@define(kw_only=True, frozen=True)
class SlurmConfig(JobQueueConfig):
    """`[backend.slurm]`: the reconciler's settings, the Slurm commands (``submit_command``
    default ``sbatch``, ``cancel_command`` ``scancel``, ``status_command`` and
    ``lookup_command`` ``squeue``), the launcher and how users are switched (see
    `gateway_core.backends.jobqueue`)."""


class SlurmDriver(JobQueueDriver[SlurmConfig, SlurmClusterConfig]):
    """Each scheduler and worker is one Slurm job (``sbatch``), submitted as the user.

    Jobs run in the cluster's staging directory and write their output there
    (``dask-scheduler-<cluster>.log``, ``dask-worker-<worker>.log``); they ask for
    ``--cpus-per-task`` = the cores and ``--mem`` = the memory of their role. One
    ``squeue -h --states=all --jobs=<ids> -o "%i %t"`` answers every status question of a
    period; a job not listed has ended. A job submitted but never recorded (the gateway was
    killed in between) is found by its name among the user's pending, running and completing
    jobs: ``squeue --noheader --format=%i --name=<job name> --user=<user>``.
    """

    job_label: ClassVar[str] = "Slurm job"
    default_submit_command: ClassVar[str] = "sbatch"
    default_cancel_command: ClassVar[str] = "scancel"
    default_status_command: ClassVar[str] = "squeue"
    default_lookup_command: ClassVar[str] = "squeue"
    states = STATES
    gone_messages = GONE_MESSAGES

    def submission(
        self,
        cluster: Cluster,
        settings: SlurmClusterConfig,
        *,
        worker: Worker | None,
        staging_dir: str,
        script: str,
    ) -> Submission:
        if worker is None:
            role, name = "scheduler", cluster.name
            cores, memory = settings.scheduler_cores, settings.scheduler_memory
        else:
            role, name = "worker", worker.name
            cores, memory = settings.worker_cores, settings.worker_memory
        job_name = self.job_name(cluster, worker)
        argv = [self.submit_program, "--parsable", f"--job-name={job_name}"]
        if settings.partition:
            argv.append(f"--partition={settings.partition}")
        if settings.account:
            argv.append(f"--account={settings.account}")
        if settings.qos:
            argv.append(f"--qos={settings.qos}")
        argv += [
            f"--chdir={staging_dir}",
            f"--output={self.output_file(staging_dir, role, name)}",
            f"--cpus-per-task={cores}",
            f"--mem={slurm_memory(memory)}",
            "--export=ALL",
        ]
        return Submission(argv=argv, stdin=script)

    def status_command_line(self, job_ids: Sequence[str]) -> list[str]:
        return [
            self.status_program,
            "-h",
            "--states=all",
            f"--jobs={','.join(job_ids)}",
            "-o",
            "%i %t",
        ]

    def lookup_command_line(self, job_name: str, username: str) -> list[str]:
        # Without --states, squeue lists pending, running and completing jobs: the live ones.
        return [
            self.lookup_program,
            "--noheader",
            "--format=%i",
            f"--name={job_name}",
            f"--user={username}",
        ]

    def parse_job_lookup(self, stdout: str) -> list[str]:
        # One job id per line; Slurm numbers jobs in submission order.
        ids = [line.strip() for line in stdout.splitlines() if line.strip()]
        for job_id in ids:
            if not job_id.isdigit():
                raise ValueError(f"expected one job id per line, got {job_id!r}")
        return sorted(ids, key=int)

    def parse_job_id(self, stdout: str) -> str:
        # --parsable prints "<id>" or "<id>;<cluster>"
        line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
        job_id = line.split(";", 1)[0].strip()
        if not job_id.isdigit():
            raise ValueError("expected a job id")
        return job_id

    def parse_job_states(self, stdout: str) -> dict[str, str]:
        states = {}
        for line in stdout.splitlines():
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"unexpected line {line!r}")
            states[parts[0]] = parts[1]
        return states


__all__ = [
    "GONE_MESSAGES",
    "STATES",
    "SlurmClusterConfig",
    "SlurmConfig",
    "SlurmDriver",
    "slurm_memory",
]

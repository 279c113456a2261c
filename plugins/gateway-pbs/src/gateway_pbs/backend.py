"""The PBS driver: Dask schedulers and workers as PBS (OpenPBS, PBS Professional) jobs of the
requesting user.

Owns `PBSClusterConfig` (queue, account, project, the ``-l`` resource-list templates and
stage-in on top of the job-queue cluster settings), `PBSConfig` (`[backend.pbs]`, adding
``gateway_hostname``) and `PBSDriver`, which fills in the scheduler-specific part of core's
`gateway_core.backends.jobqueue.JobQueueDriver`: the ``qsub`` command line, ``qsub``'s job id,
one ``qstat -x`` table for every job, what PBS's job states mean, what ``qstat``/``qdel``
say about jobs PBS no longer knows or that have already finished, and the ``qselect`` finding
a user's live jobs by name (a job submitted just before a crash).
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from attrs import define, field

from gateway_core.backends.jobqueue import (
    GoneJobMessages,
    JobQueueClusterConfig,
    JobQueueConfig,
    JobQueueDriver,
    JobState,
    Submission,
)
from gateway_core.backends.kit import CERT_FILE, KEY_FILE

if TYPE_CHECKING:
    from gateway_core.models import Cluster, Worker

STATES: dict[str, tuple[JobState, str]] = {
    "Q": (JobState.PENDING, "queued"),
    "H": (JobState.PENDING, "held"),
    "W": (JobState.PENDING, "waiting (execution time or stage-in)"),
    "T": (JobState.PENDING, "in transit"),
    "S": (JobState.PENDING, "suspended"),
    "U": (JobState.PENDING, "suspended (workstation busy)"),
    "R": (JobState.RUNNING, "running"),
    "B": (JobState.RUNNING, "array job begun"),
    "E": (JobState.FINISHED, "exiting after having run"),
    "F": (JobState.FINISHED, "finished"),
    "X": (JobState.FINISHED, "subjob finished"),
    "M": (JobState.FINISHED, "moved to another server"),
}
"""PBS's one-letter job states (the ``S`` column of ``qstat``): what each means to the
reconciler, and in words. ``E`` counts as ended, as in the original gateway: the job's
processes are gone, PBS is only copying its output back. A letter not listed counts as alive
(the heartbeat timeout still catches a dead scheduler)."""

GONE_MESSAGES = GoneJobMessages(
    unknown_job=(r"Unknown Job Id (\S+)",),
    job_finished=("Job has finished",),
    status_names_each_job=True,
)
"""What ``qstat``/``qdel`` say, failing, about jobs PBS does not know or no longer keeps in its
history (``Unknown Job Id <id>``, exit 153, PBSE_UNKJOBID), and what ``qdel`` says about a job
that has already finished (exit 35, PBSE_HISTJOBID). ``qstat`` lists the jobs it knows and
names each it does not: only when it names every job asked about is the answer "all
finished"; otherwise the check fails."""
LIVE_STATES = "".join(code for code, (state, _) in STATES.items() if state.alive)
"""The ``qselect -s`` letters of the states a job is alive in (queued, held, running, ...)."""
_JOB_ID = re.compile(r"\d+(\[\d*\])?(\.[A-Za-z0-9_.-]+)?")
_RESOURCE_FIELDS = ("cores", "memory")


def pbs_memory(n: int) -> str:
    """Bytes as a PBS size (``mem=...``): whole gigabytes from 10 GiB up, whole megabytes from
    10 MiB up, then kilobytes, rounded up (``2048mb``, ``16gb``)."""
    for unit, size in (("gb", 2**30), ("mb", 2**20), ("kb", 2**10)):
        if n >= 10 * size:
            return f"{math.ceil(n / size)}{unit}"
    return f"{max(n, 1)}b"


def resource_list(template: str, *, cores: int, memory: int) -> str:
    """A ``-l`` value from its template (fields ``{cores}`` and ``{memory}``)."""
    return template.format(cores=cores, memory=pbs_memory(memory))


def _check_resource_template(template: str, what: str) -> str | None:
    if not template.strip():
        return f"{what}: must not be empty"
    try:
        template.format(**{name: "1" for name in _RESOURCE_FIELDS})
    except KeyError as exc:
        return f"{what}: unknown placeholder {{{exc.args[0]}}}; known: {{cores}}, {{memory}}"
    except (ValueError, IndexError) as exc:
        return f"{what}: not a valid template: {exc}"
    if any(ch.isspace() for ch in template):
        return f"{what}: must not contain whitespace"
    return None


@define(kw_only=True, frozen=True)
class PBSClusterConfig(JobQueueClusterConfig):
    """Per-cluster PBS settings (seed 000's ``PBSClusterConfig``); set in `[cluster]`,
    changeable per cluster through user options."""

    queue: str = ""
    """The queue to submit jobs to (``qsub -q``); empty: the server's default queue."""
    account: str = ""
    """Accounting string associated with each job (``qsub -A``)."""
    project: str = ""
    """Project associated with each job (``qsub -P``)."""
    worker_resource_list: str = "select=1:ncpus={cores}:mem={memory}"
    """The ``-l`` resource list of each worker's job; a template of ``{cores}`` and
    ``{memory}`` (``worker_cores``, and ``worker_memory`` as a PBS size)."""
    scheduler_resource_list: str = "select=1:ncpus={cores}:mem={memory}"
    """The ``-l`` resource list of the scheduler's job (``scheduler_cores``,
    ``scheduler_memory``)."""
    use_stagein: bool = True
    """Copy the staging directory into each job's private sandbox (``-W stagein``,
    ``-W sandbox=PRIVATE``), for compute nodes that do not share the gateway's file system.
    False: the jobs read the staging directory where it is (a shared file system)."""

    def check(self) -> list[str]:
        """Problems with the settings this class adds (see `CheckedConfig`)."""
        problems: list[str] = []
        for what in ("worker_resource_list", "scheduler_resource_list"):
            bad = _check_resource_template(getattr(self, what), what)
            if bad:
                problems.append(bad)
        return problems


@define(kw_only=True, frozen=True)
class PBSConfig(JobQueueConfig):
    """`[backend.pbs]`: the reconciler's settings, the PBS commands (``submit_command`` default
    ``qsub``, ``cancel_command`` ``qdel``, ``status_command`` ``qstat``, ``lookup_command``
    ``qselect``), the launcher and how
    users are switched (see `gateway_core.backends.jobqueue`), and the gateway's host name."""

    gateway_hostname: str = field(factory=socket.gethostname)
    """The host running the gateway, as PBS directives name it: where stage-in copies the
    staging directory from, and where jobs' output is copied back to. Default: this host's
    name."""

    def check(self) -> list[str]:
        """Problems with the settings this class adds (see `CheckedConfig`)."""
        problems: list[str] = []
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.gateway_hostname):
            problems.append(f"gateway_hostname: not a host name: {self.gateway_hostname!r}")
        return problems


class PBSDriver(JobQueueDriver[PBSConfig, PBSClusterConfig]):
    """Each scheduler and worker is one PBS job (``qsub``), submitted as the user.

    Jobs are named ``dask-scheduler-<cluster>``/``dask-worker-<worker>``; stdout and stderr
    are joined (``-j oe``) into ``dask-<role>-<name>.log`` in the cluster's staging directory
    (copied there by PBS when the job ends). With ``use_stagein`` each job runs in a private
    sandbox into which PBS copies the staging directory, and the TLS files are read from there.
    One ``qstat -x <ids>`` answers every status question of a period; ``-x`` keeps finished
    jobs (state ``F``) in the answer while PBS keeps their history. A job submitted but never
    recorded (the gateway was killed in between) is found by its name among the user's live
    jobs: ``qselect -N <job name> -u <user> -s <the live states of STATES>``.
    """

    job_label: ClassVar[str] = "PBS job"
    default_submit_command: ClassVar[str] = "qsub"
    default_cancel_command: ClassVar[str] = "qdel"
    default_status_command: ClassVar[str] = "qstat"
    default_lookup_command: ClassVar[str] = "qselect"
    states = STATES
    gone_messages = GONE_MESSAGES

    def missing_output_hint(self) -> str:
        """The logs route reads the output files, which PBS writes only at a job's end."""
        return "PBS copies a job's output there only when the job ends"

    def tls_paths(self, cluster: Cluster, staging_dir: str) -> tuple[str, str]:
        if self.cluster_config(cluster).use_stagein:
            # Staged into the job's sandbox, its working directory.
            return CERT_FILE, KEY_FILE
        return super().tls_paths(cluster, staging_dir)

    def submission(
        self,
        cluster: Cluster,
        settings: PBSClusterConfig,
        *,
        worker: Worker | None,
        staging_dir: str,
        script: str,
    ) -> Submission:
        if worker is None:
            role, name = "scheduler", cluster.name
            resources = resource_list(
                settings.scheduler_resource_list,
                cores=settings.scheduler_cores,
                memory=settings.scheduler_memory,
            )
        else:
            role, name = "worker", worker.name
            resources = resource_list(
                settings.worker_resource_list,
                cores=settings.worker_cores,
                memory=settings.worker_memory,
            )
        host = self.config.gateway_hostname
        output = self.output_file(staging_dir, role, name)
        argv = [self.submit_program, "-N", self.job_name(cluster, worker)]
        if settings.queue:
            argv += ["-q", settings.queue]
        if settings.account:
            argv += ["-A", settings.account]
        if settings.project:
            argv += ["-P", settings.project]
        argv += ["-j", "oe", "-o", f"{host}:{output}", "-l", resources]
        if settings.use_stagein:
            argv += ["-W", "sandbox=PRIVATE", "-W", f"stagein=.@{host}:{staging_dir}/*"]
        return Submission(argv=argv, stdin=script)

    def status_command_line(self, job_ids: Sequence[str]) -> list[str]:
        return [self.status_program, "-x", *job_ids]

    def lookup_command_line(self, job_name: str, username: str) -> list[str]:
        # -s: only jobs in a live state (E, exiting, counts as ended, as in the status check).
        return [self.lookup_program, "-N", job_name, "-u", username, "-s", LIVE_STATES]

    def parse_job_lookup(self, stdout: str) -> list[str]:
        # One job id per line ("17.pbs01"); PBS numbers jobs in submission order.
        ids = [line.strip() for line in stdout.splitlines() if line.strip()]
        for job_id in ids:
            if not _JOB_ID.fullmatch(job_id):
                raise ValueError(f"expected one job id like 17.server per line, got {job_id!r}")
        return sorted(ids, key=lambda job_id: int(job_id.split(".", 1)[0].split("[", 1)[0]))

    def parse_job_id(self, stdout: str) -> str:
        # qsub prints "<sequence>.<server>" ("17.pbs01"), arrays "<seq>[].<server>".
        lines = [line.strip() for line in stdout.splitlines() if line.strip()]
        if not lines or not _JOB_ID.fullmatch(lines[-1]):
            raise ValueError("expected a job id like 17.server")
        return lines[-1]

    def parse_job_states(self, stdout: str) -> dict[str, str]:
        # Job id  Name  User  Time Use  S  Queue, after a header line and a line of dashes.
        states: dict[str, str] = {}
        in_table = False
        for line in stdout.splitlines():
            if not line.strip():
                continue
            if not in_table:
                if set(line.split()) <= {"-" * n for n in range(1, 200)}:
                    in_table = True
                elif not line.startswith("Job id"):
                    raise ValueError(f"unexpected line {line!r}")
                continue
            parts = line.split()
            if len(parts) < 6 or len(parts[4]) != 1:
                raise ValueError(f"unexpected line {line!r}")
            states[parts[0]] = parts[4]
        return states


__all__ = [
    "GONE_MESSAGES",
    "STATES",
    "PBSClusterConfig",
    "PBSConfig",
    "PBSDriver",
    "pbs_memory",
    "resource_list",
]

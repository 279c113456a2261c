"""The base of batch-scheduler drivers (Slurm, PBS, LSF, SGE, third parties).

Owns `JobQueueClusterConfig` and `JobQueueConfig` (the settings every batch backend shares),
`JobQueueDriver` (the six operations, written once over a handful of scheduler-specific
methods), `JobState`, `Submission`, and `JobRunner`, which runs commands as the gateway and as
the requesting user.

How a cluster runs
------------------
Each scheduler and each worker is one batch job, submitted as the user who asked for the
cluster. The job script (`JobQueueDriver.job_script`) exports the environment (the gateway's
``inherited_environment``, ``[cluster] environment``, the gateway's API URL, the cluster's
token and name, and the ``DASK_DISTRIBUTED__COMM__TLS__*`` variables), runs the
``scheduler_setup``/``worker_setup`` script, then ``exec``\\ s the same ``dask scheduler``/
``dask worker`` command line the local drivers build (`gateway_core.backends.kit`),
listening on ``job_host``. The scheduler's ``gateway_client.agent`` preload heartbeats to the
gateway's ``api_url``, which therefore must be reachable from the compute nodes. Each cluster
has a staging directory, ``staging_directory`` (a template of ``{home}`` and ``{username}``)
plus the cluster's name, created by the user (0700) and holding the TLS certificate and key
(0600) and the jobs' output files; it is removed when the cluster stops.

Privileges
----------
Everything done as the user goes through one small launcher,
`gateway_core.backends.jobqueue_launcher` (JSON request on stdin, JSON answer on stdout; it
creates the staging directory, writes the TLS files, runs the submit or cancel command, reads
log tails). ``switch_user`` says how it becomes the user:

- ``sudo``: the gateway runs unprivileged and calls
  ``sudo -n -H -u <user> -- <launcher>``; the site grants exactly that, e.g. in
  ``/etc/sudoers.d/dask-gateway``::

      Defaults:dask-gateway !requiretty
      dask-gateway ALL=(%dask-users) NOPASSWD: /opt/gateway/bin/gateway-jobqueue-launcher

  (or ``/opt/gateway/bin/python -m gateway_core.backends.jobqueue_launcher`` when the script
  is not installed; the rule must match ``dask_gateway_jobqueue_launcher`` exactly). The
  gateway account needs no other privilege: the status command (``squeue``) runs as itself.
- ``setuid``: the gateway runs as root and starts the launcher as a child with the user's
  uid, gid and groups (no sudo needed).
- ``auto`` (default): ``setuid`` when the gateway runs as root, ``sudo`` otherwise.

The launcher's interpreter (and the job's Python) must be readable and executable by users.
Users that do not exist on the gateway's host, and root, are refused before anything is
submitted or created.

Status checks
-------------
All status questions asked within ``status_batch_window`` seconds (the reconciler's cluster
and worker checks of one period) are merged into one status command for every job id. A
status command that fails is retried ``status_command_retries`` times with exponential backoff
(``backoff_base_delay``); if it keeps failing, the check raises, so the reconciler skips that
period rather than marking anything dead. A job missing from the answer is finished.

Crashes and takeovers
---------------------
A gateway killed (or a replica losing a cluster) between a successful submit and the write of
the job id leaves a job it does not know. So before each submit the driver stores what it is
about to submit (the scheduler's ``staging_dir``, a worker's ``job_name``), and a record with
that but no ``job_id`` may be started again (`JobQueueDriver.start_may_rerun`,
`JobQueueDriver.worker_start_may_rerun`): the second start first looks the job up by its name
among the user's live jobs (one lookup command, as the user, through the launcher) and adopts
it (the newest; others found are cancelled) instead of submitting another. The scheduler's
second start, finding none, removes the half-made staging directory before submitting. A
stop given such a record cancels what the lookup finds. A lookup that fails raises, like a
failed submit, so the reconciler retries: "cannot tell" is never taken as "no job".

Writing a driver for another scheduler
--------------------------------------
Subclass ``JobQueueDriver[YourConfig, YourClusterConfig]`` (the classes your `BackendSpec`
names), set ``job_label`` and the four ``default_*_command`` names, and declare what the
scheduler says:

- ``states``: its job state codes, each mapped to what it means (`JobState`) and to words for
  failure reasons (``{"R": (JobState.RUNNING, "running"), ...}``). `JobQueueDriver.job_state`
  and `JobQueueDriver.describe_state` read it; a code not listed counts as alive (the
  heartbeat timeout still catches a dead scheduler).
- ``gone_messages``: a `GoneJobMessages` of regular expressions for what the status and cancel
  commands print, failing, about jobs the scheduler no longer knows or that have already
  ended. A cancel that exits 0 or prints one of them succeeded
  (`JobQueueDriver.cancel_succeeded`); a failed status command printing an "unknown job" one
  means every job asked about has ended (`JobQueueDriver.status_error_means_gone`), or, with
  ``status_names_each_job`` (PBS's ``qstat``), only when the messages name every job asked
  about.

Then implement `JobQueueDriver.submission` (the submit command line and what goes to its
stdin; name the job `JobQueueDriver.job_name`), `JobQueueDriver.status_command_line`,
`JobQueueDriver.parse_job_id`, `JobQueueDriver.parse_job_states`, and the lookup by name:
`JobQueueDriver.lookup_command_line` and `JobQueueDriver.parse_job_lookup` (set
``default_lookup_command`` too). The cancel command is ``[cancel_program, *job_ids]`` unless
`JobQueueDriver.cancel_command_line` is overridden. Override
`JobQueueDriver.tls_paths` when jobs see the staging directory elsewhere (PBS's stage-in),
`JobQueueDriver.output_file` for where a job's output goes, and the three methods above when
a table and patterns cannot say it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from attrs import define, field

from ..config import ClusterConfig, Command, ProcessBackendConfig
from ..crashpoints import crash_point
from .base import SCHEDULER_COMPONENT, ClusterDriver, StateUpdates
from .kit import (
    CERT_FILE,
    DEFAULT_INHERITED_ENVIRONMENT,
    KEY_FILE,
    RunAs,
    attempts,
    cluster_env,
    inherited_env,
    last_lines,
    lookup_user,
    scheduler_command,
    tls_env,
    worker_command,
)

if TYPE_CHECKING:
    from ..context import GatewayContext
    from ..models import Cluster, Worker

log = logging.getLogger("gateway.backend.jobqueue")

LAUNCHER_MODULE = "gateway_core.backends.jobqueue_launcher"
LAUNCHER_SCRIPT = "gateway-jobqueue-launcher"
SWITCH_USER_MODES = ("auto", "sudo", "setuid")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TAIL_LINES = 20
_LOG_READERS = 4
"""Launcher calls one logs request runs at once."""
_TEMPLATE_FIELDS = ("home", "username")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _check_template(template: str, what: str) -> str | None:
    try:
        template.format(**{name: "x" for name in _TEMPLATE_FIELDS})
    except KeyError as exc:
        known = ", ".join("{" + f + "}" for f in _TEMPLATE_FIELDS)
        return f"{what}: unknown placeholder {{{exc.args[0]}}}; known: {known}"
    except (ValueError, IndexError) as exc:
        return f"{what}: not a valid template: {exc}"
    return None


@define(kw_only=True, frozen=True)
class JobQueueClusterConfig(ClusterConfig):
    """Per-cluster settings every batch backend has (seed 000's ``JobQueueClusterConfig``)."""

    scheduler_setup: str = ""
    """Shell script run in the scheduler's job before the scheduler starts (e.g. activate an
    environment)."""
    worker_setup: str = ""
    """Shell script run in each worker's job before the worker starts."""
    staging_directory: str = "{home}/.dask-gateway/"
    """Where each cluster's staging directory is made (a subdirectory named after the cluster,
    holding its TLS files and job output, removed when the cluster stops). A template of
    ``{home}`` (the user's home directory) and ``{username}``; must give an absolute path."""

    def check(self) -> list[str]:
        """Problems with the settings this class adds (see `CheckedConfig`)."""
        problems: list[str] = []
        bad = _check_template(self.staging_directory, "staging_directory")
        if bad:
            problems.append(bad)
        return problems


@define(kw_only=True, frozen=True)
class JobQueueConfig(ProcessBackendConfig):
    """`[backend.<name>]` of a batch backend: the reconciler's settings plus the commands and
    how the gateway acts as users (seed 000's ``JobQueueBackend``)."""

    submit_command: str = ""
    """The job submit command (``sbatch``, ``qsub``); empty: the driver's default, looked up
    on ``PATH``."""
    cancel_command: str = ""
    """The job cancel command (``scancel``, ``qdel``); empty: the driver's default."""
    status_command: str = ""
    """The job status command (``squeue``, ``qstat``); empty: the driver's default."""
    lookup_command: str = ""
    """The command finding a user's live jobs by name (``squeue``, ``qselect``), run as the
    user after a restart or takeover to find a job submitted but never recorded; empty: the
    driver's default."""
    dask_gateway_jobqueue_launcher: Command = field(factory=lambda: Command([]))
    """The launcher run as the user (a path, or a command line). Empty: the
    ``gateway-jobqueue-launcher`` script beside the gateway's Python, else
    ``<python> -m gateway_core.backends.jobqueue_launcher``. With ``switch_user = "sudo"`` the
    sudoers rule must name this exact command."""
    switch_user: str = "auto"
    """How the launcher becomes the user: ``sudo`` (``sudo -n -H -u <user>``), ``setuid`` (the
    gateway is root and starts it with the user's ids), ``auto`` (setuid as root, else sudo)."""
    sudo_command: str = "sudo"
    """The sudo program for ``switch_user = "sudo"``."""
    inherited_environment: list[str] = field(factory=lambda: list(DEFAULT_INHERITED_ENVIRONMENT))
    """Variables of the gateway's environment that the jobs get (exported in the job script,
    under ``[cluster] environment``); the default carries ``PATH``, so a gateway started from
    a virtual environment gives jobs the same ``dask``."""
    job_host: str = "0.0.0.0"
    """The address schedulers, dashboards, agents and workers listen on inside jobs; each
    advertises the node's address. Reachable from the gateway's proxy and from workers."""
    command_timeout: float = 60.0
    """Seconds a submit, cancel, status or launcher command may take before it is killed and
    counted as failed."""
    status_command_retries: int = 2
    """Retries of a failed status command within one check, after backoff_base_delay, then
    twice that, ...; then the check is skipped until the next period."""

    def check(self) -> list[str]:
        """Problems with the settings this class adds (see `CheckedConfig`)."""
        problems: list[str] = []
        if self.switch_user not in SWITCH_USER_MODES:
            problems.append(
                f"switch_user: expected one of {', '.join(SWITCH_USER_MODES)}, "
                f"got {self.switch_user!r}"
            )
        if self.command_timeout <= 0:
            problems.append(f"command_timeout: must be positive, got {self.command_timeout}")
        if self.status_command_retries < 0:
            problems.append(
                f"status_command_retries: must not be negative, got {self.status_command_retries}"
            )
        for i, name in enumerate(self.inherited_environment):
            if not _ENV_NAME.fullmatch(name):
                problems.append(f"inherited_environment[{i}]: not a variable name: {name!r}")
        return problems


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class JobState(enum.Enum):
    """What a job's scheduler-specific state means to the reconciler."""

    PENDING = "pending"
    """Queued, held, configuring: alive, not yet running."""
    RUNNING = "running"
    """Running (or completing)."""
    FINISHED = "finished"
    """Ended for any reason (done, failed, cancelled, timed out), or unknown to the scheduler."""

    @property
    def alive(self) -> bool:
        return self is not JobState.FINISHED


StateTable = Mapping[str, tuple[JobState, str]]
"""A scheduler's job state codes: code → (what it means, the code in words)."""


@define(kw_only=True, frozen=True)
class GoneJobMessages:
    """What a scheduler's commands print (on stderr), failing, about jobs that are gone:
    regular expressions, searched for anywhere in the output."""

    unknown_job: tuple[str, ...] = ()
    """The status and cancel commands' messages for a job the scheduler does not know (any
    more): ``"Invalid job id specified"``. With ``status_names_each_job``, each has one group
    capturing the job id: ``r"Unknown Job Id (\\S+)"``."""
    job_finished: tuple[str, ...] = ()
    """The cancel command's messages for a job that has already ended (the cancel counts as
    done): ``"Job has finished"``."""
    status_names_each_job: bool = False
    """How a failed status command printing an ``unknown_job`` message is read. False: every
    job asked about has ended (a scheduler that fails the whole command on one forgotten id).
    True: only when the messages name every job asked about (a scheduler that lists the jobs
    it knows and names each it does not); otherwise the check failed."""

    def __attrs_post_init__(self) -> None:
        problems = []
        for what in ("unknown_job", "job_finished"):
            for pattern in getattr(self, what):
                try:
                    compiled = re.compile(pattern)
                except re.error as exc:
                    problems.append(f"{what}: {pattern!r} is not a regular expression: {exc}")
                    continue
                if what == "unknown_job" and self.status_names_each_job and compiled.groups != 1:
                    problems.append(
                        f"unknown_job: {pattern!r} needs exactly one group capturing the job "
                        "id, as status_names_each_job is set"
                    )
        if problems:
            raise ValueError("GoneJobMessages: " + "; ".join(problems))

    def unknown(self, text: str) -> bool:
        """Whether ``text`` says some job is unknown."""
        return any(re.search(p, text) for p in self.unknown_job)

    def finished(self, text: str) -> bool:
        """Whether ``text`` says some job has already ended."""
        return any(re.search(p, text) for p in self.job_finished)

    def unknown_ids(self, text: str) -> set[str]:
        """The job ids ``text`` names as unknown (needs ``status_names_each_job``)."""
        return {m.group(1) for p in self.unknown_job for m in re.finditer(p, text)}


@define(kw_only=True, frozen=True)
class Submission:
    """How to submit one job: the command line (run in the staging directory, as the user)
    and what to write to its stdin (usually the job script)."""

    argv: list[str]
    stdin: str | None = None


@define(kw_only=True, frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str

    def describe(self, program: str) -> str:
        """``"<program> failed (exit N): <stderr or stdout>"``, for error messages."""
        detail = (self.stderr.strip() or self.stdout.strip())[-2000:]
        text = f"{program} failed (exit {self.returncode})"
        return f"{text}: {detail}" if detail else text


class LauncherError(RuntimeError):
    """The launcher could not do what it was asked (its message says why)."""


# --------------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------------


class JobRunner:
    """Runs the status command as the gateway, and the launcher as a user.

    Tests replace it (``JobQueueDriver(..., runner=FakeRunner())``) with anything that has
    the same two coroutine methods.
    """

    def __init__(self, config: JobQueueConfig) -> None:
        self.config = config

    def launcher_command(self) -> list[str]:
        if self.config.dask_gateway_jobqueue_launcher:
            return list(self.config.dask_gateway_jobqueue_launcher)
        script = os.path.join(os.path.dirname(sys.executable), LAUNCHER_SCRIPT)
        if os.access(script, os.X_OK):
            return [script]
        return [sys.executable, "-m", LAUNCHER_MODULE]

    def mode(self) -> str:
        mode = self.config.switch_user
        if mode == "auto":
            return "setuid" if os.geteuid() == 0 else "sudo"
        return mode

    async def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float,
        identity: RunAs | None = None,
    ) -> CommandResult:
        """Run ``argv`` (as ``identity``'s uid and gids when given; the gateway must be root)
        and collect its output. Raises RuntimeError when it cannot run or times out."""
        if identity is not None:
            # uvloop (the gateway's default event loop) refuses user=/group=/extra_groups= in
            # create_subprocess_exec, so a command run as someone else goes through the
            # standard library's subprocess, in a thread.
            return await asyncio.to_thread(
                _run_as_identity, list(argv), env=env, stdin=stdin, timeout=timeout, who=identity
            )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=dict(env) if env is not None else None,
                cwd="/",
                start_new_session=True,
            )
        except FileNotFoundError:
            raise RuntimeError(f"command not found: {argv[0]!r}") from None
        except OSError as exc:
            raise RuntimeError(f"cannot run {argv[0]!r}: {exc}") from None
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError(f"{argv[0]} did not finish within {timeout:g} s") from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        assert proc.returncode is not None
        return CommandResult(
            returncode=proc.returncode,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
        )

    async def run_as(self, user: RunAs, request: Mapping[str, Any]) -> dict[str, Any]:
        """Send ``request`` to the launcher running as ``user``; its JSON answer. Raises
        `LauncherError` when the launcher cannot be run or answers ``ok: false``."""
        launcher = self.launcher_command()
        env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}
        identity: RunAs | None = None
        if self.mode() == "sudo":
            argv = [self.config.sudo_command, "-n", "-H", "-u", user.name, "--", *launcher]
        else:
            argv, identity = launcher, user
            env.update(user.identity_env())
        data = json.dumps({**request, "timeout": self.config.command_timeout}).encode()
        try:
            result = await self.run(
                argv,
                env=env,
                stdin=data,
                timeout=self.config.command_timeout + 10,
                identity=identity,
            )
        except RuntimeError as exc:
            raise LauncherError(f"cannot run the launcher as {user.name}: {exc}") from None
        try:
            answer = json.loads(result.stdout)
            if not isinstance(answer, dict):
                raise ValueError("not an object")
        except ValueError:
            how = "through sudo" if identity is None else "as the user"
            raise LauncherError(
                f"the launcher ({shlex.join(argv)}) run {how} for {user.name} gave no answer: "
                + result.describe("it")
            ) from None
        if not answer.get("ok"):
            raise LauncherError(str(answer.get("error") or "the launcher failed"))
        return answer


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


@define
class _Batch:
    ids: set[str] = field(factory=set)
    future: asyncio.Future[dict[str, str | None]] | None = None


JobQueueConfigT = TypeVar("JobQueueConfigT", bound=JobQueueConfig)
JobQueueClusterConfigT = TypeVar("JobQueueClusterConfigT", bound=JobQueueClusterConfig)


class JobQueueDriver(ClusterDriver[JobQueueConfigT, JobQueueClusterConfigT]):
    """Schedulers and workers as batch jobs of the requesting user (see the module's
    docstring for the model, the privileges and what a subclass implements)."""

    job_label: ClassVar[str] = "batch job"
    """How jobs are called in messages to users (``"Slurm job"``)."""
    default_submit_command: ClassVar[str] = ""
    default_cancel_command: ClassVar[str] = ""
    default_status_command: ClassVar[str] = ""
    default_lookup_command: ClassVar[str] = ""
    status_batch_window: ClassVar[float] = 0.05
    """Seconds status questions are collected before one status command answers them all."""
    states: ClassVar[StateTable] = {}
    """The scheduler's job state codes: what each means and in words (see the module's
    docstring); a code not listed counts as alive."""
    gone_messages: ClassVar[GoneJobMessages] = GoneJobMessages()
    """What the status and cancel commands print about jobs that are gone."""

    def __init__(
        self,
        *,
        config: JobQueueConfigT,
        context: GatewayContext,
        runner: JobRunner | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, context=context, **kwargs)
        if not issubclass(self.cluster_config_class, JobQueueClusterConfig):
            raise TypeError(
                f"{type(self).__name__} needs a JobQueueClusterConfig subclass as "
                "cluster_config_class (its BackendSpec's cluster_config), got "
                f"{self.cluster_config_class.__name__}"
            )
        self.runner = runner if runner is not None else JobRunner(config)
        self.status_calls = 0
        """Status commands run so far (benchmarks and tests count them)."""
        self._batch: _Batch | None = None
        self._last_state: dict[str, str] = {}
        self._background: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------------------------------
    # What a subclass implements

    @abc.abstractmethod
    def submission(
        self,
        cluster: Cluster,
        settings: JobQueueClusterConfigT,
        *,
        worker: Worker | None,
        staging_dir: str,
        script: str,
    ) -> Submission:
        """The submit command for the scheduler (``worker`` None) or a worker of ``cluster``,
        whose job script is ``script``; it runs as the user, in ``staging_dir``."""
        raise NotImplementedError

    @abc.abstractmethod
    def lookup_command_line(self, job_name: str, username: str) -> list[str]:
        """One command listing the ids of ``username``'s live jobs (queued, held or running;
        not ended) named ``job_name`` (`job_name`); run as the user, through the launcher.
        Finds a job submitted just before a crash, before its id was stored."""
        raise NotImplementedError

    @abc.abstractmethod
    def parse_job_lookup(self, stdout: str) -> list[str]:
        """The job ids in the lookup command's output, oldest (first submitted) first; an
        empty list when it lists none. Raise ValueError on output that cannot be understood
        (the lookup then fails, and is retried)."""
        raise NotImplementedError

    def cancel_command_line(self, job_ids: Sequence[str]) -> list[str]:
        """The command cancelling ``job_ids`` (run as the user); default
        ``[cancel_program, *job_ids]``."""
        return [self.cancel_program, *job_ids]

    @abc.abstractmethod
    def status_command_line(self, job_ids: Sequence[str]) -> list[str]:
        """One command asking the state of every job in ``job_ids`` (run as the gateway)."""
        raise NotImplementedError

    @abc.abstractmethod
    def parse_job_id(self, stdout: str) -> str:
        """The job id in the submit command's output; raise ValueError when there is none."""
        raise NotImplementedError

    @abc.abstractmethod
    def parse_job_states(self, stdout: str) -> dict[str, str]:
        """Job id → the scheduler's state code, from the status command's output. Raise
        ValueError on output that cannot be understood (the check then counts as failed)."""
        raise NotImplementedError

    def job_state(self, code: str) -> JobState:
        """What the scheduler's state ``code`` means: its entry in ``states``; a code not
        listed counts as alive (RUNNING)."""
        known = self.states.get(code)
        return known[0] if known is not None else JobState.RUNNING

    def describe_state(self, code: str) -> str:
        """``code`` in words, for failure reasons (``"CA: cancelled"``); the code itself when
        ``states`` does not list it."""
        known = self.states.get(code)
        return f"{code}: {known[1]}" if known is not None else code

    def status_error_means_gone(self, result: CommandResult, job_ids: Sequence[str]) -> bool:
        """Whether a failed status command means every job in ``job_ids`` has ended, read
        from ``gone_messages`` (see `GoneJobMessages.status_names_each_job`); otherwise the
        failure is a failure and the check is retried."""
        messages = self.gone_messages
        if messages.status_names_each_job:
            return bool(job_ids) and set(job_ids) <= messages.unknown_ids(result.stderr)
        return messages.unknown(result.stderr)

    def cancel_succeeded(self, result: CommandResult) -> bool:
        """Whether the cancel command did its job: it exited 0, or it says the job is unknown
        or has already ended (``gone_messages``)."""
        if result.returncode == 0:
            return True
        return self.gone_messages.unknown(result.stderr) or self.gone_messages.finished(
            result.stderr
        )

    def output_file(self, staging_dir: str, role: str, name: str) -> str:
        """Where the job of ``role`` ("scheduler"/"worker") called ``name`` writes its output."""
        return os.path.join(staging_dir, f"dask-{role}-{name}.log")

    def missing_output_hint(self) -> str:
        """Said after "its output cannot be read" in a log the logs route cannot find, e.g.
        when the batch system copies a job's output there only when the job ends (PBS)."""
        return ""

    # ---------------------------------------------------------------------------------------
    # Commands and paths

    @property
    def submit_program(self) -> str:
        return self._program(self.config.submit_command, self.default_submit_command)

    @property
    def cancel_program(self) -> str:
        return self._program(self.config.cancel_command, self.default_cancel_command)

    @property
    def status_program(self) -> str:
        return self._program(self.config.status_command, self.default_status_command)

    @property
    def lookup_program(self) -> str:
        return self._program(self.config.lookup_command, self.default_lookup_command)

    def job_name(self, cluster: Cluster, worker: Worker | None) -> str:
        """The name the scheduler's (``worker`` None) or a worker's job is submitted with:
        ``dask-scheduler-<cluster>``, ``dask-worker-<worker>``; the lookup finds jobs by it,
        so `submission` must use it."""
        if worker is None:
            return f"dask-scheduler-{cluster.name}"
        return f"dask-worker-{worker.name}"

    @staticmethod
    def _program(configured: str, default: str) -> str:
        if configured:
            return configured
        return shutil.which(default) or default

    async def account(self, cluster: Cluster) -> RunAs:
        """The account of the user who asked for ``cluster``: jobs are submitted as it."""
        return await asyncio.to_thread(
            lookup_user,
            cluster.username,
            purpose="batch jobs run as the user who asks for the cluster, so nothing was submitted",
        )

    def staging_path(self, cluster: Cluster, settings: JobQueueClusterConfig, user: RunAs) -> str:
        """The staging directory of ``cluster``: ``staging_directory`` expanded for ``user``,
        plus the cluster's name."""
        if not _SAFE_NAME.fullmatch(cluster.name):
            raise RuntimeError(f"refusing to make files for the unsafe name {cluster.name!r}")
        base = settings.staging_directory.format(home=user.home, username=user.name)
        if not os.path.isabs(base):
            raise RuntimeError(
                f"staging_directory {settings.staging_directory!r} gives {base!r} for "
                f"{user.name}, not an absolute path"
            )
        return os.path.join(os.path.normpath(base), cluster.name)

    def tls_paths(self, cluster: Cluster, staging_dir: str) -> tuple[str, str]:
        """The certificate and key paths as the jobs see them."""
        return os.path.join(staging_dir, CERT_FILE), os.path.join(staging_dir, KEY_FILE)

    def job_env(
        self,
        cluster: Cluster,
        *,
        role: str,
        staging_dir: str,
        settings: ClusterConfig | None = None,
    ) -> dict[str, str]:
        """The variables a ``role`` job exports: the inherited ones, ``[cluster] environment``
        (that of ``settings`` when given: a worker's group config), then what the gateway
        needs (API URL, token, cluster name, TLS files; these win)."""
        env = inherited_env(self.config.inherited_environment)
        env.update(cluster_env(cluster, self.context, settings=settings))
        env.update(tls_env(role, *self.tls_paths(cluster, staging_dir)))
        for name in env:
            if not _ENV_NAME.fullmatch(name):
                raise RuntimeError(f"environment: {name!r} is not a valid variable name")
        return env

    def job_command(
        self, cluster: Cluster, settings: JobQueueClusterConfig, worker: Worker | None
    ) -> list[str]:
        host = self.config.job_host
        if worker is None:
            return scheduler_command(
                settings, host=host, heartbeat_period=self.config.cluster_heartbeat_period
            )
        if not cluster.scheduler_address:
            raise RuntimeError(f"cluster {cluster.name} has no scheduler address yet")
        return worker_command(
            settings,
            scheduler_address=cluster.scheduler_address,
            worker_name=worker.name,
            host=host,
        )

    def job_script(
        self,
        cluster: Cluster,
        settings: JobQueueClusterConfig,
        *,
        worker: Worker | None,
        staging_dir: str,
    ) -> str:
        """The job script: exports, the setup script, then ``exec`` of the Dask command."""
        role = "scheduler" if worker is None else "worker"
        env = self.job_env(cluster, role=role, staging_dir=staging_dir, settings=settings)
        what = f"worker {worker.name}" if worker is not None else "scheduler"
        lines = [
            "#!/bin/sh",
            f"# Dask {what} of cluster {cluster.name} for {cluster.username}, "
            "submitted by the Dask gateway.",
        ]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        setup = settings.scheduler_setup if worker is None else settings.worker_setup
        if setup.strip():
            lines += ["", setup.rstrip("\n"), ""]
        lines.append("exec " + shlex.join(self.job_command(cluster, settings, worker)))
        return "\n".join(lines) + "\n"

    def submit_env(self) -> dict[str, str]:
        """The environment of the submit and cancel commands (the launcher adds the user's
        identity): the inherited variables, so the programs are found on ``PATH``."""
        env = inherited_env(self.config.inherited_environment)
        env.setdefault("PATH", os.defpath)
        return env

    # ---------------------------------------------------------------------------------------
    # Life cycle

    async def setup(self) -> None:
        mode = self.runner.mode() if isinstance(self.runner, JobRunner) else "custom"
        if mode == "setuid" and os.geteuid() != 0:
            raise RuntimeError(
                'switch_user = "setuid" needs the gateway to run as root; it runs as uid '
                f'{os.geteuid()}. Use switch_user = "sudo" with a sudoers rule (see the docs).'
            )
        if mode == "sudo" and shutil.which(self.config.sudo_command) is None:
            raise RuntimeError(
                f"switch_user = sudo, but {self.config.sudo_command!r} is not installed"
            )
        programs = (self.submit_program, self.cancel_program, self.status_program)
        for program in (*programs, self.lookup_program):
            if shutil.which(program) is None:
                log.warning("%s not found on the gateway's PATH; jobs may fail to run", program)
        log.info(
            "%s driver: submit %s, status %s, users switched by %s",
            self.name or type(self).__name__,
            self.submit_program,
            self.status_program,
            mode,
        )

    async def cleanup(self) -> None:
        tasks = list(self._background)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---------------------------------------------------------------------------------------
    # The six operations

    def start_scheduler(self, cluster: Cluster) -> StateUpdates:
        return self._start_scheduler(cluster)

    async def _start_scheduler(self, cluster: Cluster) -> AsyncIterator[dict[str, Any]]:
        user = await self.account(cluster)
        settings = self.cluster_config(cluster)
        what = f"the scheduler of cluster {cluster.name}"
        stale = cluster.state.get("staging_dir")
        if isinstance(stale, str) and stale and not cluster.state.get("job_id"):
            # An attempt the gateway died in (`start_may_rerun`): its job may have been
            # submitted after its last write. A live one is adopted; otherwise the staging
            # directory it may have half made is removed, so the submit can make it afresh.
            adopted = await self._adopt(user, self.job_name(cluster, None), what)
            if adopted is not None:
                yield {"job_id": adopted}
                return
            await self._remove_staging(user, stale, what)
        staging_dir = self.staging_path(cluster, settings, user)
        # Stored before it exists: a gateway killed now still knows what to remove, and that
        # a job may have been submitted (found by its name).
        yield {"staging_dir": staging_dir}
        script = self.job_script(cluster, settings, worker=None, staging_dir=staging_dir)
        sub = self.submission(
            cluster, settings, worker=None, staging_dir=staging_dir, script=script
        )
        files = {
            CERT_FILE: {"data": cluster.tls_cert.decode(), "mode": 0o600},
            KEY_FILE: {"data": cluster.tls_key.decode(), "mode": 0o600},
        }
        request = {
            "action": "submit",
            "staging_dir": staging_dir,
            "files": files,
            "cmd": sub.argv,
            "stdin": sub.stdin,
            "env": self.submit_env(),
        }
        job_id = await self._submit(user, request, what)
        crash_point("submitted:scheduler")
        yield {"job_id": job_id}

    async def stop_scheduler(self, cluster: Cluster) -> None:
        """Cancel the scheduler's job (the one stored, or else any found by its name: a start
        may have submitted it after its last write) and remove the staging directory."""
        job_id = cluster.state.get("job_id")
        staging_dir = cluster.state.get("staging_dir")
        if not job_id and not staging_dir:
            return  # the start stored nothing: it submitted nothing
        what = f"the scheduler of cluster {cluster.name}"
        user = await self._stopping_account(cluster, what)
        if user is None:
            return
        if job_id:
            job_ids = [str(job_id)]
        else:
            job_ids = await self._unrecorded_jobs(user, self.job_name(cluster, None), what)
        await self._cancel(
            user, job_ids, remove=str(staging_dir) if staging_dir else None, what=what
        )

    def start_worker(self, cluster: Cluster, worker: Worker) -> StateUpdates:
        return self._start_worker(cluster, worker)

    async def _start_worker(
        self, cluster: Cluster, worker: Worker
    ) -> AsyncIterator[dict[str, Any]]:
        staging_dir = cluster.state.get("staging_dir")
        if not isinstance(staging_dir, str) or not staging_dir:
            raise RuntimeError(f"cluster {cluster.name} has no staging directory")
        if not _SAFE_NAME.fullmatch(worker.name):
            raise RuntimeError(f"refusing the unsafe worker name {worker.name!r}")
        user = await self.account(cluster)
        settings = self.worker_config(cluster, worker)  # its group's partition, cores, env
        script = self.job_script(cluster, settings, worker=worker, staging_dir=staging_dir)
        sub = self.submission(
            cluster, settings, worker=worker, staging_dir=staging_dir, script=script
        )
        request = {
            "action": "submit",
            "cmd": sub.argv,
            "stdin": sub.stdin,
            "env": self.submit_env(),
        }
        what = f"worker {worker.name}"
        job_name = self.job_name(cluster, worker)
        if worker.state.get("job_name") and not worker.state.get("job_id"):
            # An attempt the gateway died in (`worker_start_may_rerun`) may have submitted
            # the job after its last write: adopted, not doubled.
            adopted = await self._adopt(user, job_name, what)
            if adopted is not None:
                yield {"job_id": adopted}
                return
        else:
            # Stored before the submit: a later start or stop knows to look for the job.
            yield {"job_name": job_name}
        job_id = await self._submit(user, request, what)
        crash_point("submitted:worker")
        yield {"job_id": job_id}

    async def stop_worker(self, cluster: Cluster, worker: Worker) -> None:
        """Cancel the worker's job: the one stored, or else any found by its name (a start
        may have submitted it after its last write)."""
        job_id = worker.state.get("job_id")
        if not job_id and not worker.state.get("job_name"):
            return  # the start stored nothing: it submitted nothing
        what = f"worker {worker.name}"
        user = await self._stopping_account(cluster, what)
        if user is None:
            return
        if job_id:
            job_ids = [str(job_id)]
        else:
            job_ids = await self._unrecorded_jobs(user, self.job_name(cluster, worker), what)
        if job_ids:
            await self._cancel(user, job_ids, remove=None, what=what)

    def start_may_rerun(self, cluster: Cluster) -> bool:
        # No job id stored: the start runs again, and adopts a job the first attempt submitted
        # after its last write (found by its name) if one is live.
        return not cluster.state.get("job_id")

    def worker_start_may_rerun(self, cluster: Cluster, worker: Worker) -> bool:
        return not worker.state.get("job_id")

    async def check_clusters(self, clusters: Sequence[Cluster]) -> list[bool]:
        return await self._check([c.state.get("job_id") for c in clusters])

    async def check_workers(self, workers: Sequence[tuple[Cluster, Worker]]) -> list[bool]:
        return await self._check([w.state.get("job_id") for _, w in workers])

    async def failure_reason(self, cluster: Cluster) -> str | None:
        job_id = cluster.state.get("job_id")
        staging_dir = cluster.state.get("staging_dir")
        if not job_id:
            return None
        code = self._last_state.get(str(job_id))
        reason = f"The scheduler's {self.job_label} {job_id} ended"
        if code and not self.job_state(code).alive:
            reason += f" (state {self.describe_state(code)})"
        elif code:
            reason += f" (last seen {self.describe_state(code)}, then gone from the queue)"
        if not isinstance(staging_dir, str) or not staging_dir:
            return reason
        path = self.output_file(staging_dir, "scheduler", cluster.name)
        try:
            user = await self.account(cluster)
            answer = await self.runner.run_as(user, {"action": "tail", "path": path})
        except Exception as exc:  # noqa: BLE001 - the reason is best effort
            return f"{reason}; its output {path} cannot be read: {exc}"
        lines = [ln[:500] for ln in str(answer.get("text", "")).splitlines() if ln.strip()]
        if not lines:
            return f"{reason} without writing to its output ({path})"
        return f"{reason}; the end of its output ({path}):\n" + "\n".join(lines[-_TAIL_LINES:])

    async def cluster_logs(
        self, cluster: Cluster, *, components: Sequence[str], tail: int, max_bytes: int
    ) -> dict[str, str]:
        """The ends of the jobs' output files in the staging directory (`output_file`), read
        as the user through the launcher's ``tail``, one call per component (a few at once);
        a file that cannot be read is a message saying why."""
        staging_dir = cluster.state.get("staging_dir")
        if not isinstance(staging_dir, str) or not staging_dir:
            return dict.fromkeys(components, "(no log: the cluster has not started yet)")
        try:
            user = await self.account(cluster)
        except RuntimeError as exc:
            return dict.fromkeys(components, f"(no log: {exc})")
        readers = asyncio.Semaphore(_LOG_READERS)

        async def read(component: str) -> str:
            if component == SCHEDULER_COMPONENT:
                path = self.output_file(staging_dir, "scheduler", cluster.name)
            elif _SAFE_NAME.fullmatch(component):
                path = self.output_file(staging_dir, "worker", component)
            else:
                return "(no log: no job was submitted for this name)"
            request = {"action": "tail", "path": path, "max_bytes": max_bytes}
            try:
                async with readers:
                    answer = await self.runner.run_as(user, request)
            except LauncherError as exc:
                hint = self.missing_output_hint()
                return f"(no log: {exc}{'; ' + hint if hint else ''})"
            text = str(answer.get("text", ""))
            return last_lines(text, tail, cut=len(text.encode()) >= max_bytes)

        texts = await asyncio.gather(*(read(c) for c in components))
        return dict(zip(components, texts, strict=True))

    # ---------------------------------------------------------------------------------------
    # Submitting and cancelling

    async def _submit(self, user: RunAs, request: dict[str, Any], what: str) -> str:
        program = os.path.basename(request["cmd"][0])
        task = asyncio.ensure_future(self.runner.run_as(user, request))
        try:
            answer = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The submit may go through after all: cancel whatever job it gives.
            self._spawn(self._cancel_late_submission(user, task, what))
            raise
        result = CommandResult(
            returncode=int(answer.get("returncode", -1)),
            stdout=str(answer.get("stdout", "")),
            stderr=str(answer.get("stderr", "")),
        )
        if result.returncode != 0:
            raise RuntimeError(f"submitting {what} failed: " + result.describe(program))
        try:
            job_id = self.parse_job_id(result.stdout)
        except ValueError as exc:
            raise RuntimeError(
                f"submitting {what}: no job id in the output of {program} ({exc}): "
                f"{result.stdout.strip()[:500]!r}"
            ) from None
        log.info("Submitted %s as %s %s (user %s)", what, self.job_label, job_id, user.name)
        return job_id

    async def _cancel_late_submission(
        self, user: RunAs, task: asyncio.Future[dict[str, Any]], what: str
    ) -> None:
        try:
            answer = await task
            job_id = self.parse_job_id(str(answer.get("stdout", "")))
        except Exception:  # noqa: BLE001 - nothing was submitted
            return
        log.info("Cancelling %s %s of %s, whose start was cancelled", self.job_label, job_id, what)
        request = {
            "action": "run",
            "cmd": self.cancel_command_line([job_id]),
            "env": self.submit_env(),
        }
        try:
            await self.runner.run_as(user, request)
        except Exception:
            log.warning("Cannot cancel %s %s", self.job_label, job_id, exc_info=True)

    async def _stopping_account(self, cluster: Cluster, what: str) -> RunAs | None:
        """The account to stop ``what`` as; None (logged) when the user has none any more:
        then nothing of theirs can be cancelled or removed by the gateway."""
        try:
            return await self.account(cluster)
        except RuntimeError as exc:
            log.warning("Cannot stop %s: %s", what, exc)
            return None

    async def _cancel(
        self, user: RunAs, job_ids: Sequence[str], *, remove: str | None, what: str
    ) -> None:
        """Cancel ``job_ids`` (none: only remove) and remove the directory ``remove`` (if
        given), as ``user`` through the launcher, in one call. A cancel that fails raises
        (retried: a job must not be left behind)."""
        request: dict[str, Any] = {
            "action": "run",
            "cmd": self.cancel_command_line(job_ids) if job_ids else None,
            "env": self.submit_env(),
            "remove": remove,
        }
        try:
            answer = await self.runner.run_as(user, request)
        except LauncherError as exc:
            if job_ids:
                raise  # retried: a job must not be left behind
            # Nothing was submitted; at worst an empty staging directory is left.
            log.warning("Cannot remove the staging directory of %s: %s", what, exc)
            return
        if answer.get("remove_error"):
            log.warning("Staging directory of %s: %s", what, answer["remove_error"])
        if job_ids:
            result = CommandResult(
                returncode=int(answer.get("returncode", -1)),
                stdout=str(answer.get("stdout", "")),
                stderr=str(answer.get("stderr", "")),
            )
            ids = " ".join(job_ids)
            if not self.cancel_succeeded(result):
                raise RuntimeError(
                    f"cancelling {self.job_label} {ids} ({what}) failed: "
                    + result.describe(os.path.basename(self.cancel_program))
                )
            for job_id in job_ids:
                self._last_state.pop(job_id, None)
            log.info("Cancelled %s %s (%s)", self.job_label, ids, what)

    # ---------------------------------------------------------------------------------------
    # Jobs submitted but never recorded (a crash between the submit and the write)

    async def find_jobs(self, user: RunAs, job_name: str, what: str) -> list[str]:
        """The ids of ``user``'s live jobs named ``job_name``, oldest first: one lookup
        command (`lookup_command_line`), as the user, through the launcher. Raises
        RuntimeError naming the command when it cannot tell (the command failed or printed
        what `parse_job_lookup` cannot read): that is never taken as "no job"."""
        argv = self.lookup_command_line(job_name, user.name)
        command = shlex.join(argv)
        request = {"action": "run", "cmd": argv, "env": self.submit_env()}
        try:
            answer = await self.runner.run_as(user, request)
        except LauncherError as exc:
            raise RuntimeError(
                f"looking up {what} by its job name ({command}) failed: {exc}"
            ) from None
        result = CommandResult(
            returncode=int(answer.get("returncode", -1)),
            stdout=str(answer.get("stdout", "")),
            stderr=str(answer.get("stderr", "")),
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"looking up {what} by its job name ({command}) failed: "
                + result.describe(os.path.basename(argv[0]))
            )
        try:
            return self.parse_job_lookup(result.stdout)
        except ValueError as exc:
            raise RuntimeError(
                f"looking up {what} by its job name ({command}): cannot understand its "
                f"output ({exc}): {result.stdout.strip()[:500]!r}"
            ) from None

    async def _adopt(self, user: RunAs, job_name: str, what: str) -> str | None:
        """Before a start's second submit: the live job named ``job_name`` that an earlier
        attempt submitted after its last write, if any (the newest; older ones, which must
        not run twice, are cancelled); None when there is none."""
        found = await self.find_jobs(user, job_name, what)
        if not found:
            return None
        *extra, newest = found
        if extra:
            log.warning(
                "Found %d %ss named %s (%s); keeping the newest, %s, and cancelling %s",
                len(found),
                self.job_label,
                job_name,
                what,
                newest,
                " ".join(extra),
            )
            await self._cancel(user, extra, remove=None, what=what)
        log.info(
            "Adopted %s %s (%s, user %s), submitted before the gateway stopped but never recorded",
            self.job_label,
            newest,
            what,
            user.name,
        )
        return newest

    async def _unrecorded_jobs(self, user: RunAs, job_name: str, what: str) -> list[str]:
        """For a stop without a job id: the live jobs named ``job_name`` (a start may have
        submitted one after its last write)."""
        found = await self.find_jobs(user, job_name, what)
        if found:
            log.info(
                "Stopping %s: found %s %s by its name %s, submitted but never recorded",
                what,
                self.job_label,
                " ".join(found),
                job_name,
            )
        return found

    async def _remove_staging(self, user: RunAs, staging_dir: str, what: str) -> None:
        """Remove a staging directory an earlier attempt may have half made (no job of it
        runs), so the submit can make it afresh; raises when it cannot."""
        request = {"action": "run", "cmd": None, "env": self.submit_env(), "remove": staging_dir}
        answer = await self.runner.run_as(user, request)
        if answer.get("remove_error"):
            raise RuntimeError(
                f"starting {what} again: the earlier attempt's staging directory cannot be "
                f"removed: {answer['remove_error']}"
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------------------------------
    # Status

    async def _check(self, job_ids: Sequence[Any]) -> list[bool]:
        ids = [str(j) for j in job_ids if j]
        states = await self.job_states(ids) if ids else {}
        out = []
        for job_id in job_ids:
            code = states.get(str(job_id)) if job_id else None
            out.append(code is not None and self.job_state(code).alive)
        return out

    async def job_states(self, job_ids: Collection[str]) -> dict[str, str | None]:
        """The state code of each job (None: unknown to the scheduler, i.e. finished).
        Questions asked within ``status_batch_window`` share one status command."""
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch(future=asyncio.get_running_loop().create_future())
            self._spawn(self._answer(batch))
        batch.ids.update(job_ids)
        assert batch.future is not None
        return await asyncio.shield(batch.future)

    async def _answer(self, batch: _Batch) -> None:
        assert batch.future is not None
        try:
            await asyncio.sleep(self.status_batch_window)
        finally:
            if self._batch is batch:
                self._batch = None
        try:
            states = await self._query(sorted(batch.ids))
        except asyncio.CancelledError:
            batch.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every waiter
            batch.future.set_exception(exc)
            batch.future.exception()  # retrieved: every waiter may have been cancelled
        else:
            batch.future.set_result(states)

    async def _query(self, job_ids: list[str]) -> dict[str, str | None]:
        argv = self.status_command_line(job_ids)
        count = 1 + self.config.status_command_retries
        problem = ""
        async for attempt in attempts(
            count, base=self.config.backoff_base_delay, max_delay=self.config.backoff_max_delay
        ):
            self.status_calls += 1
            try:
                result = await self.runner.run(
                    argv, env=dict(os.environ), timeout=self.config.command_timeout
                )
            except RuntimeError as exc:
                problem = str(exc)
            else:
                if result.returncode == 0:
                    try:
                        found = self.parse_job_states(result.stdout)
                    except ValueError as exc:
                        problem = f"cannot understand the output of {argv[0]}: {exc}"
                    else:
                        return self._remember({j: found.get(j) for j in job_ids})
                elif self.status_error_means_gone(result, job_ids):
                    return self._remember(dict.fromkeys(job_ids))
                else:
                    problem = result.describe(os.path.basename(argv[0]))
            log.warning("Status command failed (attempt %d of %d): %s", attempt + 1, count, problem)
        raise RuntimeError(f"checking {len(job_ids)} {self.job_label}(s) failed: {problem}")

    def _remember(self, states: dict[str, str | None]) -> dict[str, str | None]:
        for job_id, code in states.items():
            if code is not None:
                self._last_state[job_id] = code
        return states


__all__ = [
    "CommandResult",
    "GoneJobMessages",
    "JobQueueClusterConfig",
    "JobQueueConfig",
    "JobQueueDriver",
    "JobRunner",
    "JobState",
    "LauncherError",
    "StateTable",
    "Submission",
]


def _run_as_identity(
    argv: list[str],
    *,
    env: Mapping[str, str] | None,
    stdin: bytes | None,
    timeout: float,
    who: RunAs,
) -> CommandResult:
    """`JobRunner.run` for a command run as ``who`` (blocking: called in a thread)."""
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            env=dict(env) if env is not None else None,
            cwd="/",
            start_new_session=True,
            timeout=timeout,
            user=who.uid,
            group=who.gid,
            extra_groups=list(who.groups),
            check=False,
        )
    except FileNotFoundError:
        raise RuntimeError(f"command not found: {argv[0]!r}") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{argv[0]} did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise RuntimeError(f"cannot run {argv[0]!r}: {exc}") from None
    return CommandResult(
        returncode=done.returncode,
        stdout=done.stdout.decode("utf-8", "replace"),
        stderr=done.stderr.decode("utf-8", "replace"),
    )

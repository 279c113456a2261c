"""The ``command-template`` driver: each scheduler and worker is a local process, launched
through a command template the administrator configures.

Owns `CommandTemplateConfig` (``[backend.command-template]``), `expand` (template → argv) and
`CommandTemplateDriver`, the six `ClusterDriver` operations for processes on the gateway's host
(and the optional failure reason and logs, from the processes' log files).
Starting, watching and stopping the processes is core's driver kit (`gateway_core.backends.kit`):
this module only decides what to run and where.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import signal
import string
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import define, field

from gateway_core.backends.base import SCHEDULER_COMPONENT, ClusterDriver
from gateway_core.backends.kit import (
    CERT_FILE,
    KEY_FILE,
    ProcessGroups,
    ProcessRef,
    StopSteps,
    cluster_env,
    create_log,
    describe_exit,
    read_log,
    tail_log,
    write_private_file,
)
from gateway_core.config import (
    ClusterConfig,
    Command,
    ProcessBackendConfig,
    structure,
)

if TYPE_CHECKING:
    from gateway_core.context import GatewayContext
    from gateway_core.models import Cluster, Worker

log = logging.getLogger("gateway.command_template")

CMD = "{cmd}"
"""A template argument that is replaced by the cluster's whole ``scheduler_cmd``/``worker_cmd``."""

CLUSTER_PLACEHOLDERS = (
    "cluster_name",
    "username",
    "directory",
    "tls_cert",
    "tls_key",
    "api_url",
    "heartbeat_period",
    "cores",
    "memory",
)
"""Placeholders both templates may use (``cores`` and ``memory`` are the scheduler's in the
scheduler template and the worker's in the worker template; memory is in bytes)."""

WORKER_PLACEHOLDERS = (
    *CLUSTER_PLACEHOLDERS,
    "worker_name",
    "threads",
    "scheduler_address",
    "api_address",
)
"""Placeholders only the worker template may use (workers start once the scheduler is up)."""

SCHEDULER_LOG = "scheduler.log"
KILL_WAIT = 5.0
"""Seconds to wait for a process group to go after SIGKILL (then it is logged and left)."""


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def template_problems(template: Sequence[str], allowed: Sequence[str]) -> list[str]:
    """What is wrong with a template: unknown placeholders, ``{cmd}`` not on its own, bad
    braces. Empty when it is fine."""
    problems = []
    for index, arg in enumerate(template):
        if arg == CMD:
            continue
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(arg) if name is not None]
        except ValueError as exc:
            problems.append(f"[{index}]: {exc} in {arg!r} (write {{{{ and }}}} for braces)")
            continue
        for name in names:
            if name == "cmd":
                problems.append(f"[{index}]: {CMD} must be a whole argument, not part of {arg!r}")
            elif name not in allowed:
                problems.append(
                    f"[{index}]: unknown placeholder {{{name}}}; known: "
                    + ", ".join(f"{{{n}}}" for n in ("cmd", *allowed))
                )
    return problems


@define(kw_only=True, frozen=True)
class CommandTemplateConfig(ProcessBackendConfig):
    """``[backend.command-template]``: how processes are launched, and the reconciler's
    settings every process-style backend shares (`ProcessBackendConfig`)."""

    scheduler_template: Command = field(factory=lambda: Command([CMD]))
    """The scheduler's command line. ``{cmd}`` as an argument of its own is replaced by the
    cluster's ``scheduler_cmd``; other arguments may use placeholders (`CLUSTER_PLACEHOLDERS`),
    e.g. ``["nice", "-n", "10", "{cmd}"]``."""
    worker_template: Command = field(factory=lambda: Command([CMD]))
    """Each worker's command line; ``{cmd}`` is the cluster's ``worker_cmd``, and worker
    placeholders such as ``{worker_name}`` and ``{scheduler_address}`` are available."""
    stop_signal: str = "SIGTERM"
    """Signal sent to a process group to stop it, by name."""
    stop_timeout: float = 5.0
    """Seconds to wait after ``stop_signal`` before sending SIGKILL."""
    clusters_directory: str = ""
    """Where each cluster gets a working directory (TLS files, logs); empty means a folder
    in the system's temporary directory."""

    def check(self) -> list[str]:
        """Problems with the settings this class adds (see `CheckedConfig`)."""
        problems: list[str] = []
        if (
            not self.stop_signal.startswith("SIG")
            or self.stop_signal not in signal.Signals.__members__
        ):
            problems.append(
                f"stop_signal: unknown signal {self.stop_signal!r}; use a name such as "
                "SIGTERM, SIGINT or SIGQUIT"
            )
        if self.stop_timeout < 0:
            problems.append(f"stop_timeout: must not be negative, got {self.stop_timeout}")
        for name, allowed in (
            ("scheduler_template", CLUSTER_PLACEHOLDERS),
            ("worker_template", WORKER_PLACEHOLDERS),
        ):
            template = getattr(self, name)
            if not template:
                problems.append(f"{name}: must not be empty")
            problems.extend(f"{name}{p}" for p in template_problems(template, allowed))
        return problems

    @property
    def signal(self) -> signal.Signals:
        return signal.Signals[self.stop_signal]

    @property
    def stop_steps(self) -> StopSteps:
        """``stop_signal``, then SIGKILL after ``stop_timeout`` seconds."""
        return [(self.signal, self.stop_timeout), (signal.SIGKILL, KILL_WAIT)]

    @property
    def base_directory(self) -> Path:
        if self.clusters_directory:
            return Path(self.clusters_directory)
        return Path(tempfile.gettempdir()) / "gateway-command-template"


def expand(template: Sequence[str], cmd: Sequence[str], values: Mapping[str, object]) -> list[str]:
    """The argv for ``template``: ``{cmd}`` arguments become ``cmd`` (verbatim, braces and
    all); every other argument is formatted with ``values``."""
    argv: list[str] = []
    for arg in template:
        if arg == CMD:
            argv.extend(cmd)
        else:
            argv.append(arg.format_map(values))
    return argv


def scheduler_values(
    *,
    cluster_name: str,
    username: str,
    directory: Path,
    api_url: str,
    backend: CommandTemplateConfig,
    config: ClusterConfig,
) -> dict[str, object]:
    """Placeholder values of the scheduler template (`CLUSTER_PLACEHOLDERS`)."""
    return {
        "cluster_name": cluster_name,
        "username": username,
        "directory": str(directory),
        "tls_cert": str(directory / CERT_FILE),
        "tls_key": str(directory / KEY_FILE),
        "api_url": api_url,
        "heartbeat_period": backend.cluster_heartbeat_period,
        "cores": config.scheduler_cores,
        "memory": int(config.scheduler_memory),
    }


def worker_values(
    cluster_values: Mapping[str, object],
    *,
    worker_name: str,
    scheduler_address: str,
    api_address: str,
    config: ClusterConfig,
) -> dict[str, object]:
    """Placeholder values of the worker template (`WORKER_PLACEHOLDERS`)."""
    return {
        **cluster_values,
        "cores": config.worker_cores,
        "memory": int(config.worker_memory),
        "threads": config.threads,
        "worker_name": worker_name,
        "scheduler_address": scheduler_address,
        "api_address": api_address,
    }


def preview(config_path: str | None = None) -> list[str]:
    """The scheduler and worker command lines the config gives, with sample names filled in
    (what ``gateway command-template`` prints). Raises ConfigError for a bad config."""
    from gateway_core.config import find_config_file, load_config

    path = find_config_file(config_path)
    config = load_config(path=path) if path is not None else load_config()
    backend = structure(
        config.backend.get("command-template", {}),
        CommandTemplateConfig,
        path="backend.command-template",
    )
    cluster = structure(config.cluster, ClusterConfig, path="cluster")
    values = scheduler_values(
        cluster_name="<cluster>",
        username="<user>",
        directory=backend.base_directory / "<cluster>",
        api_url=config.gateway.api_url or "<api url>",
        backend=backend,
        config=cluster,
    )
    workers = worker_values(
        values,
        worker_name="<worker>",
        scheduler_address="<scheduler address>",
        api_address="<scheduler api address>",
        config=cluster,
    )
    return [
        "scheduler: "
        + shlex.join(expand(backend.scheduler_template, cluster.scheduler_cmd, values)),
        "worker:    " + shlex.join(expand(backend.worker_template, cluster.worker_cmd, workers)),
    ]


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class CommandTemplateDriver(ClusterDriver[CommandTemplateConfig, ClusterConfig]):
    """Runs schedulers and workers as process groups on the gateway's host.

    Each cluster gets a working directory ``<clusters_directory>/<cluster name>`` holding its
    TLS certificate and key (mode 0600) and one log per process. Every process starts in a new
    session, so stopping its process group reaches whatever it started. State kept in the
    gateway's store: the directory, and for each process the kit's `ProcessRef` (pid, start
    time, boot), so that after a gateway restart the driver finds its processes again and never
    signals a process that was given a reused pid.
    """

    def __init__(
        self, *, config: CommandTemplateConfig, context: GatewayContext, **kwargs: Any
    ) -> None:
        super().__init__(config=config, context=context, **kwargs)
        self.processes = ProcessGroups()

    async def setup(self) -> None:
        base = self.config.base_directory
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(base, os.W_OK | os.X_OK):
            raise RuntimeError(f"clusters_directory {base} is not writable by the gateway")
        for name in ("scheduler_template", "worker_template"):
            program = getattr(self.config, name)[0]
            if program != CMD and shutil.which(program) is None:
                raise RuntimeError(f"{name}: program {program!r} not found on PATH")

    # ---------------------------------------------------------------------------------------
    # Helpers

    def directory(self, cluster: Cluster) -> Path:
        """The cluster's working directory (as stored, once its start has begun)."""
        stored = cluster.state.get("directory")
        return Path(stored) if stored else self.config.base_directory / cluster.name

    def values(self, cluster: Cluster) -> dict[str, object]:
        """The placeholder values of the scheduler template for ``cluster``."""
        return scheduler_values(
            cluster_name=cluster.name,
            username=cluster.username,
            directory=self.directory(cluster),
            api_url=self.context.api_url,
            backend=self.config,
            config=self.cluster_config(cluster),
        )

    def environment(self, cluster: Cluster, **extra: str) -> dict[str, str]:
        """The gateway's environment, the cluster's (`cluster_env`), the TLS file paths, then
        ``extra``."""
        directory = self.directory(cluster)
        env = dict(os.environ)
        env.update(cluster_env(cluster, self.context))
        env["DASK_GATEWAY_TLS_CERT"] = str(directory / CERT_FILE)
        env["DASK_GATEWAY_TLS_KEY"] = str(directory / KEY_FILE)
        env.update(extra)
        return env

    def spawn(
        self, argv: list[str], *, cwd: Path, log_name: str, env: dict[str, str]
    ) -> ProcessRef:
        """Start ``argv`` in a new session with its output to ``cwd/log_name``."""
        log_fd = create_log(cwd, log_name)
        try:
            ref = self.processes.start(argv, env=env, cwd=cwd, stdout=log_fd)
        finally:
            os.close(log_fd)
        log.info("Started %s (pid %d): %s", log_name, ref.pid, shlex.join(argv))
        return ref

    async def stop(self, state: Mapping[str, Any], what: str) -> None:
        """Stop the process group whose `ProcessRef` is in ``state`` (nothing if none is)."""
        ref = ProcessRef.from_state(state)
        if ref is not None:
            # The whole group at once: a wrapper's children need not pass the signal on.
            await self.processes.terminate(ref, self.config.stop_steps, what=what, group=True)

    # ---------------------------------------------------------------------------------------
    # The six operations

    async def start_scheduler(self, cluster: Cluster) -> AsyncIterator[dict[str, Any]]:
        config = self.cluster_config(cluster)
        directory = self.config.base_directory / cluster.name
        # Stored before anything is created, so a stop after a crash knows what to remove.
        yield {"directory": str(directory)}
        directory.mkdir(mode=0o700, parents=True)  # fails if it exists: never reuse one
        for name, data in ((CERT_FILE, cluster.tls_cert), (KEY_FILE, cluster.tls_key)):
            write_private_file(directory / name, data)
        argv = expand(self.config.scheduler_template, config.scheduler_cmd, self.values(cluster))
        ref = self.spawn(argv, cwd=directory, log_name=SCHEDULER_LOG, env=self.environment(cluster))
        yield ref.to_state()

    async def stop_scheduler(self, cluster: Cluster) -> None:
        await self.stop(cluster.state, f"scheduler of cluster {cluster.name}")
        directory = cluster.state.get("directory")
        # Only ever remove a directory this driver made for this cluster.
        if directory and Path(directory).name == cluster.name:
            await asyncio.to_thread(shutil.rmtree, directory, True)

    async def start_worker(self, cluster: Cluster, worker: Worker) -> dict[str, Any]:
        config = self.cluster_config(cluster)
        values = worker_values(
            self.values(cluster),
            worker_name=worker.name,
            scheduler_address=cluster.scheduler_address,
            api_address=cluster.api_address,
            config=config,
        )
        argv = expand(self.config.worker_template, config.worker_cmd, values)
        env = self.environment(cluster, DASK_GATEWAY_WORKER_NAME=worker.name)
        log_name = f"worker-{worker.name}.log"
        return self.spawn(argv, cwd=self.directory(cluster), log_name=log_name, env=env).to_state()

    async def stop_worker(self, cluster: Cluster, worker: Worker) -> None:
        await self.stop(worker.state, f"worker {worker.name}")

    async def check_clusters(self, clusters: Sequence[Cluster]) -> list[bool]:
        return [self.processes.alive(ProcessRef.from_state(c.state)) for c in clusters]

    async def check_workers(self, workers: Sequence[tuple[Cluster, Worker]]) -> list[bool]:
        return [self.processes.alive(ProcessRef.from_state(w.state)) for _, w in workers]

    async def failure_reason(self, cluster: Cluster) -> str | None:
        ref = ProcessRef.from_state(cluster.state)
        if ref is None:
            return None
        how = describe_exit(self.processes.exit_status(ref))
        lines = tail_log(self.directory(cluster), SCHEDULER_LOG)
        if not lines:
            return f"The scheduler process {how} without output"
        return f"The scheduler process {how}. Its last output:\n" + "\n".join(lines)

    async def cluster_logs(
        self, cluster: Cluster, *, components: Sequence[str], tail: int, max_bytes: int
    ) -> dict[str, str]:
        """The ends of ``scheduler.log`` and ``worker-<name>.log`` in the cluster's directory
        (a message once the directory is removed, when the cluster stops)."""
        if not cluster.state.get("directory"):
            return dict.fromkeys(components, "(no log: the cluster has not started yet)")
        return await asyncio.to_thread(
            self._read_logs, self.directory(cluster), components, tail, max_bytes
        )

    def _read_logs(
        self, directory: Path, components: Sequence[str], tail: int, max_bytes: int
    ) -> dict[str, str]:
        if not directory.is_dir():
            return dict.fromkeys(
                components, f"(no log: {directory} was removed when the cluster stopped)"
            )
        logs: dict[str, str] = {}
        for component in components:
            name = SCHEDULER_LOG if component == SCHEDULER_COMPONENT else f"worker-{component}.log"
            if "/" in name:
                logs[component] = "(no log: the driver made no file for this name)"
                continue
            text = read_log(directory, name, lines=tail, max_bytes=max_bytes)
            logs[component] = (
                text if text is not None else f"(no log: {directory / name} cannot be read)"
            )
        return logs

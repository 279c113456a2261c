"""The ``command-template`` driver: each scheduler and worker is a local process, launched
through a command template the administrator configures.

Owns `CommandTemplateConfig` (``[backend.command-template]``), `expand` (template → argv) and
`CommandTemplateDriver`, the six `ClusterDriver` operations for processes on the gateway's host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import string
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import define, field

from gateway_core.backends.base import ClusterDriver
from gateway_core.backends.process import cluster_env
from gateway_core.config import (
    ClusterConfig,
    Command,
    ConfigError,
    ProcessBackendConfig,
    structure,
)

if TYPE_CHECKING:
    from gateway_core.config import BackendConfig
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

TLS_CERT_FILE = "dask.crt"
TLS_KEY_FILE = "dask.pem"
SCHEDULER_LOG = "scheduler.log"
LOG_TAIL_LINES = 20


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

    def __attrs_post_init__(self) -> None:
        problems = []
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
        if problems:
            raise ConfigError(problems)

    @property
    def signal(self) -> signal.Signals:
        return signal.Signals[self.stop_signal]

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
        "tls_cert": str(directory / TLS_CERT_FILE),
        "tls_key": str(directory / TLS_KEY_FILE),
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
# Processes
# --------------------------------------------------------------------------------------------


def is_alive(pid: int) -> bool:
    """Is the process ``pid`` still running? Reaps it if it is our child and has exited."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child (a gateway restart) or reaped already: ask the kernel below
    else:
        return waited == 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, but belongs to someone else
    return not is_zombie(pid)


def is_zombie(pid: int) -> bool:
    """Has ``pid`` exited, waiting for a parent (not us) to reap it? Linux only; elsewhere
    False. Where process 1 of a container does not reap orphans, they stay zombies."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return bool(fields) and fields[0] == "Z"


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group ``pid`` leads (every process it started)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


async def terminate(pid: int, sig: signal.Signals, timeout: float) -> None:
    """Stop the process group led by ``pid``: ``sig``, then SIGKILL after ``timeout`` seconds.

    Returns once the leader is gone; a process that is already gone is left alone (so a pid
    reused by an unrelated process is not signalled once its leader is known dead).
    """
    if not is_alive(pid):
        return
    try:
        signal_group(pid, sig)
    except PermissionError:
        log.warning("Process %d belongs to another user; not stopping it", pid)
        return
    if await wait_gone(pid, timeout):
        return
    log.info("Process %d ignored %s for %.1fs; killing it", pid, sig.name, timeout)
    signal_group(pid, signal.SIGKILL)
    await wait_gone(pid, 5.0)


async def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; True when it did."""
    deadline = time.monotonic() + timeout
    while True:
        if not is_alive(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, or an empty string."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class CommandTemplateDriver(ClusterDriver):
    """Runs schedulers and workers as process groups on the gateway's host.

    Each cluster gets a working directory ``<clusters_directory>/<cluster name>`` holding its
    TLS certificate and key (mode 0600) and one log per process. Every process starts in a new
    session, so its pid is also its process group, and stopping it reaches whatever it started.
    State kept in the gateway's store: ``{"directory": ..., "pid": ...}`` for a scheduler,
    ``{"pid": ...}`` for a worker; nothing else is needed after a gateway restart.
    """

    name = "command-template"
    cluster_config_class: type[ClusterConfig] = ClusterConfig

    def __init__(self, *, config: BackendConfig, context: GatewayContext, **kwargs: Any) -> None:
        super().__init__(config=config, context=context, **kwargs)
        if not isinstance(config, CommandTemplateConfig):
            raise TypeError(f"{type(self).__name__} needs a CommandTemplateConfig")
        self.settings = config

    async def setup(self) -> None:
        base = self.settings.base_directory
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(base, os.W_OK | os.X_OK):
            raise RuntimeError(f"clusters_directory {base} is not writable by the gateway")
        for name in ("scheduler_template", "worker_template"):
            program = getattr(self.settings, name)[0]
            if program != CMD and shutil.which(program) is None:
                raise RuntimeError(f"{name}: program {program!r} not found on PATH")

    # ---------------------------------------------------------------------------------------
    # Helpers

    def directory(self, cluster: Cluster) -> Path:
        stored = cluster.state.get("directory")
        return Path(stored) if stored else self.settings.base_directory / cluster.name

    def values(self, cluster: Cluster, config: ClusterConfig) -> dict[str, object]:
        return scheduler_values(
            cluster_name=cluster.name,
            username=cluster.username,
            directory=self.directory(cluster),
            api_url=self.context.api_url,
            backend=self.settings,
            config=config,
        )

    def environment(self, cluster: Cluster, **extra: str) -> dict[str, str]:
        directory = self.directory(cluster)
        env = dict(os.environ)
        env.update(cluster_env(cluster, self.context))
        env["DASK_GATEWAY_TLS_CERT"] = str(directory / TLS_CERT_FILE)
        env["DASK_GATEWAY_TLS_KEY"] = str(directory / TLS_KEY_FILE)
        env.update(extra)
        return env

    def spawn(self, argv: list[str], *, cwd: Path, log_name: str, env: dict[str, str]) -> int:
        """Start ``argv`` in a new session with output to ``cwd/log_name``; return its pid."""
        with (cwd / log_name).open("ab") as out:
            try:
                process = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except FileNotFoundError:
                raise RuntimeError(f"command not found: {argv[0]!r}") from None
            except PermissionError:
                raise RuntimeError(f"command not executable: {argv[0]!r}") from None
        log.info("Started %s (pid %d): %s", log_name, process.pid, " ".join(argv))
        return process.pid

    # ---------------------------------------------------------------------------------------
    # The six operations

    async def start_scheduler(self, cluster: Cluster) -> AsyncIterator[dict[str, Any]]:
        config = structure(cluster.config, self.cluster_config_class, path="cluster")
        directory = self.settings.base_directory / cluster.name
        # Stored before anything is created, so a stop after a crash knows what to remove.
        yield {"directory": str(directory)}
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if cluster.tls_cert and cluster.tls_key:
            for name, data in ((TLS_CERT_FILE, cluster.tls_cert), (TLS_KEY_FILE, cluster.tls_key)):
                fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
        argv = expand(
            self.settings.scheduler_template, config.scheduler_cmd, self.values(cluster, config)
        )
        pid = self.spawn(argv, cwd=directory, log_name=SCHEDULER_LOG, env=self.environment(cluster))
        yield {"pid": pid}

    async def stop_scheduler(self, cluster: Cluster) -> None:
        pid = cluster.state.get("pid")
        if pid:
            await terminate(pid, self.settings.signal, self.settings.stop_timeout)
        directory = cluster.state.get("directory")
        # Only ever remove a directory this driver made for this cluster.
        if directory and Path(directory).name == cluster.name:
            await asyncio.to_thread(shutil.rmtree, directory, True)

    async def start_worker(self, cluster: Cluster, worker: Worker) -> dict[str, Any]:
        config = structure(cluster.config, self.cluster_config_class, path="cluster")
        values = worker_values(
            self.values(cluster, config),
            worker_name=worker.name,
            scheduler_address=cluster.scheduler_address,
            api_address=cluster.api_address,
            config=config,
        )
        argv = expand(self.settings.worker_template, config.worker_cmd, values)
        env = self.environment(cluster, DASK_GATEWAY_WORKER_NAME=worker.name)
        pid = self.spawn(
            argv, cwd=self.directory(cluster), log_name=f"worker-{worker.name}.log", env=env
        )
        return {"pid": pid}

    async def stop_worker(self, cluster: Cluster, worker: Worker) -> None:
        pid = worker.state.get("pid")
        if pid:
            await terminate(pid, self.settings.signal, self.settings.stop_timeout)

    async def check_clusters(self, clusters: Sequence[Cluster]) -> list[bool]:
        return [bool(c.state.get("pid")) and is_alive(c.state["pid"]) for c in clusters]

    async def check_workers(self, workers: Sequence[tuple[Cluster, Worker]]) -> list[bool]:
        return [bool(w.state.get("pid")) and is_alive(w.state["pid"]) for _, w in workers]

    async def failure_reason(self, cluster: Cluster) -> str | None:
        output = tail(self.directory(cluster) / SCHEDULER_LOG)
        if not output:
            return None
        return f"The scheduler process exited. Its last output:\n{output}"

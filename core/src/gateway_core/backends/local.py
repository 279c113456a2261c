"""The ``local`` and ``unsafe-local`` backends: Dask schedulers and workers as processes on the
gateway's own host, as the requesting user (``local``, needs root) or as the gateway's user.

Owns `LocalBackendConfig` (`[backend.local]` / `[backend.unsafe-local]`), `UnsafeLocalDriver`
and `LocalDriver`, and what they share: each cluster's private working directory (TLS files and
one log per process), launching (cold: a new process; warm: forked by
`gateway_core.backends.forkserver`), the SIGINT → SIGTERM → SIGKILL escalation on process groups,
and liveness checks through ``/proc`` that survive a gateway restart and never mistake a reused
pid for the process that had it.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import define, field

from ..config import ClusterConfig, ConfigError, ProcessBackendConfig
from .base import ClusterDriver, StateUpdates
from .commands import (
    CERT_FILE,
    DEFAULT_INHERITED_ENVIRONMENT,
    KEY_FILE,
    RunAs,
    cluster_settings,
    scheduler_command,
    tls_env,
    worker_command,
)
from .forkserver import ForkServer, ForkServerError, LaunchRefused
from .process import cluster_env

if TYPE_CHECKING:
    from ..config import BackendConfig
    from ..context import GatewayContext
    from ..models import Cluster, Worker

log = logging.getLogger("gateway.backend.local")
NANNY_START_VAR = "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"
"""How a nanny starts its worker process (distributed's ``worker.multiprocessing-method``)."""


HOST = "127.0.0.1"
"""Schedulers, dashboards, agents and workers listen on loopback: the gateway is local."""

SCHEDULER_LOG = "scheduler.log"

WARM_COMMANDS: dict[tuple[str, str], str] = {
    ("dask", "scheduler"): "distributed.cli.dask_scheduler",
    ("dask", "worker"): "distributed.cli.dask_worker",
}
"""Commands the fork server can run warm, and the module each one runs."""

_STARTUP_ENV_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "GLIBC_TUNABLES")
"""Variables read only when a process starts: a forked child cannot honour new values."""

_TAIL_LINES = 20
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@define(kw_only=True, frozen=True)
class LocalBackendConfig(ProcessBackendConfig):
    """`[backend.local]` and `[backend.unsafe-local]`: processes on the gateway's host."""

    clusters_directory: str = ""
    """Directory holding one working directory per cluster (created, 0700, removed when the
    cluster stops); empty: a new temporary directory per cluster."""
    inherited_environment: list[str] = field(factory=lambda: list(DEFAULT_INHERITED_ENVIRONMENT))
    """Environment variables the scheduler and worker processes inherit from the gateway."""
    sigint_timeout: float = 10.0
    """Seconds a process has to exit after SIGINT before it gets SIGTERM."""
    sigterm_timeout: float = 5.0
    """Seconds a process has to exit after SIGTERM before it gets SIGKILL."""
    sigkill_timeout: float = 5.0
    """Seconds to wait after SIGKILL before the process is logged as a zombie and left."""
    start_method: str = "fork"
    """``fork``: the default ``dask scheduler``/``dask worker`` commands are forked from a warm
    template process with distributed imported (falls back to ``spawn`` on any error);
    ``spawn``: every process is a new command."""
    early_exit_window: float = 2.0
    """Seconds after a launch during which a process that exits fails its start at once, with
    the end of its log as the reason; 0 leaves it to the periodic checks."""

    def __attrs_post_init__(self) -> None:
        problems = []
        if self.start_method not in ("fork", "spawn"):
            problems.append(f"start_method: expected fork or spawn, got {self.start_method!r}")
        for name in ("sigint_timeout", "sigterm_timeout", "sigkill_timeout", "early_exit_window"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must not be negative, got {getattr(self, name)}")
        if self.clusters_directory and not os.path.isabs(self.clusters_directory):
            problems.append(
                f"clusters_directory: must be an absolute path, got {self.clusters_directory!r}"
            )
        if problems:
            raise ConfigError(problems)


@define(kw_only=True, frozen=True)
class ProcessRef:
    """One launched process, as stored in driver state: the pid plus what tells it apart from a
    later process given the same pid (its start time in clock ticks since boot, and the boot)."""

    pid: int
    start_ticks: int
    boot_id: str

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ProcessRef | None:
        pid, ticks = state.get("pid"), state.get("start_ticks")
        if not isinstance(pid, int) or not isinstance(ticks, int) or pid <= 0:
            return None
        return cls(pid=pid, start_ticks=ticks, boot_id=str(state.get("boot_id", "")))

    def to_state(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_ticks": self.start_ticks, "boot_id": self.boot_id}


# --------------------------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------------------------


@define(frozen=True)
class _Stat:
    state: str
    pgrp: int
    start_ticks: int


def _read_stat(pid: int) -> _Stat | None:
    """State, process group and start time of ``pid`` from /proc; None when there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    rest = raw[raw.rindex(b")") + 2 :].split()
    return _Stat(state=rest[0].decode(), pgrp=int(rest[2]), start_ticks=int(rest[19]))


@functools.cache
def boot_id() -> str:
    """This boot's id: pids and start times from another boot mean nothing."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _live_members(pgid: int) -> list[int]:
    """Pids of the running (not zombie) processes in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _read_stat(int(entry))
        if st is not None and st.pgrp == pgid and st.state not in ("Z", "X"):
            members.append(int(entry))
    return members


def _describe_status(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


# --------------------------------------------------------------------------------------------
# The drivers
# --------------------------------------------------------------------------------------------


class UnsafeLocalDriver(ClusterDriver):
    """Schedulers and workers as local processes of the gateway's own user.

    No separation between users: anyone's cluster can read everyone's files the gateway can.
    For one person's gateway, demos and tests; `LocalDriver` runs each user's processes as that
    user. Each cluster gets a working directory (``clusters_directory``) holding the TLS
    certificate and key (``dask.crt``, ``dask.pem``) and one log per process
    (``scheduler.log``, ``worker-<name>.log``); it is removed when the cluster stops.
    """

    name = "unsafe-local"

    def __init__(self, *, config: BackendConfig, context: GatewayContext, **kwargs: Any) -> None:
        super().__init__(config=config, context=context, **kwargs)
        if not isinstance(config, LocalBackendConfig):
            raise TypeError(
                f"{type(self).__name__} needs a LocalBackendConfig, got {type(config).__name__}"
            )
        self.settings: LocalBackendConfig = config
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._forkserver_task: asyncio.Task[ForkServer | None] | None = None
        self.warm_disabled: str | None = None
        """Why the fork server is not used (it failed to start), or None."""

    # ---------------------------------------------------------------------------------------
    # Life cycle

    async def setup(self) -> None:
        if self.settings.start_method == "fork" and self._warm_possible():
            # Start importing now, so the first cluster does not wait for it.
            self._forkserver_task = asyncio.create_task(self._start_forkserver())

    async def cleanup(self) -> None:
        task, self._forkserver_task = self._forkserver_task, None
        if task is not None:
            if not task.done():
                task.cancel()
            results = await asyncio.gather(task, return_exceptions=True)
            if isinstance(results[0], ForkServer):
                await results[0].close()
        for pid, popen in list(self._children.items()):
            if popen.poll() is not None:
                self._children.pop(pid, None)

    # ---------------------------------------------------------------------------------------
    # Who runs the processes (LocalDriver overrides)

    async def run_as(self, cluster: Cluster) -> RunAs | None:
        """The account for ``cluster``'s processes; None: the gateway's own."""
        return None

    def identity_env(self, cluster: Cluster, run_as: RunAs | None) -> dict[str, str]:
        """Variables naming the user: over the inherited ones, under the config's
        ``environment``."""
        return {"USER": cluster.username}

    # ---------------------------------------------------------------------------------------
    # Commands and environment

    def cluster_settings(self, cluster: Cluster) -> ClusterConfig:
        """The cluster config fields of ``cluster.config`` (extra keys of subclasses ignored)."""
        return cluster_settings(cluster)

    def scheduler_command(self, cluster: Cluster, settings: ClusterConfig) -> list[str]:
        """``scheduler_cmd`` plus the arguments of the original gateway (TLS on loopback,
        dynamic ports, the agent preload and its settings)."""
        return scheduler_command(
            settings, host=HOST, heartbeat_period=self.settings.cluster_heartbeat_period
        )

    def worker_command(
        self, cluster: Cluster, worker: Worker, settings: ClusterConfig
    ) -> list[str]:
        return worker_command(
            settings,
            scheduler_address=cluster.scheduler_address,
            worker_name=worker.name,
            host=HOST,
        )

    def process_env(
        self, cluster: Cluster, *, role: str, workdir: str, run_as: RunAs | None
    ) -> dict[str, str]:
        """Environment of a ``role`` ("scheduler" or "worker") process: the inherited
        variables, the user's identity, the config's ``environment``, then what the gateway
        needs (API URL, token, cluster name, TLS files; these win)."""
        env = {k: os.environ[k] for k in self.settings.inherited_environment if k in os.environ}
        env.update(self.identity_env(cluster, run_as))
        env["DASK_TEMPORARY_DIRECTORY"] = workdir
        if role == "worker" and self.settings.start_method == "fork":
            # The nanny is already warm (forked from the template): let it fork its worker
            # too instead of spawning a fresh interpreter; scale(4) measured 7 s -> 1.5-3.5 s.
            # `[cluster] environment` may set it back to "spawn".
            env[NANNY_START_VAR] = "fork"
        env.update(cluster_env(cluster, self.context))
        cert, key = os.path.join(workdir, CERT_FILE), os.path.join(workdir, KEY_FILE)
        env.update(tls_env(role, cert, key))
        return env

    # ---------------------------------------------------------------------------------------
    # The six operations

    def start_scheduler(self, cluster: Cluster) -> StateUpdates:
        return self._start_scheduler(cluster)

    async def _start_scheduler(self, cluster: Cluster) -> AsyncIterator[dict[str, Any]]:
        _check_name(cluster.name)
        settings = self.cluster_settings(cluster)
        run_as = await self.run_as(cluster)
        # The directory's path is stored before the directory is made, so neither a cancelled
        # start nor a gateway killed half-way can lose it. (Likewise for processes below.)
        workdir = self._workdir_path(cluster)
        yield {"workdir": workdir}
        self._make_workdir(cluster, workdir, run_as)
        argv = self.scheduler_command(cluster, settings)
        env = self.process_env(cluster, role="scheduler", workdir=workdir, run_as=run_as)
        ref, method = await self._launch(
            argv=argv, env=env, workdir=workdir, log_name=SCHEDULER_LOG, run_as=run_as
        )
        log.info("Scheduler of cluster %s started (pid %d, %s)", cluster.name, ref.pid, method)
        yield {**ref.to_state(), "method": method}
        await self._watch_start(ref, workdir, SCHEDULER_LOG, "scheduler", run_as)

    async def stop_scheduler(self, cluster: Cluster) -> None:
        ref = ProcessRef.from_state(cluster.state)
        if ref is not None:
            await self._terminate(ref, f"scheduler of cluster {cluster.name}")
        workdir = cluster.state.get("workdir")
        if isinstance(workdir, str) and workdir:
            await asyncio.to_thread(self._remove_workdir, cluster, workdir)

    def start_worker(self, cluster: Cluster, worker: Worker) -> StateUpdates:
        return self._start_worker(cluster, worker)

    async def _start_worker(
        self, cluster: Cluster, worker: Worker
    ) -> AsyncIterator[dict[str, Any]]:
        _check_name(worker.name)
        workdir = cluster.state.get("workdir")
        if not isinstance(workdir, str) or not workdir:
            raise RuntimeError(f"cluster {cluster.name} has no working directory")
        if not cluster.scheduler_address:
            raise RuntimeError(f"cluster {cluster.name} has no scheduler address yet")
        settings = self.cluster_settings(cluster)
        run_as = await self.run_as(cluster)
        argv = self.worker_command(cluster, worker, settings)
        env = self.process_env(cluster, role="worker", workdir=workdir, run_as=run_as)
        log_name = f"worker-{worker.name}.log"
        ref, method = await self._launch(
            argv=argv, env=env, workdir=workdir, log_name=log_name, run_as=run_as
        )
        log.info("Worker %s started (pid %d, %s)", worker.name, ref.pid, method)
        yield {**ref.to_state(), "method": method, "log": log_name}
        await self._watch_start(ref, workdir, log_name, "worker", run_as)

    async def stop_worker(self, cluster: Cluster, worker: Worker) -> None:
        ref = ProcessRef.from_state(worker.state)
        if ref is not None:
            await self._terminate(ref, f"worker {worker.name}")

    async def check_clusters(self, clusters: Sequence[Cluster]) -> list[bool]:
        return [self._alive(ProcessRef.from_state(c.state)) for c in clusters]

    async def check_workers(self, workers: Sequence[tuple[Cluster, Worker]]) -> list[bool]:
        return [self._alive(ProcessRef.from_state(w.state)) for _, w in workers]

    async def failure_reason(self, cluster: Cluster) -> str | None:
        workdir = cluster.state.get("workdir")
        ref = ProcessRef.from_state(cluster.state)
        if not isinstance(workdir, str) or ref is None:
            return None
        run_as = await self.run_as(cluster)
        return self._exit_message(ref, workdir, SCHEDULER_LOG, "scheduler", run_as)

    # ---------------------------------------------------------------------------------------
    # Working directories

    def _workdir_path(self, cluster: Cluster) -> str:
        """Where the cluster's working directory goes; chosen (and stored) before it exists, so
        a gateway killed while making it still knows what to remove."""
        base = self.settings.clusters_directory
        if base:
            return os.path.join(base, cluster.name)
        suffix = secrets.token_hex(4)
        return os.path.join(tempfile.gettempdir(), f"dask-gateway-{cluster.name}-{suffix}")

    def _make_workdir(self, cluster: Cluster, workdir: str, run_as: RunAs | None) -> None:
        base = os.path.dirname(workdir)
        if self.settings.clusters_directory:
            os.makedirs(base, mode=0o755, exist_ok=True)
        os.mkdir(workdir, 0o700)  # fails if it exists: never reuse someone else's directory
        try:
            os.chmod(workdir, 0o700)
            for name, data in ((CERT_FILE, cluster.tls_cert), (KEY_FILE, cluster.tls_key)):
                fd = os.open(
                    os.path.join(workdir, name),
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
                with os.fdopen(fd, "wb") as f:
                    if run_as is not None:
                        os.fchown(f.fileno(), run_as.uid, run_as.gid)
                    f.write(data)
            if run_as is not None:
                # Last: from here on the user owns the directory and may change what is in it.
                os.chown(workdir, run_as.uid, run_as.gid)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        log.debug("Working directory %s for cluster %s created", workdir, cluster.name)

    def _remove_workdir(self, cluster: Cluster, workdir: str) -> None:
        if cluster.name not in os.path.basename(workdir):
            log.warning("Not removing %s: not the working directory of %s", workdir, cluster.name)
            return
        try:
            shutil.rmtree(workdir)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("Cannot remove the working directory %s: %s", workdir, exc)
            return
        log.debug("Working directory %s removed", workdir)

    def _open_workdir(self, workdir: str, run_as: RunAs | None) -> int:
        """An fd of ``workdir``, checked to be a real directory of the expected owner (the user
        owns it under `LocalDriver` and could have swapped it for a symlink)."""
        fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        owner = os.geteuid() if run_as is None else run_as.uid
        if os.fstat(fd).st_uid != owner:
            os.close(fd)
            raise PermissionError(f"{workdir} is not owned by uid {owner}")
        return fd

    def _create_log(self, workdir: str, name: str, run_as: RunAs | None) -> int:
        dir_fd = self._open_workdir(workdir, run_as)
        try:
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_APPEND | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
        finally:
            os.close(dir_fd)
        if run_as is not None:
            os.fchown(fd, run_as.uid, run_as.gid)
        return fd

    def _tail(self, workdir: str, name: str, run_as: RunAs | None) -> list[str] | None:
        """The last lines of log ``name``; None when it cannot be read safely."""
        try:
            dir_fd = self._open_workdir(workdir, run_as)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            owner = os.geteuid() if run_as is None else run_as.uid
            if not stat.S_ISREG(st.st_mode) or st.st_uid != owner:
                return None
            f.seek(max(0, st.st_size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
        lines = [line[:500] for line in text.splitlines() if line.strip()]
        return lines[-_TAIL_LINES:]

    # ---------------------------------------------------------------------------------------
    # Launching

    async def _launch(
        self,
        *,
        argv: list[str],
        env: dict[str, str],
        workdir: str,
        log_name: str,
        run_as: RunAs | None,
    ) -> tuple[ProcessRef, str]:
        """Start ``argv`` in ``workdir`` with stdout and stderr to its log; (ref, "fork" or
        "spawn")."""
        log_fd = self._create_log(workdir, log_name, run_as)
        try:
            module = self._warm_module(argv, env, run_as)
            if module is not None:
                server = await self._forkserver()
                if server is not None:
                    try:
                        pid, ticks = await server.spawn(
                            argv=[" ".join(argv[:2]), *argv[2:]],
                            module=module,
                            env=env,
                            cwd=workdir,
                            log_fd=log_fd,
                            uid=None if run_as is None else run_as.uid,
                            gid=None if run_as is None else run_as.gid,
                            groups=None if run_as is None else run_as.groups,
                        )
                        return ProcessRef(pid=pid, start_ticks=ticks, boot_id=boot_id()), "fork"
                    except ForkServerError as exc:
                        log.warning("Fork server launch failed (%s); starting it cold", exc)
                        if not isinstance(exc, LaunchRefused):
                            await self._discard_forkserver(server)
            return self._spawn(argv, env, workdir, log_fd, run_as), "spawn"
        finally:
            os.close(log_fd)

    def _spawn(
        self, argv: list[str], env: dict[str, str], workdir: str, log_fd: int, run_as: RunAs | None
    ) -> ProcessRef:
        identity: dict[str, Any] = {}
        if run_as is not None:
            identity = {"user": run_as.uid, "group": run_as.gid, "extra_groups": run_as.groups}
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
                start_new_session=True,
                close_fds=True,
                **identity,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"cannot run {argv[0]!r}: {exc}") from exc
        self._children[popen.pid] = popen
        st = _read_stat(popen.pid)  # our child: /proc/<pid> stays until we reap it
        ticks = st.start_ticks if st is not None else -1
        return ProcessRef(pid=popen.pid, start_ticks=ticks, boot_id=boot_id())

    def _warm_possible(self) -> bool:
        return importlib.util.find_spec("distributed") is not None

    def _warm_module(
        self, argv: Sequence[str], env: Mapping[str, str], run_as: RunAs | None
    ) -> str | None:
        """The module to fork for ``argv``, or None when it must be started cold: not the
        default command, another ``dask`` than the gateway's, start-up variables the template
        does not have, or a user site-packages directory that could shadow the template's."""
        if self.settings.start_method != "fork" or self.warm_disabled is not None:
            return None
        module = WARM_COMMANDS.get((argv[0], argv[1])) if len(argv) >= 2 else None
        if module is None:
            return None
        found = shutil.which(argv[0], path=env.get("PATH", os.defpath))
        ours = os.path.join(os.path.dirname(sys.executable), argv[0])
        if found is None or os.path.realpath(found) != os.path.realpath(ours):
            return None
        template = self._template_env()
        for key in {*env, *template} - {"PYTHONNOUSERSITE"}:
            if key.startswith(_STARTUP_ENV_PREFIXES) and env.get(key) != template.get(key):
                return None
        if "PYTHONNOUSERSITE" not in env:
            home = env.get("HOME") or (run_as.home if run_as else os.path.expanduser("~"))
            base = env.get("PYTHONUSERBASE") or os.path.join(home, ".local")
            version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
            if os.path.isdir(os.path.join(base, "lib", version, "site-packages")):
                return None
        return module

    def _template_env(self) -> dict[str, str]:
        from .forkserver import TEMPLATE_ENV

        env = {k: os.environ[k] for k in self.settings.inherited_environment if k in os.environ}
        return {**env, **TEMPLATE_ENV}

    async def _start_forkserver(self) -> ForkServer | None:
        preload = ["distributed", "distributed.cli.dask_scheduler", "distributed.cli.dask_worker"]
        for module, needs in (
            ("gateway_client.agent", "gateway_client"),
            ("distributed.dashboard.scheduler", "bokeh"),
        ):
            if importlib.util.find_spec(needs) is not None:
                preload.append(module)
        env = {k: os.environ[k] for k in self.settings.inherited_environment if k in os.environ}
        server = ForkServer(env=env, preload=preload)
        began = time.monotonic()
        try:
            await server.start()
        except Exception as exc:  # noqa: BLE001 - any failure means cold starts
            self.warm_disabled = str(exc) or type(exc).__name__
            log.warning("Not using a fork server (%s); every process starts cold", exc)
            return None
        log.info("Fork server ready in %.1f s", time.monotonic() - began)
        return server

    async def _forkserver(self) -> ForkServer | None:
        """The running fork server, started (again) if needed; None if it cannot be had."""
        if self.warm_disabled is not None:
            return None
        task = self._forkserver_task
        if task is not None and task.done():
            server = None if task.cancelled() or task.exception() else task.result()
            if server is None or not server.alive:
                if server is not None:
                    await server.close()
                task = None
        if task is None:
            task = self._forkserver_task = asyncio.create_task(self._start_forkserver())
        return await asyncio.shield(task)

    async def _discard_forkserver(self, server: ForkServer) -> None:
        task = self._forkserver_task
        if task is not None and task.done() and not task.cancelled() and task.result() is server:
            self._forkserver_task = None
        await server.close()

    # ---------------------------------------------------------------------------------------
    # Watching and stopping

    def _alive(self, ref: ProcessRef | None) -> bool:
        """Is the process ``ref`` names still running (not exited, not a zombie, not another
        process that was given the same pid later)?"""
        if ref is None or ref.boot_id != boot_id():
            return False
        popen = self._children.get(ref.pid)
        if popen is not None and popen.poll() is not None:
            return False  # reaped just now, or before
        st = _read_stat(ref.pid)
        return st is not None and st.start_ticks == ref.start_ticks and st.state not in ("Z", "X")

    def _group_alive(self, ref: ProcessRef) -> bool:
        """Is anything left of ``ref``'s process group (it leads its own session)?"""
        if self._alive(ref):
            return True
        if ref.boot_id != boot_id():
            return False
        st = _read_stat(ref.pid)
        if st is not None and st.start_ticks != ref.start_ticks:
            return False  # the pid was reused, so no group of ours can hold it any more
        try:
            os.killpg(ref.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return bool(_live_members(ref.pid))

    def _signal(self, ref: ProcessRef, sig: signal.Signals) -> None:
        """Send ``sig`` to the process while it lives (it shuts its own children down in
        order: a Dask nanny closes its worker), to what is left of its group otherwise, and
        SIGKILL always to the whole group."""
        st = _read_stat(ref.pid)
        if ref.boot_id != boot_id() or (st is not None and st.start_ticks != ref.start_ticks):
            return
        try:
            if sig != signal.SIGKILL and self._alive(ref):
                os.kill(ref.pid, sig)
            else:
                os.killpg(ref.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.warning("Cannot signal process group %d: %s", ref.pid, exc)

    async def _terminate(self, ref: ProcessRef, what: str) -> None:
        """SIGINT, then SIGTERM, then SIGKILL (see `_signal`), each after the previous one's
        timeout, until nothing is left of ``ref``'s process group."""
        s = self.settings
        steps = (
            (signal.SIGINT, s.sigint_timeout),
            (signal.SIGTERM, s.sigterm_timeout),
            (signal.SIGKILL, s.sigkill_timeout),
        )
        try:
            for sig, timeout in steps:
                if not self._group_alive(ref):
                    return
                log.debug("Sending %s to the %s (process group %d)", sig.name, what, ref.pid)
                self._signal(ref, sig)
                if await self._wait_gone(ref, timeout):
                    return
            log.warning(
                "The %s (process group %d) is still there %g s after SIGKILL; leaving it "
                "(a zombie, or stuck in the kernel)",
                what,
                ref.pid,
                s.sigkill_timeout,
            )
        finally:
            popen = self._children.get(ref.pid)
            if popen is not None and popen.poll() is not None:
                self._children.pop(ref.pid, None)

    async def _wait_gone(self, ref: ProcessRef, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pause = 0.01
        while self._group_alive(ref):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.25)
        return True

    async def _watch_start(
        self, ref: ProcessRef, workdir: str, log_name: str, what: str, run_as: RunAs | None
    ) -> None:
        """Fail the start if the process exits within ``early_exit_window`` seconds."""
        deadline = time.monotonic() + self.settings.early_exit_window
        pause = 0.02
        while time.monotonic() < deadline:
            if not self._alive(ref):
                raise RuntimeError(self._exit_message(ref, workdir, log_name, what, run_as))
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.25)

    def _exit_message(
        self, ref: ProcessRef, workdir: str, log_name: str, what: str, run_as: RunAs | None
    ) -> str:
        popen = self._children.get(ref.pid)
        # poll(), not returncode: the process may have exited just after the liveness check
        # polled it (seen as a zombie in /proc), and only reaping it tells its status.
        how = _describe_status(popen.poll() if popen is not None else None)
        lines = self._tail(workdir, log_name, run_as)
        where = os.path.join(workdir, log_name)
        if lines is None:
            return f"The {what} {how}; its log {where} cannot be read"
        if not lines:
            return f"The {what} {how} without writing to its log ({where})"
        return f"The {what} {how}; the end of its log ({where}):\n" + "\n".join(lines)


class LocalDriver(UnsafeLocalDriver):
    """Schedulers and workers as local processes of the user who asked for the cluster.

    The gateway must run as root. The user must exist on the host (``pwd``); root's clusters are
    refused. The working directory and its files belong to the user (0700 / 0600); processes get
    the user's uid, gid and groups, and ``HOME``, ``USER``, ``LOGNAME`` and ``SHELL``.
    """

    name = "local"

    async def setup(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError(
                "The local backend runs every cluster as the user who asked for it, which "
                f"needs root; the gateway runs as uid {os.geteuid()}. Run it as root, or use "
                'backend = "unsafe-local" (every cluster then runs as the gateway\'s user).'
            )
        await super().setup()

    async def run_as(self, cluster: Cluster) -> RunAs:
        return await asyncio.to_thread(lookup_user, cluster.username)

    def identity_env(self, cluster: Cluster, run_as: RunAs | None) -> dict[str, str]:
        assert run_as is not None
        return {
            "HOME": run_as.home,
            "USER": run_as.name,
            "LOGNAME": run_as.name,
            "SHELL": run_as.shell,
        }


def lookup_user(username: str) -> RunAs:
    """The local account ``username``; a clear error when there is none or it is root."""
    try:
        entry = pwd.getpwnam(username)
    except KeyError:
        raise RuntimeError(
            f"User {username!r} has no account on the gateway's host; the local backend runs "
            "clusters as their user, so it cannot start this one"
        ) from None
    if entry.pw_uid == 0:
        raise RuntimeError(
            f"User {username!r} is root; the local backend does not run clusters as root"
        )
    return RunAs.from_pwd(entry)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise RuntimeError(f"refusing to make files for the unsafe name {name!r}")


__all__ = [
    "DEFAULT_INHERITED_ENVIRONMENT",
    "LocalBackendConfig",
    "LocalDriver",
    "ProcessRef",
    "RunAs",
    "UnsafeLocalDriver",
    "boot_id",
    "lookup_user",
]

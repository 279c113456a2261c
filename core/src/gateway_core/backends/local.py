"""The ``local`` and ``unsafe-local`` backends: Dask schedulers and workers as processes on the
gateway's own host, as the requesting user (``local``, needs root) or as the gateway's user.

Owns `LocalBackendConfig` (`[backend.local]` / `[backend.unsafe-local]`) and `LocalDriver`, one
driver for both backends whose `ProcessOwner` part says who runs the processes (`GatewayUser`
or `RequestingUser`), with each cluster's private working directory (TLS files and one log per
process) and launching (cold: a new process; warm: forked by
`gateway_core.backends.forkserver`). Starting, watching and stopping process groups (SIGINT →
SIGTERM → SIGKILL, liveness that survives a restart and a reused pid) is the driver kit's
`ProcessGroups`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from attrs import define, field

from ..config import ClusterConfig, ProcessBackendConfig
from ..crashpoints import crash_point
from .base import SCHEDULER_COMPONENT, ClusterDriver, StateUpdates
from .forkserver import ForkServer, ForkServerError, LaunchRefused
from .kit import (
    CERT_FILE,
    DEFAULT_INHERITED_ENVIRONMENT,
    KEY_FILE,
    ProcessGroups,
    ProcessRef,
    RunAs,
    boot_id,
    cluster_env,
    create_log,
    describe_exit,
    inherited_env,
    launched_with_output,
    lookup_user,
    open_directory,
    read_log,
    scheduler_command,
    tail_log,
    tls_env,
    with_gateway_bin,
    worker_command,
    write_private_file,
)

if TYPE_CHECKING:
    from ..context import GatewayContext
    from ..models import Cluster, Worker

log = logging.getLogger("gateway.backend.local")
NANNY_START_VAR = "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"
"""How a nanny starts its worker process (distributed's ``worker.multiprocessing-method``)."""


HOST = "127.0.0.1"
"""Schedulers, dashboards, agents and workers listen on loopback: the gateway is local."""

SCHEDULER_LOG = "scheduler.log"

UNKNOWN_EXIT = (
    "exit status unknown: it is not this gateway process's child (forked by the fork server, "
    "or started before a gateway restart)"
)
"""Said in a failure reason for a process whose exit status the gateway cannot learn."""

WARM_COMMANDS: dict[tuple[str, str], str] = {
    ("dask", "scheduler"): "distributed.cli.dask_scheduler",
    ("dask", "worker"): "distributed.cli.dask_worker",
}
"""Commands the fork server can run warm, and the module each one runs."""

_STARTUP_ENV_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "GLIBC_TUNABLES")
"""Variables read only when a process starts: a forked child cannot honour new values."""

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@define(kw_only=True, frozen=True)
class LocalBackendConfig(ProcessBackendConfig):
    """`[backend.local]` and `[backend.unsafe-local]`: processes on the gateway's host."""

    clusters_directory: str = ""
    """Directory holding one working directory per cluster (created, 0700, removed when the
    cluster stops); empty: a new temporary directory per cluster."""
    inherited_environment: list[str] = field(factory=lambda: list(DEFAULT_INHERITED_ENVIRONMENT))
    """Environment variables the scheduler and worker processes inherit from the gateway. Their
    ``PATH`` ends with the directory of the gateway's own Python (`kit.with_gateway_bin`)."""
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

    def check(self) -> list[str]:
        """Problems with the settings this class adds (see `CheckedConfig`)."""
        problems: list[str] = []
        if self.start_method not in ("fork", "spawn"):
            problems.append(f"start_method: expected fork or spawn, got {self.start_method!r}")
        for name in ("sigint_timeout", "sigterm_timeout", "sigkill_timeout", "early_exit_window"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must not be negative, got {getattr(self, name)}")
        if self.clusters_directory and not os.path.isabs(self.clusters_directory):
            problems.append(
                f"clusters_directory: must be an absolute path, got {self.clusters_directory!r}"
            )
        return problems


# --------------------------------------------------------------------------------------------
# Who runs the processes
# --------------------------------------------------------------------------------------------


class ProcessOwner(Protocol):
    """The part of `LocalDriver` that says whose processes a cluster's are."""

    def check(self) -> None:
        """Raise RuntimeError, saying what to do, when the gateway cannot work this way."""

    async def account(self, cluster: Cluster) -> RunAs | None:
        """The account for ``cluster``'s processes; None: the gateway's own."""


@define(frozen=True)
class GatewayUser:
    """``unsafe-local``: every cluster's processes are the gateway's own user's (no separation
    between users; for one person's gateway, demos and tests)."""

    def check(self) -> None:
        pass

    async def account(self, cluster: Cluster) -> RunAs | None:
        return None


@define(frozen=True)
class RequestingUser:
    """``local``: each cluster's processes run as the user who asked for it, who must have an
    account on the host (not root). The gateway must run as root."""

    def check(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError(
                "The local backend runs every cluster as the user who asked for it, which "
                f"needs root; the gateway runs as uid {os.geteuid()}. Run it as root, or use "
                'backend = "unsafe-local" (every cluster then runs as the gateway\'s user).'
            )

    async def account(self, cluster: Cluster) -> RunAs:
        return await asyncio.to_thread(
            lookup_user,
            cluster.username,
            purpose="the local backend runs clusters as their user, so it cannot start this one",
        )


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class LocalDriver(ClusterDriver[LocalBackendConfig, ClusterConfig]):
    """Schedulers and workers as processes on the gateway's host, of the user ``owner`` says.

    ``owner`` is `RequestingUser` (``local``, the default: the gateway must be root, and each
    user's processes, working directory and files are that user's, 0700 / 0600, with the user's
    uid, gid, groups and ``HOME``, ``USER``, ``LOGNAME``, ``SHELL``) or `GatewayUser`
    (``unsafe-local``: all are the gateway's; anyone's cluster can read everyone's files the
    gateway can). Each cluster gets a working directory (``clusters_directory``) holding the
    TLS certificate and key (``dask.crt``, ``dask.pem``) and one log per process
    (``scheduler.log``, ``worker-<name>.log``); it is removed when the cluster stops.
    """

    def __init__(
        self,
        *,
        config: LocalBackendConfig,
        context: GatewayContext,
        owner: ProcessOwner | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, context=context, **kwargs)
        self.owner: ProcessOwner = RequestingUser() if owner is None else owner
        self.processes = ProcessGroups()
        self._forkserver_task: asyncio.Task[ForkServer | None] | None = None
        self.warm_disabled: str | None = None
        """Why the fork server is not used (it failed to start), or None."""

    # ---------------------------------------------------------------------------------------
    # Life cycle

    async def setup(self) -> None:
        self.owner.check()
        if self.config.start_method == "fork" and self._warm_possible():
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
        self.processes.forget_exited()

    # ---------------------------------------------------------------------------------------
    # Commands and environment

    def scheduler_command(self, cluster: Cluster, settings: ClusterConfig) -> list[str]:
        """``scheduler_cmd`` plus the arguments of the original gateway (TLS on loopback,
        dynamic ports, the agent preload and its settings)."""
        return scheduler_command(
            settings, host=HOST, heartbeat_period=self.config.cluster_heartbeat_period
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
        self,
        cluster: Cluster,
        *,
        role: str,
        workdir: str,
        run_as: RunAs | None,
        settings: ClusterConfig | None = None,
    ) -> dict[str, str]:
        """Environment of a ``role`` ("scheduler" or "worker") process: the inherited
        variables (``PATH`` ending with the gateway's own ``bin``), the user's identity, the
        config's ``environment`` (of ``settings`` when given: a worker's group config), then
        what the gateway needs (API URL, token, cluster name, TLS files; these win)."""
        env = inherited_env(self.config.inherited_environment)
        # An unactivated venv (`/venv/bin/gateway serve`) leaves its bin off PATH: append it,
        # so `dask` is found there when nothing earlier on PATH provides it.
        env["PATH"] = with_gateway_bin(env.get("PATH"))
        env.update(run_as.identity_env() if run_as is not None else {"USER": cluster.username})
        env["DASK_TEMPORARY_DIRECTORY"] = workdir
        if role == "worker" and self.config.start_method == "fork":
            # The nanny is already warm (forked from the template): let it fork its worker
            # too instead of spawning a fresh interpreter; scale(4) measured 7 s -> 1.5-3.5 s.
            # `[cluster] environment` may set it back to "spawn".
            env[NANNY_START_VAR] = "fork"
        env.update(cluster_env(cluster, self.context, settings=settings))
        cert, key = os.path.join(workdir, CERT_FILE), os.path.join(workdir, KEY_FILE)
        env.update(tls_env(role, cert, key))
        return env

    # ---------------------------------------------------------------------------------------
    # The six operations

    def start_scheduler(self, cluster: Cluster) -> StateUpdates:
        return self._start_scheduler(cluster)

    async def _start_scheduler(self, cluster: Cluster) -> AsyncIterator[dict[str, Any]]:
        _check_name(cluster.name)
        settings = self.cluster_config(cluster)
        run_as = await self.owner.account(cluster)
        # The directory's path is stored before the directory is made, so neither a cancelled
        # start nor a gateway killed half-way can lose it. (Likewise for processes below.)
        stale = cluster.state.get("workdir")
        if isinstance(stale, str) and stale and ProcessRef.from_state(cluster.state) is None:
            # An attempt the gateway died in (`start_may_rerun`): it may have made the
            # directory, and launched a scheduler after its last write. A live one is adopted
            # (it may have registered already); anything else there is cleared.
            adopted = await asyncio.to_thread(self._adopt, stale, SCHEDULER_LOG, "scheduler")
            if adopted is not None:
                log.info(
                    "Adopted the scheduler of cluster %s (pid %d), launched before the "
                    "gateway stopped but never recorded",
                    cluster.name,
                    adopted.pid,
                )
                yield {**adopted.to_state(), "method": "adopted"}
                return
            await asyncio.to_thread(self._clear_failed_attempt, cluster, stale)
        workdir = self._workdir_path(cluster)
        yield {"workdir": workdir}
        self._make_workdir(cluster, workdir, run_as)
        argv = self.scheduler_command(cluster, settings)
        env = self.process_env(cluster, role="scheduler", workdir=workdir, run_as=run_as)
        ref, method = await self._launch(
            argv=argv, env=env, workdir=workdir, log_name=SCHEDULER_LOG, run_as=run_as
        )
        log.info("Scheduler of cluster %s started (pid %d, %s)", cluster.name, ref.pid, method)
        crash_point("launched:scheduler")
        yield {**ref.to_state(), "method": method}
        await self._watch_start(ref, workdir, SCHEDULER_LOG, "scheduler", run_as)

    async def stop_scheduler(self, cluster: Cluster) -> None:
        """Stop the scheduler (the one stored, or else one launched but never recorded), then
        kill whatever still runs in the working directory and remove it: nothing of the
        cluster outlives its stop."""
        workdir = cluster.state.get("workdir")
        has_workdir = isinstance(workdir, str) and bool(workdir)
        refs: list[ProcessRef] = []
        ref = ProcessRef.from_state(cluster.state)
        if ref is not None:
            refs.append(ref)
        elif has_workdir:
            refs = await asyncio.to_thread(
                launched_with_output, os.path.join(str(workdir), SCHEDULER_LOG)
            )
        for found in refs:
            await self._terminate(found, f"scheduler of cluster {cluster.name}")
        if has_workdir:
            await asyncio.to_thread(self._clear_failed_attempt, cluster, str(workdir))

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
        settings = self.worker_config(cluster, worker)
        run_as = await self.owner.account(cluster)
        argv = self.worker_command(cluster, worker, settings)
        env = self.process_env(
            cluster, role="worker", workdir=workdir, run_as=run_as, settings=settings
        )
        log_name = f"worker-{worker.name}.log"
        # An earlier attempt that got as far as its log (the gateway died in it) may have
        # launched the worker after its last write: adopted, not doubled.
        adopted = await asyncio.to_thread(self._adopt_worker, workdir, log_name, run_as)
        if adopted is not None:
            log.info(
                "Adopted worker %s (pid %d), launched before the gateway stopped but never "
                "recorded",
                worker.name,
                adopted.pid,
            )
            yield {**adopted.to_state(), "method": "adopted", "log": log_name}
            return
        ref, method = await self._launch(
            argv=argv, env=env, workdir=workdir, log_name=log_name, run_as=run_as
        )
        log.info("Worker %s started (pid %d, %s)", worker.name, ref.pid, method)
        crash_point("launched:worker")
        yield {**ref.to_state(), "method": method, "log": log_name}
        await self._watch_start(ref, workdir, log_name, "worker", run_as)

    async def stop_worker(self, cluster: Cluster, worker: Worker) -> None:
        """Stop the worker's process: the one stored, or else any launched for it but never
        recorded (found by its log, `launched_with_output`)."""
        ref = ProcessRef.from_state(worker.state)
        if ref is not None:
            await self._terminate(ref, f"worker {worker.name}")
            return
        workdir = cluster.state.get("workdir")
        if not isinstance(workdir, str) or not workdir:
            return
        log_file = os.path.join(workdir, f"worker-{worker.name}.log")
        for found in await asyncio.to_thread(_launched_with_log, log_file):
            log.info(
                "Stopping worker %s (pid %d), launched but never recorded", worker.name, found.pid
            )
            await self._terminate(found, f"worker {worker.name}")

    def worker_start_may_rerun(self, cluster: Cluster, worker: Worker) -> bool:
        # As for the scheduler: no pid stored, so the start runs again, and adopts a worker
        # the earlier attempt launched after its last write (found by its log) if one runs.
        return ProcessRef.from_state(worker.state) is None

    async def check_clusters(self, clusters: Sequence[Cluster]) -> list[bool]:
        return [self.processes.alive(ProcessRef.from_state(c.state)) for c in clusters]

    async def check_workers(self, workers: Sequence[tuple[Cluster, Worker]]) -> list[bool]:
        return [self.processes.alive(ProcessRef.from_state(w.state)) for _, w in workers]

    async def failure_reason(self, cluster: Cluster) -> str | None:
        workdir = cluster.state.get("workdir")
        ref = ProcessRef.from_state(cluster.state)
        if not isinstance(workdir, str) or ref is None:
            return None
        run_as = await self.owner.account(cluster)
        return self._exit_message(ref, workdir, SCHEDULER_LOG, "scheduler", run_as)

    async def cluster_logs(
        self, cluster: Cluster, *, components: Sequence[str], tail: int, max_bytes: int
    ) -> dict[str, str]:
        """The ends of ``scheduler.log`` and ``worker-<name>.log`` in the cluster's working
        directory, read as its owner (a message once the directory is removed)."""
        workdir = cluster.state.get("workdir")
        if not isinstance(workdir, str) or not workdir:
            return dict.fromkeys(components, "(no log: the cluster has not started yet)")
        try:
            run_as = await self.owner.account(cluster)
        except RuntimeError as exc:
            return dict.fromkeys(components, f"(no log: {exc})")
        return await asyncio.to_thread(
            self._read_logs, workdir, components, run_as, tail, max_bytes
        )

    def _read_logs(
        self,
        workdir: str,
        components: Sequence[str],
        run_as: RunAs | None,
        tail: int,
        max_bytes: int,
    ) -> dict[str, str]:
        if not os.path.isdir(workdir):
            gone = f"(no log: the working directory {workdir} is gone; it is removed when the "
            return dict.fromkeys(components, gone + "cluster stops)")
        logs: dict[str, str] = {}
        for component in components:
            if not _NAME.fullmatch(component):
                logs[component] = "(no log: the gateway made no files for this name)"
                continue
            name = SCHEDULER_LOG if component == SCHEDULER_COMPONENT else f"worker-{component}.log"
            text = read_log(workdir, name, run_as=run_as, lines=tail, max_bytes=max_bytes)
            if text is None:
                where = os.path.join(workdir, name)
                text = f"(no log: {where} does not exist or cannot be read)"
            logs[component] = text
        return logs

    # ---------------------------------------------------------------------------------------
    # Working directories

    def _workdir_path(self, cluster: Cluster) -> str:
        """Where the cluster's working directory goes; chosen (and stored) before it exists, so
        a gateway killed while making it still knows what to remove."""
        base = self.config.clusters_directory
        if base:
            return os.path.join(base, cluster.name)
        suffix = secrets.token_hex(4)
        return os.path.join(tempfile.gettempdir(), f"dask-gateway-{cluster.name}-{suffix}")

    def _make_workdir(self, cluster: Cluster, workdir: str, run_as: RunAs | None) -> None:
        base = os.path.dirname(workdir)
        if self.config.clusters_directory:
            os.makedirs(base, mode=0o755, exist_ok=True)
        os.mkdir(workdir, 0o700)  # fails if it exists: never reuse someone else's directory
        try:
            os.chmod(workdir, 0o700)
            for name, data in ((CERT_FILE, cluster.tls_cert), (KEY_FILE, cluster.tls_key)):
                write_private_file(os.path.join(workdir, name), data, run_as=run_as)
            if run_as is not None:
                # Last: from here on the user owns the directory and may change what is in it.
                os.chown(workdir, run_as.uid, run_as.gid)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        log.debug("Working directory %s for cluster %s created", workdir, cluster.name)

    def start_may_rerun(self, cluster: Cluster) -> bool:
        # The pid is stored the moment the process exists; without it nothing was launched
        # that the gateway knows of (a fork it asked for is found by its directory).
        return ProcessRef.from_state(cluster.state) is None

    def _adopt(self, workdir: str, log_name: str, what: str) -> ProcessRef | None:
        """The live process launched with ``log_name`` in ``workdir`` as its output, if there
        is one (the newest; older ones, which cannot be, are killed)."""
        found = sorted(
            launched_with_output(os.path.join(workdir, log_name)), key=lambda r: r.start_ticks
        )
        for extra in found[:-1]:
            log.warning("Killing a second %s (pid %d) writing to %s", what, extra.pid, log_name)
            self.processes.signal(extra, signal.SIGKILL)
        return found[-1] if found else None

    def _adopt_worker(self, workdir: str, log_name: str, run_as: RunAs | None) -> ProcessRef | None:
        """Before a worker's launch: the live worker an earlier attempt launched, if its log
        is there and a process writes to it; otherwise None, with a stale log removed so the
        launch can create it afresh (`create_log` never opens an existing file)."""
        if not os.path.lexists(os.path.join(workdir, log_name)):
            return None  # the usual case: no attempt got as far as its log
        adopted = self._adopt(workdir, log_name, "worker")
        if adopted is not None:
            return adopted
        dir_fd = open_directory(workdir, run_as=run_as)
        try:
            os.unlink(log_name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(dir_fd)
        return None

    def _clear_failed_attempt(self, cluster: Cluster, workdir: str) -> None:
        """Kill what still runs in ``workdir`` (found by its working directory: a process
        launched after the gateway's last write, or anything the cluster's processes left)
        and remove the directory."""
        real = os.path.realpath(workdir)
        for pid in _pids_in_directory(real):
            log.warning(
                "Killing process %d left in the working directory of cluster %s",
                pid,
                cluster.name,
            )
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)  # each launch leads its own process group
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self._remove_workdir(cluster, workdir)

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
        log_fd = create_log(workdir, log_name, run_as=run_as)
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
                        ref = ProcessRef(pid=pid, start_ticks=ticks, boot_id=boot_id())
                        return ref, "fork"
                    except ForkServerError as exc:
                        log.warning("Fork server launch failed (%s); starting it cold", exc)
                        if not isinstance(exc, LaunchRefused):
                            await self._discard_forkserver(server)
            ref = self.processes.start(argv, env=env, cwd=workdir, stdout=log_fd, run_as=run_as)
            return ref, "spawn"
        finally:
            os.close(log_fd)

    def _warm_possible(self) -> bool:
        return importlib.util.find_spec("distributed") is not None

    def _warm_module(
        self, argv: Sequence[str], env: Mapping[str, str], run_as: RunAs | None
    ) -> str | None:
        """The module to fork for ``argv``, or None when it must be started cold: not the
        default command, another ``dask`` than the gateway's, start-up variables the template
        does not have, or a user site-packages directory that could shadow the template's."""
        if self.config.start_method != "fork" or self.warm_disabled is not None:
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

        return {**inherited_env(self.config.inherited_environment), **TEMPLATE_ENV}

    async def _start_forkserver(self) -> ForkServer | None:
        preload = ["distributed", "distributed.cli.dask_scheduler", "distributed.cli.dask_worker"]
        for module, needs in (
            ("gateway_client.agent", "gateway_client"),
            ("distributed.dashboard.scheduler", "bokeh"),
        ):
            if importlib.util.find_spec(needs) is not None:
                preload.append(module)
        server = ForkServer(env=inherited_env(self.config.inherited_environment), preload=preload)
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

    async def _terminate(self, ref: ProcessRef, what: str) -> None:
        """SIGINT, then SIGTERM, then SIGKILL, each after the previous one's timeout, until
        nothing is left of ``ref``'s process group."""
        c = self.config
        steps = (
            (signal.SIGINT, c.sigint_timeout),
            (signal.SIGTERM, c.sigterm_timeout),
            (signal.SIGKILL, c.sigkill_timeout),
        )
        await self.processes.terminate(ref, steps, what=what)

    async def _watch_start(
        self, ref: ProcessRef, workdir: str, log_name: str, what: str, run_as: RunAs | None
    ) -> None:
        """Fail the start if the process exits within ``early_exit_window`` seconds."""
        deadline = time.monotonic() + self.config.early_exit_window
        pause = 0.02
        while time.monotonic() < deadline:
            if not self.processes.alive(ref):
                raise RuntimeError(self._exit_message(ref, workdir, log_name, what, run_as))
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.25)

    def _exit_message(
        self, ref: ProcessRef, workdir: str, log_name: str, what: str, run_as: RunAs | None
    ) -> str:
        code = self.processes.exit_status(ref)
        if code is None and not self.processes.started_here(ref):
            how = f"exited ({UNKNOWN_EXIT})"
        else:
            how = describe_exit(code)
        lines = tail_log(workdir, log_name, run_as=run_as)
        where = os.path.join(workdir, log_name)
        if lines is None:
            return f"The {what} {how}; its log {where} cannot be read"
        if not lines:
            return f"The {what} {how} without writing to its log ({where})"
        return f"The {what} {how}; the end of its log ({where}):\n" + "\n".join(lines)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise RuntimeError(f"refusing to make files for the unsafe name {name!r}")


def _launched_with_log(log_file: str) -> list[ProcessRef]:
    """`launched_with_output` of ``log_file``; at once empty when there is no such file (no
    attempt got as far as its log, so nothing was launched with it)."""
    if not os.path.lexists(log_file):
        return []
    return launched_with_output(log_file)


def _pids_in_directory(directory: str) -> list[int]:
    """Pids of the processes whose working directory is ``directory`` (Linux ``/proc``)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:  # gone, or not ours to read
            continue
        if cwd == directory:
            found.append(int(entry))
    return found


__all__ = [
    "GatewayUser",
    "LocalBackendConfig",
    "LocalDriver",
    "ProcessOwner",
    "RequestingUser",
]

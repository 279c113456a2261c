"""A simulated YARN cluster behind skein's gRPC services, for tests: the real ``skein`` client
talks to it over mutual TLS as it would to skein's Java driver and application masters.

Owns `YarnSimulator` (skein's ``Driver`` service: submit, status, listing, kill, logs; one
``AppMaster`` service per running application: containers, scale, shutdown), `SimApplication`
and `SimContainer`. Master and container scripts run as local processes (as the application's
user when the simulator runs as root, as YARN's LinuxContainerExecutor does), each in a
working directory ``<LOCAL_DIRS>/<CONTAINER_ID>`` holding its localized files and skein's
``.skein.crt``/``.skein.pem``, with YARN's and skein's environment variables. What YARN does on
failures is modelled: an unknown queue or user fails the application with YARN's diagnostics,
a master script that exits ends the application (FAILED when non-zero), a container whose
process exits is FAILED, a killed application is KILLED, an unknown id is NOT_FOUND.
"""

from __future__ import annotations

import collections
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import skein
from attrs import define, field
from skein.proto import skein_pb2 as pb
from skein.proto import skein_pb2_grpc as pb_grpc

ACTIVE = ("NEW", "NEW_SAVING", "SUBMITTED", "ACCEPTED", "RUNNING")
"""Application states YARN counts as not yet ended."""
CONTAINER_ACTIVE = ("WAITING", "REQUESTED", "RUNNING")
MASTER_LOG = "application.master.log"
"""The log file of the master script, as skein names it in the container's log directory."""


def _now_ms() -> int:
    return int(time.time() * 1000)


@define(kw_only=True)
class SimContainer:
    """One YARN container: the application master's or one instance of a service."""

    service: str
    """The skein service name; ``""`` for the application master."""
    instance: int
    yarn_id: str
    state: str = "WAITING"
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    logdir: Path | None = None
    env: dict[str, str] = field(factory=dict)
    start_time: int = 0
    finish_time: int = 0
    exit_message: str = ""

    @property
    def skein_id(self) -> str:
        return f"{self.service}_{self.instance}"

    @property
    def log_name(self) -> str:
        return MASTER_LOG if not self.service else f"{self.service}.log"

    def to_protobuf(self) -> pb.Container:
        return pb.Container(
            service_name=self.service,
            instance=self.instance,
            state=self.state,
            yarn_container_id=self.yarn_id,
            yarn_node_http_address="127.0.0.1:8042",
            start_time=self.start_time,
            finish_time=self.finish_time,
            exit_message=self.exit_message,
        )


@define(kw_only=True)
class SimApplication:
    """One YARN application and what the simulated ResourceManager knows about it."""

    id: str
    spec: pb.ApplicationSpec
    user: str
    state: str = "SUBMITTED"
    final_status: str = "UNDEFINED"
    diagnostics: str = ""
    host: str = ""
    port: int = 0
    start_time: int = field(factory=_now_ms)
    finish_time: int = 0
    progress: float = 0.0
    staging: Path | None = None
    am_server: grpc.Server | None = None
    master: SimContainer | None = None
    containers: dict[str, SimContainer] = field(factory=dict)
    next_instance: dict[str, int] = field(factory=dict)
    next_container: int = 2

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def report(self) -> pb.ApplicationReport:
        return pb.ApplicationReport(
            id=self.id,
            name=self.spec.name,
            user=self.user,
            queue=self.spec.queue,
            tags=list(self.spec.tags),
            host=self.host,
            port=self.port,
            tracking_url="",
            state=self.state,
            final_status=self.final_status,
            progress=self.progress,
            usage=pb.ResourceUsageReport(
                needed_resources=pb.Resources(),
                reserved_resources=pb.Resources(),
                used_resources=pb.Resources(),
            ),
            diagnostics=self.diagnostics,
            start_time=self.start_time,
            finish_time=self.finish_time,
        )


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def _rpc(method: Any) -> Any:
    """Run an RPC under the simulator's lock, counting it; `_Abort` becomes a gRPC status."""

    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        sim: YarnSimulator = self.sim
        name = method.__name__
        with sim.lock:
            sim.calls[name] += 1
            injected = sim.failures.get(name, 0)
            if injected:
                sim.failures[name] = injected - 1
        if injected:
            context.abort(grpc.StatusCode.INTERNAL, f"{name} failed (failure injected by test)")
        try:
            return method(self, request, context)
        except _Abort as exc:
            context.abort(exc.code, exc.details)

    wrapper.__name__ = method.__name__
    return wrapper


class _Driver(pb_grpc.DriverServicer):
    def __init__(self, sim: YarnSimulator) -> None:
        self.sim = sim

    @_rpc
    def ping(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.Empty:
        return pb.Empty()

    @_rpc
    def submit(self, request: pb.ApplicationSpec, context: grpc.ServicerContext) -> pb.Application:
        return pb.Application(id=self.sim.submit(request))

    @_rpc
    def getStatus(
        self, request: pb.Application, context: grpc.ServicerContext
    ) -> pb.ApplicationReport:
        with self.sim.lock:
            return self.sim.app(request.id).report()

    @_rpc
    def waitForStart(
        self, request: pb.Application, context: grpc.ServicerContext
    ) -> pb.ApplicationReport:
        deadline = time.monotonic() + (context.time_remaining() or 60.0)
        while time.monotonic() < deadline:
            with self.sim.lock:
                app = self.sim.app(request.id)
                if app.state not in ("NEW", "NEW_SAVING", "SUBMITTED", "ACCEPTED"):
                    return app.report()
            time.sleep(0.05)
        raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "timed out waiting for start")

    @_rpc
    def getApplications(
        self, request: pb.ApplicationsRequest, context: grpc.ServicerContext
    ) -> pb.ApplicationsResponse:
        states = {pb.ApplicationState.Type.Name(s) for s in request.states}
        with self.sim.lock:
            reports = [
                app.report()
                for app in self.sim.apps.values()
                if (not states or app.state in states)
                and (not request.name or app.spec.name == request.name)
                and (not request.user or app.user == request.user)
                and (not request.queue or app.spec.queue == request.queue)
            ]
        return pb.ApplicationsResponse(reports=reports)

    @_rpc
    def kill(self, request: pb.KillRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.sim.kill_application(request.id, by=request.user or "gateway")
        return pb.Empty()

    @_rpc
    def getLogs(self, request: pb.LogsRequest, context: grpc.ServicerContext) -> pb.LogsResponse:
        return pb.LogsResponse(logs=self.sim.aggregated_logs(request.id))


class _AppMaster(pb_grpc.AppMasterServicer):
    def __init__(self, sim: YarnSimulator, app_id: str) -> None:
        self.sim, self.app_id = sim, app_id

    def _app(self) -> SimApplication:
        app = self.sim.app(self.app_id)
        if app.state != "RUNNING":
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"{self.app_id} is not running")
        return app

    @_rpc
    def getApplicationSpec(
        self, request: pb.Empty, context: grpc.ServicerContext
    ) -> pb.ApplicationSpec:
        with self.sim.lock:
            return self._app().spec

    @_rpc
    def getContainers(
        self, request: pb.ContainersRequest, context: grpc.ServicerContext
    ) -> pb.ContainersResponse:
        states = {pb.Container.State.Name(s) for s in request.states} or set(CONTAINER_ACTIVE)
        services = set(request.services)
        with self.sim.lock:
            app = self._app()
            found = [
                c.to_protobuf()
                for c in app.containers.values()
                if c.state in states and (not services or c.service in services)
            ]
        return pb.ContainersResponse(containers=found)

    @_rpc
    def addContainer(
        self, request: pb.AddContainerRequest, context: grpc.ServicerContext
    ) -> pb.Container:
        with self.sim.lock:
            container = self.sim.add_container(self._app(), request.service_name, dict(request.env))
            return container.to_protobuf()

    @_rpc
    def scale(
        self, request: pb.ScaleRequest, context: grpc.ServicerContext
    ) -> pb.ContainersResponse:
        with self.sim.lock:
            app = self._app()
            if request.service_name not in app.spec.services:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Unknown service {request.service_name!r}"
                )
            live = [
                c
                for c in app.containers.values()
                if c.service == request.service_name and c.state in CONTAINER_ACTIVE
            ]
            # proto3 scalars: a delta of 0 means "count was given".
            target = len(live) + request.delta if request.delta else request.count
            target = max(target, 0)
            changed: list[SimContainer] = []
            while len(live) < target:
                live.append(self.sim.add_container(app, request.service_name, {}))
                changed.append(live[-1])
            for container in sorted(live, key=lambda c: c.instance)[: len(live) - target]:
                self.sim.end_container(container, "KILLED", "Killed by a scale request")
                changed.append(container)
            return pb.ContainersResponse(containers=[c.to_protobuf() for c in changed])

    @_rpc
    def killContainer(
        self, request: pb.ContainerInstance, context: grpc.ServicerContext
    ) -> pb.Empty:
        with self.sim.lock:
            app = self._app()
            key = f"{request.service_name}_{request.instance}"
            container = app.containers.get(key)
            if container is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"Container {key} not found")
            if container.state in CONTAINER_ACTIVE:
                self.sim.end_container(container, "KILLED", "Killed by user request")
        return pb.Empty()

    @_rpc
    def SetProgress(
        self, request: pb.SetProgressRequest, context: grpc.ServicerContext
    ) -> pb.Empty:
        with self.sim.lock:
            self._app().progress = request.progress
        return pb.Empty()

    @_rpc
    def shutdown(self, request: pb.ShutdownRequest, context: grpc.ServicerContext) -> pb.Empty:
        status = pb.FinalStatus.Type.Name(request.final_status)
        with self.sim.lock:
            app = self._app()
            self.sim.finish(
                app,
                state="FINISHED",
                final_status="SUCCEEDED" if status == "UNDEFINED" else status,
                diagnostics=request.diagnostics or "Shutdown by request",
            )
        return pb.Empty()


class YarnSimulator:
    """A YARN ResourceManager, its NodeManager (this host) and skein's driver and application
    masters, in this process. ``start()`` serves the driver on ``address``; connect with
    ``skein.Client(address=sim.address, security=sim.security)``.

    ``root`` holds everything: ``staging/<app>`` (the files a submission uploads, as skein
    uploads them to HDFS), ``nm-local-dir/usercache/<user>/appcache/<app>/<container>`` (the
    containers' working directories) and ``logs/<app>/<container>``. ``queues`` are the queues
    that exist; ``node_path`` is the ``PATH`` containers get (the NodeManager's). ``calls``
    counts every RPC by method name; ``failures[method] = n`` makes its next ``n`` calls fail
    with INTERNAL (a busy ResourceManager). ``switch_users`` (as root): containers run as the
    application's user, an unknown one fails the application.
    """

    def __init__(
        self,
        *,
        root: Path,
        queues: tuple[str, ...] = ("default",),
        node_path: str | None = None,
        security: skein.Security | None = None,
        cluster_timestamp: int | None = None,
        stop_grace: float = 3.0,
        switch_users: bool = True,
    ) -> None:
        self.root = root
        self.queues = queues
        self.node_path = node_path or os.environ.get("PATH", os.defpath)
        self.security = security or skein.Security.new_credentials()
        self.cluster_timestamp = cluster_timestamp or _now_ms()
        self.stop_grace = stop_grace
        self.switch_users = switch_users and os.geteuid() == 0
        """Run containers as the application's user (as root only); False: as this process's
        user, whatever the application's (a benchmark's made-up user)."""
        self.lock = threading.RLock()
        self.apps: dict[str, SimApplication] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.failures: dict[str, int] = {}
        self._sequence = 0
        self._server: grpc.Server | None = None
        self._port = 0
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    # -----------------------------------------------------------------------------------
    # Serving

    def _credentials(self) -> grpc.ServerCredentials:
        cert = self.security._get_bytes("cert")
        key = self.security._get_bytes("key")
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=cert, require_client_auth=True
        )

    def _serve(self, add: Any, servicer: Any) -> tuple[grpc.Server, int]:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        add(servicer, server)
        port = server.add_secure_port("127.0.0.1:0", self._credentials())
        server.start()
        return server, port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._port}"

    def start(self) -> YarnSimulator:
        self.root.mkdir(parents=True, exist_ok=True)
        self._server, self._port = self._serve(pb_grpc.add_DriverServicer_to_server, _Driver(self))
        self._monitor = threading.Thread(target=self._watch, name="yarn-sim-monitor", daemon=True)
        self._monitor.start()
        return self

    def stop(self) -> None:
        """Kill every application still running, stop serving."""
        with self.lock:
            for app in self.apps.values():
                if app.active:
                    self.finish(app, state="KILLED", final_status="KILLED", diagnostics="stopped")
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace=None)
        if self._monitor is not None:
            self._monitor.join(timeout=5)

    # -----------------------------------------------------------------------------------
    # The ResourceManager

    def app(self, app_id: str) -> SimApplication:
        app = self.apps.get(app_id)
        if app is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Application {app_id} not found")
        return app

    def submit(self, spec: pb.ApplicationSpec) -> str:
        user = spec.user or pwd.getpwuid(os.geteuid()).pw_name
        with self.lock:
            self._sequence += 1
            app_id = f"application_{self.cluster_timestamp}_{self._sequence:04d}"
        staging = self.root / "staging" / app_id
        staging.mkdir(parents=True, mode=0o700)
        # skein's driver uploads local files at submission; a missing one fails the submit.
        for files in [spec.master.files, *(s.files for s in spec.services.values())]:
            for name, f in files.items():
                if f.source.scheme not in ("file", ""):
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"Unsupported file system {f.source.scheme!r} (simulator: local only)",
                    )
                source = Path(f.source.file)
                if not source.exists():
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"File {source} does not exist")
                if (staging / name).exists():
                    continue
                if source.is_dir():
                    shutil.copytree(source, staging / name)
                else:
                    shutil.copy2(source, staging / name)
        app = SimApplication(id=app_id, spec=spec, user=user, staging=staging)
        with self.lock:
            self.apps[app_id] = app
        threading.Thread(target=self._launch_master, args=(app,), daemon=True).start()
        return app_id

    def _launch_master(self, app: SimApplication) -> None:
        time.sleep(0.05)
        with self.lock:
            if app.state != "SUBMITTED":
                return
            app.state = "ACCEPTED"
            if app.spec.queue not in self.queues:
                self.finish(
                    app,
                    state="FAILED",
                    final_status="FAILED",
                    diagnostics=f"Application {app.id} submitted by user {app.user} to unknown "
                    f"queue: {app.spec.queue}",
                )
                return
            if self.switch_users:
                try:
                    pwd.getpwnam(app.user)
                except KeyError:
                    self.finish(
                        app,
                        state="FAILED",
                        final_status="FAILED",
                        diagnostics=f"Application {app.id} failed 1 times due to AM Container "
                        f"for appattempt_{app.id[12:]}_000001 exited with exitCode: -1000\n"
                        f"Failing this attempt.Diagnostics: User {app.user} not found\n"
                        ". Failing the application.",
                    )
                    return
            server, port = self._serve(
                pb_grpc.add_AppMasterServicer_to_server, _AppMaster(self, app.id)
            )
            app.am_server, app.host, app.port = server, "127.0.0.1", port
            master = SimContainer(service="", instance=0, yarn_id=self._yarn_id(app, 1))
            app.master = master
            try:
                self._run(
                    app,
                    master,
                    app.spec.master.script,
                    dict(app.spec.master.env),
                    dict(app.spec.master.files),
                    app.spec.master.resources,
                )
            except Exception as exc:  # noqa: BLE001 - becomes the application's diagnostics
                self.finish(
                    app,
                    state="FAILED",
                    final_status="FAILED",
                    diagnostics=f"Failed to launch the application master: {exc}",
                )
                return
            app.state = "RUNNING"

    def _yarn_id(self, app: SimApplication, n: int) -> str:
        _, stamp, seq = app.id.split("_")
        return f"container_{stamp}_{seq}_01_{n:06d}"

    def add_container(self, app: SimApplication, service: str, env: dict[str, str]) -> SimContainer:
        """A new instance of ``service``, started at once (enough room on the node)."""
        spec = app.spec.services.get(service) if service in app.spec.services else None
        if spec is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"Unknown service {service!r}")
        instance = app.next_instance.get(service, 0)
        app.next_instance[service] = instance + 1
        container = SimContainer(
            service=service, instance=instance, yarn_id=self._yarn_id(app, app.next_container)
        )
        app.next_container += 1
        app.containers[container.skein_id] = container
        try:
            self._run(
                app, container, spec.script, {**spec.env, **env}, dict(spec.files), spec.resources
            )
        except Exception as exc:  # noqa: BLE001 - the container's exit message
            container.state, container.exit_message = "FAILED", f"Failed to launch: {exc}"
            container.finish_time = _now_ms()
        return container

    # -----------------------------------------------------------------------------------
    # The NodeManager

    def _run(
        self,
        app: SimApplication,
        container: SimContainer,
        script: str,
        env: dict[str, str],
        files: dict[str, Any],
        resources: pb.Resources,
    ) -> None:
        as_root = self.switch_users
        account = pwd.getpwnam(app.user) if as_root else pwd.getpwuid(os.geteuid())
        local_dirs = self.root / "nm-local-dir" / "usercache" / app.user / "appcache" / app.id
        workdir = local_dirs / container.yarn_id
        logdir = self.root / "logs" / app.id / container.yarn_id
        for directory in (workdir, logdir):
            directory.mkdir(parents=True, mode=0o750)
        assert app.staging is not None
        for name, f in files.items():
            staged = app.staging / name
            if f.type == pb.File.Type.ARCHIVE and staged.is_file():
                shutil.unpack_archive(staged, workdir / name)
            elif staged.is_dir():
                shutil.copytree(staged, workdir / name)
            else:
                shutil.copy2(staged, workdir / name)
        (workdir / ".skein.crt").write_bytes(self.security._get_bytes("cert"))
        (workdir / ".skein.pem").write_bytes(self.security._get_bytes("key"))
        (workdir / ".skein.pem").chmod(0o600)
        (workdir / "launch_container.sh").write_text(f"#!/bin/bash\n{script}\n")
        log = logdir / container.log_name
        log.touch()
        for path in [*(local_dirs.parents[i] for i in range(3)), local_dirs]:
            path.chmod(0o755)
        if as_root:
            for path in (workdir, logdir):
                for dirpath, dirnames, filenames in os.walk(path):
                    for n in [dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)]:
                        os.lchown(n, account.pw_uid, account.pw_gid)
        full_env = {
            **env,
            # What YARN's NodeManager sets (the ones skein and these tests read).
            "CONTAINER_ID": container.yarn_id,
            "USER": account.pw_name,
            "LOGNAME": account.pw_name,
            "HOME": account.pw_dir,
            "PWD": str(workdir),
            "LOCAL_DIRS": str(local_dirs),
            "LOG_DIRS": str(logdir),
            "NM_HOST": "127.0.0.1",
            "PATH": self.node_path,
            "LANG": "C.UTF-8",
            # What skein's application master sets.
            "SKEIN_APPLICATION_ID": app.id,
            "SKEIN_APPMASTER_ADDRESS": f"{app.host}:{app.port}",
            "SKEIN_CONTAINER_ID": container.skein_id,
            "SKEIN_RESOURCE_MEMORY": str(resources.memory),
            "SKEIN_RESOURCE_VCORES": str(resources.vcores),
        }
        extra: dict[str, Any] = {}
        if as_root:
            groups = [g for g in os.getgrouplist(account.pw_name, account.pw_gid)]
            extra = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": groups}
        with open(log, "ab") as out:
            container.proc = subprocess.Popen(
                ["/bin/bash", "launch_container.sh"],
                cwd=workdir,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **extra,
            )
        container.workdir, container.logdir, container.env = workdir, logdir, full_env
        container.state, container.start_time = "RUNNING", _now_ms()

    def _signal_later(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the container's process group, SIGKILL after ``stop_grace`` (YARN's
        ``sleep-delay-before-sigkill``), in the background."""

        def run() -> None:
            for sig, wait in ((signal.SIGTERM, self.stop_grace), (signal.SIGKILL, 5.0)):
                # Only while the group's leader is not reaped: its pid cannot be reused yet.
                if proc.poll() is not None:
                    return
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    return
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
                return

        threading.Thread(target=run, daemon=True).start()

    def end_container(self, container: SimContainer, state: str, message: str) -> None:
        container.state, container.exit_message = state, message
        container.finish_time = _now_ms()
        if container.proc is not None and container.proc.poll() is None:
            self._signal_later(container.proc)

    def finish(
        self, app: SimApplication, *, state: str, final_status: str, diagnostics: str
    ) -> None:
        """End ``app``: its containers and master are stopped, its AppMaster service goes."""
        if not app.active:
            return
        app.state, app.final_status, app.diagnostics = state, final_status, diagnostics
        app.finish_time = _now_ms()
        for container in app.containers.values():
            if container.state in CONTAINER_ACTIVE:
                self.end_container(container, "KILLED", "Container killed: application ended")
        if app.master is not None and app.master.proc is not None:
            self.end_container(app.master, "SUCCEEDED", "")
        if app.am_server is not None:
            # Not from within its own RPC (a shutdown request): let the answer go out first.
            threading.Timer(0.2, app.am_server.stop, kwargs={"grace": 1.0}).start()

    def _watch(self) -> None:
        while not self._stopping.wait(0.1):
            with self.lock:
                for app in list(self.apps.values()):
                    if not app.active:
                        continue
                    for container in app.containers.values():
                        if container.state == "RUNNING" and container.proc is not None:
                            code = container.proc.poll()
                            if code is not None:
                                self._container_exited(container, code)
                    master = app.master
                    if master is not None and master.proc is not None:
                        code = master.proc.poll()
                        if code is not None:
                            self._master_exited(app, code)

    @staticmethod
    def _exit_code(code: int) -> int:
        return 128 - code if code < 0 else code

    def _container_exited(self, container: SimContainer, code: int) -> None:
        container.finish_time = _now_ms()
        if code == 0:
            container.state = "SUCCEEDED"
        else:
            container.state = "FAILED"
            container.exit_message = (
                f"Exception from container-launch.\nContainer id: {container.yarn_id}\n"
                f"Exit code: {self._exit_code(code)}"
            )

    def _master_exited(self, app: SimApplication, code: int) -> None:
        if code == 0:
            self.finish(app, state="FINISHED", final_status="SUCCEEDED", diagnostics="")
        else:
            self.finish(
                app,
                state="FINISHED",
                final_status="FAILED",
                diagnostics=f"Application master failure: the master script of {app.id} "
                f"exited with exit code {self._exit_code(code)}",
            )

    # -----------------------------------------------------------------------------------
    # What an operator (or the node) does behind the gateway's back

    def kill_application(self, app_id: str, *, by: str = "root") -> None:
        """``yarn application -kill``: an application already ended stays as it was."""
        with self.lock:
            app = self.app(app_id)
            self.finish(
                app,
                state="KILLED",
                final_status="KILLED",
                diagnostics=f"Application {app_id} was killed by user {by} at 127.0.0.1",
            )

    def kill_container_process(self, app_id: str, skein_id: str) -> None:
        """The container's processes die (SIGKILL), as when a node's OOM killer strikes."""
        with self.lock:
            container = self.app(app_id).containers[skein_id]
            proc = container.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def aggregated_logs(self, app_id: str) -> dict[str, str]:
        """Each container's log, as YARN's log aggregation keeps it once the application
        ended; refused while it runs (aggregation happens at the end)."""
        with self.lock:
            app = self.app(app_id)
            if app.active:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Log aggregation has not completed or is not enabled for {app_id}",
                )
            containers = [c for c in [app.master, *app.containers.values()] if c is not None]
        logs: dict[str, str] = {}
        for c in containers:
            if c.logdir is None:
                continue
            path = c.logdir / c.log_name
            text = path.read_text(errors="replace") if path.exists() else ""
            logs[c.yarn_id] = (
                f"LogType:{c.log_name}\nLogLength:{len(text)}\nLog Contents:\n{text}"
                f"End of LogType:{c.log_name}\n"
            )
        return logs

    def live_processes(self) -> list[tuple[SimApplication, SimContainer]]:
        """Every (application, container) whose process still runs, master included."""
        with self.lock:
            out = []
            for app in self.apps.values():
                for c in [app.master, *app.containers.values()]:
                    if c is not None and c.proc is not None and c.proc.poll() is None:
                        out.append((app, c))
            return out

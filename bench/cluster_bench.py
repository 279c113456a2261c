"""Benchmark of a Dask cluster's life cycle (start, scale to N workers, shut down) on four systems.
Owns the run: one driver process per system, its repetitions, and bench/results/cluster.{md,json}.
"""

# Systems, measured with the same workload and the same worker settings (1 thread, the same
# memory limit), on loopback only:
#
# - ``warm``: this project's ``gateway serve`` (unsafe-local backend, ``start_method = "fork"``:
#   the fork server) driven by our client, ``gateway_client``;
# - ``cold``: the same with ``start_method = "spawn"`` (every process a new ``dask`` command);
# - ``original``: ``dask-gateway-server`` from PyPI (UnsafeLocalBackend and its Go proxy) driven by
#   the original client, ``dask_gateway``;
# - ``floor``: no gateway at all: ``dask scheduler`` and N ``dask worker`` processes started and
#   stopped directly (no TLS): what any gateway that starts new processes cannot beat.
# - ``yarn``: ``gateway serve`` with the ``yarn`` backend (plugins/gateway-yarn), through the
#   real skein client to the YARN simulator of that plugin's tests (run in the driver process,
#   containers as its children): the life cycle as YARN applications and containers.
#
# Each system has its own driver process (``--role driver``), so one client library is
# imported per process: the original client registers its ``gateway`` comm in distributed's
# registry at import and would otherwise take over our client's connections. The main process
# tells the drivers, one at a time, to run one repetition (interleaved rounds by default, so a
# load drifting over the run hits every system alike); a repetition ends only when every
# process of its cluster has exited, so no two ever overlap. The main process is a child
# subreaper: whatever a driver or gateway leaves behind ends up as its child and is killed.
# Run ``python bench/cluster_bench.py --help``.

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from gateway_core.backends.kit import DEFAULT_INHERITED_ENVIRONMENT, inherited_env

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
USER = "bench"
PASSWORD = "bench-password"
LOOPBACK = "127.0.0.1"

SYSTEMS: dict[str, str] = {
    "warm": "gateway, fork server (warm)",
    "cold": "gateway, spawn (cold)",
    "original": "dask-gateway-server (PyPI)",
    "floor": "bare dask processes (floor)",
    "yarn": "gateway, yarn backend on the YARN simulator",
}
METRICS: dict[str, str] = {
    "start_s": "new_cluster() → RUNNING",
    "scale_s": "scale(N) → N workers",
    "shutdown_call_s": "shutdown() returns",
    "stopped_s": "→ STOPPED (API)",
    "gone_s": "→ all processes exited",
}
DISTRIBUTIONS = (
    "gateway-core",
    "gateway-client",
    "gateway-proxy",
    "dask-gateway-server",
    "dask-gateway",
    "distributed",
    "dask",
    "bokeh",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def alive(proc: psutil.Process) -> bool:
    """Is ``proc`` (the very process, not a later one with its pid) running, and not a zombie?"""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


# ============================================================================================
# Driver: one system, every repetition (its own process)
# ============================================================================================


class Aborted(Exception):
    """A repetition cannot go on; the message says why."""


class Driver:
    """One system, commanded by the main process one repetition at a time over stdin/stdout;
    results go to ``events``, one JSON object per line."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.system: str = args.system
        self.deadline = time.monotonic() + args.budget
        self.events = open(args.events, "a", buffering=1)  # noqa: SIM115 - closed in run()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"cluster-bench-{self.system}-"))
        self.server: subprocess.Popen[bytes] | None = None
        self.server_log = self.tmp / "server.log"
        self.port = 0
        self.rep_runner: Callable[[int], dict[str, Any]] | None = None
        self.closers: list[Callable[[], Any]] = []
        self.yarn: Any = None

    def emit(self, event: str, **fields: Any) -> None:
        self.events.write(json.dumps({"event": event, **fields}) + "\n")

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def failure(self, exc: BaseException) -> str:
        if isinstance(exc, Aborted):
            return str(exc)
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return (text or type(exc).__name__) + self.server_errors()

    def run(self) -> None:
        """Set up, answer ``ready``; then per ``rep K WARMUP SECONDS`` line one repetition
        within SECONDS, answering ``ok`` or ``error``; stop at ``quit`` or end of input."""
        signal.signal(signal.SIGTERM, _raise_system_exit)
        # Replies go to the original stdout; anything printed by libraries goes to stderr.
        control = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        try:
            try:
                self.setup()
            except BaseException as exc:  # noqa: BLE001 - every failure goes into the table
                self.emit("error", rep=None, error=self.failure(exc))
                control.write("error\n")
                return
            control.write("ready\n")
            for line in sys.stdin:
                words = line.split()
                if not words or words[0] != "rep":
                    break
                rep, warmup, budget = int(words[1]), words[2] == "1", float(words[3])
                self.deadline = time.monotonic() + budget
                assert self.rep_runner is not None
                try:
                    result = self.rep_runner(rep)
                except BaseException as exc:  # a time-limit SIGTERM too: recorded, then raised
                    exhausted = self.left() <= 0.5  # its waits ended at the time limit
                    self.emit("error", rep=rep, error=self.failure(exc), out_of_time=exhausted)
                    control.write("error\n")
                    if not isinstance(exc, Exception):
                        raise
                    continue
                self.emit("rep", rep=rep, warmup=warmup, **result)
                control.write("ok\n")
        finally:
            for close in reversed(self.closers):
                with contextlib.suppress(Exception):
                    close()
            self.stop_server()
            self.events.close()
            control.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def setup(self) -> None:
        if self.system == "floor":
            from distributed import Client

            self.emit("ready", server_ready_s=None, comm_module=None)
            self.rep_runner = lambda rep: self.floor_rep(rep, Client)
            return
        if self.system == "yarn":
            self.start_yarn_simulator()
        ready = self.start_server()
        gateway_cls, auth_cls, comm = self.client_api()
        assert self.server is not None
        self.emit("ready", server_ready_s=ready, comm_module=comm, server_pid=self.server.pid)
        monitor = gateway_cls(
            address=f"http://{LOOPBACK}:{self.port}",
            proxy_address=f"{LOOPBACK}:{self.port}",
            auth=auth_cls(USER, PASSWORD),
        )
        self.closers.append(monitor.close)
        self.rep_runner = lambda rep: self.gateway_rep(rep, monitor, gateway_cls, auth_cls)

    # ---------------------------------------------------------------------------------------
    # Gateway servers

    def write_config(self) -> list[str]:
        memory = self.args.worker_memory
        clusters = self.tmp / "clusters"
        clusters.mkdir()
        if self.system == "original":
            path = self.tmp / "dask_gateway_config.py"
            path.write_text(
                "c = get_config()  # noqa: F821\n"
                'c.DaskGateway.backend_class = "dask_gateway_server.backends.local.'
                'UnsafeLocalBackend"\n'
                f'c.DaskGateway.address = "{LOOPBACK}:0"\n'
                'c.DaskGateway.log_level = "WARN"\n'
                f'c.Proxy.address = "{LOOPBACK}:{self.port}"\n'
                f"c.SimpleAuthenticator.password = {PASSWORD!r}\n"
                f"c.UnsafeLocalBackend.clusters_directory = {str(clusters)!r}\n"
                # Its defaults, `dask-scheduler` and `dask-worker`, are gone from distributed:
                # the same commands as ours.
                'c.ClusterConfig.scheduler_cmd = ["dask", "scheduler"]\n'
                'c.ClusterConfig.worker_cmd = ["dask", "worker"]\n'
                "c.ClusterConfig.worker_cores = 1\n"
                "c.ClusterConfig.worker_threads = 1\n"
                f"c.ClusterConfig.worker_memory = {memory}\n"
            )
            return [str(BIN / "dask-gateway-server"), "-f", str(path)]
        if self.system == "yarn":
            return self.write_yarn_config(memory)
        method = "fork" if self.system == "warm" else "spawn"
        path = self.tmp / "gateway.toml"
        path.write_text(
            "[gateway]\n"
            'backend = "unsafe-local"\n'
            'authenticator = "simple"\n'
            f'address = "{LOOPBACK}:0"\n'
            'log_level = "WARNING"\n'
            "\n[proxy]\n"
            f'address = "{LOOPBACK}:{self.port}"\n'
            "\n[auth.simple]\n"
            f'password = "{PASSWORD}"\n'
            "\n[cluster]\n"
            "worker_cores = 1\n"
            "worker_threads = 1\n"
            f"worker_memory = {memory}\n"
            "\n[backend.unsafe-local]\n"
            f'start_method = "{method}"\n'
            f'clusters_directory = "{clusters}"\n'
        )
        return [str(BIN / "gateway"), "serve", "--config", str(path)]

    def start_yarn_simulator(self) -> None:
        """The YARN simulator of plugins/gateway-yarn/tests, serving skein's gRPC services in
        this driver process; its containers are this process's children."""
        # Before grpc is imported: containers are forked from a gRPC-serving process.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        sys.path.insert(0, str(HERE.parent / "plugins" / "gateway-yarn" / "tests"))
        from yarn_sim.server import YarnSimulator

        env_path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        sim = YarnSimulator(root=self.tmp / "yarn", node_path=env_path, switch_users=False)
        self.yarn = sim.start()
        self.closers.append(sim.stop)

    def write_yarn_config(self, memory: int) -> list[str]:
        sim = self.yarn
        cert, key = self.tmp / "skein.crt", self.tmp / "skein.pem"
        cert.write_bytes(sim.security._get_bytes("cert"))
        key.write_bytes(sim.security._get_bytes("key"))
        path = self.tmp / "gateway.toml"
        path.write_text(
            "[gateway]\n"
            'backend = "yarn"\n'
            'authenticator = "simple"\n'
            f'address = "{LOOPBACK}:0"\n'
            'log_level = "WARNING"\n'
            "\n[proxy]\n"
            f'address = "{LOOPBACK}:{self.port}"\n'
            "\n[auth.simple]\n"
            f'password = "{PASSWORD}"\n'
            "\n[cluster]\n"
            "worker_cores = 1\n"
            "worker_threads = 1\n"
            f"worker_memory = {memory}\n"
            "\n[backend.yarn]\n"
            f'driver_address = "{sim.address}"\n'
            f'driver_certificate = "{cert}"\n'
            f'driver_key = "{key}"\n'
            f'files_directory = "{self.tmp / "files"}"\n'
        )
        return [str(BIN / "gateway"), "serve", "--config", str(path)]

    def start_server(self) -> float:
        """Start the gateway; seconds until its API answers through the proxy."""
        self.port = free_port()
        argv = self.write_config()
        env = dict(os.environ)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the venv's `dask`
        began = time.perf_counter()
        with open(self.server_log, "wb") as log:
            self.server = subprocess.Popen(
                argv,
                cwd=self.tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://{LOOPBACK}:{self.port}/api/version"
        limit = time.monotonic() + min(60.0, self.left())
        while True:
            if self.server.poll() is not None:
                raise Aborted(
                    f"server exited with status {self.server.returncode} at start-up:\n"
                    + tail(self.server_log)
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - began
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > limit:
                raise Aborted("server API not reachable after 60 s:\n" + tail(self.server_log))
            time.sleep(0.02)

    def server_errors(self) -> str:
        """The last error lines of the gateway's log, if any: the client rarely has them."""
        if self.server is None:
            return ""
        try:
            lines = self.server_log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        found = [line.strip() for line in lines if "Error" in line or "error" in line]
        return f" (gateway log: {' / '.join(found[-3:])[:600]})" if found else ""

    def stop_server(self) -> None:
        server, self.server = self.server, None
        if server is None or server.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    def client_api(self) -> tuple[Any, Any, str]:
        """(Gateway, BasicAuth, where the gateway comm comes from) of this system's client."""
        from distributed.comm import registry

        if self.system == "original":
            from dask_gateway import BasicAuth, Gateway

            # Its Gateway.__del__ closes a second time and, with this distributed, raises
            # "loop is not running" during garbage collection, after the measurements: noise.
            default_hook = sys.unraisablehook

            def hook(unraisable: Any) -> None:
                where = unraisable.object
                if (getattr(where, "__module__", ""), getattr(where, "__qualname__", "")) != (
                    "dask_gateway.client",
                    "Gateway.__del__",
                ):
                    default_hook(unraisable)

            sys.unraisablehook = hook
        else:
            from gateway_client import BasicAuth, Gateway
        backend = registry.get_backend("gateway")
        return Gateway, BasicAuth, type(backend).__module__

    def gateway_rep(
        self, rep: int, monitor: Any, gateway_cls: Any, auth_cls: Any
    ) -> dict[str, Any]:
        assert self.server is not None
        n = self.args.workers
        server_pid = self.server.pid
        # YARN's containers are the simulator's children, in this process.
        server_pid = os.getpid() if self.system == "yarn" else server_pid
        baseline = {(p.pid, _created(p)) for p in descendants(server_pid)}
        gateway = gateway_cls(
            address=f"http://{LOOPBACK}:{self.port}",
            proxy_address=f"{LOOPBACK}:{self.port}",
            auth=auth_cls(USER, PASSWORD),
        )
        cluster = client = None
        out: dict[str, Any] = {}
        try:
            self.emit("step", rep=rep, step="start")
            began = time.perf_counter()
            cluster = gateway.new_cluster()
            out["start_s"] = time.perf_counter() - began
            name = cluster.name
            client = cluster.get_client(set_as_default=False)

            self.emit("step", rep=rep, step="scale")
            began = time.perf_counter()
            cluster.scale(n)
            client.wait_for_workers(n, timeout=self.left())
            out["scale_s"] = time.perf_counter() - began

            procs = [p for p in descendants(server_pid) if (p.pid, _created(p)) not in baseline]
            out["cluster_processes"] = len(procs)
            templates = {p.pid for p in descendants(server_pid) if _is_forkserver(p)}
            out["forked_processes"] = sum(1 for p in procs if _ppid(p) in templates)
            client.close()
            client = None

            self.emit("step", rep=rep, step="shutdown")
            began = time.perf_counter()
            cluster.shutdown()
            out["shutdown_call_s"] = time.perf_counter() - began
            cluster = None
            out.update(self.wait_stopped(began, procs, lambda: _api_stopped(monitor, name)))
            return out
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.shutdown()
            with contextlib.suppress(Exception):
                gateway.close()

    def wait_stopped(
        self,
        began: float,
        procs: list[psutil.Process],
        api_stopped: Callable[[], bool] | None,
    ) -> dict[str, Any]:
        """Seconds from ``began`` until the API says STOPPED and until every process exited."""
        out: dict[str, Any] = {}
        limit = time.monotonic() + min(60.0, self.left())
        next_api = 0.0
        while "gone_s" not in out or ("stopped_s" not in out and api_stopped is not None):
            now = time.monotonic()
            if "gone_s" not in out and not any(alive(p) for p in procs):
                out["gone_s"] = time.perf_counter() - began
            if api_stopped is not None and "stopped_s" not in out and now >= next_api:
                if api_stopped():
                    out["stopped_s"] = time.perf_counter() - began
                next_api = time.monotonic() + 0.05
            if now > limit:
                left = [p.pid for p in procs if alive(p)]
                raise Aborted(
                    f"cluster not stopped {min(60.0, self.left()):.0f} s after shutdown "
                    f"(API stopped: {'stopped_s' in out}; processes left: {left})"
                )
            time.sleep(0.01)
        return out

    # ---------------------------------------------------------------------------------------
    # The floor: the same processes, no gateway

    def floor_rep(self, rep: int, client_cls: Any) -> dict[str, Any]:
        n = self.args.workers
        dask = str(BIN / "dask")
        workdir = self.tmp / f"rep-{rep}"
        workdir.mkdir()
        scheduler_file = workdir / "scheduler.json"
        # What both gateways pass on to their processes by default (the original's default
        # inherited_environment, which core's kit keeps), nothing else.
        env = inherited_env(DEFAULT_INHERITED_ENVIRONMENT)
        env["DASK_TEMPORARY_DIRECTORY"] = str(workdir)
        popens: list[subprocess.Popen[bytes]] = []
        client = None
        out: dict[str, Any] = {}

        def launch(argv: list[str], log_name: str) -> subprocess.Popen[bytes]:
            with open(workdir / log_name, "wb") as log:
                popen = subprocess.Popen(
                    argv,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            popens.append(popen)
            return popen

        try:
            self.emit("step", rep=rep, step="start")
            began = time.perf_counter()
            scheduler = launch(
                [
                    dask,
                    "scheduler",
                    "--host",
                    LOOPBACK,
                    "--port",
                    "0",
                    "--dashboard-address",
                    f"{LOOPBACK}:0",
                    "--scheduler-file",
                    str(scheduler_file),
                ],
                "scheduler.log",
            )
            address = self.wait_reachable(scheduler, scheduler_file, workdir / "scheduler.log")
            out["start_s"] = time.perf_counter() - began
            client = client_cls(address, set_as_default=False)

            self.emit("step", rep=rep, step="scale")
            began = time.perf_counter()
            for i in range(n):
                launch(
                    [
                        dask,
                        "worker",
                        address,
                        "--dashboard-address",
                        f"{LOOPBACK}:0",
                        "--name",
                        f"worker-{i}",
                        "--nthreads",
                        "1",
                        "--memory-limit",
                        str(self.args.worker_memory),
                    ],
                    f"worker-{i}.log",
                )
            client.wait_for_workers(n, timeout=self.left())
            out["scale_s"] = time.perf_counter() - began

            procs = [psutil.Process(p.pid) for p in popens]
            for p in popens:
                procs += descendants(p.pid)
            out["cluster_processes"] = len(procs)
            client.close()
            client = None

            self.emit("step", rep=rep, step="shutdown")
            # The fastest clean teardown found: SIGINT to the workers (each nanny closes its
            # worker), then to the scheduler once they are gone. SIGINT to all at once leaves
            # workers waiting seconds on the vanished scheduler.
            began = time.perf_counter()
            for p in popens[1:]:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT)
            out["shutdown_call_s"] = time.perf_counter() - began
            worker_procs = [p for p in procs if p.pid != scheduler.pid]
            limit = time.monotonic() + min(60.0, self.left())
            while any(alive(p) for p in worker_procs) and time.monotonic() < limit:
                time.sleep(0.01)
            with contextlib.suppress(ProcessLookupError):
                scheduler.send_signal(signal.SIGINT)
            out.update(self.wait_stopped(began, procs, None))
            for p in popens:
                p.wait()
            return out
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            for p in popens:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()

    def wait_reachable(self, scheduler: subprocess.Popen[bytes], file: Path, log: Path) -> str:
        """The scheduler's address once its file is written and its port accepts TCP."""
        limit = time.monotonic() + min(60.0, self.left())
        while True:
            if scheduler.poll() is not None:
                raise Aborted(f"dask scheduler exited ({scheduler.returncode}):\n{tail(log)}")
            try:
                address = json.loads(file.read_text())["address"]
                host, port = address.split("://", 1)[1].rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=1):
                    return str(address)
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > limit:
                raise Aborted(f"dask scheduler not reachable after 60 s:\n{tail(log)}")
            time.sleep(0.01)


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum} (time limit)")


def _created(proc: psutil.Process) -> float:
    try:
        return float(proc.create_time())
    except psutil.Error:
        return 0.0


def _is_forkserver(proc: psutil.Process) -> bool:
    """Is ``proc`` the fork server's template (not a process forked from it: those run other
    code under the template's command line)?"""
    try:
        parent = proc.parent()
        return "gateway_core.backends.forkserver" in " ".join(proc.cmdline()) and not (
            parent is not None and "gateway_core.backends.forkserver" in " ".join(parent.cmdline())
        )
    except psutil.Error:
        return False


def _ppid(proc: psutil.Process) -> int:
    try:
        return int(proc.ppid())
    except psutil.Error:
        return -1


def _api_stopped(gateway: Any, name: str) -> bool:
    try:
        report = gateway.get_cluster(name)
    except ValueError:  # the server no longer knows the cluster: it is stopped
        return True
    except Exception:  # noqa: BLE001 - a transient error: ask again
        return False
    return str(report.status.name) == "STOPPED"


# ============================================================================================
# Main: one driver per system, in turn
# ============================================================================================


def become_subreaper() -> bool:
    """Orphans of our drivers (processes a gateway left) become our children: we can end them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap_leftovers() -> int:
    """Kill every process still below us (none should be); how many there were."""
    left = [p for p in descendants(os.getpid()) if alive(p)]
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=10)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG) != (0, 0):
            pass
    return len(left)


def read_events(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


class System:
    """The main process's handle on one system's driver: start it, have it run repetitions
    within the system's time budget, stop it; then its results."""

    def __init__(self, name: str, args: argparse.Namespace, tmp: Path) -> None:
        self.name = name
        self.args = args
        self.events = tmp / f"{name}.jsonl"
        self.driver: subprocess.Popen[str] | None = None
        self.spent = 0.0
        self.active = False
        self.aborted_at: str | None = None
        self.exit_note: str | None = None
        self.load: list[float] = []

    def _command(self, text: str | None, timeout: float) -> str | None:
        """Send ``text`` (None: nothing) and wait for the driver's one-line answer; None when it
        did not answer in time or ended. The time counts against the system's budget."""
        assert self.driver is not None and self.driver.stdin and self.driver.stdout
        began = time.monotonic()
        try:
            if text is not None:
                self.driver.stdin.write(text + "\n")
                self.driver.stdin.flush()
            ready, _, _ = select.select([self.driver.stdout], [], [], max(0.0, timeout))
            answer = self.driver.stdout.readline().strip() if ready else None
        except (BrokenPipeError, OSError):
            answer = None
        self.spent += time.monotonic() - began
        return answer or None

    def left(self) -> float:
        return self.args.timeout - self.spent

    def start(self) -> None:
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--role",
            "driver",
            "--system",
            self.name,
            "--events",
            str(self.events),
            "--budget",
            str(self.left()),
            "--workers",
            str(self.args.workers),
            "--worker-memory",
            str(self.args.worker_memory),
        ]
        # Byte-code caching on for every process, as for the gateways' own children (they do
        # not pass PYTHONDONTWRITEBYTECODE on); the warm-up repetition fills the cache.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.driver = subprocess.Popen(
            argv,
            start_new_session=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        answer = self._command(None, min(120.0, self.left()))
        if answer == "ready":
            self.active = True
        else:
            self.give_up("start-up" if answer is None else None)

    def rep(self, rep: int) -> None:
        if not self.active:
            return
        self.load.append(os.getloadavg()[0])
        warmup = int(rep < self.args.warmup)
        budget = self.left()
        answer = (
            self._command(f"rep {rep} {warmup} {budget:.3f}", budget + 10) if budget > 0 else None
        )
        if answer != "ok":
            out_of_time = answer is None or any(
                e["event"] == "error" and e.get("out_of_time") for e in read_events(self.events)
            )
            self.give_up(f"repetition {rep + 1}" if out_of_time else None)

    def give_up(self, timed_out: str | None) -> None:
        """Stop using this system; ``timed_out`` names what overran the budget, if that is why."""
        self.active = False
        if timed_out is not None:
            self.aborted_at = timed_out
        self.stop()

    def stop(self) -> None:
        driver, self.driver = self.driver, None
        self.active = False
        if driver is None:
            return
        with contextlib.suppress(BrokenPipeError, OSError):
            assert driver.stdin is not None
            driver.stdin.write("quit\n")
            driver.stdin.close()
        try:
            driver.wait(60)
        except subprocess.TimeoutExpired:
            driver.send_signal(signal.SIGTERM)  # the driver stops its gateway and clusters
            try:
                driver.wait(40)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait()
        if driver.returncode not in (0, None) and self.aborted_at is None:
            self.exit_note = f"driver exited with status {driver.returncode}"

    def result(self) -> dict[str, Any]:
        found = read_events(self.events)
        reps = [e for e in found if e["event"] == "rep"]
        ready = next((e for e in found if e["event"] == "ready"), {})
        errors = [e for e in found if e["event"] == "error"]
        steps = [e for e in found if e["event"] == "step"]
        notes: list[str] = []
        if self.aborted_at is not None:
            where = (
                f" during repetition {steps[-1]['rep'] + 1} ({steps[-1]['step']})"
                if steps
                else f" during {self.aborted_at}"
            )
            notes.append(f"aborted: time limit of {self.args.timeout:.0f} s reached{where}")
        else:
            for e in errors:
                where = "at start-up" if e.get("rep") is None else f"in repetition {e['rep'] + 1}"
                notes.append(f"failed {where}: {e['error']}")
            if self.exit_note and not errors:
                notes.append(self.exit_note)
        measured = [r for r in reps if not r["warmup"]]
        summary: dict[str, Any] = {}
        for key in METRICS:
            values = [r[key] for r in measured if key in r]
            if values:
                summary[key] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                }
        return {
            "label": SYSTEMS[self.name],
            "completed": len(measured) == self.args.reps and not notes,
            "seconds_used": self.spent,
            "loadavg_1min": self.load,
            "server_ready_s": ready.get("server_ready_s"),
            "comm_module": ready.get("comm_module"),
            "repetitions": reps,
            "errors": [e["error"] for e in errors],
            "summary": summary,
            "notes": notes,
        }


def run_all(names: list[str], args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Every system's results, and how many processes were left behind (and killed)."""
    total = args.warmup + args.reps
    leftovers = 0
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        systems = [System(name, args, Path(tmp)) for name in names]
        try:
            if args.order == "sequential":
                for system in systems:
                    print(f"- {SYSTEMS[system.name]}", flush=True)
                    system.start()
                    for rep in range(total):
                        system.rep(rep)
                    system.stop()
                    leftovers += reap_leftovers()
            else:
                for system in systems:
                    print(f"- starting {SYSTEMS[system.name]}", flush=True)
                    system.start()
                for rep in range(total):
                    # Rotate the order each round: no system always follows the same one.
                    shift = rep % len(systems)
                    kind = "warm-up round" if rep < args.warmup else "round"
                    print(f"- {kind} {rep + 1}/{total}", flush=True)
                    for system in systems[shift:] + systems[:shift]:
                        system.rep(rep)
        finally:
            for system in systems:
                system.stop()
            leftovers += reap_leftovers()
        return {system.name: system.result() for system in systems}, leftovers


def cell(summary: dict[str, Any], key: str) -> str:
    s = summary.get(key)
    if s is None:
        return "—"
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def ratio(results: dict[str, Any], ours: str, key: str) -> float | None:
    try:
        a = results[ours]["summary"][key]["median"]
        b = results["original"]["summary"][key]["median"]
    except KeyError:
        return None
    return float(a / b) if b else None


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


ORDER_TEXT = {
    "interleaved": "Every gateway is started first; then each round runs one repetition of "
    "every system in turn (the order rotating each round), so a load that drifts over the run "
    "hits every system alike; gateways not being measured sit idle.",
    "sequential": "Systems run one after the other, each alone on the machine.",
}


def render(report: dict[str, Any]) -> str:
    m, s, results = report["machine"], report["settings"], report["systems"]
    v = m["versions"]
    lines = [
        "# Cluster life-cycle benchmark",
        "",
        f"`{report['command']}` — {m['date']}; {m['nproc']} CPUs "
        f"({m['affinity']} usable, {m['cpu'] or 'unknown CPU'}), {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}; Python {m['python']}, distributed {v['distributed']}, "
        f"dask {v['dask']}, bokeh {v['bokeh']}; gateway-core {v['gateway-core']}, "
        f"gateway-client {v['gateway-client']}, dask-gateway-server {v['dask-gateway-server']}, "
        f"dask-gateway {v['dask-gateway']}.",
        "",
        f"Workload per repetition: start a cluster, scale it to {s['workers']} workers "
        f"(1 thread, memory limit {s['worker_memory']} bytes each, `dask worker` with its "
        "nanny), wait until all are connected, shut it down. "
        f"{s['reps']} measured repetitions per system after {s['warmup']} warm-up "
        f"repetition(s) (not counted). {ORDER_TEXT[s['order']]} Repetitions never overlap: "
        "each waits until every process of the previous one has exited. A system is aborted "
        f"once its repetitions have taken {s['timeout']:.0f} s. "
        "Seconds: median (min-max).",
        "",
        "| system | " + " | ".join(METRICS.values()) + " | reps | notes |",
        "|---|" + "---|" * (len(METRICS) + 2),
    ]
    for r in results.values():
        n = max((x.get("n", 0) for x in r["summary"].values()), default=0)
        notes = "; ".join(note.replace("\n", " ").replace("|", "\\|") for note in r["notes"])
        lines.append(
            f"| {r['label']} | "
            + " | ".join(cell(r["summary"], key) for key in METRICS)
            + f" | {n} | {notes or 'ok'} |"
        )
    lines += ["", "Ours against the original (ratio of medians; the goal is ≤ 0.5):", ""]
    for ours in ("warm", "cold"):
        if ours not in results:
            continue
        parts = []
        for key in ("start_s", "scale_s", "gone_s"):
            value = ratio(results, ours, key)
            if value is None:
                parts.append(f"{METRICS[key]}: n/a")
            else:
                verdict = "met" if value <= 0.5 else "NOT met"
                verdict = "" if key == "gone_s" else f" **{verdict}**"
                parts.append(f"{METRICS[key]} {value:.2f}{verdict}")
        lines.append(f"- {SYSTEMS[ours]}: " + "; ".join(parts))
    lines += ["", "Details:", ""]
    for name, r in results.items():
        measured = [x for x in r["repetitions"] if not x["warmup"]]
        warm = [x for x in r["repetitions"] if x["warmup"]]
        bits = []
        if r["server_ready_s"] is not None:
            bits.append(f"server start → API answering {r['server_ready_s']:.2f} s")
        if warm and "start_s" in warm[0]:
            bits.append(
                f"warm-up repetition: start {warm[0]['start_s']:.2f} s"
                + (f", scale {warm[0]['scale_s']:.2f} s" if "scale_s" in warm[0] else "")
            )
        if measured:
            procs = sorted({x.get("cluster_processes") for x in measured} - {None})
            bits.append(f"cluster processes {'/'.join(map(str, procs))}")
            forked = sorted({x.get("forked_processes") for x in measured} - {None})
            if forked and name in ("warm", "cold"):
                bits.append(f"of which forked by the fork server {'/'.join(map(str, forked))}")
        if r["loadavg_1min"]:
            bits.append(
                f"1-minute load average {min(r['loadavg_1min']):.1f}-"
                f"{max(r['loadavg_1min']):.1f} over its repetitions"
            )
        if r["comm_module"]:
            bits.append(f"client's `gateway` comm from `{r['comm_module']}`")
        lines.append(f"- {r['label']}: " + ("; ".join(bits) or "no repetition completed"))
    if report.get("leftover_processes"):
        lines.append(
            f"- {report['leftover_processes']} process(es) were left behind when the drivers "
            "ended, and killed"
        )
    lines += [
        "",
        "Columns: *start* is `Gateway.new_cluster()` until it returns (the cluster is RUNNING), "
        "or for the floor `dask scheduler` launched until its scheduler file is written and its "
        "port accepts TCP. *scale* is `cluster.scale(N)` (floor: launching N `dask worker`) "
        "until `Client.wait_for_workers(N)` returns, through the gateway's proxy (TLS) for "
        "the gateways, directly (plain TCP) for the floor. *shutdown() returns* is "
        "`cluster.shutdown()` (floor: SIGINT sent to the workers; the scheduler gets its SIGINT "
        "once they have exited, the fastest clean order); *STOPPED* is until the "
        "API reports the cluster STOPPED (polled every 50 ms); *all processes exited* is until "
        "every scheduler, nanny and worker process of the cluster is gone (polled every 10 ms), "
        "timed from the same instant as *shutdown() returns*.",
        "",
        "Set-up: each gateway runs as its own process (`gateway serve` with the unsafe-local "
        "backend and the built-in proxy; `dask-gateway-server` with UnsafeLocalBackend and its "
        "Go proxy), on loopback, otherwise on its default settings; each is driven by its own "
        "client (`gateway_client`, `dask_gateway`) in a separate process, since the original "
        "client replaces distributed's `gateway` comm at import. The original's default "
        "commands, `dask-scheduler` and `dask-worker`, no longer exist in this distributed; it "
        "is given `dask scheduler` and `dask worker`, as ours runs. Schedulers and workers of "
        "every system get the same few inherited variables (PATH, VIRTUAL_ENV, LANG, ...) and "
        "may write byte-code caches (PYTHONDONTWRITEBYTECODE is dropped for the run); the "
        "warm-up repetition fills them. The machine may be shared: the load averages above "
        "say how busy it was.",
        "",
    ]
    if "yarn" in results:
        lines[-1:-1] = [
            "The YARN row is `gateway serve` with the `yarn` backend talking through the real "
            "`skein` client (gRPC, mutual TLS) to the YARN simulator of plugins/gateway-yarn's "
            "tests, run in its driver process: each cluster is an application whose master "
            "script is the scheduler, each worker a container, all local processes. It "
            "measures the backend's and skein's overhead on top of the same Dask processes, "
            "not a real YARN's scheduling delays.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--events", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=180.0, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=5, help="measured repetitions (default 5)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="uncounted repetitions first (default 1)"
    )
    parser.add_argument("--workers", type=int, default=4, help="workers to scale to (default 4)")
    parser.add_argument(
        "--worker-memory",
        type=int,
        default=2**30,
        help="memory limit per worker in bytes (default 1 GiB)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds of repetitions after which a system is aborted (default 300)",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all, in that order)",
    )
    parser.add_argument(
        "--order",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="interleaved (default): every gateway started, then each round runs one "
        "repetition of every system in turn, so a drifting load hits all alike (idle gateways "
        "wait meanwhile); sequential: one system at a time, alone on the machine",
    )
    parser.add_argument(
        "--out", default=str(RESULTS / "cluster"), help="results path without suffix"
    )
    # `nox -s bench -- ARGS` passes ARGS to every benchmark: ignore what is not ours.
    args, unknown = parser.parse_known_args()
    if args.role == "driver":
        Driver(args).run()
        return
    if unknown:
        print(f"cluster_bench: ignoring arguments {' '.join(unknown)}", file=sys.stderr)
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    for name in systems:
        if name not in SYSTEMS:
            parser.error(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    if not become_subreaper():
        print(
            "cluster_bench: cannot become a child subreaper; leftovers may escape", file=sys.stderr
        )
    report: dict[str, Any] = {
        "command": " ".join(["python", "bench/cluster_bench.py", *sys.argv[1:]]),
        "machine": machine(),
        "settings": {
            "reps": args.reps,
            "warmup": args.warmup,
            "workers": args.workers,
            "worker_threads": 1,
            "worker_memory": args.worker_memory,
            "timeout": args.timeout,
            "order": args.order,
        },
        "systems": {},
    }
    report["systems"], report["leftover_processes"] = run_all(systems, args)
    report["ratios"] = {
        ours: {key: ratio(report["systems"], ours, key) for key in ("start_s", "scale_s", "gone_s")}
        for ours in ("warm", "cold")
        if ours in report["systems"]
    }
    text = render(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(text)


if __name__ == "__main__":
    main()

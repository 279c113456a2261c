"""The YARN driver: each Dask cluster is one YARN application, submitted through skein as the
requesting user; its scheduler runs in the application master, its workers are containers.

Owns `YarnClusterConfig` (queue, localized files, setup scripts, on top of the common cluster
settings), `YarnConfig` (`[backend.yarn]`: the skein driver's address and certificates,
Kerberos principal and keytab, the application-client cache, the status retries) and
`YarnDriver`. skein's client is blocking (gRPC), so every call goes through a thread.

How a cluster runs: ``start_scheduler`` writes the cluster's TLS certificate and key to a
private directory, submits an application named ``dask-gateway`` whose master script runs
``scheduler_setup`` then the Dask scheduler, with a ``dask.worker`` service of no instances,
and removes the directory once skein has uploaded the files. ``start_worker`` asks the
application master for one more ``dask.worker`` container (skein's ``add_container``), passing
the worker's name and the scheduler's address in its environment; ``stop_worker`` kills that
container, ``stop_scheduler`` shuts the application down (or kills it). One
``get_applications`` listing per period answers every cluster's status; each application with
workers is asked once for its containers. The application's diagnostics, and the end of its
master's aggregated log when YARN has it, are the failure reason the user sees.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import define, field

from gateway_core.backends.base import ClusterDriver, StateUpdates
from gateway_core.backends.kit import (
    CERT_FILE,
    KEY_FILE,
    cluster_env,
    last_lines,
    scheduler_command,
    tls_env,
    worker_command,
    write_private_file,
)
from gateway_core.config import ClusterConfig, ProcessBackendConfig

if TYPE_CHECKING:
    import skein

    from gateway_core.models import Cluster, Worker

log = logging.getLogger("gateway.backend.yarn")

APPLICATION_NAME = "dask-gateway"
"""The name of every application the backend submits (the status listing filters by it)."""
WORKER_SERVICE = "dask.worker"
"""The skein service whose containers are the workers."""
ACTIVE_STATES = ("NEW", "NEW_SAVING", "SUBMITTED", "ACCEPTED", "RUNNING")
"""YARN application states that have not ended."""
WORKER_NAME_ENV = "DASK_GATEWAY_WORKER_NAME"
SCHEDULER_ADDRESS_ENV = "DASK_GATEWAY_SCHEDULER_ADDRESS"
MASTER_LOG = "application.master.log"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LOG_SECTION = re.compile(
    r"LogType:\s*" + re.escape(MASTER_LOG) + r".*?Log ?Contents:\n(.*?)\n?End of LogType",
    re.S,
)
_TAIL_LINES = 20
T = TypeVar("T")


def mebibytes(n: int) -> int:
    """Bytes as whole MiB (YARN's memory unit), rounded up."""
    return max(1, math.ceil(n / 2**20))


@define(kw_only=True, frozen=True)
class YarnClusterConfig(ClusterConfig):
    """Per-cluster YARN settings (seed 000's ``YarnClusterConfig``); set in `[cluster]`,
    changeable per cluster through user options."""

    queue: str = "default"
    """The YARN queue to submit applications under."""
    localize_files: dict[str, Any] = field(factory=dict)
    """Extra files for the scheduler's and workers' containers: local name → a path (local or
    ``hdfs://...``; an archive, ``.tar.gz`` or ``.zip``, is unpacked as a directory of that
    name) or a table of skein's ``File`` fields (``source``, ``type``, ``visibility``), e.g.
    ``{environment = {source = "hdfs:///envs/dask.tar.gz", visibility = "public"}}`` with
    ``scheduler_setup = "source environment/bin/activate"``."""
    scheduler_setup: str = ""
    """Shell script run in the application master's container before the scheduler starts."""
    worker_setup: str = ""
    """Shell script run in each worker's container before the worker starts."""

    def check(self) -> list[str]:
        """Problems with the settings this class adds (see `CheckedConfig`)."""
        import skein

        problems: list[str] = []
        if not self.queue.strip():
            problems.append("queue: must not be empty")
        for name, value in self.localize_files.items():
            if name in (CERT_FILE, KEY_FILE) or not name or "/" in name:
                problems.append(f"localize_files.{name}: not a usable local name")
                continue
            try:
                _file(value, skein)
            except (TypeError, ValueError, KeyError) as exc:
                problems.append(f"localize_files.{name}: {exc}")
        return problems


def _file(value: Any, skein: Any) -> skein.File:
    if isinstance(value, str):
        return skein.File(source=value)
    if isinstance(value, dict):
        return skein.File.from_dict(dict(value))
    raise TypeError(f"expected a path or a table of skein File fields, got {value!r}")


@define(kw_only=True, frozen=True)
class YarnConfig(ProcessBackendConfig):
    """`[backend.yarn]`: the reconciler's settings (seed 000's ``YarnBackend``), and how the
    gateway reaches YARN through skein."""

    principal: str = ""
    """Kerberos principal of the gateway's account; with ``keytab``, the skein driver the
    backend starts logs in with it (``skein.Client(principal=, keytab=)``). The account must be
    allowed to impersonate users (Hadoop's proxy-user settings)."""
    keytab: str = ""
    """Path to the keytab of ``principal``."""
    app_client_cache_max_size: int = 10
    """Connections to application masters kept open (least recently used go first)."""
    driver_address: str = ""
    """``host:port`` of a skein driver that is already running (a long-lived driver, as
    ``skein driver start`` makes); empty: the backend starts its own (needs Java and Hadoop's
    ``yarn`` on the gateway's host). The driver must read the files the backend localizes, so
    it runs on the gateway's host."""
    driver_certificate: str = ""
    """The certificate (PEM file) for the mutual TLS with the driver and the application
    masters; with ``driver_key``. Empty: skein's default, ``~/.skein/skein.crt``."""
    driver_key: str = ""
    """The private key of ``driver_certificate``; empty: ``~/.skein/skein.pem``."""
    files_directory: str = ""
    """Where the TLS files of a cluster being submitted are written (a private directory per
    cluster, removed once submitted); empty: the system's temporary directory."""
    job_host: str = "0.0.0.0"
    """The address schedulers, dashboards and workers listen on inside containers; each
    advertises the node's address."""
    status_retries: int = 2
    """Retries of a failed status listing within one check, after ``backoff_base_delay``,
    then twice that, ...; then the check is skipped until the next period."""

    def check(self) -> list[str]:
        """Problems with the settings this class adds (see `CheckedConfig`)."""
        problems: list[str] = []
        if bool(self.principal) != bool(self.keytab):
            problems.append("principal, keytab: give both (Kerberos login) or neither")
        if bool(self.driver_certificate) != bool(self.driver_key):
            problems.append("driver_certificate, driver_key: give both or neither")
        if self.app_client_cache_max_size < 1:
            problems.append(
                f"app_client_cache_max_size: must be at least 1, got "
                f"{self.app_client_cache_max_size}"
            )
        if self.status_retries < 0:
            problems.append(f"status_retries: must not be negative, got {self.status_retries}")
        if self.driver_address and not re.fullmatch(r"[^\s:]+:\d+", self.driver_address):
            problems.append(f"driver_address: expected host:port, got {self.driver_address!r}")
        return problems


class YarnDriver(ClusterDriver[YarnConfig, YarnClusterConfig]):
    """Each cluster one YARN application through skein; see the module's docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._client: skein.Client | None = None
        self._app_clients: collections.OrderedDict[str, skein.ApplicationClient] = (
            collections.OrderedDict()
        )
        self.status_calls = 0
        """Status listings asked of the driver (for tests and the benchmark)."""

    # ---------------------------------------------------------------------------------------
    # skein

    @staticmethod
    async def _call(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(func, *args, **kwargs)

    def security(self) -> skein.Security:
        import skein

        if self.config.driver_certificate:
            return skein.Security(
                cert_file=self.config.driver_certificate, key_file=self.config.driver_key
            )
        return skein.Security.from_default()

    @property
    def client(self) -> skein.Client:
        if self._client is None:
            raise RuntimeError("the YARN backend is not set up (no skein client)")
        return self._client

    async def setup(self) -> None:
        import skein

        address = self.config.driver_address or None

        def connect() -> skein.Client:
            return skein.Client(
                address=address,
                security=self.security(),
                principal=self.config.principal or None,
                keytab=self.config.keytab or None,
                log=False,
            )

        try:
            client = await self._call(connect)
        except Exception as exc:
            where = f"at {address}" if address else "(starting skein's Java driver)"
            raise RuntimeError(f"cannot reach the skein driver {where}: {exc}") from exc
        self._client = client
        log.info("YARN backend: skein driver at %s", client.address)

    async def cleanup(self) -> None:
        for app in self._app_clients.values():
            app.close()
        self._app_clients.clear()
        if self._client is not None:
            self._client.close()
            self._client = None

    async def app_client(self, app_id: str) -> skein.ApplicationClient:
        """A connection to the application master of ``app_id`` (cached, least recently used
        evicted); raises skein's ``ApplicationNotRunningError`` when it does not run."""
        app = self._app_clients.get(app_id)
        if app is not None:
            self._app_clients.move_to_end(app_id)
            return app
        app = await self._call(self.client.connect, app_id, wait=False)
        self._app_clients[app_id] = app
        while len(self._app_clients) > self.config.app_client_cache_max_size:
            _, old = self._app_clients.popitem(last=False)
            old.close()
        return app

    def forget(self, app_id: str) -> None:
        app = self._app_clients.pop(app_id, None)
        if app is not None:
            app.close()

    async def app_state(self, app_id: str) -> str | None:
        """The application's YARN state; None when YARN does not know it."""
        try:
            report = await self._call(self.client.application_report, app_id)
        except KeyError:
            return None
        return str(report.state)

    async def _on_master(
        self, app_id: str, call: Callable[[skein.ApplicationClient], Awaitable[T]]
    ) -> T:
        """``call`` on the application master; a connection that fails is dropped from the
        cache and tried once more (the master may have moved after a restart)."""
        import skein

        try:
            return await call(await self.app_client(app_id))
        except skein.exceptions.ConnectionError:
            self.forget(app_id)
            return await call(await self.app_client(app_id))

    # ---------------------------------------------------------------------------------------
    # The application

    def files_path(self, cluster: Cluster) -> Path:
        """The private directory holding the cluster's TLS files while it is submitted."""
        if not _SAFE_NAME.fullmatch(cluster.name):
            raise RuntimeError(f"refusing to make files for the unsafe name {cluster.name!r}")
        base = self.config.files_directory or os.path.join(tempfile.gettempdir(), "gateway-yarn")
        return Path(base) / cluster.name

    def master_script(self, cluster: Cluster, settings: YarnClusterConfig) -> str:
        command = scheduler_command(
            settings,
            host=self.config.job_host,
            heartbeat_period=self.config.cluster_heartbeat_period,
        )
        return _script(settings.scheduler_setup, shlex.join(command))

    def worker_script(self, settings: YarnClusterConfig) -> str:
        address, name = "__GATEWAY_SCHEDULER__", "__GATEWAY_WORKER__"
        command = shlex.join(
            worker_command(
                settings, scheduler_address=address, worker_name=name, host=self.config.job_host
            )
        )
        command = command.replace(address, f'"${SCHEDULER_ADDRESS_ENV}"')
        command = command.replace(name, f'"${WORKER_NAME_ENV}"')
        return _script(settings.worker_setup, command)

    def application_spec(self, cluster: Cluster, files_dir: Path) -> skein.ApplicationSpec:
        """What is submitted for ``cluster``: its master (the scheduler) and the worker
        service, with the TLS files in ``files_dir`` and ``localize_files`` localized."""
        import skein

        settings = self.cluster_config(cluster)
        files = {name: _file(value, skein) for name, value in settings.localize_files.items()}
        for name in (CERT_FILE, KEY_FILE):
            files[name] = skein.File(source=str(files_dir / name), type="file")
        env = cluster_env(cluster, self.context)
        master = skein.Master(
            script=self.master_script(cluster, settings),
            resources=skein.Resources(
                memory=mebibytes(settings.scheduler_memory), vcores=settings.scheduler_cores
            ),
            files=files,
            env={**env, **tls_env("scheduler", CERT_FILE, KEY_FILE)},
        )
        worker = skein.Service(
            script=self.worker_script(settings),
            instances=0,
            max_restarts=0,
            resources=skein.Resources(
                memory=mebibytes(settings.worker_memory), vcores=settings.worker_cores
            ),
            files=files,
            env={**env, **tls_env("worker", CERT_FILE, KEY_FILE)},
        )
        return skein.ApplicationSpec(
            name=APPLICATION_NAME,
            queue=settings.queue,
            user=cluster.username,
            tags=[APPLICATION_NAME, f"cluster-{cluster.name}"],
            max_attempts=1,
            master=master,
            services={WORKER_SERVICE: worker},
        )

    # ---------------------------------------------------------------------------------------
    # The six operations

    def start_scheduler(self, cluster: Cluster) -> StateUpdates:
        return self._start_scheduler(cluster)

    async def _start_scheduler(self, cluster: Cluster) -> AsyncIterator[dict[str, Any]]:
        files_dir = self.files_path(cluster)
        shutil.rmtree(files_dir, ignore_errors=True)
        files_dir.mkdir(mode=0o700, parents=True)
        try:
            write_private_file(files_dir / CERT_FILE, cluster.tls_cert)
            write_private_file(files_dir / KEY_FILE, cluster.tls_key)
            spec = self.application_spec(cluster, files_dir)
            try:
                app_id = await self._call(self.client.submit, spec)
            except Exception as exc:
                raise RuntimeError(f"submitting the YARN application failed: {exc}") from exc
        finally:
            # skein's driver has uploaded them (to the application's staging directory).
            shutil.rmtree(files_dir, ignore_errors=True)
        log.info("Cluster %s: YARN application %s submitted", cluster.name, app_id)
        yield {"app_id": app_id}

    async def stop_scheduler(self, cluster: Cluster) -> None:
        shutil.rmtree(self.files_path(cluster), ignore_errors=True)
        app_id = cluster.state.get("app_id")
        if not app_id:
            return
        self.forget(app_id)
        state = await self.app_state(app_id)
        if state is None or state not in ACTIVE_STATES:
            return
        if state == "RUNNING":
            try:
                await self._on_master(app_id, lambda app: self._call(app.shutdown, "SUCCEEDED"))
                self.forget(app_id)
                return
            except Exception as exc:  # noqa: BLE001 - killing it below is the answer
                log.info("Shutting down %s failed (%s); killing it", app_id, exc)
        self.forget(app_id)
        try:
            await self._call(self.client.kill_application, app_id, user=cluster.username)
        except KeyError:
            pass

    def start_worker(self, cluster: Cluster, worker: Worker) -> StateUpdates:
        return self._start_worker(cluster, worker)

    async def _start_worker(self, cluster: Cluster, worker: Worker) -> dict[str, Any]:
        app_id = cluster.state.get("app_id")
        if not app_id or not cluster.scheduler_address:
            raise RuntimeError(f"cluster {cluster.name} has no running application yet")
        env = {WORKER_NAME_ENV: worker.name, SCHEDULER_ADDRESS_ENV: cluster.scheduler_address}
        container = await self._on_master(
            app_id, lambda app: self._call(app.add_container, WORKER_SERVICE, env=env)
        )
        return {"container_id": container.id, "yarn_container_id": container.yarn_container_id}

    async def stop_worker(self, cluster: Cluster, worker: Worker) -> None:
        import skein

        app_id, container_id = cluster.state.get("app_id"), worker.state.get("container_id")
        if not app_id or not container_id:
            return
        try:
            await self._on_master(app_id, lambda app: self._call(app.kill_container, container_id))
        except (KeyError, ValueError, skein.exceptions.ApplicationNotRunningError):
            pass  # unknown or already ended container, or the application ended
        except skein.exceptions.ConnectionError:
            if await self.app_state(app_id) == "RUNNING":
                raise

    async def check_clusters(self, clusters: Sequence[Cluster]) -> list[bool]:
        wanted = [c.state.get("app_id") for c in clusters]
        active = await self.active_applications() if any(wanted) else set()
        return [bool(app_id) and app_id in active for app_id in wanted]

    async def active_applications(self) -> set[str]:
        """The ids of every ``dask-gateway`` application that has not ended: one listing,
        retried with backoff (``status_retries``); raises when it keeps failing."""
        from gateway_core.backends.kit import attempts

        count = 1 + self.config.status_retries
        problem = ""
        async for attempt in attempts(
            count, base=self.config.backoff_base_delay, max_delay=self.config.backoff_max_delay
        ):
            self.status_calls += 1
            try:
                reports = await self._call(
                    self.client.get_applications, states=ACTIVE_STATES, name=APPLICATION_NAME
                )
            except Exception as exc:  # noqa: BLE001 - retried, then raised
                problem = str(exc)
                log.warning(
                    "Listing YARN applications failed (attempt %d of %d): %s",
                    attempt + 1,
                    count,
                    problem,
                )
            else:
                return {r.id for r in reports}
        raise RuntimeError(f"listing the YARN applications failed: {problem}")

    async def check_workers(self, workers: Sequence[tuple[Cluster, Worker]]) -> list[bool]:
        by_app: dict[str, set[str]] = {}
        for cluster, _ in workers:
            app_id = cluster.state.get("app_id")
            if app_id and app_id not in by_app:
                by_app[app_id] = await self.live_containers(app_id)
        return [
            bool(w.state.get("container_id"))
            and w.state.get("container_id") in by_app.get(c.state.get("app_id") or "", set())
            for c, w in workers
        ]

    async def live_containers(self, app_id: str) -> set[str]:
        """The ids of the worker containers of ``app_id`` that have not ended (none when the
        application does not run)."""
        import skein

        try:
            containers = await self._on_master(
                app_id, lambda app: self._call(app.get_containers, services=[WORKER_SERVICE])
            )
        except (KeyError, skein.exceptions.ApplicationNotRunningError):
            return set()
        except skein.exceptions.ConnectionError:
            if await self.app_state(app_id) != "RUNNING":
                self.forget(app_id)
                return set()
            raise
        return {c.id for c in containers}

    async def failure_reason(self, cluster: Cluster) -> str | None:
        app_id = cluster.state.get("app_id")
        if not app_id:
            return None
        try:
            report = await self._call(self.client.application_report, app_id)
        except KeyError:
            return f"YARN no longer knows the application {app_id}"
        reason = f"YARN application {app_id} {report.state} (final status {report.final_status})"
        if report.diagnostics:
            reason += f": {report.diagnostics.strip()}"
        output = await self.master_output(app_id)
        if output:
            reason += f"\nThe end of its scheduler's output:\n{output}"
        return reason

    async def master_output(self, app_id: str) -> str | None:
        """The last lines of the application master's log, from YARN's log aggregation
        (None while YARN has none)."""
        try:
            logs = await self._call(self.client.application_logs, app_id)
        except Exception:  # noqa: BLE001 - aggregation disabled or not done yet
            return None
        for text in dict(logs).values():
            found = _LOG_SECTION.search(text)
            if found and found.group(1).strip():
                return last_lines(found.group(1).rstrip("\n"), _TAIL_LINES)
        return None


def _script(setup: str, command: str) -> str:
    lines = []
    if setup.strip():
        lines += [setup.rstrip("\n")]
    lines.append(f"exec {command}")
    return "\n".join(lines) + "\n"


__all__ = [
    "ACTIVE_STATES",
    "APPLICATION_NAME",
    "WORKER_SERVICE",
    "YarnClusterConfig",
    "YarnConfig",
    "YarnDriver",
    "mebibytes",
]

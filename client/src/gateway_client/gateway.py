"""`Gateway`: the user's handle on one gateway server, with a sync and an async API.

Owns address resolution (arguments, then dask config), the REST calls of PROTOCOL.md (list, get,
options, submit, wait for start, stop, scale, adapt, versions) and the failure-reason lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import dask
from distributed.utils import Log, Logs, LoopRunner, sync
from tornado.ioloop import IOLoop

from ._http import GatewayHTTP
from .auth import GatewayAuth, get_auth
from .config import config_value, format_template
from .errors import GatewayClusterError, GatewayError, GatewayWarning
from .models import ClusterReport, ClusterStatus
from .options import Options
from .progress import ProgressDisplay, StartTracker, make_progress

if TYPE_CHECKING:
    from .cluster import GatewayCluster

__all__ = ["Gateway"]

T = TypeVar("T")

# While a cluster is PENDING and the server answers ``?wait`` at once (a server that does not
# hold the request), wait this long between polls.
POLL_INTERVAL = 0.5


def close_when_collected(close: Callable[[], Any], what: str) -> None:
    """Run ``close`` for a ``__del__``: at once in the main thread, else in a thread of its own.

    The garbage collector runs finalizers in whichever thread happens to allocate, even one that
    is still starting. Closing blocks on distributed's loop lock, which the thread starting that
    thread may hold while it waits for it: closing there deadlocks both (seen in the test suite).
    """
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(Exception):
            close()
        return

    def quietly() -> None:
        with contextlib.suppress(Exception):
            close()

    threading.Thread(target=quietly, name=f"close-collected-{what}", daemon=True).start()


def resolve_proxy_address(address: str, proxy_address: str | int | None) -> str:
    """``gateway://host:port`` of the scheduler proxy.

    ``None``: the API's host and port (80/443 by scheme when the address has none). An int: that
    port on the API's host. A string: ``host:port`` or any URL whose netloc is that.
    """
    api = urlsplit(address)
    host = f"[{api.hostname}]" if api.hostname and ":" in api.hostname else api.hostname
    if proxy_address is None:
        port = api.port or {"http": 80, "https": 443}.get(api.scheme, 8786)
        netloc = f"{host}:{port}"
    elif isinstance(proxy_address, int):
        netloc = f"{host}:{proxy_address}"
    else:
        text = str(proxy_address)
        netloc = urlsplit(text).netloc if "://" in text else text
    if netloc.count(":") > 1 and not netloc.startswith("["):
        raise ValueError(f"write an IPv6 proxy address in brackets: {proxy_address!r}")
    return "gateway://" + netloc


async def _failure_reason(report_json: Mapping[str, Any], http: GatewayHTTP) -> str | None:
    """Why a cluster failed, if the server says: the only place this client looks for it.

    A ``"reason"`` key in the cluster JSON wins (the v1 JSON has none: the original client
    rejects unknown keys there). Otherwise ``GET /api/v2/clusters/{name}/reason`` answering
    ``{"reason": str | null}``; a server without that route (404) or any error means no reason.
    """
    reason = report_json.get("reason")
    if isinstance(reason, str) and reason:
        return reason
    name = report_json.get("name")
    if not name:
        return None
    try:
        data = await http.request("GET", f"/api/v2/clusters/{name}/reason")
    except (GatewayError, ValueError, PermissionError, OSError, TimeoutError):
        return None
    if isinstance(data, Mapping) and isinstance(data.get("reason"), str) and data["reason"]:
        return str(data["reason"])
    return None


def _sharing_body(
    users: Iterable[str] | None, groups: Iterable[str] | None
) -> dict[str, list[str]]:
    """The sharing keys of a v2 request body, for the lists given (None: left out)."""
    body: dict[str, list[str]] = {}
    for key, names in (("share_with_users", users), ("share_with_groups", groups)):
        if names is None:
            continue
        if isinstance(names, str):
            raise TypeError(f"{key} must be a list of names, not a string ({names!r})")
        body[key] = list(names)
    return body


class Gateway:
    """A client for one gateway server.

    ``address`` is the gateway's API address (default: the ``gateway.address`` config).
    ``proxy_address`` is where the scheduler proxy listens: ``host:port`` or a port on the API's
    host (default: ``gateway.proxy-address``, else the API's host and port). ``public_address``
    is the root of browser links (default: ``gateway.public-address``, else ``address``).
    ``auth`` is a GatewayAuth or a type name (default: ``gateway.auth``).

    By default every method blocks, running on a private event-loop thread. With
    ``asynchronous=True`` (inside a running loop) they return awaitables instead.
    """

    def __init__(
        self,
        address: str | None = None,
        proxy_address: str | int | None = None,
        public_address: str | None = None,
        auth: GatewayAuth | str | None = None,
        asynchronous: bool = False,
        loop: IOLoop | None = None,
    ) -> None:
        if address is None:
            address = config_value("gateway.address")
        if not address:
            raise ValueError(
                "no gateway address: pass Gateway(address=...) or set the gateway.address config "
                "(e.g. DASK_GATEWAY__ADDRESS=http://gateway:8000)"
            )
        self.address: str = str(address).rstrip("/")
        if public_address is None:
            public_address = config_value("gateway.public-address")
        self.public_address: str = str(public_address or self.address).rstrip("/")
        if proxy_address is None:
            proxy_address = config_value("gateway.proxy-address")
        self.proxy_address: str = resolve_proxy_address(self.address, proxy_address)

        self.auth: GatewayAuth = get_auth(auth)
        self._http = GatewayHTTP(
            address=self.address, auth=self.auth, proxy=config_value("gateway.http-client.proxy")
        )
        self._asynchronous = asynchronous
        self._loop_runner = LoopRunner(loop=loop, asynchronous=asynchronous)
        self._loop_runner.start()
        self._closed = False

    # -- event loop plumbing -------------------------------------------------------------------

    @property
    def loop(self) -> IOLoop:
        return self._loop_runner.loop

    @property
    def asynchronous(self) -> bool:
        return self._asynchronous

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop.asyncio_loop  # type: ignore[attr-defined]
        except RuntimeError:  # no running loop here, or ours has stopped
            return False

    def sync(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> Any:
        """Run coroutine function ``func``: blocking on the loop thread, or as an awaitable."""
        if self.asynchronous:
            return func(*args, **kwargs)
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._on_loop_thread():
            raise RuntimeError(
                "a blocking Gateway method was called from its own event loop; "
                "use Gateway(asynchronous=True) in async code"
            )
        return sync(self.loop, func, *args, **kwargs)

    # -- lifetime ------------------------------------------------------------------------------

    async def _cleanup(self) -> None:
        await self._http.close()

    def close(self) -> Any:
        """Close the HTTP session (and, when blocking, the loop thread). Clusters keep running."""
        if self.asynchronous or self._on_loop_thread():
            return self._cleanup()
        if self._closed:
            return None
        try:
            if self._loop_runner.is_started():
                sync(self.loop, self._cleanup)
        finally:
            self._closed = True
            self._loop_runner.stop()
        return None

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._cleanup()

    def __del__(self) -> None:
        if sys.is_finalizing() or getattr(self, "_asynchronous", True):
            return
        if getattr(self, "_closed", True) or self._on_loop_thread():
            return
        close_when_collected(self.close, "gateway")

    def __repr__(self) -> str:
        return f"Gateway<{self.address}>"

    # -- reports -------------------------------------------------------------------------------

    def _report(self, msg: dict[str, Any]) -> ClusterReport:
        return ClusterReport.from_json(
            msg, public_address=self.public_address, proxy_address=self.proxy_address
        )

    async def _clusters(
        self,
        status: str | ClusterStatus | Iterable[str | ClusterStatus] | None = None,
        shared: bool = False,
    ) -> list[ClusterReport]:
        query = ""
        if status is not None:
            wanted = [status] if isinstance(status, str | ClusterStatus) else list(status)
            query = "?status=" + ",".join(ClusterStatus.parse(s).name for s in wanted)
        if shared:
            data = await self._http.request("GET", f"/api/v2/clusters{query}")
        else:
            data = await self._http.request("GET", f"/api/v1/clusters/{query}")
        return [self._report(msg) for msg in (data or {}).values()]

    def list_clusters(
        self,
        status: str | ClusterStatus | Iterable[str | ClusterStatus] | None = None,
        shared: bool = False,
    ) -> Any:
        """Your clusters as ClusterReports; ``status`` selects (default: the active ones).

        With ``shared``, also the clusters other users shared with you, and every report says
        its ``owner``, your ``access`` and (yours) whom it is shared with
        (``GET /api/v2/clusters``).
        """
        return self.sync(self._clusters, status=status, shared=shared)

    async def _cluster_report(self, cluster_name: str, wait: bool = False) -> ClusterReport:
        msg = await self._http.request(
            "GET", f"/api/v1/clusters/{cluster_name}" + ("?wait" if wait else "")
        )
        return self._report(msg)

    def get_cluster(self, cluster_name: str) -> Any:
        """The ClusterReport of one cluster; ValueError when there is no such cluster."""
        return self.sync(self._cluster_report, cluster_name)

    async def _get_versions(self) -> dict[str, Any]:
        from . import __version__

        server = await self._http.request("GET", "/api/version")
        return {"server": server, "client": {"version": __version__}}

    def get_versions(self) -> Any:
        """``{"server": {...}, "client": {"version": ...}}``."""
        return self.sync(self._get_versions)

    async def _get_logs(
        self,
        cluster_name: str,
        cluster: bool = True,
        scheduler: bool = True,
        workers: bool | Iterable[str] = True,
        tail: int | None = None,
    ) -> Logs:
        components = ["scheduler"] if scheduler else []
        if workers is True:
            components.append("workers")
        elif workers is not False:
            if isinstance(workers, str):
                raise TypeError("workers must be a bool or an iterable of worker names")
            components.extend(workers)
        logs = Logs()
        if cluster:
            reason = await _failure_reason({"name": cluster_name}, self._http)
            if reason:
                logs["Cluster"] = Log(reason)
        if not components:
            return logs
        query: list[tuple[str, str]] = [("component", ",".join(components))]
        if tail is not None:
            query.append(("tail", str(tail)))
        path = f"/api/v2/clusters/{quote(cluster_name, safe='')}/logs?{urlencode(query)}"
        data = await self._http.request("GET", path)
        for component, text in (data or {}).items():
            logs["Scheduler" if component == "scheduler" else component] = Log(text)
        return logs

    def get_logs(
        self,
        cluster_name: str,
        cluster: bool = True,
        scheduler: bool = True,
        workers: bool | Iterable[str] = True,
        tail: int | None = None,
    ) -> Any:
        """The end of a cluster's logs, as distributed's ``Cluster.get_logs`` gives them: a
        ``Logs`` dict of ``Log`` texts, ``"Scheduler"`` and one per worker name.

        ``cluster`` adds ``"Cluster"``: why the gateway failed the cluster, when it did (the
        gateway keeps no other log of its own for a cluster). ``workers`` is True (every
        worker), False (none) or the names of the workers wanted. ``tail`` is the lines of each
        log (the gateway's default 1000, at most 10000). Reads
        ``GET /api/v2/clusters/{name}/logs``; a log that is gone (a stopped cluster's) says so
        in its text. ValueError for an unknown cluster or worker, or a bad ``tail``.
        """
        return self.sync(
            self._get_logs,
            cluster_name,
            cluster=cluster,
            scheduler=scheduler,
            workers=workers,
            tail=tail,
        )

    # -- options -------------------------------------------------------------------------------

    def _config_cluster_options(self) -> dict[str, Any]:
        configured = dask.config.get("gateway.cluster.options", None) or {}
        return {k: format_template(v) for k, v in configured.items()}

    async def _cluster_options(self, use_local_defaults: bool = True) -> Options:
        data = await self._http.request("GET", "/api/v1/options")
        options = Options.from_spec(data.get("cluster_options", []))
        if use_local_defaults:
            for key, value in self._config_cluster_options().items():
                if key in options:
                    options[key] = value
        return options

    def cluster_options(self, use_local_defaults: bool = True) -> Any:
        """The options you may set for a new cluster, as an editable, validating Options.

        With ``use_local_defaults`` the ``gateway.cluster.options`` config overrides the
        server's defaults (for options the server offers).
        """
        return self.sync(self._cluster_options, use_local_defaults=use_local_defaults)

    # -- cluster lifecycle ---------------------------------------------------------------------

    async def _submit(
        self,
        cluster_options: Mapping[str, Any] | None = None,
        share_with_users: Iterable[str] | None = None,
        share_with_groups: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> str:
        if cluster_options is None:
            options = self._config_cluster_options()
        elif isinstance(cluster_options, Mapping):
            options = dict(cluster_options)
        else:
            raise TypeError(
                "cluster_options must be an Options (from Gateway.cluster_options()) or a "
                f"mapping, got {type(cluster_options).__name__}"
            )
        options.update(kwargs)
        sharing = _sharing_body(share_with_users, share_with_groups)
        if sharing:  # the v2 route takes the sharing; v1 stays what the original client sends
            body = {"cluster_options": options, **sharing}
            data = await self._http.request("POST", "/api/v2/clusters", json=body)
        else:
            data = await self._http.request(
                "POST", "/api/v1/clusters/", json={"cluster_options": options}
            )
        return str(data["name"])

    def submit(
        self,
        cluster_options: Mapping[str, Any] | None = None,
        share_with_users: Iterable[str] | None = None,
        share_with_groups: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Ask for a new cluster and return its name at once, without waiting for it to start.

        ``kwargs`` override ``cluster_options`` (default: the ``gateway.cluster.options``
        config); the server checks them (ValueError with its reason when invalid).
        ``share_with_users``/``share_with_groups`` share the new cluster at once (see
        `share_cluster`); by default it is shared with no one.
        """
        return self.sync(
            self._submit,
            cluster_options,
            share_with_users=share_with_users,
            share_with_groups=share_with_groups,
            **kwargs,
        )

    async def _share_cluster(
        self,
        cluster_name: str,
        users: Iterable[str] | None = None,
        groups: Iterable[str] | None = None,
    ) -> ClusterReport:
        body = _sharing_body(users, groups)
        if not body:
            raise ValueError("share_cluster: give users, groups or both (an empty list: no one)")
        path = f"/api/v2/clusters/{quote(cluster_name, safe='')}"
        return self._report(await self._http.request("PATCH", path, json=body))

    def share_cluster(
        self,
        cluster_name: str,
        users: Iterable[str] | None = None,
        groups: Iterable[str] | None = None,
    ) -> Any:
        """Share your cluster with exactly these ``users`` and/or the members of ``groups``
        (each given list replaces the one before, ``[]`` shares with no one; None leaves it
        as it is); returns its ClusterReport. They see it in
        ``list_clusters(shared=True)``, connect to it, open its dashboard and read its logs,
        but only you and admins may scale or stop it. ValueError when the gateway refuses the
        names, PermissionError when the cluster is not yours (``PATCH
        /api/v2/clusters/{name}``).
        """
        return self.sync(self._share_cluster, cluster_name, users=users, groups=groups)

    async def _wait_for_start(
        self, cluster_name: str, progress: ProgressDisplay | None = None
    ) -> ClusterReport:
        """Poll until the cluster runs; GatewayClusterError (with the reason) if it fails."""
        display = make_progress(cluster_name) if progress is None else progress
        async with StartTracker(display=display) as tracker:
            while True:
                asked = time.monotonic()
                try:
                    msg = await self._http.request("GET", f"/api/v1/clusters/{cluster_name}?wait")
                except TimeoutError:
                    continue
                report = self._report(msg)
                tracker.status = report.status.name
                if report.status == ClusterStatus.RUNNING:
                    return report
                if report.status in (ClusterStatus.FAILED, ClusterStatus.STOPPED):
                    reason = await _failure_reason(msg, self._http)
                    if report.status == ClusterStatus.FAILED:
                        text = f"Cluster {cluster_name!r} failed to start"
                        hint = "the gateway gave no reason; its logs may say more"
                    else:
                        text = f"Cluster {cluster_name!r} is already stopped"
                        hint = ""
                    detail = reason or hint
                    raise GatewayClusterError(f"{text}: {detail}" if detail else text)
                waited = time.monotonic() - asked
                if waited < POLL_INTERVAL:
                    await asyncio.sleep(POLL_INTERVAL - waited)

    def connect(self, cluster_name: str, shutdown_on_close: bool = False) -> GatewayCluster:
        """A GatewayCluster for an existing cluster (waits for it to be running).

        In async mode, await the result.
        """
        from .cluster import GatewayCluster

        return GatewayCluster.from_name(
            cluster_name,
            shutdown_on_close=shutdown_on_close,
            address=self.address,
            proxy_address=self.proxy_address,
            public_address=self.public_address,
            auth=self.auth,
            asynchronous=self.asynchronous,
            loop=self.loop,
        )

    def new_cluster(
        self,
        cluster_options: Mapping[str, Any] | None = None,
        shutdown_on_close: bool = True,
        share_with_users: Iterable[str] | None = None,
        share_with_groups: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> GatewayCluster:
        """Start a new cluster and wait until it runs; ``submit`` plus ``connect``.

        ``kwargs`` are cluster options overriding ``cluster_options``. With
        ``shutdown_on_close`` (default) closing the returned object stops the cluster.
        ``share_with_users``/``share_with_groups`` share it at once (see `share_cluster`). In
        async mode, await the result.
        """
        from .cluster import GatewayCluster

        return GatewayCluster(
            address=self.address,
            proxy_address=self.proxy_address,
            public_address=self.public_address,
            auth=self.auth,
            cluster_options=cluster_options,
            shutdown_on_close=shutdown_on_close,
            asynchronous=self.asynchronous,
            loop=self.loop,
            share_with_users=share_with_users,
            share_with_groups=share_with_groups,
            **kwargs,
        )

    async def _stop_cluster(self, cluster_name: str) -> None:
        await self._http.request("DELETE", f"/api/v1/clusters/{cluster_name}")

    def stop_cluster(self, cluster_name: str) -> Any:
        """Stop a cluster and its workers (nothing happens for an unknown name)."""
        return self.sync(self._stop_cluster, cluster_name)

    @staticmethod
    def _warn_if_clamped(answer: Any) -> None:
        if isinstance(answer, Mapping) and not answer.get("ok", True) and answer.get("msg"):
            warnings.warn(GatewayWarning(str(answer["msg"])), stacklevel=4)

    async def _scale_cluster(self, cluster_name: str, n: int, group: str | None = None) -> None:
        body: dict[str, Any] = {"count": n}
        if group is not None:
            body["group"] = group  # only then: the original gateway refuses unknown keys
        answer = await self._http.request(
            "POST", f"/api/v1/clusters/{cluster_name}/scale", json=body
        )
        self._warn_if_clamped(answer)

    def scale_cluster(self, cluster_name: str, n: int, group: str | None = None) -> Any:
        """Ask for ``n`` workers of worker group ``group`` (None: the default group); a
        GatewayWarning says when the gateway clamped the count, ValueError names the groups
        there are when ``group`` is not one of them."""
        return self.sync(self._scale_cluster, cluster_name, n, group)

    async def _adapt_cluster(
        self,
        cluster_name: str,
        minimum: int | None = None,
        maximum: int | None = None,
        active: bool = True,
        group: str | None = None,
    ) -> None:
        body: dict[str, Any] = {"minimum": minimum, "maximum": maximum, "active": active}
        if group is not None:
            body["group"] = group
        answer = await self._http.request(
            "POST", f"/api/v1/clusters/{cluster_name}/adapt", json=body
        )
        self._warn_if_clamped(answer)

    def adapt_cluster(
        self,
        cluster_name: str,
        minimum: int | None = None,
        maximum: int | None = None,
        active: bool = True,
        group: str | None = None,
    ) -> Any:
        """Let the scheduler scale worker group ``group`` (None: the default group) between
        ``minimum`` (default 0) and ``maximum`` (default unbounded) by load; ``active=False``
        switches adaptive scaling of that group off.
        """
        return self.sync(
            self._adapt_cluster,
            cluster_name,
            minimum=minimum,
            maximum=maximum,
            active=active,
            group=group,
        )

    async def _worker_groups(self, cluster_name: str) -> dict[str, dict[str, int]]:
        path = f"/api/v2/clusters/{quote(cluster_name, safe='')}"
        report = self._report(await self._http.request("GET", path))
        return dict(report.groups or {})

    def worker_groups(self, cluster_name: str) -> Any:
        """The cluster's worker groups: name → ``{"count": wanted, "pending": n,
        "running": n, "stopping": n}``, the default group first (``GET
        /api/v2/clusters/{name}``)."""
        return self.sync(self._worker_groups, cluster_name)

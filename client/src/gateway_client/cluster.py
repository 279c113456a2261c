"""`GatewayCluster`: one Dask cluster run by the gateway, as the user holds it.

Owns starting (submit, wait with progress) or attaching to a cluster, its scheduler address
and TLS security, scale/adapt, `get_logs`, `get_client`, the worker-status watch, closing and
shutdown, and its display (repr, HTML, the ipywidgets scaling panel).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import html
import logging
import sys
import warnings
import weakref
from collections.abc import Generator, Iterable, Mapping
from typing import Any

from dask.utils import format_bytes
from distributed import Client
from distributed.comm import connect as dask_connect
from distributed.core import Status
from distributed.security import Security
from tornado.ioloop import IOLoop

from .auth import GatewayAuth
from .gateway import Gateway, close_when_collected

__all__ = ["ClusterState", "GatewayCluster"]

log = logging.getLogger("gateway_client")

# How long to try reaching the scheduler for worker-status updates before giving up on them.
WATCH_CONNECT_TIMEOUT = "10s"


class ClusterState(enum.StrEnum):
    """``GatewayCluster.status``: where this handle on a cluster is in its life (not the
    gateway's `ClusterStatus` of the cluster itself).

    Each member is the string the original ``dask-gateway`` client uses (``cluster.status ==
    "running"``), and it also equals the `distributed.core.Status` member of the same name,
    which is what `distributed` compares a cluster's status with (``ClusterState.closed``...).
    """

    created = "created"
    starting = "starting"
    running = "running"
    closing = "closing"
    closed = "closed"
    failed = "failed"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Status):
            return self.value == other.value
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    # Equal objects hash alike: str("running"), ClusterState.running (an Enum hashes its name) and
    # ClusterState.running all hash as "running".
    __hash__ = str.__hash__


class GatewayCluster:
    """A Dask cluster started and run by the gateway.

    Creating one asks the gateway for a new cluster with ``cluster_options`` (an Options from
    ``Gateway.cluster_options()``, or a mapping) overridden by ``kwargs``, and waits until it
    runs. The connection arguments are as for ``Gateway``. With ``shutdown_on_close`` (the
    default) closing this object, leaving its ``with`` block, or interpreter exit stops the
    cluster; otherwise it keeps running until stopped or timed out by the gateway.
    ``share_with_users``/``share_with_groups`` (in ``kwargs``) share the new cluster at once
    (see ``Gateway.share_cluster``).

    In async mode, ``await GatewayCluster(..., asynchronous=True)`` or use ``async with``.
    """

    _instances: weakref.WeakSet[GatewayCluster] = weakref.WeakSet()

    def __init__(
        self,
        address: str | None = None,
        proxy_address: str | int | None = None,
        public_address: str | None = None,
        auth: GatewayAuth | str | None = None,
        cluster_options: Mapping[str, Any] | None = None,
        shutdown_on_close: bool = True,
        asynchronous: bool = False,
        loop: IOLoop | None = None,
        **kwargs: Any,
    ) -> None:
        self._setup(
            gateway=Gateway(
                address=address,
                proxy_address=proxy_address,
                public_address=public_address,
                auth=auth,
                asynchronous=asynchronous,
                loop=loop,
            ),
            name=None,
            cluster_options=cluster_options,
            cluster_kwargs=kwargs,
            shutdown_on_close=shutdown_on_close,
        )

    @classmethod
    def from_name(
        cls,
        cluster_name: str,
        shutdown_on_close: bool = False,
        address: str | None = None,
        proxy_address: str | int | None = None,
        public_address: str | None = None,
        auth: GatewayAuth | str | None = None,
        asynchronous: bool = False,
        loop: IOLoop | None = None,
    ) -> GatewayCluster:
        """Attach to the existing cluster ``cluster_name`` (waiting for it to run)."""
        self = object.__new__(cls)
        self._setup(
            gateway=Gateway(
                address=address,
                proxy_address=proxy_address,
                public_address=public_address,
                auth=auth,
                asynchronous=asynchronous,
                loop=loop,
            ),
            name=cluster_name,
            cluster_options=None,
            cluster_kwargs={},
            shutdown_on_close=shutdown_on_close,
        )
        return self

    def _setup(
        self,
        *,
        gateway: Gateway,
        name: str | None,
        cluster_options: Mapping[str, Any] | None,
        cluster_kwargs: dict[str, Any],
        shutdown_on_close: bool,
    ) -> None:
        self.gateway = gateway
        self.name: str | None = name
        self.shutdown_on_close = shutdown_on_close
        self.status = ClusterState.created
        self.scheduler_address: str | None = None
        self.dashboard_link: str | None = None
        self.security: Security | None = None
        self.scheduler_info: dict[str, Any] = {}
        self._cluster_options = cluster_options
        self._cluster_kwargs = cluster_kwargs
        self._start_task: asyncio.Future[None] | None = None
        self._stop_task: asyncio.Future[None] | None = None
        self._watch_task: asyncio.Future[None] | None = None
        self._was_shut_down = False
        self._clients: weakref.WeakSet[Client] = weakref.WeakSet()
        self._status_widget: Any = None
        self._cached_widget: Any = None
        self._instances.add(self)
        if not self.asynchronous:
            try:
                self.gateway.sync(self._start)
            except BaseException:
                self._close_after_failed_start()
                raise

    def _close_after_failed_start(self) -> None:
        with contextlib.suppress(Exception):
            if not self.gateway._closed:
                self.gateway.sync(self._stop)
        with contextlib.suppress(Exception):
            self.gateway.close()

    # -- loop ------------------------------------------------------------------------------------

    @property
    def loop(self) -> IOLoop:
        return self.gateway.loop

    @property
    def asynchronous(self) -> bool:
        return self.gateway.asynchronous

    # -- start -----------------------------------------------------------------------------------

    async def _start(self) -> GatewayCluster:
        if self._start_task is None:
            self._start_task = asyncio.ensure_future(self._start_impl())
        try:
            await asyncio.shield(self._start_task)
        except BaseException:
            self.status = ClusterState.failed
            await self._stop()
            raise
        return self

    async def _start_impl(self) -> None:
        if self.status in (ClusterState.closing, ClusterState.closed):
            raise RuntimeError(f"{self!r} is closed")
        self.status = ClusterState.starting
        if self.name is None:
            self.name = await self.gateway._submit(self._cluster_options, **self._cluster_kwargs)
        report = await self.gateway._wait_for_start(self.name)
        self.scheduler_address = report.scheduler_address
        self.dashboard_link = report.dashboard_link
        self.security = report.security
        self._start_watch()
        self.status = ClusterState.running

    def __await__(self) -> Generator[Any, None, GatewayCluster]:
        return self._start().__await__()

    # -- worker status ---------------------------------------------------------------------------

    def _start_watch(self) -> None:
        """Follow the scheduler's worker additions and removals in the background (best effort:
        ``scheduler_info`` stays empty when the scheduler cannot be reached).
        """
        if self.scheduler_address is None or self.security is None:
            return
        self._watch_task = asyncio.ensure_future(
            _watch_workers(
                weakref.ref(self),
                address=self.scheduler_address,
                security=self.security,
                name=str(self.name),
            )
        )

    def _apply_worker_update(self, op: str, msg: Any) -> None:
        workers = self.scheduler_info.setdefault("workers", {})
        if op == "add":
            msg = dict(msg)
            workers.update(msg.pop("workers", {}))
            self.scheduler_info.update(msg)
        elif op == "remove":
            workers.pop(msg, None)
        self._refresh_widget()

    def _refresh_widget(self) -> None:
        if self._status_widget is not None:
            self._status_widget.value = self._status_html()

    # -- stop ------------------------------------------------------------------------------------

    async def _stop(self, shutdown: bool | None = None) -> None:
        if shutdown is None:
            shutdown = self.shutdown_on_close
        self._instances.discard(self)
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop_impl())
        try:
            await asyncio.shield(self._stop_task)
        except Exception:
            log.warning("error while closing %r", self, exc_info=True)
        if shutdown and self.name is not None and not self._was_shut_down:
            try:
                await self.gateway._stop_cluster(self.name)
                self._was_shut_down = True
            except Exception:
                log.error("cannot stop cluster %s", self.name, exc_info=True)
        await self.gateway._cleanup()

    async def _stop_impl(self) -> None:
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(BaseException):
                await self._start_task
        if self.status != ClusterState.failed:
            self.status = ClusterState.closing
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(BaseException):
                await self._watch_task
        for client in list(self._clients):
            with contextlib.suppress(Exception):
                await client._close()
        if self.status != ClusterState.failed:
            self.status = ClusterState.closed

    def close(self, shutdown: bool | None = None) -> Any:
        """Release this object; with ``shutdown`` (default ``shutdown_on_close``) also stop the
        cluster on the gateway. Awaitable in async mode.
        """
        if self.asynchronous or self.gateway._on_loop_thread():
            return self._stop(shutdown)
        if self.gateway._closed:
            if shutdown and self.name is not None and not self._was_shut_down:
                raise RuntimeError(
                    f"{self!r} is already closed; stop the cluster with "
                    f"Gateway().stop_cluster({self.name!r})"
                )
            return None
        try:
            self.gateway.sync(self._stop, shutdown)
        finally:
            self.gateway.close()
        return None

    def shutdown(self) -> Any:
        """Stop the cluster on the gateway and release this object: ``close(shutdown=True)``."""
        return self.close(shutdown=True)

    def __enter__(self) -> GatewayCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> GatewayCluster:
        return await self._start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    def __del__(self) -> None:
        if sys.is_finalizing() or not hasattr(self, "gateway") or self.asynchronous:
            return
        if self.gateway._closed or self.gateway._on_loop_thread():
            return
        close_when_collected(self.close, "cluster")

    # -- scaling and clients ---------------------------------------------------------------------

    def scale(self, n: int, group: str | None = None) -> Any:
        """Ask for ``n`` workers of worker group ``group`` (None: the default group);
        switches that group's adaptive scaling off."""
        return self.gateway.scale_cluster(self._started_name(), n, group=group)

    def adapt(
        self,
        minimum: int | None = None,
        maximum: int | None = None,
        active: bool = True,
        group: str | None = None,
    ) -> Any:
        """Scale worker group ``group`` (None: the default group) between ``minimum`` and
        ``maximum`` workers by load; ``active=False`` stops."""
        return self.gateway.adapt_cluster(
            self._started_name(), minimum=minimum, maximum=maximum, active=active, group=group
        )

    def worker_groups(self) -> Any:
        """Workers per worker group: name → ``{"count", "pending", "running", "stopping"}``
        (see `Gateway.worker_groups`)."""
        return self.gateway.worker_groups(self._started_name())

    def get_logs(
        self,
        cluster: bool = True,
        scheduler: bool = True,
        workers: bool | Iterable[str] = True,
        tail: int | None = None,
    ) -> Any:
        """Logs of this cluster, as distributed's ``Cluster.get_logs``: a dict (``Logs``) of
        ``"Scheduler"``, one entry per worker name and, with ``cluster``, ``"Cluster"`` (why the
        gateway failed the cluster, when it did). ``workers`` is True, False or worker names;
        ``tail`` the lines of each log (see `Gateway.get_logs`)."""
        return self.gateway.get_logs(
            self._started_name(),
            cluster=cluster,
            scheduler=scheduler,
            workers=workers,
            tail=tail,
        )

    def _started_name(self) -> str:
        if self.name is None:
            raise RuntimeError(f"{self!r} has not been started yet")
        return self.name

    def get_client(self, set_as_default: bool = True) -> Client:
        """A dask ``Client`` connected to this cluster through the gateway's proxy."""
        client = Client(
            self,
            security=self.security,
            set_as_default=set_as_default,
            asynchronous=self.asynchronous,
            loop=self.loop,
        )
        self._clients.add(client)
        return client

    # -- display ---------------------------------------------------------------------------------

    def _worker_totals(self) -> tuple[int, int, int] | None:
        workers = self.scheduler_info.get("workers")
        if workers is None:
            return None
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        memory = sum(w.get("memory_limit", 0) or 0 for w in workers.values())
        return len(workers), threads, memory

    def __repr__(self) -> str:
        status = getattr(self, "status", ClusterState.created)
        parts = [f"{getattr(self, 'name', None)}", f"status={status}"]
        totals = self._worker_totals() if hasattr(self, "scheduler_info") else None
        if totals is not None:
            parts.append(f"workers={totals[0]}")
        return f"GatewayCluster<{', '.join(parts)}>"

    def _status_html(self) -> str:
        totals = self._worker_totals()
        if totals is None:
            return "<p>Workers: unknown</p>"
        n, threads, memory = totals
        return (
            "<table style='text-align: right'>"
            f"<tr><th>Workers</th><td>{n}</td></tr>"
            f"<tr><th>Threads</th><td>{threads}</td></tr>"
            f"<tr><th>Memory</th><td>{format_bytes(memory)}</td></tr></table>"
        )

    def _repr_html_(self) -> str:
        link = (
            "<a href='{0}' target='_blank'>{0}</a>".format(html.escape(self.dashboard_link))
            if self.dashboard_link
            else "not available"
        )
        return (
            "<div style='display: inline-block; padding: 8px; border: 1px solid #999'>"
            "<h3 style='margin-top: 0'>GatewayCluster</h3><ul>"
            f"<li><b>Name:</b> {html.escape(str(self.name))}</li>"
            f"<li><b>Status:</b> {self.status}</li>"
            f"<li><b>Scheduler:</b> <code>{html.escape(str(self.scheduler_address))}</code></li>"
            f"<li><b>Dashboard:</b> {link}</li></ul>{self._status_html()}</div>"
        )

    def _widget(self) -> Any:
        """An ipywidgets panel: worker totals, manual and adaptive scaling, dashboard link."""
        if self._cached_widget is not None:
            return self._cached_widget
        if self.asynchronous:
            return None
        try:
            import ipywidgets as w
        except ImportError:
            return None
        narrow = w.Layout(width="150px")
        status = w.HTML(self._status_html(), layout=w.Layout(min_width="150px"))
        count = w.IntText(0, description="Workers", layout=narrow)
        scale = w.Button(description="Scale", layout=narrow)
        minimum = w.IntText(0, description="Minimum", layout=narrow)
        maximum = w.IntText(0, description="Maximum", layout=narrow)
        adapt = w.Button(description="Adapt", layout=narrow)
        message = w.HTML("")
        panels = w.Accordion(
            [w.HBox([count, scale]), w.HBox([minimum, maximum, adapt])],
            layout=w.Layout(min_width="500px"),
        )
        panels.set_title(0, "Manual scaling")
        panels.set_title(1, "Adaptive scaling")
        panels.selected_index = None

        def report(call: Any) -> None:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    call()
            except Exception as exc:  # noqa: BLE001 - shown to the user in the panel
                message.value = f"<span style='color: #c00'>{html.escape(str(exc))}</span>"
            else:
                message.value = html.escape("; ".join(str(c.message) for c in caught))

        scale.on_click(lambda _: report(lambda: self.scale(count.value)))
        adapt.on_click(
            lambda _: report(lambda: self.adapt(minimum=minimum.value, maximum=maximum.value))
        )
        items = [
            w.HTML("<h2>GatewayCluster</h2>"),
            w.HBox([status, panels]),
            message,
            w.HTML(f"<p><b>Name:</b> {html.escape(str(self.name))}</p>"),
        ]
        if self.dashboard_link:
            items.append(
                w.HTML(
                    "<p><b>Dashboard:</b> <a href='{0}' target='_blank'>{0}</a></p>".format(
                        html.escape(self.dashboard_link)
                    )
                )
            )
        self._status_widget = status
        self._cached_widget = w.VBox(items)
        return self._cached_widget

    def _ipython_display_(self, **kwargs: Any) -> None:
        from IPython.display import display

        widget = self._widget()
        if widget is not None:
            display(widget, **kwargs)
        else:
            display({"text/plain": repr(self), "text/html": self._repr_html_()}, raw=True)


async def _watch_workers(
    ref: weakref.ref[GatewayCluster], *, address: str, security: Security, name: str
) -> None:
    """Subscribe to a scheduler's worker status and apply it to the cluster while it exists.

    Holds only a weak reference, so an abandoned cluster object can still be collected.
    """
    try:
        comm = await dask_connect(
            address, timeout=WATCH_CONNECT_TIMEOUT, **security.get_connection_args("client")
        )
    except Exception as exc:  # noqa: BLE001 - any failure only costs the worker totals
        log.warning("cannot watch the workers of cluster %s: %s", name, exc)
        return
    try:
        await comm.write({"op": "subscribe_worker_status"})
        info = await comm.read()
        cluster = ref()
        if cluster is None:
            return
        cluster.scheduler_info = info
        cluster._refresh_widget()
        del cluster
        while True:
            batch = await comm.read()
            cluster = ref()
            if cluster is None:
                return
            for op, msg in batch:
                cluster._apply_worker_update(op, msg)
            del cluster
    except OSError:
        return
    finally:
        await comm.close()


@atexit.register
def _close_lingering_clusters() -> None:
    for cluster in list(GatewayCluster._instances):
        if cluster.asynchronous:
            continue
        try:
            cluster.close()
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            warnings.warn(f"error closing {cluster!r} at exit: {exc}", stacklevel=1)

"""The gateway's agent inside every Dask scheduler it launches, loaded as a scheduler preload.

Owns `GatewayAgent` (heartbeats, scale, adaptive scaling, idle timeout, and the small HTTP API
the gateway forwards scale/adapt to), its `AgentSettings`, and the preload hooks.

Launch::

    dask scheduler --preload gateway_client.agent [--dg-heartbeat-period 15 ...]

Settings, each from the preload's command-line option, else the environment, else the default:

====================================  ================================  =========================
option / environment variable         meaning                           default
====================================  ================================  =========================
``DASK_GATEWAY_API_URL``              gateway API base, ending in       required
                                      ``/api``
``DASK_GATEWAY_API_TOKEN``            the cluster token, or the path    required
                                      of a file holding it
``DASK_GATEWAY_CLUSTER_NAME``         the cluster's name                required
``--dg-api-address`` /                ``host:port`` the agent's HTTP    ``:0`` (all interfaces,
``DASK_GATEWAY_API_ADDRESS``          API listens on                    a free port)
``--dg-heartbeat-period`` /           seconds between heartbeats; 0:    ``15``
``DASK_GATEWAY_HEARTBEAT_PERIOD``     only on changes
``--dg-adaptive-period`` /            seconds between adaptive checks   ``3``
``DASK_GATEWAY_ADAPTIVE_PERIOD``
``--dg-idle-timeout`` /               seconds of inactivity before the  ``0`` (never)
``DASK_GATEWAY_IDLE_TIMEOUT``         agent asks the gateway to stop
                                      the cluster
====================================  ================================  =========================

The option names are those of the original dask-gateway preload, so its launch commands work.
Adaptive scaling also follows distributed's ``distributed.adaptive.target-duration`` and
``distributed.adaptive.wait-count`` (scale down only after that many consecutive checks agree).
Log records go to the ``distributed.gateway_agent`` logger, so the scheduler's log shows them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click
import dask.config
from distributed.comm.addressing import get_address_host, unparse_host_port
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from ._agent_gateway import GatewayAnswer, GatewayAPI
from ._agent_http import DEFAULT_GROUP, MAX_BODY_BYTES, AdaptOp, CommOp, ScaleOp, make_app
from ._agent_workers import WorkerBook, choose_retirees, group_of_worker

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["AgentConfigError", "AgentSettings", "GatewayAgent", "dask_setup", "dask_teardown"]

logger = logging.getLogger("distributed.gateway_agent")

PLUGIN_NAME = "gateway-agent"
"""The name of the agent's plugin in ``scheduler.plugins``."""

_BUILTIN_CLIENTS = frozenset({"fire-and-forget"})
"""Scheduler-internal client ids that are not a user's connection."""


class AgentConfigError(ValueError):
    """A missing or invalid agent setting; the message names the variable or option."""


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


def _split_address(value: str, *, what: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not 0 <= port <= 65535:
        raise AgentConfigError(f"{what}: expected host:port (e.g. ':0'), got {value!r}")
    return host.strip("[]"), port


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """Everything the agent needs to know; build with `from_env` in a launched scheduler."""

    api_url: str
    """The gateway's API base, ending in ``/api``."""
    api_token: str = field(repr=False)
    """The cluster token (sent to the gateway, and required from it)."""
    cluster_name: str
    api_address: str = ":0"
    """``host:port`` for the agent's HTTP API; an empty host means all interfaces."""
    heartbeat_period: float = 15.0
    """Seconds between heartbeats; 0 sends heartbeats only on changes."""
    adaptive_period: float = 3.0
    """Seconds between adaptive scaling checks."""
    idle_timeout: float = 0.0
    """Seconds without activity before the agent asks the gateway to stop; 0 for never."""
    adaptive_wait_count: int | None = None
    """Consecutive adaptive checks that must agree before scaling down; None reads
    ``distributed.adaptive.wait-count``."""
    heartbeat_coalesce: float = 0.1
    """Seconds a change waits for others before its heartbeat goes, so bursts send one."""
    request_timeout: float = 10.0
    """Seconds a call to the gateway may take."""

    def __post_init__(self) -> None:
        if not self.api_url.startswith(("http://", "https://")):
            raise AgentConfigError(
                f"DASK_GATEWAY_API_URL: expected an http(s) URL ending in /api, "
                f"got {self.api_url!r}"
            )
        if not self.api_token:
            raise AgentConfigError("DASK_GATEWAY_API_TOKEN: must not be empty")
        if not self.cluster_name:
            raise AgentConfigError("DASK_GATEWAY_CLUSTER_NAME: must not be empty")
        _split_address(self.api_address, what="api_address")
        for name in ("heartbeat_period", "idle_timeout", "heartbeat_coalesce"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise AgentConfigError(f"{name}: expected a number >= 0, got {value!r}")
        for name in ("adaptive_period", "request_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise AgentConfigError(f"{name}: expected a number > 0, got {value!r}")
        if self.adaptive_wait_count is not None and self.adaptive_wait_count < 1:
            raise AgentConfigError(
                f"adaptive_wait_count: expected an integer >= 1, got {self.adaptive_wait_count!r}"
            )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        api_address: str | None = None,
        heartbeat_period: float | None = None,
        adaptive_period: float | None = None,
        idle_timeout: float | None = None,
        **extra: Any,
    ) -> AgentSettings:
        """Settings from ``environ`` (default `os.environ`); arguments that are not None
        override the environment. ``DASK_GATEWAY_API_TOKEN`` may name a file holding the
        token. Raises `AgentConfigError` naming every missing variable."""
        env = os.environ if environ is None else environ
        required = ("DASK_GATEWAY_API_URL", "DASK_GATEWAY_API_TOKEN", "DASK_GATEWAY_CLUSTER_NAME")
        missing = [name for name in required if not env.get(name)]
        if missing:
            raise AgentConfigError(
                "the gateway agent needs the environment variable(s) " + ", ".join(missing)
            )
        token = env["DASK_GATEWAY_API_TOKEN"]
        if os.path.isfile(token):
            with open(token, encoding="utf-8") as f:
                token = f.read().strip()

        def number(value: float | None, variable: str, default: float) -> float:
            if value is not None:
                return float(value)
            text = env.get(variable, "").strip()
            if not text:
                return default
            try:
                return float(text)
            except ValueError:
                raise AgentConfigError(f"{variable}: expected a number, got {text!r}") from None

        return cls(
            api_url=env["DASK_GATEWAY_API_URL"].rstrip("/"),
            api_token=token,
            cluster_name=env["DASK_GATEWAY_CLUSTER_NAME"],
            api_address=(
                api_address
                if api_address is not None
                else env.get("DASK_GATEWAY_API_ADDRESS", "").strip() or ":0"
            ),
            heartbeat_period=number(heartbeat_period, "DASK_GATEWAY_HEARTBEAT_PERIOD", 15.0),
            adaptive_period=number(adaptive_period, "DASK_GATEWAY_ADAPTIVE_PERIOD", 3.0),
            idle_timeout=number(idle_timeout, "DASK_GATEWAY_IDLE_TIMEOUT", 0.0),
            **extra,
        )


# ----------------------------------------------------------------------------------------------
# The agent
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AdaptiveBounds:
    minimum: int
    maximum: int | None

    def clamp(self, count: int) -> int:
        if self.maximum is not None:
            count = min(count, self.maximum)
        return max(count, self.minimum)


class _AgentPlugin(SchedulerPlugin):
    """Tells the agent when workers come and go and when the scheduler closes."""

    name = PLUGIN_NAME

    def __init__(self, agent: GatewayAgent) -> None:
        self.agent = agent

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self.agent._worker_joined(worker)

    def remove_worker(
        self, scheduler: Scheduler, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        self.agent._worker_left(worker)

    async def before_close(self) -> None:
        await self.agent.stop()


class GatewayAgent:
    """The gateway's representative in one scheduler.

    ``await agent.start()`` registers a scheduler plugin, serves the HTTP API and starts
    heartbeating; ``await agent.stop()`` (also run when the scheduler closes) undoes all that.
    ``targets`` are the worker counts the cluster should have per worker group (``target``
    the default group's), pending workers included: the gateway starts and stops worker
    processes to match them, the agent only retires connected workers beyond them and
    reports. Each group scales on its own, by request or adaptively within its own bounds
    (``bounds``); a worker's group is read from the name the gateway gave it.
    """

    retire_retry_delay: float = 1.0
    """Seconds before retrying a failed retirement (doubling on each failure, up to 30)."""

    def __init__(
        self, *, scheduler: Scheduler, settings: AgentSettings, api: GatewayAPI | None = None
    ) -> None:
        self.scheduler = scheduler
        self.settings = settings
        self.api = api or GatewayAPI(
            api_url=settings.api_url,
            api_token=settings.api_token,
            cluster_name=settings.cluster_name,
            timeout=settings.request_timeout,
        )
        self.book = WorkerBook()
        self.targets: dict[str, int] = {DEFAULT_GROUP: 0}
        """Workers wanted per worker group."""
        self.bounds: dict[str, AdaptiveBounds] = {}
        """The groups under adaptive scaling, with their bounds."""
        self.api_address = ""
        self.stop_requested = False
        """True once the idle timeout asked the gateway to stop the cluster."""
        self._changed = asyncio.Event()
        self._scale_down_wanted = asyncio.Event()
        self._heartbeat_lock = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._server: HTTPServer | None = None
        self._shutdown: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False

    @property
    def target(self) -> int:
        """Workers wanted in the default group."""
        return self.targets[DEFAULT_GROUP]

    @property
    def adaptive(self) -> AdaptiveBounds | None:
        """The default group's adaptive bounds; None while it is not adaptive."""
        return self.bounds.get(DEFAULT_GROUP)

    def group_of(self, name: str) -> str:
        """The worker group of the worker named ``name``."""
        return group_of_worker(self.settings.cluster_name, name, DEFAULT_GROUP)

    def active_counts(self) -> dict[str, int]:
        """Connected workers not being retired, per worker group."""
        counts: dict[str, int] = {}
        for name in self.book.active_names():
            group = self.group_of(name)
            counts[group] = counts.get(group, 0) + 1
        return counts

    @classmethod
    def of(cls, scheduler: Scheduler) -> GatewayAgent | None:
        """The agent running in ``scheduler``, if any."""
        plugin = scheduler.plugins.get(PLUGIN_NAME)
        return plugin.agent if isinstance(plugin, _AgentPlugin) else None

    # ------------------------------------------------------------------------------------------
    # Life cycle

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("the gateway agent was already started")
        self._started = True
        self._serve()  # first: if the port cannot be had, nothing else was changed
        self.scheduler.add_plugin(_AgentPlugin(self), name=PLUGIN_NAME)
        for address, ws in self.scheduler.workers.items():
            self.book.joined(address=address, name=str(ws.name))
        self._spawn("heartbeat", self._heartbeat_loop())
        self._spawn("scale-down", self._scale_down_loop())
        if self.settings.idle_timeout > 0:
            self._spawn("idle", self._idle_loop())
        logger.info(
            "Gateway agent for cluster %s: API at %s, heartbeats to %s every %gs",
            self.settings.cluster_name,
            self.api_address,
            self.api.cluster_url,
            self.settings.heartbeat_period,
        )

    async def stop(self) -> None:
        """Cancel the agent's tasks and stop its HTTP API; safe to call more than once."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        current = asyncio.current_task()
        tasks = [t for t in self._tasks.values() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        self.api.close()
        if self.scheduler.plugins.get(PLUGIN_NAME) is not None:
            self.scheduler.remove_plugin(name=PLUGIN_NAME)

    def _spawn(self, name: str, coro: Any) -> None:
        self._tasks[name] = asyncio.create_task(coro, name=f"gateway-agent-{name}")

    def _serve(self) -> None:
        host, port = _split_address(self.settings.api_address, what="api_address")
        app = make_app(token=self.settings.api_token, handle=self._handle_comm)
        sockets = bind_sockets(port, address=host or None)
        self._server = HTTPServer(app, max_body_size=MAX_BODY_BYTES)
        self._server.add_sockets(sockets)
        bound_port = sockets[0].getsockname()[1]
        advertised = host if host not in ("", "0.0.0.0", "::") else self._scheduler_host
        self.api_address = "http://" + unparse_host_port(advertised, bound_port)

    @property
    def _scheduler_host(self) -> str:
        return get_address_host(self.scheduler.address)

    @property
    def dashboard_address(self) -> str:
        """``http(s)://ip:port`` of the scheduler's dashboard, "" when it has none."""
        server = self.scheduler.services.get("dashboard")
        application = getattr(self.scheduler, "http_application", None)
        if server is None or not getattr(application, "applications", None):
            return ""  # an HTTP server for /health and /metrics, but no dashboard on it
        tls = dask.config.get("distributed.scheduler.dashboard.tls.cert", None)
        scheme = "https" if tls else "http"
        return f"{scheme}://{unparse_host_port(self._scheduler_host, server.port)}"

    # ------------------------------------------------------------------------------------------
    # Scale and adapt

    def scale(self, count: int, group: str = DEFAULT_GROUP) -> dict[str, Any]:
        """Set the target worker count of ``group``, switching its adaptive scaling off."""
        self._adaptive_off(group)
        self._set_target(count, why="scale request", group=group)
        return self._status(group)

    def adapt(
        self,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
        active: bool = True,
        group: str = DEFAULT_GROUP,
    ) -> dict[str, Any]:
        """Switch adaptive scaling of ``group`` on within [minimum, maximum] (None: 0 and
        unbounded), or off when not ``active`` (the target stays where it is)."""
        if not active:
            self._adaptive_off(group)
            return self._status(group)
        bounds = AdaptiveBounds(minimum=minimum or 0, maximum=maximum)
        if bounds.maximum is not None and bounds.minimum > bounds.maximum:
            raise ValueError(f"minimum ({minimum}) must not exceed maximum ({maximum})")
        logger.info(
            "Adaptive scaling on%s: minimum %s, maximum %s",
            _of_group(group),
            bounds.minimum,
            maximum,
        )
        self.bounds[group] = bounds
        self._set_target(
            bounds.clamp(self.targets.get(group, 0)), why="adaptive bounds", group=group
        )
        old = self._tasks.pop("adaptive", None)
        if old is not None:
            old.cancel()
        if not self._stopped:
            self._spawn("adaptive", self._adaptive_loop())
        return self._status(group)

    def _adaptive_off(self, group: str = DEFAULT_GROUP) -> None:
        if self.bounds.pop(group, None) is not None:
            logger.info("Adaptive scaling off%s", _of_group(group))
        if not self.bounds:
            task = self._tasks.pop("adaptive", None)
            if task is not None:
                task.cancel()

    def _status(self, group: str = DEFAULT_GROUP) -> dict[str, Any]:
        bounds = self.bounds.get(group)
        return {
            "ok": True,
            "group": group,
            "count": self.targets.get(group, 0),
            "adaptive": bounds is not None,
            "minimum": bounds.minimum if bounds else None,
            "maximum": bounds.maximum if bounds else None,
        }

    def _handle_comm(self, op: CommOp) -> dict[str, Any]:
        if isinstance(op, ScaleOp):
            return self.scale(op.count, group=op.group)
        assert isinstance(op, AdaptOp)
        return self.adapt(minimum=op.minimum, maximum=op.maximum, active=op.active, group=op.group)

    def _set_target(self, count: int, *, why: str, group: str = DEFAULT_GROUP) -> None:
        before = self.targets.get(group, 0)
        if count == before and group in self.targets:
            return
        logger.info("Target%s %d -> %d workers (%s)", _of_group(group), before, count, why)
        self.targets[group] = count
        self._changed.set()
        if self.active_counts().get(group, 0) > count:
            self._scale_down_wanted.set()

    async def _scale_down_loop(self) -> None:
        retry = self.retire_retry_delay
        while True:
            await self._scale_down_wanted.wait()
            self._scale_down_wanted.clear()
            try:
                await self._retire_excess()
            except asyncio.CancelledError:
                raise
            except Exception:  # try again a little later
                logger.exception("Retiring workers failed; trying again in %gs", retry)
                await asyncio.sleep(retry)
                retry = min(retry * 2, 30.0)
                self._scale_down_wanted.set()
            else:
                retry = self.retire_retry_delay

    async def _retire_excess(self) -> None:
        """Retire the connected workers beyond each group's target, cheapest first."""
        counts = self.active_counts()
        victims = []
        for group, active in counts.items():
            excess = active - self.targets.get(group, 0)
            if excess <= 0:
                continue
            known = [
                ws
                for ws in self.scheduler.workers.values()
                if (name := self.book.name_of(ws.address)) and self.group_of(name) == group
            ]
            victims.extend(choose_retirees(known, count=excess, book=self.book))
        if not victims:
            return
        names = [str(ws.name) for ws in victims]
        addresses = [ws.address for ws in victims]
        logger.info("Retiring %d worker(s): %s", len(names), ", ".join(names))
        self.book.mark_closing(names)
        # Tell the gateway first, so it expects these workers to exit (not a failure).
        try:
            await self.heartbeat()
        except Exception:  # retire anyway; the periodic heartbeat reports them
            logger.exception("Sending a heartbeat failed")
        if self._shutdown is not None:
            return
        stimulus_id = f"gateway-agent-scale-down-{time.time()}"
        try:
            retired = await self.scheduler.retire_workers(
                workers=addresses, close_workers=True, remove=True, stimulus_id=stimulus_id
            )
        except Exception:
            # Still connected: reported active again until the retry.
            self.book.unmark_closing(names)
            self._changed.set()
            raise
        stuck = [a for a in addresses if a not in retired and a in self.scheduler.workers]
        if stuck:
            # Their data had nowhere to go (no other worker); the target says they must go.
            logger.warning(
                "Closing %d worker(s) whose data could not be moved elsewhere: %s",
                len(stuck),
                ", ".join(stuck),
            )
            for address in stuck:
                await self.scheduler.remove_worker(
                    address, stimulus_id=stimulus_id, close=True, expected=True
                )

    async def _adaptive_loop(self) -> None:
        wait_count = self.settings.adaptive_wait_count or int(
            dask.config.get("distributed.adaptive.wait-count", 3)
        )
        lower: dict[str, deque[int]] = {}
        while True:
            try:
                self._adapt_once(lower, wait_count)
            except Exception:  # try again next period
                logger.exception("Adaptive scaling check failed")
            await asyncio.sleep(self.settings.adaptive_period)

    def desired_per_group(self) -> dict[str, int]:
        """What adaptive scaling wants for each adaptive group now.

        The scheduler's `adaptive_target` is the number of workers the whole cluster should
        have; the targets of the groups that are not adaptive are taken off it first, and the
        rest is shared among the adaptive groups: each gets its minimum, then one worker at a
        time goes to each group in turn (default first, then the others in the order they
        became adaptive) until the rest is spent or every group is at its maximum.
        """
        if not self.bounds:
            return {}
        fixed = sum(n for g, n in self.targets.items() if g not in self.bounds)
        rest = max(0, self.scheduler.adaptive_target() - fixed)
        groups = sorted(self.bounds, key=lambda g: g != DEFAULT_GROUP)
        desired = {g: self.bounds[g].minimum for g in groups}
        rest -= sum(desired.values())
        while rest > 0:
            open_groups = [g for g in groups if self.bounds[g].clamp(desired[g] + 1) > desired[g]]
            if not open_groups:
                break
            for g in open_groups[:rest]:
                desired[g] += 1
            rest -= min(rest, len(open_groups))
        return desired

    def _adapt_once(self, lower: dict[str, deque[int]], wait_count: int = 3) -> None:
        for group, desired in self.desired_per_group().items():
            waiting = lower.setdefault(group, deque(maxlen=max(1, wait_count)))
            target = self.targets.get(group, 0)
            if desired > target:
                waiting.clear()
                self._set_target(desired, why="adaptive", group=group)
            elif desired < target:
                waiting.append(desired)
                if len(waiting) == waiting.maxlen:
                    self._set_target(max(waiting), why="adaptive", group=group)
                    waiting.clear()
            else:
                waiting.clear()
        for group in list(lower):
            if group not in self.bounds:
                del lower[group]

    # ------------------------------------------------------------------------------------------
    # Workers

    def _worker_joined(self, address: str) -> None:
        ws = self.scheduler.workers.get(address)
        if ws is None:
            return
        name = str(ws.name)
        self.book.joined(address=address, name=name)
        self._changed.set()
        group = self.group_of(name)
        if self.active_counts().get(group, 0) > self.targets.get(group, 0):
            self._scale_down_wanted.set()

    def _worker_left(self, address: str) -> None:
        if self.book.left(address=address) is not None:
            self._changed.set()

    # ------------------------------------------------------------------------------------------
    # Heartbeats

    def heartbeat_message(self) -> dict[str, Any]:
        workers = self.book.report()
        return {
            "scheduler_address": self.scheduler.address,
            "dashboard_address": self.dashboard_address,
            "api_address": self.api_address,
            "count": self.target,
            "group_counts": {g: n for g, n in self.targets.items() if g != DEFAULT_GROUP},
            "active_workers": workers.active,
            "closing_workers": workers.closing,
            "closed_workers": workers.closed,
        }

    async def heartbeat(self) -> GatewayAnswer:
        """Send one heartbeat now; a closed worker the gateway accepted is not reported again,
        and a gateway that no longer knows the cluster (404, 409) closes the scheduler."""
        async with self._heartbeat_lock:
            self._changed.clear()
            msg = self.heartbeat_message()
            answer = await self.api.heartbeat(msg)
            if answer.ok:
                self.book.acknowledge(msg["closed_workers"])
            elif answer.cluster_unknown:
                self._gateway_forgot(answer)
            else:
                logger.warning(
                    "Heartbeat to the gateway failed (HTTP %d%s); trying again",
                    answer.status,
                    f": {answer.reason}" if answer.reason else "",
                )
            return answer

    async def _heartbeat_loop(self) -> None:
        period = self.settings.heartbeat_period
        delay: float | None = 0.0  # the first heartbeat goes at once
        failures = 0
        while True:
            if (delay is None or delay > 0) and await self._wait_for_change(delay):
                await asyncio.sleep(self.settings.heartbeat_coalesce)  # let a burst gather
            try:
                answer = await self.heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception:  # a heartbeat must never end the loop
                logger.exception("Sending a heartbeat failed")
                answer = GatewayAnswer(status=599, reason="error")
            if answer.ok:
                failures = 0
                delay = period or None
            elif answer.cluster_unknown:
                return
            else:
                failures += 1
                delay = min(2.0 ** (failures - 1), period or 30.0)

    async def _wait_for_change(self, timeout: float | None) -> bool:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _gateway_forgot(self, answer: GatewayAnswer) -> None:
        if self._shutdown is not None:
            return
        logger.warning(
            "The gateway no longer knows cluster %s (HTTP %d%s); closing the scheduler",
            self.settings.cluster_name,
            answer.status,
            f": {answer.reason}" if answer.reason else "",
        )
        self._shutdown = asyncio.create_task(
            self.scheduler.close(reason="gateway-cluster-unknown"),
            name="gateway-agent-close-scheduler",
        )

    # ------------------------------------------------------------------------------------------
    # Idle timeout

    def _busy(self) -> bool:
        s = self.scheduler
        return bool(
            s.queued
            or s.unrunnable
            or getattr(s, "_active_graph_updates", 0)
            or any(ws.processing for ws in s.workers.values())
            or any(c not in _BUILTIN_CLIENTS for c in s.clients)
        )

    async def _idle_loop(self) -> None:
        timeout = self.settings.idle_timeout
        interval = min(max(timeout / 4, 0.05), 10.0)
        loop = asyncio.get_running_loop()
        last_activity = loop.time()
        transitions = self.scheduler.transition_counter
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            if self.scheduler.transition_counter != transitions or self._busy():
                transitions = self.scheduler.transition_counter
                last_activity = now
                continue
            if now - last_activity < timeout:
                continue
            logger.warning(
                "Cluster %s idle for %gs; asking the gateway to stop it",
                self.settings.cluster_name,
                timeout,
            )
            answer = await self.api.stop_cluster()
            if answer.ok:
                self.stop_requested = True
                return
            logger.warning(
                "Asking the gateway to stop the cluster failed (HTTP %d%s); trying again",
                answer.status,
                f": {answer.reason}" if answer.reason else "",
            )


def _of_group(group: str) -> str:
    """`` of group gpu`` for a named group, nothing for the default one (log lines)."""
    return "" if group == DEFAULT_GROUP else f" of group {group}"


# ----------------------------------------------------------------------------------------------
# Preload hooks
# ----------------------------------------------------------------------------------------------


@click.command(name="gateway-agent")
@click.option(
    "--dg-api-address",
    default=None,
    help="host:port for the agent's HTTP API [env DASK_GATEWAY_API_ADDRESS; default :0]",
)
@click.option(
    "--dg-heartbeat-period",
    type=float,
    default=None,
    help="Seconds between heartbeats, 0 for only on changes "
    "[env DASK_GATEWAY_HEARTBEAT_PERIOD; default 15]",
)
@click.option(
    "--dg-adaptive-period",
    type=float,
    default=None,
    help="Seconds between adaptive scaling checks [env DASK_GATEWAY_ADAPTIVE_PERIOD; default 3]",
)
@click.option(
    "--dg-idle-timeout",
    type=float,
    default=None,
    help="Seconds idle before asking the gateway to stop the cluster, 0 for never "
    "[env DASK_GATEWAY_IDLE_TIMEOUT; default 0]",
)
async def dask_setup(
    scheduler: Scheduler,
    dg_api_address: str | None,
    dg_heartbeat_period: float | None,
    dg_adaptive_period: float | None,
    dg_idle_timeout: float | None,
) -> None:
    """Preload hook: start the gateway agent in ``scheduler``.

    distributed logs and ignores a preload that raises, which would leave a scheduler the
    gateway can never reach; so a failure here exits the process (status 1) instead.
    """
    try:
        settings = AgentSettings.from_env(
            api_address=dg_api_address,
            heartbeat_period=dg_heartbeat_period,
            adaptive_period=dg_adaptive_period,
            idle_timeout=dg_idle_timeout,
        )
        await GatewayAgent(scheduler=scheduler, settings=settings).start()
    except AgentConfigError as exc:
        logger.error("Cannot start the gateway agent: %s", exc)
        raise SystemExit(1) from None
    except Exception:  # anything else is as fatal, with its traceback
        logger.exception("Cannot start the gateway agent")
        raise SystemExit(1) from None


async def dask_teardown(scheduler: Scheduler) -> None:
    """Preload hook: stop the agent (the scheduler's close does this as well)."""
    agent = GatewayAgent.of(scheduler)
    if agent is not None:
        await agent.stop()

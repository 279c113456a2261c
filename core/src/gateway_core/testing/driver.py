"""An in-process `ClusterDriver` for tests: fake schedulers and workers, no real processes.

Owns `InProcessConfig` (the reconciler's settings plus behaviour knobs: failures, delays,
silence) and `InProcessDriver`, which counts its calls so tests can check batching and retries.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from attrs import define

from ..backends.base import ClusterDriver, StateUpdates
from ..config import ClusterConfig, ProcessBackendConfig
from .fake_scheduler import FakeScheduler

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..context import GatewayContext
    from ..models import Cluster, Worker


@define(kw_only=True, frozen=True)
class InProcessConfig(ProcessBackendConfig):
    """`[backend.inprocess]`: the reconciler's settings plus how the fakes misbehave."""

    heartbeat_period: float = 0.0
    """Seconds between fake heartbeats; 0 means ``cluster_heartbeat_period``."""
    start_style: str = "generator"
    """``generator``: start operations yield state as they go; ``awaitable``: they return it."""
    scheduler_start_delay: float = 0.0
    scheduler_watch: float = 0.0
    """Seconds a scheduler's start operation goes on after its last state (as the local
    backend watches for an early exit), so a normal stop can end it."""
    scheduler_start_error: str = ""
    """If set, starting a scheduler raises RuntimeError with this message."""
    scheduler_heartbeats: bool = True
    """False: schedulers start but never heartbeat."""
    stop_scheduler_failures: int = 0
    """The first N stop_scheduler calls raise."""
    worker_start_delay: float = 0.0
    worker_start_failures: int = 0
    """The first N start_worker calls raise."""
    worker_connect_delay: float = 0.0
    workers_connect: bool = True
    """False: workers start but never connect to their scheduler."""

    def __attrs_post_init__(self) -> None:
        if self.start_style not in ("generator", "awaitable"):
            raise ValueError(
                f"start_style: expected generator or awaitable, got {self.start_style!r}"
            )


class InProcessDriver(ClusterDriver[InProcessConfig, ClusterConfig]):
    """Runs each cluster's scheduler as a `FakeScheduler` in this process.

    Heartbeats go by HTTP to ``context.api_url``, or straight to a backend after
    `deliver_to`. Knobs not in the config are attributes tests set: ``dead_clusters`` (name →
    failure reason; check_clusters says dead), ``dead_workers``, ``check_clusters_errors`` and
    ``check_workers_errors`` (that many next checks raise). ``calls`` counts every operation,
    ``call_times`` records (monotonic time, operation, name), ``check_batches`` the size of
    every check_clusters batch, ``worker_settings`` the config each worker started with
    (`worker_config`: its group's). Pass ``schedulers=`` (another driver's) to adopt running fake
    schedulers across a simulated gateway restart.
    """

    def __init__(
        self,
        *,
        config: InProcessConfig,
        context: GatewayContext,
        schedulers: dict[str, FakeScheduler] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config, context=context, **kwargs)
        self.schedulers: dict[str, FakeScheduler] = {} if schedulers is None else schedulers
        for name, scheduler in self.schedulers.items():
            scheduler.send = functools.partial(self._deliver, name)
        self.backend: Backend | None = None
        self.calls: collections.Counter[str] = collections.Counter()
        self.worker_settings: dict[str, ClusterConfig] = {}
        self.call_times: list[tuple[float, str, str]] = []
        self.check_batches: list[int] = []
        self.dead_clusters: dict[str, str] = {}
        self.dead_workers: set[str] = set()
        self.check_clusters_errors = 0
        self.check_workers_errors = 0
        self._worker_failures_left = config.worker_start_failures
        self._stop_failures_left = config.stop_scheduler_failures

    # ---------------------------------------------------------------------------------------
    # Test controls

    def deliver_to(self, backend: Backend) -> None:
        """Send heartbeats straight to ``backend.on_cluster_heartbeat`` (no API server)."""
        self.backend = backend

    def kill_cluster(self, name: str, reason: str = "the fake scheduler was killed") -> None:
        """The scheduler of ``name`` dies: no more heartbeats, and checks report it dead."""
        self.dead_clusters[name] = reason
        scheduler = self.schedulers.get(name)
        if scheduler is not None:
            scheduler.pause()

    async def shutdown(self) -> None:
        """Stop every fake scheduler (test teardown; a real driver's processes outlive it)."""
        schedulers = list(self.schedulers.values())
        self.schedulers.clear()
        await asyncio.gather(*(s.stop() for s in schedulers))

    def _record(self, op: str, name: str) -> None:
        self.calls[op] += 1
        self.call_times.append((time.monotonic(), op, name))

    async def _deliver(self, name: str, msg: dict[str, Any]) -> None:
        if self.backend is not None:
            await self.backend.on_cluster_heartbeat(name, msg)
            return
        scheduler = self.schedulers.get(name)
        if scheduler is None:
            raise RuntimeError(f"no fake scheduler for {name}")
        scheduler.api_url = self.context.api_url
        await scheduler.post_heartbeat(msg)

    def _style(self, gen: AsyncIterator[dict[str, Any]]) -> StateUpdates:
        if self.config.start_style == "generator":
            return gen
        return _last(gen)

    # ---------------------------------------------------------------------------------------
    # The six operations

    def start_scheduler(self, cluster: Cluster) -> StateUpdates:
        self._record("start_scheduler", cluster.name)
        return self._style(self._start_scheduler(cluster))

    async def _start_scheduler(self, cluster: Cluster) -> AsyncIterator[dict[str, Any]]:
        cfg = self.config
        yield {"submitted": True}
        if cfg.scheduler_start_delay > 0:
            await asyncio.sleep(cfg.scheduler_start_delay)
        if cfg.scheduler_start_error:
            raise RuntimeError(cfg.scheduler_start_error)
        if cluster.name in self.schedulers:
            await self.schedulers.pop(cluster.name).stop()
        scheduler = FakeScheduler(
            name=cluster.name,
            token=cluster.token,
            heartbeat_period=cfg.heartbeat_period or float(cfg.cluster_heartbeat_period),
            send=functools.partial(self._deliver, cluster.name),
            heartbeats=cfg.scheduler_heartbeats,
        )
        self.schedulers[cluster.name] = scheduler
        await scheduler.start()
        yield {"port": scheduler.port}
        if cfg.scheduler_watch > 0:
            await asyncio.sleep(cfg.scheduler_watch)

    async def stop_scheduler(self, cluster: Cluster) -> None:
        self._record("stop_scheduler", cluster.name)
        if self._stop_failures_left > 0:
            self._stop_failures_left -= 1
            raise RuntimeError("fake stop_scheduler failure")
        scheduler = self.schedulers.pop(cluster.name, None)
        if scheduler is not None:
            await scheduler.stop()

    def start_worker(self, cluster: Cluster, worker: Worker) -> StateUpdates:
        self._record("start_worker", worker.name)
        return self._style(self._start_worker(cluster, worker))

    async def _start_worker(
        self, cluster: Cluster, worker: Worker
    ) -> AsyncIterator[dict[str, Any]]:
        cfg = self.config
        self.worker_settings[worker.name] = self.worker_config(cluster, worker)
        if self._worker_failures_left > 0:
            self._worker_failures_left -= 1
            raise RuntimeError("fake worker start failure")
        if cfg.worker_start_delay > 0:
            await asyncio.sleep(cfg.worker_start_delay)
        scheduler = self.schedulers.get(cluster.name)
        if scheduler is None:
            raise RuntimeError(f"no fake scheduler for cluster {cluster.name}")
        scheduler.launch_worker(
            worker.name, connect=cfg.workers_connect, delay=cfg.worker_connect_delay
        )
        yield {"launched": True}

    async def stop_worker(self, cluster: Cluster, worker: Worker) -> None:
        self._record("stop_worker", worker.name)
        scheduler = self.schedulers.get(cluster.name)
        if scheduler is not None:
            scheduler.kill_worker(worker.name)

    async def check_clusters(self, clusters: Sequence[Cluster]) -> list[bool]:
        self._record("check_clusters", ",".join(c.name for c in clusters))
        self.check_batches.append(len(clusters))
        if self.check_clusters_errors > 0:
            self.check_clusters_errors -= 1
            raise RuntimeError("fake check_clusters failure")
        return [c.name in self.schedulers and c.name not in self.dead_clusters for c in clusters]

    async def check_workers(self, workers: Sequence[tuple[Cluster, Worker]]) -> list[bool]:
        self._record("check_workers", ",".join(w.name for _, w in workers))
        if self.check_workers_errors > 0:
            self.check_workers_errors -= 1
            raise RuntimeError("fake check_workers failure")
        out = []
        for cluster, worker in workers:
            scheduler = self.schedulers.get(cluster.name)
            out.append(
                scheduler is not None
                and worker.name in scheduler.launched
                and worker.name not in self.dead_workers
            )
        return out

    async def failure_reason(self, cluster: Cluster) -> str | None:
        return self.dead_clusters.get(cluster.name)


async def _last(gen: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """Run a state generator to its end and return its merged states (the awaitable style)."""
    state: dict[str, Any] = {}
    async for update in gen:
        state.update(update)
    return state

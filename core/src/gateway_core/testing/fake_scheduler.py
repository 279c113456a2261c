"""A stand-in for a Dask scheduler and its workers that speaks the gateway's scheduler protocol.

Owns `FakeScheduler` (serves ``POST /api/comm``, heartbeats, tracks fake workers) and the
command line that runs one as a real process, or a fake worker that registers with one:
``python -m gateway_core.testing.fake_scheduler [worker --name N --scheduler-api URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from ..models import DEFAULT_GROUP, group_of_worker

log = logging.getLogger("gateway.testing.fake_scheduler")

Sender = Callable[[dict[str, Any]], Awaitable[None]]
"""Delivers one heartbeat message; raises when the gateway refuses it."""


class FakeScheduler:
    """A fake scheduler of cluster ``name`` living in this process.

    It serves, on one loopback port, ``POST /api/comm`` (``scale`` and ``adapt``, checked
    against ``token``), ``POST``/``DELETE /api/workers/{name}`` (fake worker processes register
    and ping there) and ``GET /status`` (a stand-in dashboard). It heartbeats every
    ``heartbeat_period`` seconds and at once on every change, through ``send`` if given, else
    by HTTP to ``{api_url}/v1/clusters/{name}/heartbeat``. Workers registered over HTTP that
    stop pinging for ``worker_timeout`` seconds are dropped and reported closed.
    """

    def __init__(
        self,
        *,
        name: str,
        token: str,
        heartbeat_period: float,
        send: Sender | None = None,
        api_url: str = "",
        heartbeats: bool = True,
        worker_timeout: float = 2.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.name = name
        self.token = token
        self.heartbeat_period = heartbeat_period
        self.send = send
        self.api_url = api_url
        self.paused = not heartbeats
        self.worker_timeout = worker_timeout
        self.host = host
        self.count = 0
        self.group_counts: dict[str, int] = {}
        """Workers wanted per named worker group."""
        self.adapt: dict[str, Any] | None = None
        self.comm_log: list[dict[str, Any]] = []
        self.comm_peers: list[tuple[str, int]] = []
        """The client address of each ``/api/comm`` request (one per request: a reused
        connection repeats its address)."""
        self.workers: dict[str, float | None] = {}
        """Connected workers → monotonic time of the last ping (None: never expires)."""
        self.launched: set[str] = set()
        """Workers whose (fake) process was launched and not yet stopped."""
        self.closed: set[str] = set()
        self.retired: set[str] = set()
        """Workers this scheduler retired; their pings are answered 410 Gone."""
        self.heartbeats_sent = 0
        self.last_error: str | None = None
        self.port = 0
        self._wake = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._connects: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    # ---------------------------------------------------------------------------------------
    # Addresses

    @property
    def scheduler_address(self) -> str:
        return f"tls://{self.host}:{self.port}"

    @property
    def dashboard_address(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_address(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---------------------------------------------------------------------------------------
    # Life cycle

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/comm", self._handle_comm)
        app.router.add_post("/api/workers/{worker}", self._handle_worker_ping)
        app.router.add_delete("/api/workers/{worker}", self._handle_worker_leave)
        app.router.add_get("/status", self._handle_status)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        # A restart keeps the port it had (a scheduler coming back where it was).
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._loop_task = asyncio.create_task(self._heartbeat_loop(), name=f"fake-hb-{self.name}")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self._connects.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._connects.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def pause(self) -> None:
        """Stop heartbeating (the scheduler hangs or its network is cut)."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.poke()

    def poke(self) -> None:
        """Heartbeat at once."""
        self._wake.set()

    # ---------------------------------------------------------------------------------------
    # Scheduler behaviour

    def message(self) -> dict[str, Any]:
        """The heartbeat message as PROTOCOL.md has it."""
        return {
            "scheduler_address": self.scheduler_address,
            "dashboard_address": self.dashboard_address,
            "api_address": self.api_address,
            "count": self.count,
            "group_counts": dict(self.group_counts),
            "active_workers": sorted(self.workers),
            "closing_workers": [],
            "closed_workers": sorted(self.closed),
        }

    def scale(self, count: int, group: str = DEFAULT_GROUP) -> None:
        """Want ``count`` workers of ``group``; retire the surplus of its connected ones
        (reported closed)."""
        if group == DEFAULT_GROUP:
            self.count = count
        else:
            self.group_counts[group] = count
        members = sorted(w for w in self.workers if group_of_worker(self.name, w) == group)
        surplus = len(members) - count
        if surplus > 0:
            for worker in members[-surplus:]:
                self.retired.add(worker)
                self.disconnect_worker(worker)
        self.poke()

    def launch_worker(self, name: str, *, connect: bool = True, delay: float = 0.0) -> None:
        """A fake worker process of this cluster was started; it connects after ``delay``."""
        self.launched.add(name)
        if connect:
            self._connects[name] = asyncio.create_task(self._connect_later(name, delay))

    def kill_worker(self, name: str) -> None:
        """The worker process is gone (stopped, or died)."""
        self.launched.discard(name)
        task = self._connects.pop(name, None)
        if task is not None:
            task.cancel()
        self.disconnect_worker(name)

    def connect_worker(self, name: str, *, expires: bool = False) -> None:
        self.workers[name] = time.monotonic() if expires else None
        self.closed.discard(name)
        self.poke()

    def disconnect_worker(self, name: str) -> None:
        if self.workers.pop(name, "absent") != "absent":
            self.closed.add(name)
            self.poke()

    async def _connect_later(self, name: str, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        self._connects.pop(name, None)
        self.connect_worker(name)

    def _expire_workers(self) -> None:
        now = time.monotonic()
        for name, last in list(self.workers.items()):
            if last is not None and now - last > self.worker_timeout:
                log.info("Fake worker %s stopped pinging", name)
                self.disconnect_worker(name)

    async def _heartbeat_loop(self) -> None:
        while True:
            self._wake.clear()
            self._expire_workers()
            if not self.paused:
                msg = self.message()
                try:
                    await self._send(msg)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - keep heartbeating, like a scheduler
                    self.last_error = str(exc) or type(exc).__name__
                    log.debug("Heartbeat of %s refused: %s", self.name, self.last_error)
                else:
                    self.heartbeats_sent += 1
                    self.last_error = None
                    self.closed -= set(msg["closed_workers"])
            timeout = self.heartbeat_period if self.heartbeat_period > 0 else None
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _send(self, msg: dict[str, Any]) -> None:
        if self.send is not None:
            await self.send(msg)
        else:
            await self.post_heartbeat(msg)

    async def post_heartbeat(self, msg: dict[str, Any]) -> None:
        """Send ``msg`` by HTTP to the gateway API; raise on an error status."""
        if not self.api_url:
            raise RuntimeError("no api_url to heartbeat to")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        url = f"{self.api_url.rstrip('/')}/v1/clusters/{self.name}/heartbeat"
        headers = {"Authorization": f"token {self.token}"}
        async with self._session.post(url, json=msg, headers=headers) as resp:
            if resp.status >= 400:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")

    # ---------------------------------------------------------------------------------------
    # HTTP handlers

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization", "") == f"token {self.token}"

    async def _handle_comm(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "bad or missing token"}, status=403)
        try:
            msg = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        if not isinstance(msg, dict):
            return web.json_response({"error": "body must be an object"}, status=400)
        self.comm_log.append(msg)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.comm_peers.append((str(peer[0]), int(peer[1])))
        op = msg.get("op")
        if op == "scale":
            count = msg.get("count")
            if type(count) is not int or count < 0:
                return web.json_response({"error": "count must be an int >= 0"}, status=422)
            group = msg.get("group", DEFAULT_GROUP)
            if not isinstance(group, str):
                return web.json_response({"error": "group must be a string"}, status=422)
            self.adapt = None
            self.scale(count, group)
        elif op == "adapt":
            self.adapt = {k: msg.get(k) for k in ("minimum", "maximum", "active")}
            if "group" in msg:
                self.adapt["group"] = msg["group"]
            self.poke()
        else:
            return web.json_response({"error": f"unknown op {op!r}"}, status=400)
        return web.json_response({"ok": True})

    async def _handle_worker_ping(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "bad or missing token"}, status=403)
        name = request.match_info["worker"]
        if name in self.retired:
            return web.json_response({"error": f"worker {name} was retired"}, status=410)
        if name not in self.workers:
            log.info("Fake worker %s connected", name)
            self.connect_worker(name, expires=True)
        else:
            self.workers[name] = time.monotonic()
        return web.json_response({"ok": True})

    async def _handle_worker_leave(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "bad or missing token"}, status=403)
        self.disconnect_worker(request.match_info["worker"])
        return web.json_response({"ok": True})

    async def _handle_status(self, request: web.Request) -> web.Response:
        workers = ", ".join(sorted(self.workers)) or "none"
        return web.Response(
            text=f"<html><body>fake dashboard of {self.name}; workers: {workers}</body></html>",
            content_type="text/html",
        )


# -------------------------------------------------------------------------------------------
# Running as a process
# -------------------------------------------------------------------------------------------


def _require_env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise SystemExit(f"fake_scheduler: environment variable {name} is not set")
    return value


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_scheduler(*, heartbeat_period: float, worker_timeout: float, host: str) -> None:
    """Run a FakeScheduler heartbeating over HTTP, configured from the DASK_GATEWAY_* env."""
    scheduler = FakeScheduler(
        name=_require_env("DASK_GATEWAY_CLUSTER_NAME"),
        token=_require_env("DASK_GATEWAY_API_TOKEN"),
        api_url=_require_env("DASK_GATEWAY_API_URL"),
        heartbeat_period=heartbeat_period,
        worker_timeout=worker_timeout,
        host=host,
    )
    await scheduler.start()
    print(json.dumps({"api_address": scheduler.api_address}), flush=True)
    try:
        await _until_signalled()
    finally:
        await scheduler.stop()


async def run_worker(*, name: str, scheduler_api: str, ping_period: float) -> None:
    """Register worker ``name`` with the fake scheduler at ``scheduler_api`` and ping it until
    signalled; then say goodbye."""
    token = os.environ.get("DASK_GATEWAY_API_TOKEN", "")
    headers = {"Authorization": f"token {token}"} if token else {}
    url = f"{scheduler_api.rstrip('/')}/api/workers/{name}"
    stopped = asyncio.create_task(_until_signalled())
    try:
        await _ping_until(stopped, name=name, url=url, headers=headers, period=ping_period)
    finally:
        stopped.cancel()


async def _ping_until(
    stopped: asyncio.Task[None], *, name: str, url: str, headers: dict[str, str], period: float
) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while not stopped.done():
            try:
                async with session.post(url, headers=headers) as resp:
                    if resp.status == 410:
                        log.info("Worker %s was retired by its scheduler; exiting", name)
                        return
                    if resp.status >= 400:
                        log.warning("Scheduler refused worker %s: HTTP %d", name, resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("Cannot reach the scheduler at %s: %s", url, exc)
            await asyncio.wait({stopped}, timeout=period)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.delete(url, headers=headers):
                pass


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gateway_core.testing.fake_scheduler",
        description="A fake Dask scheduler (default) or worker speaking the gateway protocol.",
    )
    parser.add_argument("--heartbeat-period", type=float, default=1.0)
    parser.add_argument("--worker-timeout", type=float, default=2.0)
    parser.add_argument("--host", default="127.0.0.1")
    sub = parser.add_subparsers(dest="role")
    worker = sub.add_parser("worker", help="run a fake worker")
    worker.add_argument("--name", required=True)
    worker.add_argument("--scheduler-api", required=True, help="the scheduler's api_address")
    worker.add_argument("--ping-period", type=float, default=0.5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if args.role == "worker":
        asyncio.run(
            run_worker(
                name=args.name, scheduler_api=args.scheduler_api, ping_period=args.ping_period
            )
        )
    else:
        asyncio.run(
            run_scheduler(
                heartbeat_period=args.heartbeat_period,
                worker_timeout=args.worker_timeout,
                host=args.host,
            )
        )


if __name__ == "__main__":
    main()

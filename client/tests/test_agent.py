"""Unit tests of the scheduler agent against a fake gateway, with in-process Dask servers.

Owns `HeartbeatSink` (a fake gateway API taking heartbeats and DELETEs) and the agent's tests.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import dask
import pytest
from aiohttp import web
from distributed import Client, Scheduler, Worker
from distributed.core import Status
from tornado import web as tornado_web

from gateway_client.agent import (
    PLUGIN_NAME,
    AgentConfigError,
    AgentSettings,
    GatewayAgent,
)

pytestmark = pytest.mark.unit

TOKEN = "0123456789abcdef" * 4
CLUSTER = "c0ffee"
HEARTBEAT_KEYS = {
    "scheduler_address",
    "dashboard_address",
    "api_address",
    "count",
    "group_counts",
    "active_workers",
    "closing_workers",
    "closed_workers",
}


class HeartbeatSink:
    """The gateway's side of the agent's calls: records heartbeats and DELETEs.

    ``status`` is the answer to heartbeats (change it to make the gateway fail or forget).
    """

    def __init__(self) -> None:
        self.beats: list[dict[str, Any]] = []
        self.answers: list[int] = []
        self.beat_times: list[float] = []
        self.auth: list[str] = []
        self.deletes: list[str] = []
        self.status = 200
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v1/clusters/{name}/heartbeat", self._heartbeat)
        app.router.add_delete("/api/v1/clusters/{name}", self._delete)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/api"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _heartbeat(self, request: web.Request) -> web.Response:
        assert request.match_info["name"] == CLUSTER
        self.auth.append(request.headers.get("Authorization", ""))
        msg = await request.json()
        async with self._changed:
            self.beats.append(msg)
            self.beat_times.append(time.monotonic())
            self._changed.notify_all()
        self.answers.append(self.status)
        if self.status >= 400:
            return web.json_response({"error": "told to fail"}, status=self.status)
        return web.json_response({})

    async def _delete(self, request: web.Request) -> web.Response:
        async with self._changed:
            self.deletes.append(request.headers.get("Authorization", ""))
            self._changed.notify_all()
        return web.Response(status=204)

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], *, after: int = 0, timeout: float = 5
    ) -> dict[str, Any]:
        """The first heartbeat from index ``after`` on that satisfies ``predicate``."""

        def found() -> dict[str, Any] | None:
            return next((b for b in self.beats[after:] if predicate(b)), None)

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: found() is not None), timeout)
            except TimeoutError:
                raise AssertionError(
                    f"no matching heartbeat in {timeout}s; got {self.beats[after:]}"
                ) from None
        beat = found()
        assert beat is not None
        return beat

    def position(self, beat: dict[str, Any]) -> int:
        """The index of ``beat`` (by identity: many heartbeats are equal)."""
        return next(i for i, b in enumerate(self.beats) if b is beat)

    async def wait_for_delete(self, timeout: float) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: bool(self.deletes)), timeout)


@pytest.fixture
async def sink() -> AsyncIterator[HeartbeatSink]:
    gateway = HeartbeatSink()
    await gateway.start()
    yield gateway
    await gateway.stop()


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def settings(url: str, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "api_url": url,
        "api_token": TOKEN,
        "cluster_name": CLUSTER,
        "api_address": "127.0.0.1:0",
        "heartbeat_period": 60.0,
        "heartbeat_coalesce": 0.05,
        "adaptive_period": 0.1,
        "request_timeout": 2.0,
    }
    values.update(overrides)
    return AgentSettings(**values)


@asynccontextmanager
async def running_agent(url: str, **overrides: Any) -> AsyncIterator[GatewayAgent]:
    async with Scheduler(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0") as s:
        agent = GatewayAgent(scheduler=s, settings=settings(url, **overrides))
        await agent.start()
        try:
            yield agent
        finally:
            await agent.stop()


async def comm(
    agent: GatewayAgent, body: Any, *, token: str | None = TOKEN, raw: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"token {token}"} if token is not None else {}
    data = raw if raw is not None else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{agent.api_address}/api/comm", data=data, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


# ----------------------------------------------------------------------------------------------
# Heartbeats
# ----------------------------------------------------------------------------------------------


async def test_heartbeat_shape_and_cadence(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url, heartbeat_period=0.2) as agent:
        started = time.monotonic()  # the scheduler is up (importing bokeh may take a while)
        await sink.wait_for(lambda b: True, after=3)
        s = agent.scheduler
        first = sink.beats[0]
        assert set(first) == HEARTBEAT_KEYS
        dashboard = first.pop("dashboard_address")
        if importlib.util.find_spec("bokeh") is None:
            assert dashboard == ""  # no bokeh, no dashboard to route to
        else:
            assert dashboard.startswith("http://127.0.0.1:")
        assert first == {
            "scheduler_address": s.address,
            "api_address": agent.api_address,
            "count": 0,
            "group_counts": {},
            "active_workers": [],
            "closing_workers": [],
            "closed_workers": [],
        }
        assert s.address.startswith("tcp://127.0.0.1:")
        assert agent.api_address.startswith("http://127.0.0.1:")
        assert sink.auth[0] == f"token {TOKEN}"
        # The first heartbeat goes at once, the next ones every period.
        assert sink.beat_times[0] - started < 1.0
        gaps = [b - a for a, b in zip(sink.beat_times[:3], sink.beat_times[1:4], strict=True)]
        assert all(0.15 < gap < 0.6 for gap in gaps), gaps


async def test_dashboard_address_reported_when_the_scheduler_has_a_dashboard(
    sink: HeartbeatSink,
) -> None:
    async with running_agent(sink.url) as agent:
        s = agent.scheduler
        if importlib.util.find_spec("bokeh") is None:
            assert agent.heartbeat_message()["dashboard_address"] == ""
            # What distributed.dashboard.scheduler.connect does when bokeh is installed.
            s.http_application.add_application(tornado_web.Application())
        port = s.services["dashboard"].port
        assert agent.heartbeat_message()["dashboard_address"] == f"http://127.0.0.1:{port}"


async def test_worker_join_and_leave_heartbeat_at_once(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url) as agent:
        await sink.wait_for(lambda b: True)
        agent.scale(1)
        async with Worker(agent.scheduler.address, name="w-1", nthreads=1):
            beat = await sink.wait_for(lambda b: b["active_workers"] == ["w-1"], timeout=3)
            assert beat["count"] == 1
            n = len(sink.beats)
        # Left without being retired: reported closed, once the gateway acknowledged it, no more.
        beat = await sink.wait_for(lambda b: b["closed_workers"] == ["w-1"], after=n, timeout=3)
        assert beat["active_workers"] == []
        await eventually(lambda: agent.book.report().closed == [])
        assert agent.heartbeat_message()["closed_workers"] == []


async def test_burst_of_changes_sends_one_heartbeat(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url, heartbeat_coalesce=0.3) as agent:
        await sink.wait_for(lambda b: True)
        n = len(sink.beats)
        for count in (1, 2, 3, 4):
            status, _ = await comm(agent, {"op": "scale", "count": count})
            assert status == 200
        await sink.wait_for(lambda b: b["count"] == 4, after=n)
        await asyncio.sleep(0.4)
        assert [b["count"] for b in sink.beats[n:]] == [4]


async def test_closed_workers_reported_until_acknowledged(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url, heartbeat_period=0.1) as agent:
        agent.scale(1)
        async with Worker(agent.scheduler.address, name="w-1", nthreads=1):
            await sink.wait_for(lambda b: b["active_workers"] == ["w-1"])
            sink.status = 500
            n = len(sink.beats)
        await sink.wait_for(lambda b: b["closed_workers"] == ["w-1"], after=n)
        # Refused heartbeats: the closed name is sent again and again.
        await sink.wait_for(lambda b: True, after=len(sink.beats) + 1, timeout=5)
        assert all(b["closed_workers"] == ["w-1"] for b in sink.beats[-2:])
        sink.status = 200
        accepted = await sink.wait_for(lambda b: True, after=len(sink.beats))
        assert accepted["closed_workers"] == ["w-1"]
        assert sink.answers[sink.position(accepted)] == 200
        after_ack = await sink.wait_for(lambda b: True, after=sink.position(accepted) + 1)
        assert after_ack["closed_workers"] == []


async def test_zero_period_heartbeats_only_on_changes(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url, heartbeat_period=0) as agent:
        await sink.wait_for(lambda b: True)  # the first one still goes at once
        await asyncio.sleep(0.3)
        assert len(sink.beats) == 1
        agent.scale(2)
        await sink.wait_for(lambda b: b["count"] == 2)
        await asyncio.sleep(0.3)
        assert len(sink.beats) == 2


async def test_heartbeat_failures_are_tolerated(sink: HeartbeatSink) -> None:
    sink.status = 500
    async with running_agent(sink.url, heartbeat_period=0.1) as agent:
        await sink.wait_for(lambda b: True, after=2)
        sink.status = 401  # not "cluster unknown": keep trying
        n = len(sink.beats)
        await sink.wait_for(lambda b: True, after=n + 1)
        sink.status = 200
        await sink.wait_for(lambda b: True, after=len(sink.beats))
        assert agent.scheduler.status == Status.running
        assert not agent._tasks["heartbeat"].done()


async def test_unreachable_gateway_is_tolerated(sink: HeartbeatSink) -> None:
    url = sink.url
    await sink.stop()  # nothing listens there any more
    async with running_agent(url, heartbeat_period=0.1) as agent:
        await asyncio.sleep(0.5)
        assert agent.scheduler.status == Status.running
        assert not agent._tasks["heartbeat"].done()
        status, answer = await comm(agent, {"op": "scale", "count": 2})
        assert (status, answer["count"]) == (200, 2)


@pytest.mark.parametrize("status", [404, 409])
async def test_gateway_forgetting_the_cluster_closes_the_scheduler(
    sink: HeartbeatSink, status: int
) -> None:
    sink.status = status
    async with Scheduler(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0") as s:
        agent = GatewayAgent(scheduler=s, settings=settings(sink.url))
        await agent.start()
        await asyncio.wait_for(s.finished(), 5)
        assert s.status == Status.closed
        assert PLUGIN_NAME not in s.plugins  # the agent stopped with the scheduler
        assert len(sink.beats) == 1
        with pytest.raises(aiohttp.ClientConnectionError):
            await comm(agent, {"op": "scale", "count": 1})


# ----------------------------------------------------------------------------------------------
# The HTTP API
# ----------------------------------------------------------------------------------------------


async def test_scale_via_comm_updates_count(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url) as agent:
        await sink.wait_for(lambda b: True)
        status, answer = await comm(agent, {"op": "scale", "count": 3})
        assert status == 200
        assert answer == {
            "ok": True,
            "group": "default",
            "count": 3,
            "adaptive": False,
            "minimum": None,
            "maximum": None,
        }
        beat = await sink.wait_for(lambda b: b["count"] == 3)
        assert beat["active_workers"] == []  # pending workers are the gateway's business


async def test_comm_checks_the_token(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url) as agent:
        body = {"op": "scale", "count": 2}
        status, answer = await comm(agent, body, token=None)
        assert status == 401
        assert "token" in answer["error"]
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{agent.api_address}/api/comm",
                json=body,
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as resp,
        ):
            assert resp.status == 401
        status, answer = await comm(agent, body, token=TOKEN[:-1] + "0")
        assert status == 403
        assert answer == {"error": "the token is not this cluster's token"}
        assert agent.target == 0
        status, _ = await comm(agent, body)
        assert status == 200
        assert agent.target == 2


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "op is required"),
        (b'{"op": "explode"}', "op must be one of 'scale', 'adapt', got \"explode\""),
        (b'{"op": "scale"}', "count is required"),
        (b'{"op": "scale", "count": -1}', "count must be a non-negative integer, got -1"),
        (b'{"op": "scale", "count": "3"}', 'count must be a non-negative integer, got "3"'),
        (b'{"op": "scale", "count": 1.5}', "count must be a non-negative integer, got 1.5"),
        (b'{"op": "scale", "count": true}', "count must be a non-negative integer, got true"),
        (b'{"op": "adapt", "minimum": 4, "maximum": 2}', "minimum (4) must not exceed maximum (2)"),
        (b'{"op": "adapt", "maximum": -2}', "maximum must be a non-negative integer"),
        (b'{"op": "adapt", "active": "yes"}', 'active must be true or false, got "yes"'),
        (b'{"op": "scale", "count": 1, "group": 3}', "group must be a worker group name, got 3"),
        (b'{"op": "adapt", "group": ""}', 'group must be a worker group name, got ""'),
    ],
)
async def test_comm_rejects_bad_bodies(sink: HeartbeatSink, raw: bytes, problem: str) -> None:
    async with running_agent(sink.url) as agent:
        status, answer = await comm(agent, None, raw=raw)
        assert status == 422
        assert problem in answer["error"]
        assert (agent.target, agent.adaptive) == (0, None)


async def test_unknown_routes_answer_json_404(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url) as agent, aiohttp.ClientSession() as session:
        async with session.get(f"{agent.api_address}/api/nothing") as resp:
            assert resp.status == 404
            assert await resp.json() == {"error": "no route /api/nothing"}
        async with session.get(f"{agent.api_address}/api/health") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "pass"})


# ----------------------------------------------------------------------------------------------
# Scaling down
# ----------------------------------------------------------------------------------------------


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def test_scale_down_retires_idle_workers_first(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url) as agent:
        s = agent.scheduler
        agent.scale(3)
        async with (
            Worker(s.address, name="busy", nthreads=1) as busy,
            Worker(s.address, name="holder", nthreads=1) as holder,
            Worker(s.address, name="empty", nthreads=1) as empty,
            Client(s.address, asynchronous=True) as client,
        ):
            await sink.wait_for(lambda b: len(b["active_workers"]) == 3)
            running = client.submit(slow, 3, workers=[busy.address], pure=False)
            [data] = await client.scatter([list(range(1000))], workers=[holder.address])
            await eventually(lambda: bool(s.workers[busy.address].processing))

            n = len(sink.beats)
            status, _ = await comm(agent, {"op": "scale", "count": 2})
            assert status == 200
            closing = await sink.wait_for(lambda b: b["closing_workers"] == ["empty"], after=n)
            assert closing["active_workers"] == ["busy", "holder"]
            assert closing["count"] == 2
            closed = await sink.wait_for(lambda b: b["closed_workers"] == ["empty"], after=n)
            assert closed["closing_workers"] == []
            assert empty.status in (Status.closing, Status.closed)

            n = len(sink.beats)
            agent.scale(1)
            await sink.wait_for(lambda b: b["closing_workers"] == ["holder"], after=n)
            closed = await sink.wait_for(lambda b: b["closed_workers"] == ["holder"], after=n)
            assert closed["active_workers"] == ["busy"]
            assert holder.status in (Status.closing, Status.closed)
            # Its data moved to the remaining worker rather than being lost.
            assert await client.gather(data) == list(range(1000))
            assert list(s.workers) == [busy.address]
            await running.cancel()


async def test_scale_down_of_a_group_retires_only_its_workers(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url) as agent:
        s = agent.scheduler
        status, answer = await comm(agent, {"op": "scale", "count": 2, "group": "gpu"})
        assert (status, answer["group"], answer["count"]) == (200, "gpu", 2)
        agent.scale(1)
        cpu, gpu1, gpu2 = f"{CLUSTER}-ab12", f"{CLUSTER}-gpu-cd34", f"{CLUSTER}-gpu-ef56"
        async with (
            Worker(s.address, name=cpu, nthreads=1),
            Worker(s.address, name=gpu1, nthreads=1),
            Worker(s.address, name=gpu2, nthreads=1),
        ):
            beat = await sink.wait_for(lambda b: len(b["active_workers"]) == 3)
            assert (beat["count"], beat["group_counts"]) == (1, {"gpu": 2})
            assert agent.active_counts() == {"default": 1, "gpu": 2}
            n = len(sink.beats)
            status, _ = await comm(agent, {"op": "scale", "count": 1, "group": "gpu"})
            assert status == 200
            closed = await sink.wait_for(lambda b: len(b["closed_workers"]) == 1, after=n)
            assert closed["closed_workers"][0] in (gpu1, gpu2)
            assert cpu in closed["active_workers"]  # the default group keeps its worker
            assert (closed["count"], closed["group_counts"]) == (1, {"gpu": 1})


def test_adaptive_shares_the_schedulers_target_among_adaptive_groups() -> None:
    class FakeScheduler:
        wanted = 0

        def adaptive_target(self) -> int:
            return self.wanted

    scheduler = FakeScheduler()
    agent = GatewayAgent(scheduler=scheduler, settings=settings("http://127.0.0.1:9/api"))  # type: ignore[arg-type]
    agent._stopped = True  # no adaptive task: checks run by hand
    agent.scale(2, group="fixed")  # not adaptive: its 2 come off the scheduler's target
    agent.adapt(minimum=1, maximum=3)
    agent.adapt(minimum=0, maximum=2, group="gpu")
    scheduler.wanted = 0
    assert agent.desired_per_group() == {"default": 1, "gpu": 0}
    scheduler.wanted = 5  # 3 after the fixed group: the default's minimum, then one each
    assert agent.desired_per_group() == {"default": 2, "gpu": 1}
    scheduler.wanted = 50  # each group stops at its own maximum
    assert agent.desired_per_group() == {"default": 3, "gpu": 2}
    agent._adapt_once({})
    assert agent.targets == {"default": 3, "fixed": 2, "gpu": 2}
    agent.scale(0, group="gpu")  # a scale request ends that group's adaptive scaling only
    assert set(agent.bounds) == {"default"}
    assert agent.desired_per_group() == {"default": 3}


async def test_scale_to_zero_closes_every_worker(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url) as agent:
        s = agent.scheduler
        agent.scale(1)
        async with (
            Worker(s.address, name="only", nthreads=1),
            Client(s.address, asynchronous=True) as client,
        ):
            held = await client.scatter([1, 2, 3])  # data with nowhere else to go
            await sink.wait_for(lambda b: b["active_workers"] == ["only"])
            agent.scale(0)
            beat = await sink.wait_for(lambda b: b["closed_workers"] == ["only"])
            assert (beat["count"], beat["active_workers"]) == (0, [])
            assert not s.workers
            del held


async def test_late_worker_beyond_the_target_is_retired(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url) as agent:
        s = agent.scheduler
        agent.scale(1)
        async with Worker(s.address, name="w-1", nthreads=1):
            await sink.wait_for(lambda b: b["active_workers"] == ["w-1"])
            # The gateway had started a second worker before a scale down reached it.
            async with Worker(s.address, name="w-2", nthreads=1):
                beat = await sink.wait_for(lambda b: b["closed_workers"] == ["w-2"])
                assert beat["active_workers"] == ["w-1"]
                assert beat["count"] == 1


async def test_failed_retirement_is_reported_and_retried(
    sink: HeartbeatSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_agent(sink.url) as agent:
        s = agent.scheduler
        agent.scale(2)
        async with Worker(s.address, name="w-1", nthreads=1), Worker(s.address, name="w-2"):
            await sink.wait_for(lambda b: len(b["active_workers"]) == 2)
            real_retire = s.retire_workers

            async def broken_retire(**kwargs: Any) -> dict[str, Any]:
                raise OSError("lost the worker's comm")

            monkeypatch.setattr(s, "retire_workers", broken_retire)
            monkeypatch.setattr(agent, "retire_retry_delay", 0.3)
            n = len(sink.beats)
            agent.scale(1)
            closing = await sink.wait_for(lambda b: len(b["closing_workers"]) == 1, after=n)
            victim = closing["closing_workers"][0]
            # The retirement failed: the worker is reported active again ...
            beat = await sink.wait_for(lambda b: len(b["active_workers"]) == 2, after=n)
            assert (beat["closing_workers"], beat["count"]) == ([], 1)
            # ... and retired on the next attempt.
            monkeypatch.setattr(s, "retire_workers", real_retire)
            beat = await sink.wait_for(lambda b: b["closed_workers"] == [victim], after=n)
            assert len(beat["active_workers"]) == 1
            assert len(s.workers) == 1


# ----------------------------------------------------------------------------------------------
# Adaptive scaling
# ----------------------------------------------------------------------------------------------


async def test_adapt_clamps_the_target_at_once(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url, adaptive_period=60.0) as agent:
        status, answer = await comm(agent, {"op": "adapt", "minimum": 2, "maximum": 4})
        assert status == 200
        assert answer == {
            "ok": True,
            "group": "default",
            "count": 2,
            "adaptive": True,
            "minimum": 2,
            "maximum": 4,
        }
        await sink.wait_for(lambda b: b["count"] == 2)
        agent.scale(7)
        status, answer = await comm(agent, {"op": "adapt", "maximum": 5, "active": True})
        assert (answer["count"], answer["minimum"], answer["maximum"]) == (5, 0, 5)
        # A scale request switches adaptive scaling off; adapt with active false too.
        status, answer = await comm(agent, {"op": "scale", "count": 1})
        assert (answer["count"], answer["adaptive"]) == (1, False)
        assert "adaptive" not in agent._tasks
        await comm(agent, {"op": "adapt", "minimum": 1, "maximum": 3})
        status, answer = await comm(agent, {"op": "adapt", "active": False})
        assert (answer["count"], answer["adaptive"]) == (1, False)


async def test_adaptive_follows_load_within_bounds(sink: HeartbeatSink) -> None:
    with dask.config.set({"distributed.adaptive.target-duration": "50ms"}):
        async with running_agent(sink.url, adaptive_period=0.05, adaptive_wait_count=3) as agent:
            s = agent.scheduler
            agent.scale(1)
            async with (
                Worker(s.address, name="w-1", nthreads=2),
                Client(s.address, asynchronous=True) as client,
            ):
                status, _ = await comm(agent, {"op": "adapt", "minimum": 1, "maximum": 3})
                assert status == 200
                await asyncio.sleep(0.3)
                assert agent.target == 1  # idle: stays at the minimum

                n = len(sink.beats)
                futures = client.map(slow, [0.1] * 16, pure=False)
                await sink.wait_for(lambda b: b["count"] == 3, after=n)  # capped at maximum
                assert max(b["count"] for b in sink.beats) == 3
                await client.gather(futures)

                n = len(sink.beats)
                await sink.wait_for(lambda b: b["count"] == 1, after=n, timeout=5)
                assert agent.target == 1
                assert agent.heartbeat_message()["active_workers"] == ["w-1"]


async def test_adaptive_waits_before_scaling_down(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url, adaptive_period=0.05, adaptive_wait_count=4) as agent:
        agent.scale(3)
        agent.adapt(minimum=0, maximum=5)
        s = agent.scheduler
        assert s.adaptive_target() == 0
        # Not on the first check that finds less to do, but after four in a row.
        await asyncio.sleep(0.1)
        assert agent.target == 3
        for _ in range(100):
            if agent.target == 0:
                break
            await asyncio.sleep(0.02)
        assert agent.target == 0


# ----------------------------------------------------------------------------------------------
# Idle timeout
# ----------------------------------------------------------------------------------------------


async def test_idle_timeout_asks_the_gateway_to_stop(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url, idle_timeout=0.4) as agent:
        started = time.monotonic()
        await sink.wait_for_delete(timeout=3)
        assert time.monotonic() - started >= 0.35
        assert sink.deletes == [f"token {TOKEN}"]
        await eventually(lambda: agent.stop_requested)
        await asyncio.sleep(0.3)
        assert len(sink.deletes) == 1  # asked once


async def test_connected_client_and_work_keep_the_cluster_alive(sink: HeartbeatSink) -> None:
    async with running_agent(sink.url, idle_timeout=0.3) as agent:
        s = agent.scheduler
        agent.scale(1)
        async with Worker(s.address, name="w-1", nthreads=1):
            async with Client(s.address, asynchronous=True) as client:
                await asyncio.sleep(0.6)
                assert await client.submit(slow, 0.5) == 0.5
                assert sink.deletes == []
            quiet = time.monotonic()
            await sink.wait_for_delete(timeout=3)
            assert time.monotonic() - quiet >= 0.25


# ----------------------------------------------------------------------------------------------
# Preload and settings
# ----------------------------------------------------------------------------------------------


async def test_preload_runs_the_agent(sink: HeartbeatSink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASK_GATEWAY_API_URL", sink.url)
    monkeypatch.setenv("DASK_GATEWAY_API_TOKEN", TOKEN)
    monkeypatch.setenv("DASK_GATEWAY_CLUSTER_NAME", CLUSTER)
    monkeypatch.setenv("DASK_GATEWAY_HEARTBEAT_PERIOD", "30")
    monkeypatch.setenv("DASK_GATEWAY_IDLE_TIMEOUT", "0")
    async with Scheduler(
        host="127.0.0.1",
        port=0,
        dashboard_address="127.0.0.1:0",
        preload=["gateway_client.agent"],
        preload_argv=["--dg-heartbeat-period", "0.1", "--dg-api-address", "127.0.0.1:0"],
    ) as s:
        agent = GatewayAgent.of(s)
        assert agent is not None
        assert agent.settings.heartbeat_period == 0.1  # the option beats the environment
        assert agent.settings.adaptive_period == 3.0
        await sink.wait_for(lambda b: True, after=2)
        assert sink.beats[0]["api_address"] == agent.api_address
    assert agent._stopped
    with pytest.raises(aiohttp.ClientConnectionError):
        await comm(agent, {"op": "scale", "count": 1})


def test_settings_from_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    env = {
        "DASK_GATEWAY_API_URL": "http://gw.example:8000/api/",
        "DASK_GATEWAY_API_TOKEN": str(token_file),
        "DASK_GATEWAY_CLUSTER_NAME": CLUSTER,
        "DASK_GATEWAY_HEARTBEAT_PERIOD": "5",
        "DASK_GATEWAY_ADAPTIVE_PERIOD": "1.5",
        "DASK_GATEWAY_IDLE_TIMEOUT": "600",
        "DASK_GATEWAY_API_ADDRESS": "0.0.0.0:8788",
    }
    got = AgentSettings.from_env(env, idle_timeout=60.0)
    assert got.api_url == "http://gw.example:8000/api"
    assert got.api_token == TOKEN  # read from the file the variable names
    assert (got.heartbeat_period, got.adaptive_period, got.idle_timeout) == (5.0, 1.5, 60.0)
    assert got.api_address == "0.0.0.0:8788"
    assert TOKEN not in repr(got)

    defaults = AgentSettings.from_env({**env, "DASK_GATEWAY_API_TOKEN": "literal"}, **{})
    assert defaults.api_token == "literal"
    minimal = {k: env[k] for k in list(env)[:3]}
    got = AgentSettings.from_env(minimal)
    assert (got.heartbeat_period, got.adaptive_period, got.idle_timeout) == (15.0, 3.0, 0.0)
    assert got.api_address == ":0"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({}, "DASK_GATEWAY_API_URL, DASK_GATEWAY_API_TOKEN, DASK_GATEWAY_CLUSTER_NAME"),
        ({"DASK_GATEWAY_HEARTBEAT_PERIOD": "often"}, "DASK_GATEWAY_HEARTBEAT_PERIOD: expected"),
        ({"DASK_GATEWAY_ADAPTIVE_PERIOD": "0"}, "adaptive_period: expected a number > 0"),
        ({"DASK_GATEWAY_IDLE_TIMEOUT": "-1"}, "idle_timeout: expected a number >= 0"),
        ({"DASK_GATEWAY_API_ADDRESS": "nowhere"}, "api_address: expected host:port"),
        ({"DASK_GATEWAY_API_URL": "gw:8000/api"}, "DASK_GATEWAY_API_URL: expected an http(s)"),
    ],
)
def test_settings_errors_name_the_problem(env: dict[str, str], problem: str) -> None:
    base = {
        "DASK_GATEWAY_API_URL": "http://gw/api",
        "DASK_GATEWAY_API_TOKEN": TOKEN,
        "DASK_GATEWAY_CLUSTER_NAME": CLUSTER,
    }
    with pytest.raises(AgentConfigError) as info:
        AgentSettings.from_env({**base, **env} if env else {})
    assert problem in str(info.value)

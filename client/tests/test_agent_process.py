"""Integration tests of the scheduler agent in a real ``dask scheduler --preload`` process.

Owns the tests that launch the scheduler (and a worker) the way a gateway backend does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from test_agent import CLUSTER, TOKEN, HeartbeatSink

pytestmark = pytest.mark.integration


@pytest.fixture
async def sink() -> AsyncIterator[HeartbeatSink]:
    gateway = HeartbeatSink()
    await gateway.start()
    yield gateway
    await gateway.stop()


SRC = Path(__file__).resolve().parents[1] / "src"


def dask_command(*args: str) -> list[str]:
    """``dask <args>`` from the running interpreter's environment."""
    script = shutil.which("dask", path=os.path.dirname(sys.executable))
    if script is not None:
        return [script, *args]
    module = {
        "scheduler": "distributed.cli.dask_scheduler",
        "worker": "distributed.cli.dask_worker",
    }
    return [sys.executable, "-m", module[args[0]], *args[1:]]


def launch_env(api_url: str | None) -> dict[str, str]:
    env = dict(os.environ)
    # Compiled bytecode in a shared cache outside the repo: later launches start in ~1 s.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "gateway-agent-tests-pyc")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["DASK_GATEWAY_API_TOKEN"] = TOKEN
    env["DASK_GATEWAY_CLUSTER_NAME"] = CLUSTER
    if api_url is not None:
        env["DASK_GATEWAY_API_URL"] = api_url
    else:
        env.pop("DASK_GATEWAY_API_URL", None)
    return env


@asynccontextmanager
async def process(
    args: list[str], env: dict[str, str], log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


SCHEDULER_ARGS = [
    "--host",
    "127.0.0.1",
    "--port",
    "0",
    "--dashboard-address",
    "127.0.0.1:0",
    "--preload",
    "gateway_client.agent",
    "--dg-api-address",
    "127.0.0.1:0",
    "--dg-heartbeat-period",
    "0.5",
    "--dg-adaptive-period",
    "0.5",
    "--dg-idle-timeout",
    "0",
]


async def test_scheduler_process_heartbeats_scales_and_exits_when_forgotten(
    sink: HeartbeatSink, tmp_path: Path
) -> None:
    command = dask_command("scheduler", *SCHEDULER_ARGS)
    async with process(command, launch_env(sink.url), tmp_path / "scheduler.log") as scheduler:
        first = await sink.wait_for(lambda b: True, timeout=40)
        address = first["scheduler_address"]
        assert address.startswith("tcp://127.0.0.1:")
        assert first["api_address"].startswith("http://127.0.0.1:")
        assert (first["count"], first["active_workers"]) == (0, [])

        async with aiohttp.ClientSession(headers={"Authorization": f"token {TOKEN}"}) as session:
            comm = f"{first['api_address']}/api/comm"
            async with session.post(comm, json={"op": "scale", "count": 1}) as resp:
                assert resp.status == 200
            await sink.wait_for(lambda b: b["count"] == 1)

            worker_command = dask_command(
                "worker", address, "--name", "w-1", "--nthreads", "1", "--no-nanny"
            )
            async with process(worker_command, launch_env(None), tmp_path / "worker.log") as w:
                await sink.wait_for(lambda b: b["active_workers"] == ["w-1"], timeout=40)
                n = len(sink.beats)
                async with session.post(comm, json={"op": "scale", "count": 0}) as resp:
                    assert resp.status == 200
                await sink.wait_for(lambda b: b["closing_workers"] == ["w-1"], after=n)
                await sink.wait_for(lambda b: b["closed_workers"] == ["w-1"], after=n)
                # Retired with close_workers: the worker process exits by itself.
                assert await asyncio.wait_for(w.wait(), 20) == 0

        sink.status = 404  # the gateway forgot this cluster
        assert await asyncio.wait_for(scheduler.wait(), 20) == 0
    log = (tmp_path / "scheduler.log").read_text()
    assert "no longer knows cluster" in log


async def test_scheduler_process_exits_when_settings_are_missing(tmp_path: Path) -> None:
    command = dask_command("scheduler", *SCHEDULER_ARGS)
    log_path = tmp_path / "scheduler.log"
    async with process(command, launch_env(None), log_path) as scheduler:
        assert await asyncio.wait_for(scheduler.wait(), 40) == 1
    log = log_path.read_text()
    assert "needs the environment variable(s) DASK_GATEWAY_API_URL" in log

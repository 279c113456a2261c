"""Fixtures of the client's tests: a loop thread, the fake gateway on it, clean dask config.

Owns only fixtures; the doubles themselves live in `fakes.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

import dask
import pytest
from fakes import FakeGateway, LoopThread


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


@pytest.fixture
def fake(loop_thread: LoopThread) -> Iterator[FakeGateway]:
    """A fake gateway on its own loop thread (so blocking client calls can reach it)."""
    gateway = FakeGateway()
    loop_thread.run(gateway.start())
    yield gateway
    loop_thread.run(gateway.stop())


@pytest.fixture(autouse=True)
def _clean_gateway_config() -> Iterator[None]:
    """Each test starts from the shipped gateway.* defaults, whatever the environment says."""
    with dask.config.set(
        {
            "gateway.address": None,
            "gateway.public-address": None,
            "gateway.proxy-address": None,
            "gateway.auth.type": "basic",
            "gateway.auth.kwargs": {},
            "gateway.http-client.proxy": False,
            "gateway.cluster.options": {},
            "gateway.cluster.progress": True,
        }
    ):
        yield


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Poll PENDING clusters every 20 ms instead of every 0.5 s."""
    import gateway_client.gateway

    monkeypatch.setattr(gateway_client.gateway, "POLL_INTERVAL", 0.02)

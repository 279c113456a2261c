"""System tests: users log in with a JupyterHub token through the user-facing clients (ours and
the original ``dask-gateway`` from PyPI) and run a real Dask cluster as themselves.

The gateway runs in process with the ``unsafe-local`` backend (real scheduler and worker
processes); the hub is the real one of conftest.py. The original client comes with the
plugin's nox session (``dask-gateway``); without it that test fails saying so.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Hub

pytestmark = [pytest.mark.system, pytest.mark.usefixtures("no_process_left_behind")]

WHOLE_TEST = 240.0
"""Seconds for one whole flow, cluster and worker start included, on a loaded machine."""

FAST: dict[str, Any] = {
    "cluster_start_timeout": 90.0,
    "worker_start_timeout": 90.0,
    "cluster_heartbeat_period": 1,
    "cluster_status_period": 0.5,
    "worker_status_period": 0.5,
    "backoff_base_delay": 0.01,
    "backoff_max_delay": 0.5,
    "sigint_timeout": 5.0,
    "sigterm_timeout": 2.0,
    "sigkill_timeout": 2.0,
}


@pytest.fixture
def dask_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dask`` on PATH is this environment's (the unsafe-local backend runs it)."""
    bindir = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


def local_config(hub: Hub, tmp_path: Path) -> dict[str, Any]:
    config = hub.gateway_auth()
    config["gateway"]["backend"] = "unsafe-local"
    config["backend"] = {"unsafe-local": {**FAST, "clusters_directory": str(tmp_path / "clusters")}}
    config["cluster"] = {"worker_memory": "512 MiB", "scheduler_memory": "512 MiB"}
    return config


KEPT: list[Any] = []
"""The original client's objects, kept alive to the end of the session: their ``__del__``
raises when they are collected after their event loop stopped (upstream behaviour, the reason
the compat session runs with ``-p no:unraisableexception``), which pytest would report against
whichever test happens to collect them."""


def owner_of(gw: Any, loop: asyncio.AbstractEventLoop, name: str) -> str:
    """The user the gateway's record of cluster ``name`` names (asked from a client thread)."""
    future = asyncio.run_coroutine_threadsafe(gw.backend.get_cluster(name), loop)
    cluster = future.result(timeout=30)
    assert cluster is not None, f"the gateway has no record of {name}"
    return str(cluster.username)


def run_flow(gateway: Any, gw: Any, loop: asyncio.AbstractEventLoop) -> tuple[str, str, int]:
    """New cluster, one worker, one computation, shutdown: (cluster name, owner, result)."""
    cluster = gateway.new_cluster()
    KEPT.append(cluster)
    try:
        owner = owner_of(gw, loop, cluster.name)
        cluster.scale(1)
        client = cluster.get_client(set_as_default=False)
        KEPT.append(client)
        try:
            client.wait_for_workers(1, timeout=120)
            result = client.submit(sum, [20, 22]).result(timeout=60)
            assert [c.name for c in gateway.list_clusters()] == [cluster.name]
        finally:
            client.close()
    finally:
        cluster.shutdown()
    return cluster.name, owner, result


async def test_our_client_logs_in_with_a_hub_token_and_runs_a_cluster(
    hub: Hub, make_gateway: Any, tmp_path: Path, dask_on_path: None, monkeypatch: Any
) -> None:
    import dask

    from gateway_client import Gateway

    gw = await make_gateway(local_config(hub, tmp_path))
    name = hub.create_user()
    token, _ = hub.token(name)
    # As in a single-user server: the client finds the token in the environment, and the
    # auth type in the dask config (DASK_GATEWAY__AUTH__TYPE=jupyterhub).
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", token)
    loop = asyncio.get_running_loop()

    def flow() -> tuple[str, str, int]:
        with (
            dask.config.set({"gateway.auth.type": "jupyterhub"}),
            Gateway(f"http://{gw.public_address}") as gateway,
        ):
            assert type(gateway.auth).__name__ == "JupyterHubAuth"
            return run_flow(gateway, gw, loop)

    async with asyncio.timeout(WHOLE_TEST):
        _, owner, result = await asyncio.to_thread(flow)
    assert (owner, result) == (name, 42)


async def test_the_original_client_logs_in_with_a_hub_token_and_runs_a_cluster(
    hub: Hub, make_gateway: Any, tmp_path: Path, dask_on_path: None
) -> None:
    try:
        import dask_gateway
    except ImportError:
        pytest.fail(
            "this test needs the original client: run it with `nox -s "
            "'tests(package=\"auth-jupyterhub\")'` (its venv installs dask-gateway)"
        )
    gw = await make_gateway(local_config(hub, tmp_path))
    name = hub.create_user()
    token, _ = hub.token(name)
    loop = asyncio.get_running_loop()

    def flow() -> tuple[str, str, int]:
        auth = dask_gateway.JupyterHubAuth(api_token=token)
        with dask_gateway.Gateway(f"http://{gw.public_address}", auth=auth) as gateway:
            KEPT.append(gateway)
            return run_flow(gateway, gw, loop)

    async with asyncio.timeout(WHOLE_TEST):
        _, owner, result = await asyncio.to_thread(flow)
    assert (owner, result) == (name, 42)


async def test_the_original_client_gets_a_401_for_a_revoked_token(
    hub: Hub, make_gateway: Any
) -> None:
    try:
        import dask_gateway
    except ImportError:
        pytest.fail("this test needs the original client (dask-gateway): see the test above")
    gw = await make_gateway(hub.gateway_auth())
    name = hub.create_user()
    token, token_id = hub.token(name)
    hub.revoke(name, token_id)

    def flow() -> str:
        auth = dask_gateway.JupyterHubAuth(api_token=token)
        with dask_gateway.Gateway(f"http://{gw.public_address}", auth=auth) as gateway:
            KEPT.append(gateway)
            try:
                gateway.list_clusters()
            except Exception as exc:  # noqa: BLE001 - whatever the original raises, say it
                return f"{type(exc).__name__}: {exc}"
        return "no error"

    said = await asyncio.to_thread(flow)
    # The original client shows the status only (its own behaviour); the original server
    # answered this with a 500.
    assert said.startswith("ClientResponseError: 401"), said

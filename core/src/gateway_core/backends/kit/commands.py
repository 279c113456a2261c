"""The Dask command lines every process-style driver runs.

Owns `scheduler_command` (``scheduler_cmd`` plus TLS, dynamic ports, the gateway agent preload
and its settings) and `worker_command` (``worker_cmd`` plus the scheduler and the worker's name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...config import ClusterConfig


def scheduler_command(settings: ClusterConfig, *, host: str, heartbeat_period: int) -> list[str]:
    """``scheduler_cmd`` plus the arguments of the original gateway: TLS, dynamic ports on
    ``host`` (scheduler, dashboard, agent API), the ``gateway_client.agent`` preload and its
    heartbeat, adaptive and idle settings."""
    return [
        *settings.scheduler_cmd,
        "--protocol",
        "tls",
        "--port",
        "0",
        "--host",
        host,
        "--dashboard-address",
        f"{host}:0",
        "--preload",
        "gateway_client.agent",
        "--dg-api-address",
        f"{host}:0",
        "--dg-heartbeat-period",
        str(heartbeat_period),
        "--dg-adaptive-period",
        f"{settings.adaptive_period:g}",
        "--dg-idle-timeout",
        f"{settings.idle_timeout:g}",
    ]


def worker_command(
    settings: ClusterConfig, *, scheduler_address: str, worker_name: str, host: str
) -> list[str]:
    """``worker_cmd`` plus the scheduler's address, the worker's name (chosen by core), its
    dashboard on ``host``, threads and memory limit."""
    return [
        *settings.worker_cmd,
        scheduler_address,
        "--dashboard-address",
        f"{host}:0",
        "--name",
        worker_name,
        "--nthreads",
        str(settings.threads),
        "--memory-limit",
        str(int(settings.worker_memory)),
    ]

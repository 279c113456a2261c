"""The Dask command lines and TLS environment every process-style driver builds.

Owns what the ``local`` drivers and the job-queue base (`gateway_core.backends.jobqueue`) share:
the scheduler command (``scheduler_cmd`` plus TLS, dynamic ports, the gateway agent preload and
its settings), the worker command, the ``DASK_DISTRIBUTED__COMM__TLS__*`` variables pointing at a
cluster's certificate and key, and reading the base cluster settings back from ``cluster.config``.
"""

from __future__ import annotations

import os
import pwd
from typing import TYPE_CHECKING

import attrs
from attrs import define

from ..config import ClusterConfig, structure

if TYPE_CHECKING:
    from ..models import Cluster

CERT_FILE = "dask.crt"
"""Name of a cluster's certificate file in its working or staging directory."""
KEY_FILE = "dask.pem"
"""Name of a cluster's private key file beside it."""

DEFAULT_INHERITED_ENVIRONMENT: tuple[str, ...] = (
    "PATH",
    "PYTHONPATH",
    "CONDA_ROOT",
    "CONDA_DEFAULT_ENV",
    "VIRTUAL_ENV",
    "LANG",
    "LC_ALL",
)
"""The original gateway's default for ``inherited_environment``."""


@define(kw_only=True, frozen=True)
class RunAs:
    """The account a cluster's processes run as (`LocalDriver`, the job-queue drivers)."""

    name: str
    uid: int
    gid: int
    groups: list[int]
    home: str
    shell: str

    @classmethod
    def from_pwd(cls, entry: pwd.struct_passwd) -> RunAs:
        return cls(
            name=entry.pw_name,
            uid=entry.pw_uid,
            gid=entry.pw_gid,
            groups=os.getgrouplist(entry.pw_name, entry.pw_gid),
            home=entry.pw_dir,
            shell=entry.pw_shell or "/bin/sh",
        )

    def identity_env(self) -> dict[str, str]:
        """``HOME``, ``USER``, ``LOGNAME`` and ``SHELL`` of this account."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "SHELL": self.shell}


def cluster_settings(cluster: Cluster) -> ClusterConfig:
    """The `ClusterConfig` fields of ``cluster.config`` (a subclass's extra keys ignored)."""
    known = {f.name for f in attrs.fields(ClusterConfig)}
    data = {k: v for k, v in cluster.config.items() if k in known}
    return structure(data, ClusterConfig, path="cluster")


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


def tls_env(role: str, cert: str, key: str) -> dict[str, str]:
    """Dask config variables making a ``role`` ("scheduler" or "worker") process use the
    cluster's certificate ``cert`` and key ``key`` (paths as the process sees them), and
    require encryption."""
    return {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": cert,
        f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}__CERT": cert,
        f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}__KEY": key,
    }


__all__ = [
    "CERT_FILE",
    "DEFAULT_INHERITED_ENVIRONMENT",
    "KEY_FILE",
    "RunAs",
    "cluster_settings",
    "scheduler_command",
    "tls_env",
    "worker_command",
]

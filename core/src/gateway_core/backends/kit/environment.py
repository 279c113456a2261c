"""The environment of a cluster's processes: what the gateway passes on, and what it adds.

Owns `cluster_env` (``[cluster] environment`` plus how to reach the gateway), `tls_env` (the
Dask TLS variables), `inherited_env`, `with_gateway_bin` and the names they share.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...config import ClusterConfig
    from ...context import GatewayContext
    from ...models import Cluster

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


def inherited_env(names: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables among ``names`` that the gateway's environment (``environ``, default
    `os.environ`) has: what ``inherited_environment`` passes on to a cluster's processes."""
    source = os.environ if environ is None else environ
    return {name: source[name] for name in names if name in source}


def gateway_bin() -> str:
    """The directory of the gateway's own Python (a virtual environment's ``bin``), where the
    ``dask`` installed with the gateway is."""
    return os.path.dirname(os.path.abspath(sys.executable))


def with_gateway_bin(path: str | None) -> str:
    """``path`` (a ``PATH`` value; empty or None: `os.defpath`) with `gateway_bin` appended
    when it is not on it already.

    A gateway started as ``/venv/bin/gateway serve`` without activating the venv has no
    ``/venv/bin`` on its ``PATH``, so the default ``dask scheduler`` would not be found. The
    directory goes at the *end*: it only supplies commands found nowhere else, and never changes
    which program a ``PATH`` the site chose (an activated environment, a module system) picks.
    """
    entries = (path or os.defpath).split(os.pathsep)
    ours = gateway_bin()
    if any(e and os.path.abspath(e) == ours for e in entries):
        return os.pathsep.join(entries)
    return os.pathsep.join([*entries, ours])


def cluster_env(
    cluster: Cluster, context: GatewayContext, *, settings: ClusterConfig | None = None
) -> dict[str, str]:
    """Environment for a cluster's scheduler and workers: the cluster config's
    ``environment`` (that of ``settings`` when given: a worker's `Driver.worker_config`, with
    its group's variables), then what the gateway's scheduler agent needs to reach the API
    (the API URL, the cluster's token and name; these win)."""
    source = cluster.config.get("environment") if settings is None else settings.environment
    env = {str(k): str(v) for k, v in (source or {}).items()}
    env.update(
        {
            "DASK_GATEWAY_API_URL": context.api_url,
            "DASK_GATEWAY_API_TOKEN": cluster.token,
            "DASK_GATEWAY_CLUSTER_NAME": cluster.name,
        }
    )
    return env


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

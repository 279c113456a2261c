"""gateway-client: the Python client of the Dask gateway.

Owns the package version and the public names, imported lazily: the scheduler agent
(`gateway_client.agent`) runs in every scheduler and must not pay for the user client's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name → the module that defines it. Importing one of them also registers the
# `gateway.*` dask config defaults (gateway_client.config); the gateway:// comm is found by
# distributed through its entry point.
_PUBLIC = {
    "BasicAuth": "auth",
    "GatewayAuth": "auth",
    "JupyterHubAuth": "auth",
    "ClusterState": "cluster",
    "GatewayCluster": "cluster",
    "GatewayAuthError": "errors",
    "GatewayClusterError": "errors",
    "GatewayError": "errors",
    "GatewayServerError": "errors",
    "GatewayWarning": "errors",
    "Gateway": "gateway",
    "ClusterReport": "models",
    "ClusterStatus": "models",
    "Options": "options",
}

__all__ = [
    "BasicAuth",
    "ClusterReport",
    "ClusterState",
    "ClusterStatus",
    "Gateway",
    "GatewayAuth",
    "GatewayAuthError",
    "GatewayCluster",
    "GatewayClusterError",
    "GatewayError",
    "GatewayServerError",
    "GatewayWarning",
    "JupyterHubAuth",
    "Options",
    "__version__",
]

if TYPE_CHECKING:
    from .auth import BasicAuth, GatewayAuth, JupyterHubAuth
    from .cluster import ClusterState, GatewayCluster
    from .errors import (
        GatewayAuthError,
        GatewayClusterError,
        GatewayError,
        GatewayServerError,
        GatewayWarning,
    )
    from .gateway import Gateway
    from .models import ClusterReport, ClusterStatus
    from .options import Options


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway_client' has no attribute {name!r}")
    importlib.import_module(".config", __name__)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

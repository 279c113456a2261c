"""gateway-client: the Python client of the Dask gateway.

Owns the package version and the public names; importing it registers the `gateway.*` dask
config defaults and the `gateway://` comm scheme.
"""

__version__ = "0.1.0"

from . import comm as _comm  # noqa: F401 - registers the gateway:// scheme
from . import config as _config  # noqa: F401 - registers the gateway.* config defaults
from .auth import BasicAuth, GatewayAuth, JupyterHubAuth
from .cluster import GatewayCluster
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

__all__ = [
    "BasicAuth",
    "ClusterReport",
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

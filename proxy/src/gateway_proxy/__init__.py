"""gateway-proxy: the gateway's public face, HTTP path routes and TLS-SNI passthrough.

Owns the package version and the public names: `ProxyServer`, `ProxySettings`, `Route`.
"""

__version__ = "0.1.0"

from .server import ProxyServer
from .settings import HEALTH_PATH, READY_PATH, ProxySettings
from .table import Route

__all__ = ["HEALTH_PATH", "READY_PATH", "ProxyServer", "ProxySettings", "Route", "__version__"]

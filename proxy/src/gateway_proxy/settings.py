"""The proxy's own settings, independent of gateway-core's configuration classes.

Owns `ProxySettings` (what `ProxyServer` runs with, built from `[proxy]` by the embedded glue or
from the command line when standalone); its addresses are checked with `addresses.split_address`.
"""

from __future__ import annotations

from attrs import define, field

from .addresses import split_address
from .hello import DEFAULT_MAX_HELLO
from .table import normalize_prefix

READY_PATH = "/_gateway-proxy/ready"
"""Answered by the proxy itself, on every HTTP listener and whatever the prefix: 200 once the
routes are loaded, 503 before. Cluster routes live under ``{prefix}/clusters/`` and the API under
``{prefix}/api/``, so this path never shadows a gateway or cluster route."""
HEALTH_PATH = "/_gateway-proxy/health"
"""Answered by the proxy itself: 200 while the process serves (liveness)."""


@define(kw_only=True, frozen=True)
class ProxySettings:
    """Everything one proxy server needs to run."""

    address: str = ":8000"
    """``host:port`` of the HTTP face (an empty host means every interface; port 0 picks one)."""
    tcp_address: str = ""
    """``host:port`` of the TLS-SNI face; empty: shared with ``address`` (one port)."""
    prefix: str = field(default="", converter=normalize_prefix)
    """Path prefix the gateway is served under, e.g. ``/gateway``; routes already include it."""
    tls_cert: str = ""
    """PEM certificate for HTTPS on the HTTP face; needs ``tls_key``."""
    tls_key: str = ""
    api_target: str = ""
    """``http://host:port`` of the gateway API: the default route ``{prefix}/`` points there."""
    gateway_url: str = ""
    """Standalone mode: base URL of the gateway whose ``/api/v1/routes`` feed is followed."""
    api_token: str = field(default="", repr=False)
    """Token for the routes feed (``Authorization: token ...``)."""
    handshake_timeout: float = 10.0
    """Seconds a client has to send its first bytes (a whole ClientHello on the TLS face)."""
    connect_timeout: float = 10.0
    """Seconds to connect to a route's target before giving up (502 on the HTTP face)."""
    max_hello_size: int = DEFAULT_MAX_HELLO
    """Largest ClientHello (records included) the TLS face reads before closing."""
    backlog: int = 4096
    splice: bool = True
    """Move TLS-SNI traffic with ``os.splice`` (Linux): the bytes never enter user space."""
    buffer_size: int = 256 * 1024
    """Bytes copied at once when forwarding without splice (one buffer for all tunnels)."""
    upstream_idle_timeout: float = 30.0
    """Seconds an idle keep-alive connection to an HTTP target is kept for reuse."""
    client_idle_timeout: float = 300.0
    """Seconds an idle keep-alive HTTP client connection is kept open."""
    feed_initial_backoff: float = 0.5
    feed_max_backoff: float = 15.0
    feed_timeout: float = 60.0
    """Seconds without a byte from the routes feed before the watch is restarted."""

    def __attrs_post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")
        split_address(self.address)
        if self.tcp_address:
            split_address(self.tcp_address)

    @property
    def shared_port(self) -> bool:
        """One listener for both faces: no ``tcp_address``, or the same fixed one."""
        if not self.tcp_address:
            return True
        return self.tcp_address == self.address and split_address(self.address)[1] != 0

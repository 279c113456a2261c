"""The interface every proxy plugin implements.

Owns `Proxy`: what core asks of the public face (HTTP path routes and TLS-SNI passthrough) when
it hosts a proxy in the gateway process or manages one as a child process.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from .config import ProxyConfig
    from .context import GatewayContext
    from .routes import RouteTable


class Proxy(abc.ABC):
    """A proxy serving the gateway's routes.

    Core builds one with keyword arguments: ``config`` is the ``[proxy]`` section, ``routes`` the
    live route table (an embedded proxy subscribes to it; a standalone one polls the
    ``/api/v1/routes`` feed instead), ``api_target`` the ``http://host:port`` of the private API
    that the default route ``/`` points at.

    A proxy may also offer ``traffic()`` (`gateway_core.metrics.ProxyTraffic`): its connection
    and byte counts per face, which core exposes as the ``gateway_proxy_*`` metrics.
    """

    def __init__(
        self,
        *,
        config: ProxyConfig,
        routes: RouteTable,
        api_target: str,
        context: GatewayContext | None = None,
        **kwargs: Any,
    ) -> None:
        self.config = config
        self.routes = routes
        self.api_target = api_target
        self.context = context

    @abc.abstractmethod
    async def start(self) -> None:
        """Bind the listeners and begin serving; return once they accept connections."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Close the listeners and every open connection."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """``host:port`` the HTTP face is bound to (the real port when config said 0)."""

    def serve_api_in_process(self, factory: Callable[[], asyncio.BaseProtocol] | None) -> bool:
        """Offered, once the API is set up, the API server's protocol factory in the
        gateway's event loop (and None again before it stops). A proxy living in that loop
        may pass requests for ``api_target`` to new protocols of ``factory`` in memory
        instead of connecting to it; returns whether it does. The default does not."""
        return False

    @property
    def tcp_address(self) -> str:
        """``host:port`` of the TLS-SNI face; the HTTP address when both share one port."""
        return self.address

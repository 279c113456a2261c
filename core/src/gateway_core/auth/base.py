"""The interface every authenticator implements.

Owns `Authenticator` and `Unauthorized`. The cookie that caches a login for ``cache_max_age``
seconds is handled by core around these methods, so authenticators only talk to their service.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

    from ..config import AuthConfig
    from ..context import GatewayContext
    from ..models import User


class Unauthorized(Exception):
    """No valid credentials: answered 401 with ``headers`` (e.g. ``WWW-Authenticate``)."""

    def __init__(self, reason: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.headers = dict(headers or {})


class Authenticator(abc.ABC):
    """Decides who is making a request.

    Core builds one per gateway with keyword arguments, calls ``setup`` before serving and
    ``cleanup`` at shutdown, and calls ``authenticate`` for every API request that carries no
    valid login cookie.
    """

    name: str = ""

    def __init__(self, *, config: AuthConfig, context: GatewayContext, **kwargs: Any) -> None:
        self.config = config
        self.context = context

    async def setup(self) -> None:  # noqa: B027 - optional hook
        """Open sessions to the backing service."""

    async def cleanup(self) -> None:  # noqa: B027 - optional hook
        """Close what ``setup`` opened."""

    @abc.abstractmethod
    async def authenticate(self, request: web.Request) -> User:
        """Return the `User` behind ``request``, or raise `Unauthorized` (with the challenge
        headers a client needs, such as ``WWW-Authenticate: Negotiate``)."""

    def pre_response(self, request: web.Request, response: web.StreamResponse) -> None:  # noqa: B027
        """Add headers to a successful response (e.g. the final SPNEGO token). Optional."""

    def web_routes(self) -> Sequence[web.RouteDef]:
        """Routes this authenticator serves itself, such as an OAuth login and its callback
        (``aiohttp.web.get(path, handler)``). Optional; none by default.

        Core adds them to the API app beside its own routes (also under the proxy prefix) as
        public routes: the handler decides who may call it. Paths must start with ``/api/``
        (``/api/v2/<something>`` for new ones). A handler that has found out who the user is
        calls `gateway_core.api.app.log_in` to set the login cookie on its response. Called
        once, when the app is built, before ``setup``.
        """
        return ()

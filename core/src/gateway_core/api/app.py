"""Builds the REST API application: routes, body limit, error and authentication middleware.

Owns `make_api_app` and the two middlewares: every exception becomes `{"error": ...}` with its
status, and every route but health and version is authenticated as its route table says.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..auth.base import Authenticator
from ..context import GatewayContext
from ..manager import ClusterManager, ClusterToken
from ..models import User
from ..web import add_web_ui
from .admin import ADMIN_ROUTES
from .authn import Authn, token_from_header
from .errors import error_response
from .metrics import METRICS_PATH, metrics_middleware, serve_metrics
from .routes import (
    AUTHN,
    CALLER,
    CLOSING,
    CONTEXT,
    MANAGER,
    MAX_BODY,
    ROUTE_ACCESS,
    ROUTES,
    Access,
    Handler,
)

__all__ = ["log_in", "make_api_app"]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure as JSON; an unexpected exception is logged and answered 500."""
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the server keeps serving whatever happened
        return error_response(exc, max_body_size=request.app[MAX_BODY])


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate the caller as the route's `Access` says and store it as ``request[CALLER]``.

    A user who passed the authenticator (not the login cookie) gets a fresh login cookie and
    the authenticator's ``pre_response`` headers on whatever the handler answered.
    """
    match = request.match_info
    if match.http_exception is not None:
        return await handler(request)  # no such route or method: a plain 404/405
    access = request.app[ROUTE_ACCESS].get(match.route, Access.USER)
    if access in (Access.PUBLIC, Access.CLUSTER):
        return await handler(request)
    authn = request.app[AUTHN]
    if access is Access.PROXY:
        authn.check_proxy(request)
        return await handler(request)
    if access is Access.USER_OR_CLUSTER:
        token = token_from_header(request)
        if token is not None:
            caller: ClusterToken = ClusterToken(token=token)
            request[CALLER] = caller
            return await handler(request)
    user, fresh = await authn.authenticate_user(request)
    request[CALLER] = user
    if not fresh:
        return await handler(request)
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - still a successful login: keep the cookie
        response = error_response(exc, max_body_size=request.app[MAX_BODY])
    authn.finish_login(request, response, user)
    return response


def log_in(request: web.Request, response: web.StreamResponse, user: User) -> None:
    """Log ``user`` in from an authenticator's own route (`Authenticator.web_routes`), e.g. an
    OAuth callback: set the login cookie on ``response`` (and the authenticator's
    ``pre_response`` headers), as a successful ``authenticate`` does. Without a cookie
    (``cache_max_age = 0``) the login lasts only this response."""
    request.app[AUTHN].finish_login(request, response, user)


async def _close_streams(app: web.Application) -> None:
    """At shutdown, end open routes-feed streams instead of waiting for their readers."""
    app[CLOSING].set()


def make_api_app(
    *,
    manager: ClusterManager,
    authenticator: Authenticator,
    context: GatewayContext,
    proxy_token: str,
) -> web.Application:
    """The REST API as an aiohttp application.

    Routes are served at ``/api/...`` and, when the context has a proxy prefix, also at
    ``{prefix}/api/...`` (so it works whether or not the proxy strips the prefix); so are the
    authenticator's own routes (`Authenticator.web_routes`), ``/metrics`` (Prometheus,
    `gateway_core.api.metrics`) and the web UI (``/`` and ``/ui/...``, `gateway_core.web`).
    Request bodies are limited to ``[gateway] max_body_size`` (413 beyond it).
    """
    max_body = int(context.config.gateway.max_body_size)
    app = web.Application(
        client_max_size=max_body,
        middlewares=[metrics_middleware, error_middleware, auth_middleware],
    )
    app[MANAGER] = manager
    app[AUTHN] = Authn(authenticator=authenticator, proxy_token=proxy_token)
    app[CONTEXT] = context
    app[MAX_BODY] = max_body
    app[CLOSING] = asyncio.Event()
    access: dict[web.AbstractRoute, Access] = {}
    prefixes = [""]
    prefix = context.prefix.rstrip("/")
    if prefix:
        prefixes.append(prefix if prefix.startswith("/") else "/" + prefix)
    extra = list(authenticator.web_routes())
    for route_def in extra:
        if not route_def.path.startswith("/api/"):
            raise ValueError(
                f"authenticator {authenticator.name!r}: route {route_def.path!r} must start "
                "with /api/"
            )
    for base in prefixes:
        for route in ROUTES + ADMIN_ROUTES:
            registered = app.router.add_route(route.method, base + route.path, route.handler)
            access[registered] = route.access
        for route_def in extra:  # public: the authenticator's handler decides
            before = set(app.router.routes())
            prefixed = web.RouteDef(
                route_def.method, base + route_def.path, route_def.handler, route_def.kwargs
            )
            prefixed.register(app.router)
            for added in set(app.router.routes()) - before:  # GET brings its HEAD
                access[added] = Access.PUBLIC
        # Public to the middleware: the handler checks [metrics] token itself.
        for registered in app.router.add_get(base + METRICS_PATH, serve_metrics).resource or ():
            access[registered] = Access.PUBLIC
    # The web UI (gateway_core.web): the home page and /ui/..., public to the middleware.
    access.update(add_web_ui(app, prefixes))
    app[ROUTE_ACCESS] = access
    app.on_shutdown.append(_close_streams)
    return app

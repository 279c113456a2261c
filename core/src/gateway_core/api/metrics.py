"""The API's side of the Prometheus metrics: the ``/metrics`` route and the request counting.

Owns `metrics_middleware` (every answer counted by route pattern, method and status; every 401
counted as an authentication failure by kind of caller) and `serve_metrics` (the exposition,
behind ``[metrics] token`` unless ``[metrics] public``).
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from ..metrics import CONTENT_TYPE, UNMATCHED_ROUTE
from .authn import tokens_match
from .errors import json_error
from .routes import CONTEXT, ROUTE_ACCESS, Access, Handler

METRICS_PATH = "/metrics"
"""Where the exposition is served (also under the proxy prefix)."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods kept as they are in the ``method`` label; any other is ``other`` (bounded)."""

DISABLED = (
    "metrics are disabled: set [metrics] token in the gateway config (scrapers then send "
    "`Authorization: Bearer <token>`), or [metrics] public = true to serve them to anyone"
)


def _route_label(request: web.Request) -> str:
    match = request.match_info
    if match.http_exception is not None:
        return UNMATCHED_ROUTE
    resource = match.route.resource
    return resource.canonical if resource is not None else UNMATCHED_ROUTE


def _auth_kind(request: web.Request, route: str) -> str:
    """Which credential a 401 refused, from the route's `Access`."""
    match = request.match_info
    access = None
    if match.http_exception is None:
        access = request.app[ROUTE_ACCESS].get(match.route)
    if access is Access.PROXY:
        return "proxy"
    if access is Access.CLUSTER:
        return "cluster"
    if access is Access.USER_OR_CLUSTER:
        header = request.headers.get("Authorization", "")
        return "cluster" if header.strip().lower().startswith("token ") else "user"
    if route.endswith(METRICS_PATH):
        return "metrics"
    return "user"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every answer (outermost: it sees the status the error middleware chose)."""
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's convention); still counted
        raise
    finally:
        route = _route_label(request)
        method = request.method if request.method in METHODS else "other"
        metrics = request.app[CONTEXT].metrics
        metrics.observe_request(
            route=route, method=method, code=status, seconds=time.perf_counter() - start
        )
        if status == 401:
            metrics.auth_failure(_auth_kind(request, route))


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


async def serve_metrics(request: web.Request) -> web.StreamResponse:
    """``GET /metrics``: the text exposition; 403 when not enabled, 401 without the token."""
    context = request.app[CONTEXT]
    config = context.config.metrics
    if not config.public:
        if not config.token:
            return json_error(403, DISABLED)
        given = _bearer(request)
        challenge = {"WWW-Authenticate": 'Bearer realm="gateway metrics"'}
        if given is None:
            return json_error(
                401, "metrics need `Authorization: Bearer <[metrics] token>`", challenge
            )
        if not tokens_match(given, config.token):
            return json_error(401, "invalid metrics token", challenge)
    body = await context.metrics.scrape()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

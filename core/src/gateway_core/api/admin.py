"""The admin routes of the REST API, under ``/api/v2/admin/``: every cluster, and usage by user.

Owns their handlers and `ADMIN_ROUTES`; stopping any cluster stays the ordinary DELETE route
(admins may stop any cluster there).
"""

from __future__ import annotations

from aiohttp import web

from ..admin import all_clusters, cluster_summary, usage_by_user
from ..errors import InvalidRequest
from ..models import User
from .routes import CALLER, CONTEXT, MANAGER, Access, RouteDef, status_filter

__all__ = ["ADMIN_ROUTES"]


def _admin_user(request: web.Request) -> User:
    caller = request[CALLER]
    if not isinstance(caller, User):
        raise InvalidRequest("the admin routes need a user")
    return caller


async def admin_clusters(request: web.Request) -> web.Response:
    """Every user's clusters; ``?user=`` one user's, ``?status=`` those statuses (default:
    the active ones)."""
    username = request.query.get("user")
    if username is not None and not username.strip():
        raise InvalidRequest("user: expected a user name, got an empty value")
    statuses = status_filter(request)
    manager = request.app[MANAGER]
    clusters = await all_clusters(
        manager, _admin_user(request), username=username, statuses=statuses
    )
    prefix = request.app[CONTEXT].prefix
    return web.json_response(
        {"clusters": [cluster_summary(manager, c, prefix=prefix) for c in clusters]}
    )


async def admin_usage(request: web.Request) -> web.Response:
    """Every known user's usage against their quotas (`ClusterManager.quota` of each)."""
    users = await usage_by_user(request.app[MANAGER], _admin_user(request))
    return web.json_response({"users": users})


ADMIN_ROUTES: tuple[RouteDef, ...] = (
    RouteDef(
        method="GET", path="/api/v2/admin/clusters", handler=admin_clusters, access=Access.USER
    ),
    RouteDef(method="GET", path="/api/v2/admin/usage", handler=admin_usage, access=Access.USER),
)

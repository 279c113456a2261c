"""The handlers of the REST API (PROTOCOL.md), one per route, and the table that lists them.

Owns request parsing and validation (JSON bodies, cluster names, query flags, status filters),
the app and request state keys, and `ROUTES`: method, path, handler and who may call it.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import re
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiohttp import web
from attrs import define

from .. import __version__
from ..context import GatewayContext
from ..errors import ClusterNotFound, InvalidRequest, NotAuthenticated
from ..manager import LOG_TAIL_DEFAULT, LOG_TAIL_MAX, Caller, ClusterManager
from ..models import ClusterStatus, User
from ..routes import EventsGone, RouteEvent, RouteTable
from ..sharing import SHARE_KEYS, cluster_json_v2, parse_sharing
from .authn import Authn, token_from_header
from .errors import Gone

log = logging.getLogger("gateway.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Access(enum.Enum):
    """Who may call a route."""

    PUBLIC = "public"
    """Anyone (health, version)."""
    USER = "user"
    """An authenticated user (login cookie or the authenticator)."""
    USER_OR_CLUSTER = "user_or_cluster"
    """A user, or a cluster presenting ``Authorization: token <its token>`` (DELETE)."""
    CLUSTER = "cluster"
    """A cluster's token, checked by the handler against the named cluster (heartbeat)."""
    PROXY = "proxy"
    """The proxy's token (the routes feed)."""


MANAGER = web.AppKey("manager", ClusterManager)
AUTHN = web.AppKey("authn", Authn)
CONTEXT = web.AppKey("context", GatewayContext)
MAX_BODY = web.AppKey("max_body_size", int)
ROUTE_ACCESS = web.AppKey("route_access", dict[web.AbstractRoute, Access])
CLOSING = web.AppKey("closing", asyncio.Event)
"""Set at shutdown: open routes-feed streams end cleanly instead of holding the server."""

CALLER: web.RequestKey[Caller] = web.RequestKey("caller")
"""Who is calling, set by the authentication middleware."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Valid cluster names: 1-64 letters, digits, '.', '_', '-', starting with a letter or digit."""

WATCH_CHECK_PERIOD = 5.0
"""Seconds between checks that a routes-feed reader is still connected."""

HEARTBEAT_ADDRESSES = ("scheduler_address", "dashboard_address", "api_address")
HEARTBEAT_WORKER_LISTS = ("active_workers", "closing_workers", "closed_workers")


# --------------------------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "bool", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _shown(text: str, limit: int = 70) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def cluster_name(request: web.Request) -> str:
    """The ``{name}`` of the path, refused (404) unless it matches `NAME_PATTERN`."""
    name = request.match_info["name"]
    if not NAME_PATTERN.fullmatch(name):
        raise ClusterNotFound(
            f"invalid cluster name {_shown(name)}: names are 1-64 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return name


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def json_object(
    request: web.Request, *, allowed: Collection[str] | None = None
) -> dict[str, Any]:
    """The request body as a JSON object; 413 when too large, 422 naming what is wrong.

    With ``allowed``, a key outside it is refused (422 naming the key).
    """
    raw = await request.read()
    if not raw.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"request body is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        body = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"malformed JSON in request body: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise InvalidRequest(f"malformed JSON in request body: {exc}") from None
    except RecursionError:
        raise InvalidRequest("malformed JSON in request body: nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {_kind(body)}")
    if allowed is not None:
        unknown = sorted(k for k in body if k not in allowed)
        if unknown:
            expected = ", ".join(sorted(allowed)) or "no keys"
            raise InvalidRequest(
                f"unknown key {_shown(unknown[0])} in request body; expected {expected}"
            )
    return body


def query_flag(request: web.Request, name: str) -> bool:
    """A boolean query flag: absent is false; ``?name``, ``=1``, ``=true`` true; ``=0``,
    ``=false`` false; anything else is 422."""
    if name not in request.query:
        return False
    value = request.query[name].strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InvalidRequest(f"{name}: expected a flag (empty, 1/0 or true/false), got {_shown(value)}")


def status_filter(request: web.Request) -> list[ClusterStatus] | None:
    """``?status=RUNNING,pending`` (case-insensitive, comma separated); None when absent."""
    values = request.query.getall("status", [])
    if not values:
        return None
    statuses: list[ClusterStatus] = []
    for value in values:
        for part in value.split(","):
            try:
                statuses.append(ClusterStatus.parse(part))
            except ValueError as exc:
                raise InvalidRequest(f"status: {exc}") from None
    return statuses


def log_query(request: web.Request) -> tuple[list[str], int]:
    """``?component=scheduler,<worker>&component=...&tail=N`` of the logs route: the
    components (none: all) and the lines wanted (default `LOG_TAIL_DEFAULT`); 422 naming
    what is wrong. The range of ``tail`` is the manager's to check."""
    components: list[str] = []
    for value in request.query.getall("component", []):
        for part in value.split(","):
            if not part.strip():
                raise InvalidRequest(
                    f"component: empty name in {_shown(value)}; expected scheduler, workers, "
                    "all or the name of a worker"
                )
            components.append(part.strip())
    raw = request.query.get("tail")
    if raw is None:
        return components, LOG_TAIL_DEFAULT
    try:
        tail = int(raw.strip())
    except ValueError:
        raise InvalidRequest(
            f"tail: expected an integer from 0 to {LOG_TAIL_MAX}, got {_shown(raw)}"
        ) from None
    return components, tail


def heartbeat_problems(msg: dict[str, Any]) -> list[str]:
    """Type checks of the heartbeat fields core knows; other keys pass through."""
    problems = []
    for key in HEARTBEAT_ADDRESSES:
        if msg.get(key) is not None and not isinstance(msg[key], str):
            problems.append(f"{key}: expected a string, got {_kind(msg[key])}")
    if "count" in msg:
        count = msg["count"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            problems.append(f"count: expected a non-negative integer, got {_kind(count)} {count!r}")
    for key in HEARTBEAT_WORKER_LISTS:
        if key in msg and not (
            isinstance(msg[key], list) and all(isinstance(w, str) for w in msg[key])
        ):
            problems.append(f"{key}: expected an array of worker names")
    return problems


def _json_bytes(body: bytes, status: int = 200) -> web.Response:
    """An answer of JSON already encoded, with the headers `web.json_response` sends."""
    return web.Response(body=body, status=status, content_type="application/json", charset="utf-8")


def _json_key(name: str) -> bytes:
    """A cluster name as the inside of a JSON string (names need no escaping, but an odd
    record loaded from a store is escaped as json.dumps would)."""
    return json.dumps(name)[1:-1].encode()


def _user(request: web.Request) -> User:
    caller = request[CALLER]
    if not isinstance(caller, User):  # the route table makes this unreachable
        raise NotAuthenticated("this route needs a user")
    return caller


# --------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    result = await request.app[MANAGER].health()
    return web.json_response(result, status=200 if result.get("status") == "pass" else 503)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def cluster_options(request: web.Request) -> web.Response:
    form = await request.app[MANAGER].options_for(_user(request))
    return web.json_response({"cluster_options": form.spec_json()})


async def list_clusters(request: web.Request) -> web.Response:
    statuses = status_filter(request)
    clusters = await request.app[MANAGER].list_clusters(_user(request), statuses)
    prefix = request.app[CONTEXT].prefix
    # ``{name: <cluster>, ...}`` as json.dumps writes it, from each cluster's cached bytes.
    parts = [b'"%s": %s' % (_json_key(c.name), c.json_bytes(prefix=prefix)) for c in clusters]
    return _json_bytes(b"{" + b", ".join(parts) + b"}")


async def create_cluster(request: web.Request) -> web.Response:
    user = _user(request)
    body = await json_object(request, allowed={"cluster_options"})
    options = body.get("cluster_options")
    name = await request.app[MANAGER].create_cluster(user, {} if options is None else options)
    return web.json_response({"name": name}, status=201)


async def get_cluster(request: web.Request) -> web.Response:
    name = cluster_name(request)
    wait = query_flag(request, "wait")
    cluster = await request.app[MANAGER].get_cluster(_user(request), name, wait=wait)
    return _json_bytes(cluster.json_bytes(prefix=request.app[CONTEXT].prefix))


async def cluster_reason(request: web.Request) -> web.Response:
    """v2 extension: why a cluster failed (the v1 cluster JSON cannot carry it: the original
    client refuses keys it does not know)."""
    name = cluster_name(request)
    cluster = await request.app[MANAGER].get_cluster(_user(request), name)
    return web.json_response({"name": cluster.name, "reason": cluster.reason})


async def cluster_logs(request: web.Request) -> web.Response:
    """v2 extension: the end of the scheduler's and workers' output, component → text."""
    name = cluster_name(request)
    components, tail = log_query(request)
    logs = await request.app[MANAGER].cluster_logs(
        _user(request), name, components=components, tail=tail
    )
    return web.json_response(logs)


async def quota(request: web.Request) -> web.Response:
    """v2 extension: the caller's quota usage and limits; admins may ask for any ``?user=``."""
    username = request.query.get("user")
    if username is not None and not username.strip():
        raise InvalidRequest("user: expected a user name, got an empty value")
    answer = await request.app[MANAGER].quota(_user(request), username)
    return web.json_response(answer)


async def list_clusters_v2(request: web.Request) -> web.Response:
    """v2: the caller's clusters and (unless ``?shared=0``) those shared with them, as v2
    cluster JSON (with ``owner``, ``access`` and the sharing lists)."""
    statuses = status_filter(request)
    shared = query_flag(request, "shared") if "shared" in request.query else True
    manager = request.app[MANAGER]
    user = _user(request)
    clusters = await manager.list_visible_clusters(user, statuses, shared=shared)
    prefix = request.app[CONTEXT].prefix
    return web.json_response(
        {
            c.name: cluster_json_v2(
                c,
                prefix=prefix,
                access=manager.access_of(user, c),
                group_names=manager.typed_config(c).group_names(),
            )
            for c in clusters
        }
    )


async def create_cluster_v2(request: web.Request) -> web.Response:
    """v2: create a cluster, maybe shared at once (``share_with_users``/``_groups``)."""
    user = _user(request)
    body = await json_object(request, allowed={"cluster_options", *SHARE_KEYS})
    sharing = parse_sharing(body, required=False)
    options = body.get("cluster_options")
    name = await request.app[MANAGER].create_cluster(
        user, {} if options is None else options, sharing=sharing
    )
    return web.json_response({"name": name}, status=201)


async def get_cluster_v2(request: web.Request) -> web.Response:
    """v2: one cluster as v2 cluster JSON; ``?wait`` as in v1."""
    name = cluster_name(request)
    wait = query_flag(request, "wait")
    manager = request.app[MANAGER]
    user = _user(request)
    cluster = await manager.get_cluster(user, name, wait=wait)
    prefix = request.app[CONTEXT].prefix
    return web.json_response(
        cluster_json_v2(
            cluster,
            prefix=prefix,
            access=manager.access_of(user, cluster),
            group_names=manager.typed_config(cluster).group_names(),
        )
    )


async def patch_cluster(request: web.Request) -> web.Response:
    """v2: replace whom a cluster is shared with (owner and admins only); answers the
    cluster's v2 JSON."""
    name = cluster_name(request)
    body = await json_object(request, allowed=SHARE_KEYS)
    sharing = parse_sharing(body, required=True)
    manager = request.app[MANAGER]
    user = _user(request)
    cluster = await manager.share_cluster(user, name, sharing)
    prefix = request.app[CONTEXT].prefix
    return web.json_response(
        cluster_json_v2(
            cluster,
            prefix=prefix,
            access=manager.access_of(user, cluster),
            group_names=manager.typed_config(cluster).group_names(),
        )
    )


async def delete_cluster(request: web.Request) -> web.Response:
    name = cluster_name(request)
    caller: Caller = request[CALLER]
    await request.app[MANAGER].stop_cluster(caller, name)
    return web.Response(status=204)


async def scale_cluster(request: web.Request) -> web.Response:
    name = cluster_name(request)
    body = await json_object(request, allowed={"count", "group"})
    if "count" not in body:
        raise InvalidRequest("count: required (the number of workers wanted)")
    answer = await request.app[MANAGER].scale(
        _user(request), name, body["count"], group=body.get("group")
    )
    return web.json_response(answer)


async def adapt_cluster(request: web.Request) -> web.Response:
    name = cluster_name(request)
    body = await json_object(request, allowed={"minimum", "maximum", "active", "group"})
    answer = await request.app[MANAGER].adapt(
        _user(request),
        name,
        minimum=body.get("minimum"),
        maximum=body.get("maximum"),
        active=body.get("active", True),
        group=body.get("group"),
    )
    return web.json_response(answer)


async def heartbeat(request: web.Request) -> web.Response:
    name = cluster_name(request)
    token = token_from_header(request)
    manager = request.app[MANAGER]
    await manager.check_cluster_token(name, token)  # credentials before reading the body
    msg = await json_object(request)
    problems = heartbeat_problems(msg)
    if problems:
        raise InvalidRequest("invalid heartbeat: " + "; ".join(problems))
    await manager.heartbeat(name, token, msg)
    return web.json_response({})


async def routes_feed(request: web.Request) -> web.StreamResponse:
    """The proxy routes feed: a snapshot, or with ``?watch`` a stream of event batches."""
    table = request.app[CONTEXT].routes
    if not query_flag(request, "watch"):
        return web.json_response(
            {"routes": [r.to_json() for r in table.routes()], "id": table.last_id}
        )
    raw = request.query.get("last_id", "0")
    try:
        last_id = int(raw)
    except ValueError:
        raise InvalidRequest(f"last_id: expected an integer event id, got {_shown(raw)}") from None
    try:
        events = table.events_since(last_id)
    except EventsGone as exc:
        raise Gone(f"{exc}; fetch the whole routes table again") from None
    closing = request.app[CLOSING]
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    try:
        while True:
            if events:
                line = json.dumps({"events": [e.to_json() for e in events]}) + "\n"
                await response.write(line.encode())
                last_id = events[-1].id
            transport = request.transport
            if closing.is_set() or transport is None or transport.is_closing():
                break
            try:
                next_events = await _next_events(table, last_id, closing)
            except EventsGone:
                break  # this reader fell behind; it reconnects and gets 410
            if next_events is None:
                break
            events = next_events
        await response.write_eof()
    except (ConnectionError, OSError):
        log.debug("routes feed reader went away")
    except Exception:  # headers are sent: log it and end this stream only
        log.exception("routes feed stream failed")
    return response


async def _next_events(
    table: RouteTable, last_id: int, closing: asyncio.Event
) -> list[RouteEvent] | None:
    """Events after ``last_id`` ([] after a quiet `WATCH_CHECK_PERIOD`), or None once the app
    is closing."""
    waiter = asyncio.ensure_future(table.wait_for_events(last_id, WATCH_CHECK_PERIOD))
    stopper = asyncio.ensure_future(closing.wait())
    try:
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not waiter.done():
            waiter.cancel()
    if waiter.done() and not waiter.cancelled():
        return waiter.result()
    return None


@define(kw_only=True, frozen=True)
class RouteDef:
    method: str
    path: str
    handler: Handler
    access: Access


ROUTES: tuple[RouteDef, ...] = (
    RouteDef(method="GET", path="/api/health", handler=health, access=Access.PUBLIC),
    RouteDef(method="GET", path="/api/version", handler=version, access=Access.PUBLIC),
    RouteDef(method="GET", path="/api/v1/options", handler=cluster_options, access=Access.USER),
    RouteDef(method="GET", path="/api/v1/clusters/", handler=list_clusters, access=Access.USER),
    RouteDef(method="GET", path="/api/v1/clusters", handler=list_clusters, access=Access.USER),
    RouteDef(method="POST", path="/api/v1/clusters/", handler=create_cluster, access=Access.USER),
    RouteDef(method="POST", path="/api/v1/clusters", handler=create_cluster, access=Access.USER),
    RouteDef(method="GET", path="/api/v1/clusters/{name}", handler=get_cluster, access=Access.USER),
    RouteDef(
        method="GET",
        path="/api/v2/clusters/{name}/reason",
        handler=cluster_reason,
        access=Access.USER,
    ),
    RouteDef(method="GET", path="/api/v2/quota", handler=quota, access=Access.USER),
    RouteDef(method="GET", path="/api/v2/clusters", handler=list_clusters_v2, access=Access.USER),
    RouteDef(method="POST", path="/api/v2/clusters", handler=create_cluster_v2, access=Access.USER),
    RouteDef(
        method="GET", path="/api/v2/clusters/{name}", handler=get_cluster_v2, access=Access.USER
    ),
    RouteDef(
        method="PATCH", path="/api/v2/clusters/{name}", handler=patch_cluster, access=Access.USER
    ),
    RouteDef(
        method="GET",
        path="/api/v2/clusters/{name}/logs",
        handler=cluster_logs,
        access=Access.USER,
    ),
    RouteDef(
        method="DELETE",
        path="/api/v1/clusters/{name}",
        handler=delete_cluster,
        access=Access.USER_OR_CLUSTER,
    ),
    RouteDef(
        method="POST",
        path="/api/v1/clusters/{name}/scale",
        handler=scale_cluster,
        access=Access.USER,
    ),
    RouteDef(
        method="POST",
        path="/api/v1/clusters/{name}/adapt",
        handler=adapt_cluster,
        access=Access.USER,
    ),
    RouteDef(
        method="POST",
        path="/api/v1/clusters/{name}/heartbeat",
        handler=heartbeat,
        access=Access.CLUSTER,
    ),
    RouteDef(method="GET", path="/api/v1/routes", handler=routes_feed, access=Access.PROXY),
)

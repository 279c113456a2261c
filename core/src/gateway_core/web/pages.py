"""The pages of the web UI and their form handlers, on top of `ClusterManager` and the admin view.

Owns `add_web_ui` (registers the pages on the API app), the rendering of Jinja2 templates, the
conversion of HTML forms to cluster options, and the mapping of core's errors to error pages.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from .. import __version__
from ..admin import all_clusters, cluster_summary, require_admin, usage_by_user
from ..api.errors import status_of
from ..api.routes import AUTHN, CONTEXT, MANAGER, Access
from ..auth.base import Unauthorized
from ..auth.simple import SimpleAuthenticator
from ..config import QUOTA_KEYS
from ..errors import AccessDenied, ClusterConflict, ClusterNotFound, GatewayError, InvalidRequest
from ..manager import ClusterManager
from ..models import Cluster, ClusterStatus, User
from ..options import Field, Options
from ..units import format_duration, format_memory
from .session import PRELOGIN_COOKIE, WebSession

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TEMPLATES_DIR = HERE / "templates"

SESSION = web.AppKey("web_session", WebSession)
TEMPLATES = web.AppKey("web_templates", jinja2.Environment)
PluginInfos = Callable[[], list[Any]]
PLUGIN_INFOS: web.AppKey[PluginInfos] = web.AppKey("web_plugin_infos")
"""Set by `gateway_core.app.Gateway`: the loaded plugins (`gateway_core.plugins.PluginInfo`)."""

UI = "/ui"
"""Every page but the home page is under this path: ``/clusters/`` belongs to dashboards."""
WEB_PATHS = ("/", UI + "/")
"""Paths the web UI owns (the home page, and everything under ``/ui/``)."""

LOG_TAIL = 200
"""Lines of each log the cluster page shows."""
MY_CLUSTERS_LIMIT = 50
"""Finished clusters beyond this many are left off the user's list."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PageError(Exception):
    """Answer the request with an error page of this status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _prefix(request: web.Request) -> str:
    return request.app[CONTEXT].prefix.rstrip("/")


def render(
    request: web.Request,
    template: str,
    *,
    user: User | None,
    status: int = 200,
    csrf: str | None = None,
    **values: Any,
) -> web.Response:
    """Render ``template`` with the page's common values (user, CSRF token, prefix)."""
    session = request.app[SESSION]
    manager = request.app[MANAGER]
    html = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            user=user,
            is_admin=user is not None and manager.is_admin(user),
            csrf=session.csrf_token(request) if csrf is None else csrf,
            base=_prefix(request),
            ui=_prefix(request) + UI,
            version=__version__,
            status=status,
            **values,
        )
    )
    response = web.Response(text=html, status=status, content_type="text/html")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'"
    )
    return response


def redirect(request: web.Request, path: str) -> web.Response:
    """A 303 to ``path`` (relative to the gateway's prefix): POST, then GET."""
    return web.Response(status=303, headers={"Location": _prefix(request) + path})


def _age(start_ms: int, stop_ms: int | None = None) -> str:
    end = stop_ms / 1000 if stop_ms is not None else time.time()
    return format_duration(max(0.0, round(end - start_ms / 1000)))


def _memory(nbytes: Any) -> str:
    return format_memory(int(nbytes)) if nbytes else "0"


def cluster_row(manager: ClusterManager, cluster: Cluster, prefix: str) -> dict[str, Any]:
    """What the pages show of one cluster."""
    row = cluster_summary(manager, cluster, prefix=prefix)
    row["age"] = _age(cluster.start_time, cluster.stop_time)
    row["memory_text"] = _memory(row["memory"])
    lifetime = manager.typed_config(cluster).max_lifetime
    row["lifetime_left"] = None
    if lifetime is not None and cluster.status.is_active:
        left = cluster.start_time / 1000 + float(lifetime) - time.time()
        row["lifetime_left"] = format_duration(max(0.0, round(left)))
    row["active"] = cluster.status.is_active and cluster.target == ClusterStatus.RUNNING
    row["running"] = cluster.status == ClusterStatus.RUNNING
    return row


def usage_rows(answer: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A quota answer (`ClusterManager.quota`) as rows: what, used, limit, and the pools."""
    rows = []
    scopes = [(f"user {answer['user']}", answer["quota"], answer["usage"])]
    for group, pool in sorted(answer.get("group_pools", {}).items()):
        scopes.append((f"group {group}", pool["quota"], pool["usage"]))
    for scope, quota, usage in scopes:
        for key in QUOTA_KEYS:
            what = key.removeprefix("max_")
            used = usage.get(what, 0)
            limit = quota.get(key)
            if what == "memory":
                used_text = _memory(used)
                limit_text = _memory(limit) if limit is not None else "no limit"
            else:
                used_text = f"{used:g}"
                limit_text = f"{limit:g}" if limit is not None else "no limit"
            rows.append(
                {
                    "scope": scope,
                    "what": what,
                    "used": used_text,
                    "limit": limit_text,
                    "over": limit is not None and used > limit,
                }
            )
    return rows


# --------------------------------------------------------------------------------------------
# The new-cluster form
# --------------------------------------------------------------------------------------------


def form_fields(form: Options, values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The options spec as HTML inputs, each with its current value as text."""
    out = []
    for spec in form.spec_json():
        name = spec["field"]
        kind = spec["spec"]["type"]
        value = values.get(name, spec["default"])
        if kind == "mapping" and not isinstance(value, str):
            value = json.dumps(value or {})
        out.append(
            {
                "name": name,
                "label": spec["label"],
                "kind": kind,
                "value": value,
                "min": spec["spec"].get("min"),
                "max": spec["spec"].get("max"),
                "choices": spec["spec"].get("options", []),
            }
        )
    return out


def options_from_form(fields: tuple[Field, ...], data: Mapping[str, Any]) -> dict[str, Any]:
    """Cluster options from a posted form: numbers and JSON parsed where they parse, the text
    kept where they do not (so the options' own validation names the problem)."""
    out: dict[str, Any] = {}
    for f in fields:
        kind = f.type_name
        if kind == "bool":
            out[f.field] = f.field in data
            continue
        if f.field not in data:
            continue
        text = str(data[f.field]).strip()
        value: Any = text
        if kind == "int":
            try:
                value = int(text)
            except ValueError:
                pass
        elif kind == "float":
            try:
                value = float(text)
            except ValueError:
                pass
        elif kind == "mapping":
            try:
                value = json.loads(text) if text else {}
            except ValueError:
                pass
        out[f.field] = value
    return out


# --------------------------------------------------------------------------------------------
# Page plumbing: who is asking, CSRF, error pages
# --------------------------------------------------------------------------------------------


def _current_user(request: web.Request) -> User:
    user = request.app[SESSION].user(request)
    if user is None:
        raise web.HTTPSeeOther(location=_prefix(request) + UI + "/login")
    return user


async def _posted(request: web.Request) -> Mapping[str, Any]:
    """The posted form, refused (403 page) without this session's CSRF token."""
    data = await request.post()
    if not request.app[SESSION].check_csrf(request, data.get("csrf")):  # type: ignore[arg-type]
        raise PageError(403, "the form is missing its CSRF token or it is not this session's")
    return data


@web.middleware
async def _pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Error pages for the web UI's routes (the API's own answer JSON as before)."""
    path = request.path.removeprefix(_prefix(request))
    if not (path == "/" or path.startswith(UI + "/")) or path.startswith(UI + "/static/"):
        return await handler(request)
    user = request.app[SESSION].user(request)
    try:
        return await handler(request)
    except web.HTTPRedirection as exc:
        return web.Response(status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status in (404, 405):
            return render(request, "error.html", user=user, status=exc.status, message=exc.reason)
        raise
    except PageError as exc:
        return render(request, "error.html", user=user, status=exc.status, message=exc.message)
    except AccessDenied as exc:
        return render(request, "error.html", user=user, status=403, message=exc.reason)
    except ClusterNotFound as exc:
        return render(request, "error.html", user=user, status=404, message=exc.reason)
    except GatewayError as exc:
        return render(request, "error.html", user=user, status=400, message=exc.reason)


async def _visible_cluster(request: web.Request, user: User) -> Cluster:
    """The page's cluster; a stranger's is "not found", as an unknown one."""
    name = request.match_info["name"]
    try:
        return await request.app[MANAGER].get_cluster(user, name)
    except AccessDenied:
        raise ClusterNotFound(f"cluster {name!r} not found") from None


# --------------------------------------------------------------------------------------------
# Login and logout
# --------------------------------------------------------------------------------------------


def _login_links(request: web.Request) -> list[dict[str, str]]:
    """The authenticator's own browser flows: its GET routes whose path says login."""
    authn = request.app[AUTHN]
    links = []
    for route in authn.authenticator.web_routes():
        if route.method == "GET" and "login" in route.path:
            links.append(
                {"href": _prefix(request) + route.path + "?next=" + _prefix(request) + "/"}
            )
    return links


async def login_page(request: web.Request, *, message: str = "", status: int = 200) -> web.Response:
    """The login form (`simple`) or links to the authenticator's own browser flow; sets the
    pre-login cookie the form's CSRF token is tied to."""
    session = request.app[SESSION]
    if session.user(request) is not None and not message:
        return redirect(request, "/")
    authn = request.app[AUTHN]
    token = request.cookies.get(PRELOGIN_COOKIE) or secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html",
        user=None,
        status=status,
        csrf=session.token_for(token),
        message=message,
        form=isinstance(authn.authenticator, SimpleAuthenticator),
        authenticator=authn.authenticator.name,
        links=_login_links(request),
    )
    response.set_cookie(
        PRELOGIN_COOKIE, token, httponly=True, samesite="Strict", path="/", max_age=3600
    )
    session.secure_cookies(request, response)
    return response


async def login_get(request: web.Request) -> web.Response:
    return await login_page(request)


async def login_post(request: web.Request) -> web.StreamResponse:
    """Log in through the form (HTTP Basic credentials given to the `simple` authenticator)."""
    data = await request.post()
    prelogin = request.cookies.get(PRELOGIN_COOKIE, "")
    given = str(data.get("csrf", ""))
    if not prelogin or not hmac.compare_digest(given, request.app[SESSION].token_for(prelogin)):
        raise PageError(403, "the login form is missing its CSRF token; reload the login page")
    authn = request.app[AUTHN]
    if not isinstance(authn.authenticator, SimpleAuthenticator):
        raise PageError(400, f"the {authn.authenticator.name} authenticator has no login form")
    username = str(data.get("username", "")).strip()
    password = str(data.get("password", ""))
    if not username:
        return await login_page(request, message="Enter a user name.", status=422)
    try:
        user = authn.authenticator.check_credentials(username, password)
    except Unauthorized as exc:
        return await login_page(request, message=f"Login refused: {exc.reason}", status=401)
    response = redirect(request, "/")
    authn.finish_login(request, response, user)
    response.del_cookie(PRELOGIN_COOKIE, path="/")
    request.app[SESSION].secure_cookies(request, response)
    return response


async def login_direct(request: web.Request) -> web.StreamResponse:
    """Log in by the authenticator's own check of this request (e.g. Kerberos SPNEGO)."""
    authn = request.app[AUTHN]
    try:
        user = await authn.authenticator.authenticate(request)
    except Unauthorized as exc:
        response = render(
            request, "error.html", user=None, status=401, message=f"Login refused: {exc.reason}"
        )
        response.headers.update(exc.headers)
        return response
    response = redirect(request, "/")
    authn.finish_login(request, response, user)
    request.app[SESSION].secure_cookies(request, response)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    await _posted(request)
    response = redirect(request, UI + "/login")
    request.app[SESSION].log_out(request, response)
    request.app[SESSION].secure_cookies(request, response)
    return response


# --------------------------------------------------------------------------------------------
# User pages
# --------------------------------------------------------------------------------------------


async def home(request: web.Request) -> web.Response:
    user = _current_user(request)
    manager = request.app[MANAGER]
    clusters = await manager.list_visible_clusters(user, list(ClusterStatus), shared=True)
    clusters.sort(key=lambda c: (not c.status.is_active, -c.start_time))
    prefix = request.app[CONTEXT].prefix
    rows = [cluster_row(manager, c, prefix) for c in clusters[:MY_CLUSTERS_LIMIT]]
    return render(request, "clusters.html", user=user, clusters=rows)


async def new_cluster_get(request: web.Request) -> web.Response:
    user = _current_user(request)
    form = await request.app[MANAGER].options_for(user)
    return render(request, "new.html", user=user, fields=form_fields(form, {}), message="")


async def new_cluster_post(request: web.Request) -> web.StreamResponse:
    user = _current_user(request)
    data = await _posted(request)
    manager = request.app[MANAGER]
    form = await manager.options_for(user)
    options = options_from_form(form.fields, data)
    try:
        name = await manager.create_cluster(user, options)
    except (InvalidRequest, ClusterConflict) as exc:  # bad options, or a quota: the form again
        shown = {k: data.get(k, v) for k, v in options.items()}
        return render(
            request,
            "new.html",
            user=user,
            status=status_of(exc),
            fields=form_fields(form, shown),
            message=exc.reason,
        )
    return redirect(request, f"{UI}/cluster/{name}")


async def cluster_page(
    request: web.Request, *, message: str = "", status: int = 200
) -> web.Response:
    user = _current_user(request)
    manager = request.app[MANAGER]
    cluster = await _visible_cluster(request, user)
    logs: dict[str, str] = {}
    if request.query.get("logs") is not None:
        logs = await manager.cluster_logs(user, cluster.name, components=["all"], tail=LOG_TAIL)
    row = cluster_row(manager, cluster, request.app[CONTEXT].prefix)
    return render(
        request,
        "cluster.html",
        user=user,
        status=status,
        cluster=row,
        manages=cluster.username == user.name or manager.is_admin(user),
        workers=sorted(cluster.workers.values(), key=lambda w: w.start_time),
        logs=logs,
        message=message or request.query.get("msg", ""),
    )


async def cluster_get(request: web.Request) -> web.Response:
    return await cluster_page(request)


async def cluster_scale(request: web.Request) -> web.StreamResponse:
    user = _current_user(request)
    data = await _posted(request)
    cluster = await _visible_cluster(request, user)
    text = str(data.get("count", "")).strip()
    try:
        count = int(text)
    except ValueError:
        return await cluster_page(
            request, message=f"count: expected a whole number of workers, got {text!r}", status=422
        )
    try:
        answer = await request.app[MANAGER].scale(user, cluster.name, count)
    except (InvalidRequest, ClusterConflict) as exc:  # a bad count, or not running any more
        return await cluster_page(request, message=exc.reason, status=status_of(exc))
    message = answer.get("msg") or f"Scaling to {count} workers."
    location = f"{UI}/cluster/{cluster.name}?" + _query({"msg": message})
    return redirect(request, location)


async def cluster_stop(request: web.Request) -> web.StreamResponse:
    user = _current_user(request)
    data = await _posted(request)
    cluster = await _visible_cluster(request, user)
    await request.app[MANAGER].stop_cluster(user, cluster.name)
    back = str(data.get("next", ""))
    if back == "admin" and request.app[MANAGER].is_admin(user):
        return redirect(request, f"{UI}/admin?" + _query({"msg": f"Stopped {cluster.name}."}))
    return redirect(request, "/")


def _query(values: Mapping[str, str]) -> str:
    return urlencode(values)


async def quota_page(request: web.Request) -> web.Response:
    user = _current_user(request)
    answer = await request.app[MANAGER].quota(user)
    return render(request, "quota.html", user=user, answer=answer, rows=usage_rows(answer))


# --------------------------------------------------------------------------------------------
# Admin pages
# --------------------------------------------------------------------------------------------


async def admin_page(request: web.Request) -> web.Response:
    user = _current_user(request)
    manager = request.app[MANAGER]
    require_admin(manager, user)
    clusters = await all_clusters(manager, user)
    prefix = request.app[CONTEXT].prefix
    usage = await usage_by_user(manager, user)
    plugins_of = request.app.get(PLUGIN_INFOS)
    plugins = [p.to_json() for p in plugins_of()] if plugins_of is not None else []
    return render(
        request,
        "admin.html",
        user=user,
        clusters=[cluster_row(manager, c, prefix) for c in clusters],
        usage={name: usage_rows(answer) for name, answer in usage.items()},
        plugins=plugins,
        health=await manager.health(),
        message=request.query.get("msg", ""),
    )


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


PAGES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/", home),
    ("GET", UI + "/", home),
    ("GET", UI + "/login", login_get),
    ("POST", UI + "/login", login_post),
    ("GET", UI + "/login/direct", login_direct),
    ("POST", UI + "/logout", logout),
    ("GET", UI + "/new", new_cluster_get),
    ("POST", UI + "/new", new_cluster_post),
    ("GET", UI + "/cluster/{name}", cluster_get),
    ("POST", UI + "/cluster/{name}/scale", cluster_scale),
    ("POST", UI + "/cluster/{name}/stop", cluster_stop),
    ("GET", UI + "/quota", quota_page),
    ("GET", UI + "/admin", admin_page),
)


def add_web_ui(app: web.Application, prefixes: list[str]) -> dict[web.AbstractRoute, Access]:
    """Add the pages and static files to the API ``app`` under each of ``prefixes``; return
    their routes (public to the API's middleware: the pages check the session themselves)."""
    app[SESSION] = WebSession(authn=app[AUTHN])
    app[TEMPLATES] = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    app.middlewares.append(_pages)
    access: dict[web.AbstractRoute, Access] = {}
    for base in prefixes:
        for method, path, handler in PAGES:
            access[app.router.add_route(method, base + path, handler)] = Access.PUBLIC
        resource = app.router.add_static(base + UI + "/static", STATIC_DIR)
        for route in resource:
            access[route] = Access.PUBLIC
    return access


__all__ = ["PLUGIN_INFOS", "WEB_PATHS", "add_web_ui"]

"""Tests of the web UI's pages through aiohttp's test client (fake backend, no browser):
login and logout, sessions and cookie flags, CSRF, the forms and their validation, the same
authorization as the API, and the admin pages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web as web_
from test_api import Api, ApiFactory, make_api  # noqa: F401 - the fixture

from gateway_core.api.routes import AUTHN, MANAGER
from gateway_core.auth.base import Authenticator, Unauthorized
from gateway_core.auth.simple import SimpleAuthConfig
from gateway_core.models import ClusterStatus, User, Worker
from gateway_core.web.pages import SESSION, options_from_form

pytestmark = pytest.mark.unit

CONFIG: dict[str, Any] = {
    "gateway": {"admin_users": ["admin"]},
    "cluster": {"cluster_max_workers": 4, "max_lifetime": "8h"},
    "options": {
        "worker_cores": {"type": "int", "min": 1, "max": 4, "default": 1, "label": "Cores"},
        "profile": {
            "type": "select",
            "options": [{"key": "small", "value": 1}, {"key": "big", "value": 2}],
            "target": "scheduler_cores",
        },
        "environment": {"type": "mapping"},
    },
    "quotas": {"default": {"max_clusters": 2}},
}

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
async def web(make_api: ApiFactory) -> Api:  # noqa: F811 - test_api's fixture
    return await make_api(CONFIG, cookies=True)


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, html
    return match.group(1)


async def log_in(api: Api, user: str, **headers: str) -> str:
    """Log ``user`` in through the form; return the session's CSRF token. (Calls of the
    `Api` helper log in by Basic credentials and replace the session: make them first.)"""
    api.client.session.cookie_jar.clear()
    page = await api.client.get("/ui/login", headers=headers)
    assert page.status == 200
    token = csrf_of(await page.text())
    resp = await api.client.post(
        "/ui/login",
        data={"csrf": token, "username": user, "password": ""},
        headers=headers,
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    home = await api.client.get("/")
    assert home.status == 200
    return csrf_of(await home.text())


async def test_pages_need_a_login(web: Api) -> None:
    for path in ["/", "/ui/new", "/ui/quota", "/ui/admin", "/ui/cluster/abc"]:
        resp = await web.client.get(path, allow_redirects=False)
        assert resp.status == 303, path
        assert resp.headers["Location"] == "/ui/login"


async def test_login_sets_a_session_cookie_httponly_samesite(web: Api) -> None:
    page = await web.client.get("/ui/login")
    html = await page.text()
    assert 'id="login-form"' in html
    assert "SameSite=Strict" in page.headers["Set-Cookie"]
    token = csrf_of(html)
    resp = await web.client.post(
        "/ui/login", data={"csrf": token, "username": "alice"}, allow_redirects=False
    )
    assert resp.status == 303 and resp.headers["Location"] == "/"
    cookies = resp.headers.getall("Set-Cookie")
    cookie = next(c for c in cookies if c.startswith(web.app[AUTHN].cookie_name + "="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    home = await web.client.get("/")
    assert "alice" in await home.text()
    # the same session serves the API
    assert (await web.client.get("/api/v1/clusters/")).status == 200


async def test_cookies_are_secure_under_tls(web: Api) -> None:
    proto = {"X-Forwarded-Proto": "https"}
    page = await web.client.get("/ui/login", headers=proto)
    assert "Secure" in page.headers["Set-Cookie"]
    token = csrf_of(await page.text())
    prelogin = page.cookies["gateway-web-csrf"].value  # the jar keeps Secure ones from http
    resp = await web.client.post(
        "/ui/login",
        data={"csrf": token, "username": "alice"},
        headers={**proto, "Cookie": f"gateway-web-csrf={prelogin}"},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    cookies = resp.headers.getall("Set-Cookie")
    name = web.app[AUTHN].cookie_name + "="
    assert any(c.startswith(name) and "Secure" in c for c in cookies), cookies
    # logging out clears the cookie with the same flags
    session = next(c for c in cookies if c.startswith(name)).split(";")[0]
    home = await web.client.get("/", headers={**proto, "Cookie": session})
    token = csrf_of(await home.text())
    resp = await web.client.post(
        "/ui/logout",
        data={"csrf": token},
        headers={**proto, "Cookie": session},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    cleared = [c for c in resp.headers.getall("Set-Cookie") if c.startswith(name)]
    assert cleared and all("Secure" in c and "Max-Age=0" in c for c in cleared), cleared


async def test_login_without_its_csrf_token_is_refused(web: Api) -> None:
    await web.client.get("/ui/login")
    resp = await web.client.post("/ui/login", data={"username": "alice"}, allow_redirects=False)
    assert resp.status == 403
    assert "CSRF" in await resp.text()
    assert (await web.client.get("/", allow_redirects=False)).status == 303


async def test_a_wrong_password_shows_the_form_again(make_api: ApiFactory) -> None:  # noqa: F811
    api = await make_api(CONFIG, cookies=True, auth_config=SimpleAuthConfig(password="s3cret"))
    token = csrf_of(await (await api.client.get("/ui/login")).text())
    resp = await api.client.post(
        "/ui/login", data={"csrf": token, "username": "alice", "password": "no"}
    )
    assert resp.status == 401
    html = await resp.text()
    assert "invalid user name or password" in html and 'id="login-form"' in html


def auth_failures(api: Api) -> dict[str, float]:
    """``gateway_auth_failures_total`` by ``kind``, read from the gateway's registry."""
    return {
        sample.labels["kind"]: sample.value
        for family in api.context.metrics.registry.collect()
        if family.name == "gateway_auth_failures"
        for sample in family.samples
        if sample.name == "gateway_auth_failures_total"
    }


async def test_refused_logins_count_as_auth_failures(make_api: ApiFactory) -> None:  # noqa: F811
    api = await make_api(CONFIG, cookies=True, auth_config=SimpleAuthConfig(password="s3cret"))
    token = csrf_of(await (await api.client.get("/ui/login")).text())
    for password in ["no", "nope"]:
        resp = await api.client.post(
            "/ui/login", data={"csrf": token, "username": "alice", "password": password}
        )
        assert resp.status == 401
    # as the API's own refusals: kind "user", once each (no label for the user name)
    assert auth_failures(api) == {"user": 2}
    # neither a form without its CSRF token nor one without a user name is a credential refused
    assert (await api.client.post("/ui/login", data={"username": "alice"})).status == 403
    resp = await api.client.post("/ui/login", data={"csrf": token, "username": " "})
    assert resp.status == 422
    resp = await api.client.post(
        "/ui/login", data={"csrf": token, "username": "alice", "password": "s3cret"}
    )
    assert resp.status == 200 and resp.url.path == "/"
    assert auth_failures(api) == {"user": 2}


async def test_new_cluster_form_follows_the_options_and_shows_api_messages(web: Api) -> None:
    token = await log_in(web, "alice")
    html = await (await web.client.get("/ui/new")).text()
    assert 'id="opt-worker_cores"' in html and "Cores" in html
    assert '<option value="big"' in html and 'id="opt-environment"' in html
    before = web.backend.snapshot()
    resp = await web.client.post(
        "/ui/new", data={"csrf": token, "worker_cores": "9", "profile": "big"}
    )
    assert resp.status == 422
    html = await resp.text()
    assert "worker_cores" in html and "9" in html and "at most 4" in html.replace("&lt;", "<")
    assert web.backend.snapshot() == before
    resp = await web.client.post(
        "/ui/new", data={"csrf": token, "worker_cores": "two", "profile": "big"}
    )
    assert resp.status == 422 and "expected int, got string" in await resp.text()
    resp = await web.client.post(
        "/ui/new",
        data={"csrf": token, "worker_cores": "2", "profile": "big", "environment": '{"A": "1"}'},
        allow_redirects=False,
    )
    assert resp.status == 303
    [cluster] = web.backend.clusters.values()
    assert resp.headers["Location"] == f"/ui/cluster/{cluster.name}"
    assert cluster.options == {"worker_cores": 2, "profile": "big", "environment": {"A": "1"}}


async def test_every_option_type_has_its_input(make_api: ApiFactory) -> None:  # noqa: F811
    options = {
        "idle": {"type": "float", "min": 0.5, "max": 8.0, "default": 1.0, "target": "idle_timeout"},
        "memory": {
            "type": "string",
            "default": "1 GiB",
            "label": "Memory",
            "target": "worker_memory",
        },
        "debug": {"type": "bool", "default": True},
    }
    api = await make_api({**CONFIG, "options": options}, cookies=True)
    token = await log_in(api, "alice")
    html = await (await api.client.get("/ui/new")).text()
    assert '<input type="checkbox" name="debug" id="opt-debug" checked>' in html
    assert 'name="memory" id="opt-memory" value="1 GiB"' in html and "Memory" in html
    assert 'id="opt-idle" value="1.0"' in html and "at least 0.5, at most 8.0" in html
    resp = await api.client.post("/ui/new", data={"csrf": token, "idle": "lots", "memory": "q"})
    assert resp.status == 422 and "idle" in await resp.text()
    assert api.backend.clusters == {}
    # an unchecked box is not posted: false
    manager = api.app[MANAGER]
    fields = (await manager.options_for(User(name="alice"))).fields
    posted = {"idle": "2.5", "memory": "2 GiB"}
    assert options_from_form(fields, posted) == {"idle": 2.5, "memory": "2 GiB", "debug": False}
    assert options_from_form(fields, {**posted, "debug": "on"})["debug"] is True


async def test_quota_refusal_is_shown_in_the_form(web: Api) -> None:
    await web.create("alice")
    await web.create("alice")
    token = await log_in(web, "alice")
    resp = await web.client.post("/ui/new", data={"csrf": token, "worker_cores": "1"})
    assert resp.status == 409
    assert "max_clusters is 2 clusters" in await resp.text()
    assert len(web.backend.clusters) == 2


async def test_posts_without_the_csrf_token_change_nothing(web: Api) -> None:
    name = await web.running("alice")
    token = await log_in(web, "alice")
    before = web.backend.snapshot()
    for path, data in [
        ("/ui/new", {"worker_cores": "1"}),
        (f"/ui/cluster/{name}/scale", {"count": "2"}),
        (f"/ui/cluster/{name}/stop", {}),
        (f"/ui/cluster/{name}/stop", {"csrf": token + "x"}),
        ("/ui/logout", {}),
    ]:
        resp = await web.client.post(path, data=data)
        assert resp.status == 403, path
        assert "CSRF" in await resp.text()
    assert web.backend.snapshot() == before
    assert web.backend.forwarded == []
    assert (await web.client.get("/", allow_redirects=False)).status == 200


async def test_cluster_page_scales_stops_and_shows_logs(web: Api) -> None:
    name = await web.running("alice")
    token = await log_in(web, "alice")
    web.backend.clusters[name].dashboard_address = "http://127.0.0.1:1"
    web.backend.logs[name] = {"scheduler": "scheduler says hello"}
    web.backend.clusters[name].workers = {
        f"{name}-gpu-1": Worker(name=f"{name}-gpu-1", cluster_name=name, group="gpu")
    }
    html = await (await web.client.get(f"/ui/cluster/{name}")).text()
    assert "RUNNING" in html and f"/clusters/{name}/status" in html
    assert f"<td>{name}-gpu-1</td><td>gpu</td><td>PENDING</td>" in html  # each worker's group
    assert re.search(r"Lifetime left</dt><dd>(8h|7h59m\d+s)</dd>", html), html
    home = await (await web.client.get("/")).text()
    assert re.search(r"<td>(8h|7h59m\d+s)</td>", home), home
    resp = await web.client.post(f"/ui/cluster/{name}/scale", data={"csrf": token, "count": "x"})
    assert resp.status == 422 and "expected a whole number" in await resp.text()
    resp = await web.client.post(f"/ui/cluster/{name}/scale", data={"csrf": token, "count": "-1"})
    assert resp.status == 422 and "-1" in await resp.text()
    assert web.backend.forwarded == []
    resp = await web.client.post(f"/ui/cluster/{name}/scale", data={"csrf": token, "count": "9"})
    assert resp.status == 200
    assert "scaling to 4 workers" in (await resp.text()).lower()
    assert web.backend.forwarded[-1][1]["count"] == 4
    logs = await (await web.client.get(f"/ui/cluster/{name}?logs")).text()
    assert "scheduler says hello" in logs
    resp = await web.client.post(f"/ui/cluster/{name}/stop", data={"csrf": token})
    assert resp.status == 200 and resp.url.path == "/"
    assert web.backend.clusters[name].status == ClusterStatus.STOPPED


async def test_no_lifetime_left_without_max_lifetime(make_api: ApiFactory) -> None:  # noqa: F811
    config = {**CONFIG, "cluster": {"cluster_max_workers": 4}}
    api = await make_api(config, cookies=True)
    name = await api.running("alice")
    await log_in(api, "alice")
    html = await (await api.client.get(f"/ui/cluster/{name}")).text()
    assert "Lifetime left</dt><dd>—</dd>" in html


async def test_a_strangers_cluster_is_a_404_page(web: Api) -> None:
    name = await web.running("bob")
    token = await log_in(web, "alice")
    for resp in [
        await web.client.get(f"/ui/cluster/{name}"),
        await web.client.post(f"/ui/cluster/{name}/stop", data={"csrf": token}),
        await web.client.post(f"/ui/cluster/{name}/scale", data={"csrf": token, "count": "1"}),
        await web.client.get("/ui/cluster/no-such-cluster"),
    ]:
        assert resp.status == 404
        assert "not found" in await resp.text()
    assert web.backend.clusters[name].status == ClusterStatus.RUNNING
    html = await (await web.client.get("/")).text()
    assert name not in html


async def test_a_sharee_sees_the_cluster_but_may_not_scale_or_stop_it(web: Api) -> None:
    body = {"cluster_options": {}, "share_with_users": ["bob"]}
    resp = await web.call("POST", "/api/v2/clusters", user="alice", json=body)
    assert resp.status == 201, await resp.text()
    name = (await resp.json())["name"]
    web.backend.set_status(name, ClusterStatus.RUNNING)
    token = await log_in(web, "bob")
    home = await (await web.client.get("/")).text()
    assert name in home and "shared by alice" in home
    html = await (await web.client.get(f"/ui/cluster/{name}")).text()
    assert 'id="show-logs"' in html and 'id="shared-note"' in html
    assert 'id="scale-form"' not in html and 'id="stop-form"' not in html
    before = web.backend.snapshot()
    for path, data in [
        (f"/ui/cluster/{name}/stop", {"csrf": token}),
        (f"/ui/cluster/{name}/scale", {"csrf": token, "count": "1"}),
    ]:
        resp = await web.client.post(path, data=data)
        assert resp.status == 403, path
        assert "only its owner 'alice' and admins may" in (await resp.text()).replace("&#39;", "'")
    assert web.backend.snapshot() == before and web.backend.forwarded == []
    # the owner has the buttons
    await log_in(web, "alice")
    html = await (await web.client.get(f"/ui/cluster/{name}")).text()
    assert 'id="scale-form"' in html and 'id="stop-form"' in html
    assert 'id="shared-note"' not in html


async def test_non_admins_are_refused_the_admin_page(web: Api) -> None:
    await log_in(web, "alice")
    resp = await web.client.get("/ui/admin")
    assert resp.status == 403
    assert "not an admin" in await resp.text()
    assert "nav-admin" not in await (await web.client.get("/")).text()


async def test_admin_sees_every_cluster_and_user_and_stops_any(web: Api) -> None:
    bobs = await web.running("bob")
    web.backend.clusters[bobs].reason = None
    token = await log_in(web, "admin")
    html = await (await web.client.get("/ui/admin")).text()
    assert bobs in html and ">bob<" in html
    assert 'id="health"' in html and "pass" in html
    assert 'class="user">bob<' in html and "max_clusters" not in html  # rows say "clusters"
    resp = await web.client.post(f"/ui/cluster/{bobs}/stop", data={"csrf": token, "next": "admin"})
    assert resp.status == 200 and resp.url.path == "/ui/admin"
    assert f"Stopped {bobs}" in await resp.text()
    assert web.backend.clusters[bobs].status == ClusterStatus.STOPPED


async def test_quota_page_shows_usage_against_limits(web: Api) -> None:
    await web.running("alice")
    await log_in(web, "alice")
    html = await (await web.client.get("/ui/quota")).text()
    assert "user alice" in html
    assert re.search(r"<td>clusters</td><td>1</td><td>2</td>", html), html


async def test_logout_ends_the_session(web: Api) -> None:
    token = await log_in(web, "alice")
    resp = await web.client.post("/ui/logout", data={"csrf": token}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/ui/login"
    assert len(web.app[AUTHN].cache) == 0
    assert (await web.client.get("/", allow_redirects=False)).status == 303


async def test_unknown_pages_are_html_and_the_api_stays_json(web: Api) -> None:
    resp = await web.client.get("/ui/nothing-here")
    assert resp.status == 404 and resp.content_type == "text/html"
    resp = await web.client.get("/api/nothing-here")
    assert resp.status == 404 and resp.content_type == "application/json"
    css = await web.client.get("/ui/static/style.css")
    assert css.status == 200 and "text/css" in css.content_type


async def test_scaling_a_cluster_that_is_not_running_says_why(web: Api) -> None:
    name = await web.create("alice")  # PENDING
    token = await log_in(web, "alice")
    resp = await web.client.post(f"/ui/cluster/{name}/scale", data={"csrf": token, "count": "1"})
    assert resp.status == 409
    assert "is PENDING, not RUNNING" in await resp.text()
    assert web.backend.forwarded == []


class HubLikeAuth(Authenticator):
    """An authenticator with its own browser flow (as JupyterHub's OAuth), and no form."""

    name = "hub"

    async def authenticate(self, request: web_.Request) -> User:
        raise Unauthorized("log in through the hub")

    def web_routes(self) -> Sequence[web_.RouteDef]:
        async def login(request: web_.Request) -> web_.Response:
            return web_.Response(text="hub login")

        return [web_.get("/api/v2/oauth/login", login)]


async def test_other_authenticators_link_to_their_own_browser_flow(
    make_api: ApiFactory,  # noqa: F811 - test_api's fixture
) -> None:
    api = await make_api(CONFIG, cookies=True, auth_class=HubLikeAuth)
    html = await (await api.client.get("/ui/login")).text()
    assert 'id="login-form"' not in html
    assert 'href="/api/v2/oauth/login?next=/"' in html
    token = api.app[SESSION].token_for(
        api.client.session.cookie_jar.filter_cookies(api.client.make_url("/"))[
            "gateway-web-csrf"
        ].value
    )
    resp = await api.client.post("/ui/login", data={"csrf": token, "username": "x"})
    assert resp.status == 400 and "has no login form" in await resp.text()
    assert len(api.app[AUTHN].cache) == 0
    resp = await api.client.get("/ui/login/direct")
    assert resp.status == 401 and "log in through the hub" in await resp.text()
    assert auth_failures(api) == {"user": 1}


VOID = frozenset(
    [
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "track",
        "wbr",
    ]
)  # elements without an end tag


class PageCheck(HTMLParser):
    """A page's links and form actions, and what makes its HTML invalid: end tags that do not
    close the open element, duplicate ids, form controls without a label."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.ids: list[str] = []
        self.links: list[str] = []
        self.actions: list[str] = []
        self.labelled: set[str] = set()
        self.controls: list[tuple[str | None, bool]] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.append(a["id"])
        if tag in ("a", "link") and a.get("href"):
            self.links.append(a["href"])
        if tag == "form":
            self.actions.append(a.get("action", ""))
        if tag == "label" and a.get("for"):
            self.labelled.add(a["for"])
        if tag in ("input", "select", "textarea") and a.get("type") not in (
            "hidden",
            "submit",
            "button",
        ):
            self.controls.append((a.get("id"), "label" in self.open))
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"</{tag}> while <{self.open[-1] if self.open else ''}> is open")
        else:
            self.open.pop()

    def check(self, html: str) -> list[str]:
        self.feed(html)
        self.close()
        problems = list(self.problems)
        if self.open != []:
            problems.append(f"never closed: {self.open}")
        dupes = {i for i in self.ids if self.ids.count(i) > 1}
        if dupes:
            problems.append(f"duplicate ids: {sorted(dupes)}")
        for ident, wrapped in self.controls:
            if not wrapped and ident not in self.labelled:
                problems.append(f"a form control without a label: id={ident!r}")
        return problems


async def crawl(api: Api, start: Sequence[str]) -> dict[str, int]:
    """Follow every link of the gateway's pages from ``start``; check each page's HTML and
    that its form actions are routes; answer the status of every URL reached."""
    seen: dict[str, int] = {}
    todo = list(start)
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        resp = await api.client.get(url)
        seen[url] = resp.status
        if resp.content_type != "text/html":
            continue
        page = PageCheck()
        problems = page.check(await resp.text())
        assert problems == [], (url, problems)
        for action in page.actions:
            # POST routes answer a GET 405; a form posting nowhere would be a 404
            status = (await api.client.get(action, allow_redirects=False)).status
            assert status in (200, 405), (url, action, status)
        for link in page.links:
            parts = urlsplit(link)
            assert not parts.scheme and not parts.netloc, (url, link)  # nothing external
            if parts.path.startswith("/clusters/"):  # dashboards: the proxy's, not the API's
                assert re.fullmatch(r"/clusters/[0-9a-f]+/status", parts.path), (url, link)
                continue
            todo.append(link)
    return seen


async def test_every_link_of_every_page_answers_and_the_html_is_sound(web: Api) -> None:
    names = []
    for user in ["admin", "bob", "alice"]:
        web.client.session.cookie_jar.clear()  # the API's session would be the last user's
        names.append(await web.running(user))
    mine, bobs, alices = names
    for name in names:
        web.backend.clusters[name].dashboard_address = "http://127.0.0.1:1"
    web.backend.logs[mine] = {"scheduler": "hello"}
    web.client.session.cookie_jar.clear()
    visited = await crawl(web, ["/ui/login"])
    assert visited == {  # "/" leads to the login page
        "/ui/login": 200,
        "/": 200,
        "/api/health": 200,
        "/ui/static/style.css": 200,
    }
    await log_in(web, "admin")
    visited = await crawl(web, ["/"])
    broken = {url: status for url, status in visited.items() if status != 200}
    assert broken == {}, broken
    for url in ["/", "/ui/new", "/ui/quota", "/ui/admin", f"/ui/cluster/{bobs}", "/api/health"]:
        assert url in visited, sorted(visited)
    await log_in(web, "alice")
    visited = await crawl(web, ["/", "/ui/nothing-here"])
    broken = {url: status for url, status in visited.items() if status != 200}
    assert broken == {"/ui/nothing-here": 404}, broken
    assert f"/ui/cluster/{alices}" in visited and "/ui/admin" not in visited

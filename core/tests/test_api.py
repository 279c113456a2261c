"""Tests of the REST API (PROTOCOL.md) and the cluster manager behind it, over a fake backend.

The backend here is an in-memory dict of `Cluster` records (no reconciler); the API runs in an
aiohttp test server and is called over real HTTP on loopback. Every refused request is checked
for its status, an error that names the problem, an unchanged store and a server still serving.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

import aiohttp
import attrs
import pluggy
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

import gateway_core
import gateway_core.hookspecs
from gateway_core.api.app import log_in, make_api_app
from gateway_core.api.routes import AUTHN
from gateway_core.auth.simple import SimpleAuthConfig, SimpleAuthenticator
from gateway_core.backends.base import Backend, ClusterConflict
from gateway_core.config import (
    BackendConfig,
    ClusterConfig,
    ConfigError,
    load_config,
    unstructure,
)
from gateway_core.context import GatewayContext
from gateway_core.events import ClusterEvent
from gateway_core.hookcaller import GatewayHooks
from gateway_core.hookspecs import hookimpl
from gateway_core.manager import (
    LOG_COMPONENT_BYTES,
    LOG_MAX_WORKERS,
    LOG_TAIL_DEFAULT,
    NO_LOG,
    ClusterManager,
)
from gateway_core.models import (
    Cluster,
    ClusterStatus,
    User,
    Worker,
    WorkerStatus,
    new_name,
    new_token,
    now_ms,
)
from gateway_core.options import Integer, Options, OptionsError
from gateway_core.options import Mapping as OptionsMapping
from gateway_core.routes import EventsGone, Route, RouteTable

pytestmark = pytest.mark.unit

PROXY_TOKEN = "proxy-" + "x" * 40
MAX_BODY = 4096
CLUSTER_KEYS = {
    "name",
    "dashboard_route",
    "status",
    "start_time",
    "stop_time",
    "options",
    "tls_cert",
    "tls_key",
}

BASE_CONFIG: dict[str, Any] = {
    "gateway": {"admin_users": ["admin"], "max_body_size": MAX_BODY, "wait_timeout": 2.0},
    "cluster": {"cluster_max_workers": 4},
    "options": {
        "worker_cores": {"type": "int", "min": 1, "max": 4, "default": 1, "label": "Cores"},
        "idle_timeout": {"type": "float", "min": 0, "max": 3600, "default": 600},
        "profile": {
            "type": "select",
            "options": [{"key": "small", "value": 1}, {"key": "big", "value": 2}],
            "target": "scheduler_cores",
        },
        "environment": {"type": "mapping"},
    },
}


# --------------------------------------------------------------------------------------------
# A fake backend and the plugins tests register
# --------------------------------------------------------------------------------------------


class FakeBackend(Backend):
    """Clusters in a dict; heartbeats make a cluster RUNNING; nothing runs anywhere."""

    def __init__(self, *, context: GatewayContext) -> None:
        super().__init__(
            config=BackendConfig(), cluster_config_class=ClusterConfig, context=context
        )
        self.clusters: dict[str, Cluster] = {}
        self.forwarded: list[tuple[str, dict[str, Any]]] = []
        self.heartbeats: list[tuple[str, dict[str, Any]]] = []
        self.refuse_forward: str | None = None
        self.healthy: Any = True
        self.fail_listing = False
        self.slow_stop = False
        """When set, a stop leaves the cluster STOPPING (target STOPPED), as a real one is."""
        self.logs: dict[str, dict[str, str]] = {}
        """Cluster name → component → the text `cluster_logs` answers (others: left out)."""
        self.log_calls: list[tuple[str, list[str], int, int]] = []
        self._changed: dict[str, asyncio.Event] = {}

    def snapshot(self) -> dict[str, Any]:
        """Everything a request could change, to check that refused ones changed nothing."""
        return {
            "clusters": {n: attrs.asdict(c) for n, c in self.clusters.items()},
            "forwarded": list(self.forwarded),
            "heartbeats": list(self.heartbeats),
        }

    def health(self) -> Any:
        if isinstance(self.healthy, Exception):
            raise self.healthy
        return self.healthy

    def set_status(self, name: str, status: ClusterStatus) -> None:
        cluster = self.clusters[name]
        cluster.status = status
        if status == ClusterStatus.RUNNING:
            cluster.dashboard_address = "http://127.0.0.1:8787"
            cluster.tls_cert = b"CERT"
            cluster.tls_key = b"KEY"
        self._changed.setdefault(name, asyncio.Event()).set()

    async def list_clusters(
        self,
        *,
        username: str | None = None,
        statuses: Collection[ClusterStatus] | None = None,
    ) -> list[Cluster]:
        if self.fail_listing:
            raise RuntimeError("the store is on fire")
        return [
            c
            for c in self.clusters.values()
            if (username is None or c.username == username)
            and (statuses is None or c.status in statuses)
        ]

    async def get_cluster(self, name: str, *, wait: bool = False) -> Cluster | None:
        cluster = self.clusters.get(name)
        if cluster is not None and wait and cluster.status == ClusterStatus.PENDING:
            event = self._changed.setdefault(name, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), self.context.config.gateway.wait_timeout)
            except TimeoutError:
                pass
        return cluster

    async def start_cluster(
        self, *, user: User, options: dict[str, Any], config: ClusterConfig
    ) -> str:
        name = new_name()
        self.clusters[name] = Cluster(
            name=name,
            username=user.name,
            token=new_token(),
            options=dict(options),
            config=unstructure(config),
        )
        return name

    async def stop_cluster(
        self, name: str, *, failed: bool = False, reason: str | None = None
    ) -> None:
        cluster = self.clusters.get(name)
        if cluster is not None and cluster.status.is_active:
            cluster.target = ClusterStatus.FAILED if failed else ClusterStatus.STOPPED
            if self.slow_stop:
                cluster.status = ClusterStatus.STOPPING
                return
            cluster.status = ClusterStatus.STOPPED
            cluster.stop_time = now_ms()

    async def on_cluster_heartbeat(self, name: str, msg: dict[str, Any]) -> None:
        cluster = self.clusters[name]
        if not cluster.status.is_active:
            raise ClusterConflict(f"cluster {name} is {cluster.status.name}; exit")
        self.heartbeats.append((name, msg))
        cluster.count = msg.get("count", cluster.count)
        self.set_status(name, ClusterStatus.RUNNING)

    async def forward_to_scheduler(self, cluster: Cluster, msg: dict[str, Any]) -> None:
        if self.refuse_forward:
            raise ClusterConflict(self.refuse_forward)
        self.forwarded.append((cluster.name, msg))

    async def cluster_logs(
        self, cluster: Cluster, *, components: Sequence[str], tail: int, max_bytes: int
    ) -> dict[str, str]:
        self.log_calls.append((cluster.name, list(components), tail, max_bytes))
        texts = self.logs.get(cluster.name, {})
        return {c: texts[c] for c in components if c in texts}


class FileOptions:
    """Stands in for core's built-in plugin: the form of the `[options]` tables."""

    @hookimpl(trylast=True)
    def gateway_cluster_options(self, user: User, config: Any) -> Options:
        return Options.from_config(config.options)


class Observer:
    def __init__(self) -> None:
        self.events: list[ClusterEvent] = []

    @hookimpl
    def gateway_cluster_event(self, event: ClusterEvent) -> None:
        self.events.append(event)


class CountingAuth(SimpleAuthenticator):
    """The simple authenticator, counting calls; ``root`` is an admin by its User record, and
    every full login gets an ``X-Login`` header through ``pre_response``."""

    calls = 0

    async def authenticate(self, request: web.Request) -> User:
        self.calls += 1
        user = await super().authenticate(request)
        return User(name=user.name, admin=user.name == "root")

    def pre_response(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Login"] = "fresh"


@attrs.define(kw_only=True)
class Api:
    client: TestClient[web.Request, web.Application]
    app: web.Application
    backend: FakeBackend
    auth: CountingAuth
    context: GatewayContext
    observer: Observer

    async def call(
        self,
        method: str,
        path: str | URL,
        *,
        user: str | None = "alice",
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> aiohttp.ClientResponse:
        all_headers = dict(headers or {})
        if user is not None and "Authorization" not in all_headers:
            all_headers["Authorization"] = basic(user)
        return await self.client.request(method, path, headers=all_headers, **kwargs)

    async def create(self, user: str = "alice", **options: Any) -> str:
        resp = await self.call(
            "POST", "/api/v1/clusters/", user=user, json={"cluster_options": options}
        )
        assert resp.status == 201, await resp.text()
        name: str = (await resp.json())["name"]
        return name

    async def running(self, user: str = "alice", **options: Any) -> str:
        name = await self.create(user, **options)
        self.backend.set_status(name, ClusterStatus.RUNNING)
        return name

    async def refused(
        self,
        method: str,
        path: str | URL,
        status: int,
        *needles: str,
        **kwargs: Any,
    ) -> aiohttp.ClientResponse:
        """Make a request that must fail: check status, error text, store, and liveness."""
        before = self.backend.snapshot()
        resp = await self.call(method, path, **kwargs)
        text = await resp.text()
        assert resp.status == status, text
        error = json.loads(text)["error"]
        for needle in needles:
            assert needle in error, (needle, error)
        assert self.backend.snapshot() == before
        health = await self.client.get("/api/health")
        assert health.status == 200
        return resp


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


ApiFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api() -> AsyncIterator[ApiFactory]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def factory(
        config: Mapping[str, Any] | None = None,
        *,
        plugins: Collection[object] = (),
        cookies: bool = False,
        max_events: int = 100,
        prefix: str = "",
        auth_config: SimpleAuthConfig | None = None,
        auth_class: type[CountingAuth] | None = None,
    ) -> Api:
        pm = pluggy.PluginManager("gateway")
        pm.add_hookspecs(gateway_core.hookspecs)
        observer = Observer()
        pm.register(FileOptions(), name="file-options")
        pm.register(observer, name="observer")
        for i, plugin in enumerate(plugins):
            pm.register(plugin, name=f"test-plugin-{i}")
        cfg = load_config(dict(BASE_CONFIG if config is None else config))
        context = GatewayContext(
            config=cfg,
            hook=GatewayHooks.from_plugin_manager(pm),
            routes=RouteTable(max_events=max_events),
            prefix=prefix,
        )
        backend = FakeBackend(context=context)
        auth = (auth_class or CountingAuth)(
            config=auth_config or SimpleAuthConfig(), context=context
        )
        manager = ClusterManager(
            backend=backend,
            context=context,
            cluster_config_class=ClusterConfig,
            cluster_defaults=cfg.cluster,
        )
        app = make_api_app(
            manager=manager, authenticator=auth, context=context, proxy_token=PROXY_TOKEN
        )
        jar: aiohttp.abc.AbstractCookieJar = (
            aiohttp.CookieJar(unsafe=True) if cookies else aiohttp.DummyCookieJar()
        )
        client = TestClient(TestServer(app), cookie_jar=jar)
        await client.start_server()
        clients.append(client)
        return Api(
            client=client,
            app=app,
            backend=backend,
            auth=auth,
            context=context,
            observer=observer,
        )

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def api(make_api: ApiFactory) -> Api:
    return await make_api()


# --------------------------------------------------------------------------------------------
# Health, version, routing errors
# --------------------------------------------------------------------------------------------


async def test_health_passes_without_authentication(api: Api) -> None:
    resp = await api.call("GET", "/api/health", user=None)
    assert resp.status == 200
    assert await resp.json() == {"status": "pass"}


@pytest.mark.parametrize(
    "healthy",
    [False, {"status": "fail", "db": "down"}, RuntimeError("no database")],
)
async def test_health_fails_with_503_when_backend_is_unhealthy(api: Api, healthy: Any) -> None:
    api.backend.healthy = healthy
    resp = await api.call("GET", "/api/health", user=None)
    assert resp.status == 503
    body = await resp.json()
    assert body["status"] == "fail"
    if isinstance(healthy, dict):
        assert body["db"] == "down"
    if isinstance(healthy, Exception):
        assert "no database" in body["reason"]


async def test_version(api: Api) -> None:
    resp = await api.call("GET", "/api/version", user=None)
    assert resp.status == 200
    assert await resp.json() == {"version": gateway_core.__version__}


async def test_unknown_route_and_method_are_json_errors(api: Api) -> None:
    resp = await api.refused("GET", "/api/v1/nothing", 404, "no such API route")
    assert resp.content_type == "application/json"
    await api.refused("PUT", "/api/v1/options", 405, "method PUT is not allowed", "GET")


async def test_unexpected_exception_is_a_500_and_the_server_keeps_serving(api: Api) -> None:
    await api.create()
    api.backend.fail_listing = True
    resp = await api.refused("GET", "/api/v1/clusters/", 500, "internal server error")
    assert "on fire" not in (await resp.json())["error"]  # internals are logged, not shown
    api.backend.fail_listing = False
    resp = await api.call("GET", "/api/v1/clusters/")
    assert resp.status == 200
    assert len(await resp.json()) == 1


async def test_routes_are_also_served_under_the_proxy_prefix(make_api: ApiFactory) -> None:
    api = await make_api(prefix="/gw")
    assert (await api.call("GET", "/gw/api/version", user=None)).status == 200
    assert (await api.call("GET", "/gw/api/v1/options")).status == 200
    assert (await api.call("GET", "/gw/api/v1/options", user=None)).status == 401
    name = await api.running()
    cluster = await (await api.call("GET", f"/gw/api/v1/clusters/{name}")).json()
    assert cluster["dashboard_route"] == f"/gw/clusters/{name}/status"


# --------------------------------------------------------------------------------------------
# Authentication and the login cookie
# --------------------------------------------------------------------------------------------

USER_ROUTES = [
    ("GET", "/api/v1/options"),
    ("GET", "/api/v1/clusters/"),
    ("POST", "/api/v1/clusters/"),
    ("GET", "/api/v1/clusters/abc"),
    ("DELETE", "/api/v1/clusters/abc"),
    ("POST", "/api/v1/clusters/abc/scale"),
    ("POST", "/api/v1/clusters/abc/adapt"),
]


@pytest.mark.parametrize(("method", "path"), USER_ROUTES)
async def test_user_routes_need_authentication(api: Api, method: str, path: str) -> None:
    await api.create()
    resp = await api.refused(method, path, 401, "authentication required", user=None, json={})
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="gateway"'


async def test_wrong_password_is_401(make_api: ApiFactory) -> None:
    api = await make_api(auth_config=SimpleAuthConfig(password="pw"))
    await api.refused(
        "GET", "/api/v1/clusters/", 401, "invalid user name or password", user="alice"
    )
    headers = {"Authorization": basic("alice", "pw")}
    assert (await api.call("GET", "/api/v1/clusters/", headers=headers)).status == 200


async def test_login_cookie_skips_the_authenticator_until_it_expires(make_api: ApiFactory) -> None:
    api = await make_api(cookies=True, auth_config=SimpleAuthConfig(cache_max_age=60))
    now = [1000.0]
    api.app[AUTHN].cache.clock = lambda: now[0]

    first = await api.call("GET", "/api/v1/clusters/")
    assert first.status == 200
    assert api.auth.calls == 1
    assert first.headers["X-Login"] == "fresh"  # pre_response ran after a full login
    cookie = first.cookies["gateway-simple"]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Lax"
    assert cookie["max-age"] == "60"
    assert len(cookie.value) >= 32

    second = await api.call("GET", "/api/v1/clusters/", user=None)
    assert second.status == 200
    assert api.auth.calls == 1  # the cookie did it
    assert "X-Login" not in second.headers

    now[0] += 61
    await api.refused("GET", "/api/v1/clusters/", 401, "authentication required", user=None)
    assert api.auth.calls == 2  # expired: the authenticator was asked again

    again = await api.call("GET", "/api/v1/clusters/")
    assert again.status == 200
    assert api.auth.calls == 3
    assert again.cookies["gateway-simple"].value != cookie.value


async def test_unknown_cookie_falls_back_to_the_authenticator(make_api: ApiFactory) -> None:
    api = await make_api()
    headers = {"Cookie": "gateway-simple=forged"}
    await api.refused("GET", "/api/v1/clusters/", 401, "authentication", user=None, headers=headers)
    assert api.auth.calls == 1


async def test_cookie_is_set_even_when_the_handler_refuses(make_api: ApiFactory) -> None:
    api = await make_api(cookies=True)
    resp = await api.refused("GET", "/api/v1/clusters/unknown", 404, "not found")
    assert "gateway-simple" in resp.cookies
    resp = await api.call("GET", "/api/v1/clusters/", user=None)
    assert resp.status == 200
    assert api.auth.calls == 1


async def test_cookie_name_comes_from_the_config(make_api: ApiFactory) -> None:
    api = await make_api(cookies=True, auth_config=SimpleAuthConfig(cookie_name="my-login"))
    resp = await api.call("GET", "/api/v1/options")
    assert "my-login" in resp.cookies


# --------------------------------------------------------------------------------------------
# Options and creating clusters
# --------------------------------------------------------------------------------------------


async def test_options_route_lists_the_form(api: Api) -> None:
    resp = await api.call("GET", "/api/v1/options")
    assert resp.status == 200
    spec = (await resp.json())["cluster_options"]
    assert [s["field"] for s in spec] == ["worker_cores", "idle_timeout", "profile", "environment"]
    assert spec[0] == {
        "field": "worker_cores",
        "label": "Cores",
        "default": 1,
        "spec": {"type": "int", "min": 1, "max": 4},
    }
    assert spec[2]["spec"] == {"type": "select", "options": ["small", "big"]}


async def test_create_cluster(api: Api) -> None:
    name = await api.create(worker_cores=2, profile="big", environment={"A": "1"})
    cluster = api.backend.clusters[name]
    assert cluster.username == "alice"
    assert cluster.options == {
        "worker_cores": 2,
        "idle_timeout": 600.0,
        "profile": "big",
        "environment": {"A": "1"},
    }
    # each option lands on its target; the select's value, not its key
    assert cluster.config["worker_cores"] == 2
    assert cluster.config["scheduler_cores"] == 2
    assert cluster.config["environment"] == {"A": "1"}
    assert cluster.config["cluster_max_workers"] == 4  # from [cluster]
    assert [(e.kind, e.cluster_name, e.username) for e in api.observer.events] == [
        ("created", name, "alice")
    ]


async def test_create_without_options_uses_defaults(make_api: ApiFactory) -> None:
    api = await make_api({"options": {"worker_cores": {"type": "int", "min": 1, "default": 3}}})
    resp = await api.call("POST", "/api/v1/clusters", json={})
    assert resp.status == 201
    name = (await resp.json())["name"]
    assert api.backend.clusters[name].config["worker_cores"] == 3
    resp = await api.call("POST", "/api/v1/clusters/", json={"cluster_options": None})
    assert resp.status == 201


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ({"cluster_options": {"worker_gpus": 1}}, ["unknown option 'worker_gpus'"]),
        ({"cluster_options": {"worker_cores": "2"}}, ["worker_cores: expected int, got string"]),
        ({"cluster_options": {"worker_cores": True}}, ["worker_cores: expected int, got bool"]),
        ({"cluster_options": {"worker_cores": 9}}, ["worker_cores: 9 is above the maximum of 4"]),
        ({"cluster_options": {"profile": "huge"}}, ["profile: 'huge' is not one of small, big"]),
        ({"cluster_options": {"environment": [1]}}, ["environment: expected mapping"]),
        ({"cluster_options": [1]}, ["cluster_options: expected an object, got array"]),
        ({"cluster_options": {}, "extra": 1}, ["unknown key 'extra'", "cluster_options"]),
        ([1, 2], ["request body must be a JSON object, got array"]),
    ],
)
async def test_create_with_bad_options_is_422(api: Api, body: Any, needles: list[str]) -> None:
    await api.refused("POST", "/api/v1/clusters/", 422, *needles, json=body)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b'{"cluster_options": ', "malformed JSON in request body: Expecting value at line 1"),
        (b"{'single': 1}", "malformed JSON in request body"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b"", "request body is empty"),
        (b"\xff\xfe{}", "request body is not UTF-8"),
        (b"[" * 100_0 + b"]" * 100_0, "nested too deeply"),
    ],
)
async def test_malformed_json_is_422(api: Api, data: bytes, needle: str) -> None:
    headers = {"Content-Type": "application/json"}
    await api.refused("POST", "/api/v1/clusters/", 422, needle, data=data, headers=headers)


async def test_huge_body_is_413(api: Api) -> None:
    name = await api.running()
    body = json.dumps({"cluster_options": {"environment": {"A": "x" * (MAX_BODY * 4)}}})
    await api.refused(
        "POST", "/api/v1/clusters/", 413, f"limit of {MAX_BODY} bytes", data=body.encode()
    )
    body = json.dumps({"count": 1, "pad": "x" * (MAX_BODY * 2)})
    await api.refused("POST", f"/api/v1/clusters/{name}/scale", 413, "larger than", data=body)


# --------------------------------------------------------------------------------------------
# Listing and reading clusters
# --------------------------------------------------------------------------------------------


async def test_list_shows_the_callers_active_clusters(api: Api) -> None:
    pending = await api.create()
    running = await api.running()
    stopped = await api.create()
    api.backend.set_status(stopped, ClusterStatus.STOPPED)
    await api.create(user="bob")
    resp = await api.call("GET", "/api/v1/clusters/")
    assert resp.status == 200
    listed = await resp.json()
    assert set(listed) == {pending, running}
    assert set(listed[running]) == CLUSTER_KEYS
    assert listed[running]["status"] == "RUNNING"
    assert listed[pending]["status"] == "PENDING"

    resp = await api.call("GET", "/api/v1/clusters/?status=stopped,Running")
    assert set(await resp.json()) == {stopped, running}
    resp = await api.call("GET", "/api/v1/clusters?status=STOPPED&status=pending")
    assert set(await resp.json()) == {stopped, pending}


async def test_default_list_leaves_out_clusters_asked_to_stop(api: Api) -> None:
    """As the original gateway: the default list is the clusters whose target is not stopped,
    so a cluster leaves it as soon as it is asked to stop, while it is still STOPPING."""
    api.backend.slow_stop = True
    kept = await api.running()
    stopping = await api.running()
    resp = await api.call("DELETE", f"/api/v1/clusters/{stopping}")
    assert resp.status == 204
    assert api.backend.clusters[stopping].status == ClusterStatus.STOPPING
    assert set(await (await api.call("GET", "/api/v1/clusters/")).json()) == {kept}
    listed = await (await api.call("GET", "/api/v1/clusters/?status=stopping")).json()
    assert set(listed) == {stopping}
    assert listed[stopping]["status"] == "STOPPING"
    listed = await (await api.call("GET", "/api/v1/clusters/?status=running,stopping")).json()
    assert set(listed) == {kept, stopping}


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("BOGUS", "status: unknown cluster status 'BOGUS'"),
        ("RUNNING,", "unknown cluster status ''"),
        ("", "unknown cluster status ''"),
        ("running;stopped", "'running;stopped'"),
    ],
)
async def test_bad_status_filter_is_422(api: Api, query: str, needle: str) -> None:
    await api.create()
    await api.refused("GET", f"/api/v1/clusters/?status={query}", 422, needle)


async def test_get_cluster(api: Api) -> None:
    name = await api.running(worker_cores=2)
    resp = await api.call("GET", f"/api/v1/clusters/{name}")
    assert resp.status == 200
    cluster = await resp.json()
    assert set(cluster) == CLUSTER_KEYS
    assert cluster["name"] == name
    assert cluster["status"] == "RUNNING"
    assert cluster["dashboard_route"] == f"/clusters/{name}/status"
    assert cluster["tls_cert"] == "CERT"
    assert cluster["tls_key"] == "KEY"
    assert cluster["options"]["worker_cores"] == 2
    assert isinstance(cluster["start_time"], int)
    assert cluster["stop_time"] is None


async def test_list_and_get_answer_the_bytes_json_dumps_would(api: Api) -> None:
    """The cached encoding changes nothing on the wire: the same bytes and headers as
    ``web.json_response`` of the cluster JSON, before and after a cluster changes."""
    one = await api.running(worker_cores=2)
    two = await api.create()
    for _ in range(2):  # the second time from the cache
        resp = await api.call("GET", "/api/v1/clusters/")
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        expected = {n: api.backend.clusters[n].to_json() for n in (one, two)}
        assert await resp.read() == json.dumps(expected).encode()
        resp = await api.call("GET", f"/api/v1/clusters/{one}")
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        assert await resp.read() == json.dumps(api.backend.clusters[one].to_json()).encode()
    api.backend.set_status(two, ClusterStatus.RUNNING)
    listed = await (await api.call("GET", "/api/v1/clusters/")).json()
    assert listed[two]["status"] == "RUNNING" and listed[two]["tls_cert"] == "CERT"
    resp = await api.call("GET", "/api/v1/clusters/?status=stopped")
    assert await resp.read() == b"{}"


def test_cluster_json_bytes_are_cached_until_a_shown_field_changes() -> None:
    cluster = Cluster(name="c1", username="alice", token="t", options={"cores": 1})
    first = cluster.json_bytes()
    assert first == json.dumps(cluster.to_json()).encode()
    assert cluster.json_bytes() is first  # cached: not encoded again
    cluster.last_heartbeat = 123.0  # not shown in the JSON: still cached
    cluster.count = 3
    assert cluster.json_bytes() is first
    with_prefix = cluster.json_bytes(prefix="/gw")
    assert with_prefix == json.dumps(cluster.to_json(prefix="/gw")).encode()
    changes: list[Callable[[Cluster], None]] = [
        lambda c: setattr(c, "status", ClusterStatus.RUNNING),
        lambda c: setattr(c, "dashboard_address", "http://127.0.0.1:8787"),
        lambda c: setattr(c, "tls_cert", b"CERT"),
        lambda c: setattr(c, "tls_key", b"KEY"),
        lambda c: setattr(c, "stop_time", 99),
        lambda c: setattr(c, "start_time", 7),
        lambda c: setattr(c, "options", {"cores": 2}),
        lambda c: c.options.update(cores=3),  # changed in place: still seen
        lambda c: setattr(c, "status", ClusterStatus.STOPPED),
    ]
    for change in changes:
        before = cluster.json_bytes(prefix="/gw")
        change(cluster)
        after = cluster.json_bytes(prefix="/gw")
        assert after != before
        assert after == json.dumps(cluster.to_json(prefix="/gw")).encode()
    assert b'"cores": 3' in cluster.json_bytes()


async def test_v2_reason_route_tells_why_a_cluster_failed(api: Api) -> None:
    name = await api.running()
    resp = await api.call("GET", f"/api/v2/clusters/{name}/reason")
    assert (resp.status, await resp.json()) == (200, {"name": name, "reason": None})
    api.backend.clusters[name].status = ClusterStatus.FAILED
    api.backend.clusters[name].reason = "scheduler exited: ImportError: no module named foo"
    resp = await api.call("GET", f"/api/v2/clusters/{name}/reason")
    assert (await resp.json())["reason"].startswith("scheduler exited: ImportError")
    await api.refused("GET", f"/api/v2/clusters/{name}/reason", 403, "may not view", user="bob")
    await api.refused("GET", "/api/v2/clusters/nope/reason", 404, "'nope' not found")


def add_workers(api: Api, name: str, *states: WorkerStatus) -> list[str]:
    """Worker records on cluster ``name``, started one after the other; their names."""
    cluster = api.backend.clusters[name]
    names = []
    for i, status in enumerate(states):
        worker = Worker(
            name=new_name(), cluster_name=name, status=status, start_time=now_ms() - 1000 + i
        )
        cluster.workers[worker.name] = worker
        names.append(worker.name)
    return names


async def test_v2_logs_route_answers_each_component(api: Api) -> None:
    name = await api.running()
    w1, w2 = add_workers(api, name, WorkerStatus.RUNNING, WorkerStatus.STOPPED)
    api.backend.logs[name] = {"scheduler": "s1\ns2", w1: "worker one"}
    path = f"/api/v2/clusters/{name}/logs"

    resp = await api.call("GET", path)
    assert resp.status == 200
    logs = await resp.json()
    # Scheduler first, then workers in start order; what the backend left out says so.
    assert list(logs) == ["scheduler", w1, w2]
    assert logs == {"scheduler": "s1\ns2", w1: "worker one", w2: NO_LOG}
    assert api.backend.log_calls[-1][1:3] == (["scheduler", w1, w2], LOG_TAIL_DEFAULT)

    for query, expected in (
        ("component=scheduler", ["scheduler"]),
        (f"component={w2}", [w2]),
        ("component=workers", [w1, w2]),
        (f"component={w2},scheduler", ["scheduler", w2]),
        (f"component={w2}&component=scheduler", ["scheduler", w2]),
        ("component=all&tail=5", ["scheduler", w1, w2]),
    ):
        resp = await api.call("GET", f"{path}?{query}")
        assert resp.status == 200, await resp.text()
        assert list(await resp.json()) == expected, query
    assert api.backend.log_calls[-1][2] == 5
    assert all(0 < max_bytes <= LOG_COMPONENT_BYTES for *_, max_bytes in api.backend.log_calls)

    # Admins read anyone's logs.
    resp = await api.call("GET", f"{path}?component=scheduler", user="admin")
    assert (resp.status, await resp.json()) == (200, {"scheduler": "s1\ns2"})


async def test_v2_logs_route_bounds_what_it_answers(api: Api) -> None:
    name = await api.running()
    big = "".join(f"line {i:07d}\n" for i in range(200_000))  # 2.6 MB
    api.backend.logs[name] = {"scheduler": big}
    resp = await api.call("GET", f"/api/v2/clusters/{name}/logs?component=scheduler")
    text = (await resp.json())["scheduler"]
    max_bytes = api.backend.log_calls[-1][3]
    assert len(text.encode()) <= max_bytes <= LOG_COMPONENT_BYTES
    assert text.endswith("line 0199999\n")
    assert text.startswith("line ")  # cut at a line's start


async def test_v2_logs_route_answers_at_most_so_many_workers(api: Api) -> None:
    name = await api.running()
    workers = api.backend.clusters[name].workers
    old = add_workers(api, name, *[WorkerStatus.STOPPED] * 3)
    for worker in old:
        workers[worker].start_time -= 60_000  # long before the running ones
    running = add_workers(api, name, *[WorkerStatus.RUNNING] * LOG_MAX_WORKERS)
    path = f"/api/v2/clusters/{name}/logs"
    resp = await api.call("GET", path)
    assert list(await resp.json()) == ["scheduler", *running]
    # Room for two more: the newest finished workers come after the running ones.
    del workers[running[-1]], workers[running[-2]]
    resp = await api.call("GET", f"{path}?component=workers")
    assert list(await resp.json()) == [old[1], old[2], *running[:-2]]
    everyone = ",".join([*old, *running[:-2]])
    await api.refused("GET", f"{path}?component={everyone}", 422, "at most 200 worker logs")


async def test_v2_logs_route_refuses_bad_requests(api: Api) -> None:
    name = await api.running()
    (worker,) = add_workers(api, name, WorkerStatus.RUNNING)
    path = f"/api/v2/clusters/{name}/logs"
    await api.refused("GET", f"{path}?component=nosuch", 404, "no log component 'nosuch'")
    await api.refused("GET", f"{path}?component={worker},ghost", 404, "'ghost'")
    await api.refused("GET", f"{path}?component=", 422, "component: empty name")
    await api.refused("GET", f"{path}?tail=abc", 422, "tail: expected an integer", "'abc'")
    await api.refused("GET", f"{path}?tail=-1", 422, "tail: expected an integer", "-1")
    await api.refused("GET", f"{path}?tail=10001", 422, "from 0 to 10000", "10001")
    await api.refused("GET", f"{path}?tail=1.5", 422, "tail", "'1.5'")
    await api.refused("GET", path, 403, "'bob' may not read the logs of cluster", user="bob")
    await api.refused("GET", f"{path}?component=scheduler", 401, user=None)
    await api.refused("GET", "/api/v2/clusters/nope/logs", 404, "'nope' not found")
    assert api.backend.log_calls == []


async def test_get_unknown_cluster_is_404(api: Api) -> None:
    await api.refused("GET", "/api/v1/clusters/doesnotexist", 404, "'doesnotexist' not found")


async def test_get_another_users_cluster_is_403(api: Api) -> None:
    name = await api.create(user="bob")
    await api.refused("GET", f"/api/v1/clusters/{name}", 403, "'alice' may not view cluster")


@pytest.mark.parametrize("admin", ["admin", "root"])  # by config, and by the User record
async def test_admins_see_and_act_on_every_cluster(api: Api, admin: str) -> None:
    name = await api.running(user="bob")
    resp = await api.call("GET", f"/api/v1/clusters/{name}", user=admin)
    assert resp.status == 200
    resp = await api.call("POST", f"/api/v1/clusters/{name}/scale", user=admin, json={"count": 1})
    assert resp.status == 200
    assert (await api.call("DELETE", f"/api/v1/clusters/{name}", user=admin)).status == 204
    assert api.backend.clusters[name].status == ClusterStatus.STOPPED
    listed = await (await api.call("GET", "/api/v1/clusters/", user=admin)).json()
    assert listed == {}  # listing is always one's own


async def test_get_with_wait_blocks_until_not_pending(api: Api) -> None:
    name = await api.create()

    async def start_later() -> None:
        await asyncio.sleep(0.1)
        api.backend.set_status(name, ClusterStatus.RUNNING)

    task = asyncio.create_task(start_later())
    resp = await api.call("GET", f"/api/v1/clusters/{name}?wait")
    await task
    assert resp.status == 200
    assert (await resp.json())["status"] == "RUNNING"


async def test_get_with_wait_gives_up_after_the_timeout(make_api: ApiFactory) -> None:
    config = {**BASE_CONFIG, "gateway": {"wait_timeout": 0.2}}
    api = await make_api(config)
    name = await api.create()
    loop = asyncio.get_running_loop()
    start = loop.time()
    resp = await api.call("GET", f"/api/v1/clusters/{name}?wait=1")
    assert resp.status == 200
    assert (await resp.json())["status"] == "PENDING"
    assert 0.15 < loop.time() - start < 2.0
    resp = await api.call("GET", f"/api/v1/clusters/{name}?wait=0")
    assert (await resp.json())["status"] == "PENDING"


async def test_bad_wait_flag_is_422(api: Api) -> None:
    name = await api.create()
    await api.refused("GET", f"/api/v1/clusters/{name}?wait=maybe", 422, "wait: expected a flag")


BAD_NAMES = [
    ("..%2Fetc", "'../etc'"),
    ("..%2F..%2Fapi%2Fv1%2Foptions", "invalid cluster name"),
    ("a%2Fb", "'a/b'"),
    ("%2e%2e%2fx", "invalid cluster name"),
    ("abc%00", "invalid cluster name"),
    (".hidden", "invalid cluster name"),
    ("a" * 65, "invalid cluster name"),
    ("x%20y", "'x y'"),
]


@pytest.mark.parametrize(("raw", "needle"), BAD_NAMES)
@pytest.mark.parametrize(
    ("method", "suffix", "body", "user"),
    [
        ("GET", "", None, "alice"),
        ("DELETE", "", None, "alice"),
        ("POST", "/scale", {"count": 1}, "alice"),
        ("POST", "/adapt", {}, "alice"),
        ("POST", "/heartbeat", {}, None),
    ],
)
async def test_bad_cluster_names_are_404(
    api: Api, raw: str, needle: str, method: str, suffix: str, body: Any, user: str | None
) -> None:
    await api.running()
    url = URL(f"/api/v1/clusters/{raw}{suffix}", encoded=True)
    headers = {"Authorization": "token abc"} if user is None else None
    await api.refused(
        method, url, 404, "invalid cluster name", needle, json=body, user=user, headers=headers
    )


# --------------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------------


async def test_delete_is_204_and_idempotent(api: Api) -> None:
    name = await api.running()
    resp = await api.call("DELETE", f"/api/v1/clusters/{name}")
    assert resp.status == 204
    assert api.backend.clusters[name].status == ClusterStatus.STOPPED
    assert (await api.call("DELETE", f"/api/v1/clusters/{name}")).status == 204
    assert (await api.call("DELETE", "/api/v1/clusters/neverexisted")).status == 204
    cluster = await (await api.call("GET", f"/api/v1/clusters/{name}")).json()
    assert cluster["status"] == "STOPPED"
    assert cluster["tls_cert"] is None and cluster["dashboard_route"] is None


async def test_delete_another_users_cluster_is_403(api: Api) -> None:
    name = await api.running(user="bob")
    await api.refused("DELETE", f"/api/v1/clusters/{name}", 403, "'alice' may not stop cluster")


async def test_cluster_can_stop_itself_with_its_token(api: Api) -> None:
    name = await api.running(user="bob")
    other = await api.running(user="bob")
    token = api.backend.clusters[name].token
    logins = api.auth.calls
    await api.refused(
        "DELETE",
        f"/api/v1/clusters/{other}",
        401,
        "not the token of cluster",
        user=None,
        headers={"Authorization": f"token {token}"},
    )
    await api.refused(
        "DELETE",
        f"/api/v1/clusters/{name}",
        401,
        "not the token",
        user=None,
        headers={"Authorization": "token wrong"},
    )
    resp = await api.call(
        "DELETE", f"/api/v1/clusters/{name}", user=None, headers={"Authorization": f"token {token}"}
    )
    assert resp.status == 204
    assert api.backend.clusters[name].status == ClusterStatus.STOPPED
    assert api.backend.clusters[other].status == ClusterStatus.RUNNING
    assert api.auth.calls == logins  # tokens never reach the user authenticator


# --------------------------------------------------------------------------------------------
# Scale and adapt
# --------------------------------------------------------------------------------------------


async def test_scale_forwards_to_the_scheduler(api: Api) -> None:
    name = await api.running()
    resp = await api.call("POST", f"/api/v1/clusters/{name}/scale", json={"count": 3})
    assert resp.status == 200
    assert await resp.json() == {"ok": True, "msg": None}
    assert api.backend.forwarded == [(name, {"op": "scale", "count": 3})]
    assert api.observer.events[-1].kind == "scaled"
    assert api.observer.events[-1].detail["count"] == 3


async def test_scale_above_the_limit_is_clamped(api: Api) -> None:
    name = await api.running()
    resp = await api.call("POST", f"/api/v1/clusters/{name}/scale", json={"count": 10})
    assert resp.status == 200
    answer = await resp.json()
    assert answer["ok"] is False
    assert "10 workers" in answer["msg"] and "scaling to 4 workers instead" in answer["msg"]
    assert api.backend.forwarded == [(name, {"op": "scale", "count": 4})]


async def test_limit_counts_cores_and_memory_too(make_api: ApiFactory) -> None:
    config = {
        **BASE_CONFIG,
        "cluster": {"cluster_max_cores": 7, "worker_cores": 2, "scheduler_cores": 1},
        "options": {},
    }
    api = await make_api(config)
    name = await api.running()
    resp = await api.call("POST", f"/api/v1/clusters/{name}/scale", json={"count": 5})
    assert (await resp.json())["ok"] is False
    assert api.backend.forwarded == [(name, {"op": "scale", "count": 3})]


async def test_scale_without_limit_is_never_clamped(make_api: ApiFactory) -> None:
    api = await make_api({**BASE_CONFIG, "cluster": {}})
    name = await api.running()
    resp = await api.call("POST", f"/api/v1/clusters/{name}/scale", json={"count": 1000})
    assert await resp.json() == {"ok": True, "msg": None}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"count": -1}, "count: expected a non-negative integer, got int -1"),
        ({"count": "3"}, "count: expected a non-negative integer, got string '3'"),
        ({"count": True}, "count: expected a non-negative integer, got bool true"),
        ({"count": 2.5}, "count: expected a non-negative integer, got float 2.5"),
        ({"count": None}, "count: expected a non-negative integer, got null"),
        ({}, "count: required"),
        ({"count": 1, "n": 2}, "unknown key 'n' in request body; expected count, group"),
        ("3", "request body must be a JSON object, got string"),
    ],
)
async def test_bad_scale_requests_are_422(api: Api, body: Any, needle: str) -> None:
    name = await api.running()
    await api.refused("POST", f"/api/v1/clusters/{name}/scale", 422, needle, json=body)


async def test_scale_malformed_json_is_422(api: Api) -> None:
    name = await api.running()
    await api.refused(
        "POST", f"/api/v1/clusters/{name}/scale", 422, "malformed JSON", data=b"{count: 3}"
    )


async def test_scale_unknown_or_foreign_cluster(api: Api) -> None:
    await api.refused(
        "POST", "/api/v1/clusters/nope/scale", 404, "'nope' not found", json={"count": 1}
    )
    name = await api.running(user="bob")
    await api.refused(
        "POST", f"/api/v1/clusters/{name}/scale", 403, "may not scale", json={"count": 1}
    )


@pytest.mark.parametrize("status", [ClusterStatus.PENDING, ClusterStatus.STOPPED])
async def test_scale_of_a_cluster_that_is_not_running_is_409(
    api: Api, status: ClusterStatus
) -> None:
    name = await api.create()
    api.backend.set_status(name, status)
    await api.refused(
        "POST",
        f"/api/v1/clusters/{name}/scale",
        409,
        f"is {status.name}, not RUNNING",
        json={"count": 1},
    )
    await api.refused(
        "POST", f"/api/v1/clusters/{name}/adapt", 409, f"is {status.name}, not RUNNING", json={}
    )


async def test_scheduler_refusing_is_409(api: Api) -> None:
    name = await api.running()
    api.backend.refuse_forward = "scheduler is shutting down"
    await api.refused(
        "POST",
        f"/api/v1/clusters/{name}/scale",
        409,
        "scheduler is shutting down",
        json={"count": 1},
    )
    await api.refused(
        "POST", f"/api/v1/clusters/{name}/adapt", 409, "scheduler is shutting down", json={}
    )


GROUPS_CONFIG: dict[str, Any] = {
    **BASE_CONFIG,
    "cluster": {
        "cluster_max_workers": 4,
        "worker_groups": {
            "gpu": {"worker_cores": 4, "max_workers": 2, "environment": {"GPU": "1"}},
            "highmem": {"worker_memory": "16 GiB"},
        },
    },
    "options": {
        **BASE_CONFIG["options"],
        "groups": {
            "type": "select",
            "target": "enabled_worker_groups",
            "options": [
                {"key": "all", "value": ["gpu", "highmem"]},
                {"key": "cpu-only", "value": []},
            ],
        },
    },
}


async def test_scale_and_adapt_a_worker_group(make_api: ApiFactory) -> None:
    api = await make_api(GROUPS_CONFIG)
    name = await api.running()
    resp = await api.call(
        "POST", f"/api/v1/clusters/{name}/scale", json={"count": 1, "group": "gpu"}
    )
    assert await resp.json() == {"ok": True, "msg": None}
    # The group's own limit (2), not the cluster's (4), and the message names the group.
    resp = await api.call(
        "POST", f"/api/v1/clusters/{name}/scale", json={"count": 3, "group": "gpu"}
    )
    answer = await resp.json()
    assert answer["ok"] is False
    assert "at most 2 in worker group gpu; scaling to 2 workers instead" in answer["msg"]
    resp = await api.call(
        "POST", f"/api/v1/clusters/{name}/adapt", json={"maximum": 9, "group": "highmem"}
    )
    assert (await resp.json())["ok"] is False
    # The default group, named or not, is the v1 request exactly.
    await api.call("POST", f"/api/v1/clusters/{name}/scale", json={"count": 2, "group": "default"})
    assert api.backend.forwarded == [
        (name, {"op": "scale", "count": 1, "group": "gpu"}),
        (name, {"op": "scale", "count": 2, "group": "gpu"}),
        (name, {"op": "adapt", "minimum": 0, "maximum": 4, "active": True, "group": "highmem"}),
        (name, {"op": "scale", "count": 2}),
    ]
    assert api.observer.events[-2].detail["group"] == "highmem"


async def test_unknown_worker_group_is_422_naming_the_groups(make_api: ApiFactory) -> None:
    api = await make_api(GROUPS_CONFIG)
    name = await api.running()
    await api.refused(
        "POST",
        f"/api/v1/clusters/{name}/scale",
        422,
        f"cluster {name} has no worker group 'tpu'; its groups are default, gpu, highmem",
        json={"count": 1, "group": "tpu"},
    )
    await api.refused(
        "POST",
        f"/api/v1/clusters/{name}/adapt",
        422,
        "group: expected a worker group name (one of default, gpu, highmem), got int 3",
        json={"maximum": 1, "group": 3},
    )
    # A cluster whose options enable no named group has the default one only.
    small = await api.running(groups="cpu-only")
    await api.refused(
        "POST",
        f"/api/v1/clusters/{small}/scale",
        422,
        "no worker group 'gpu'; its groups are default",
        json={"count": 1, "group": "gpu"},
    )


async def test_v2_cluster_reports_workers_per_group_and_v1_does_not(
    make_api: ApiFactory,
) -> None:
    api = await make_api(GROUPS_CONFIG)
    name = await api.running()
    cluster = api.backend.clusters[name]
    cluster.count = 1
    cluster.group_counts = {"gpu": 2}
    cluster.workers = {
        "w1": Worker(name="w1", cluster_name=name, status=WorkerStatus.RUNNING),
        "w2": Worker(name="w2", cluster_name=name, group="gpu", status=WorkerStatus.RUNNING),
        "w3": Worker(name="w3", cluster_name=name, group="gpu"),
        "w4": Worker(name="w4", cluster_name=name, group="gpu", status=WorkerStatus.STOPPED),
    }
    resp = await api.call("GET", f"/api/v2/clusters/{name}")
    groups = (await resp.json())["groups"]
    assert groups == {
        "default": {"count": 1, "pending": 0, "running": 1, "stopping": 0},
        "gpu": {"count": 2, "pending": 1, "running": 1, "stopping": 0},
        "highmem": {"count": 0, "pending": 0, "running": 0, "stopping": 0},
    }
    resp = await api.call("GET", "/api/v2/clusters")
    assert (await resp.json())[name]["groups"] == groups
    # v1 keeps its exact keys: the original client refuses any other.
    resp = await api.call("GET", f"/api/v1/clusters/{name}")
    assert set(await resp.json()) == {
        "name",
        "dashboard_route",
        "status",
        "start_time",
        "stop_time",
        "options",
        "tls_cert",
        "tls_key",
    }


async def test_adapt_forwards_and_fills_in_the_limit(api: Api) -> None:
    name = await api.running()
    resp = await api.call(
        "POST", f"/api/v1/clusters/{name}/adapt", json={"minimum": 1, "maximum": 3, "active": True}
    )
    assert await resp.json() == {"ok": True, "msg": None}
    resp = await api.call(
        "POST", f"/api/v1/clusters/{name}/adapt", json={"minimum": None, "maximum": None}
    )
    assert await resp.json() == {"ok": True, "msg": None}
    resp = await api.call("POST", f"/api/v1/clusters/{name}/adapt", json={"active": False})
    assert resp.status == 200
    assert api.backend.forwarded == [
        (name, {"op": "adapt", "minimum": 1, "maximum": 3, "active": True}),
        (name, {"op": "adapt", "minimum": 0, "maximum": 4, "active": True}),
        (name, {"op": "adapt", "minimum": 0, "maximum": 4, "active": False}),
    ]
    assert api.observer.events[-1].kind == "adapted"


async def test_adapt_above_the_limit_is_clamped(api: Api) -> None:
    name = await api.running()
    resp = await api.call(
        "POST", f"/api/v1/clusters/{name}/adapt", json={"minimum": 6, "maximum": 10}
    )
    answer = await resp.json()
    assert answer["ok"] is False
    assert "minimum=6, maximum=10" in answer["msg"]
    assert "minimum=4, maximum=4 instead" in answer["msg"]
    assert api.backend.forwarded == [
        (name, {"op": "adapt", "minimum": 4, "maximum": 4, "active": True})
    ]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"minimum": -1}, "minimum: expected a non-negative integer or null, got int -1"),
        ({"maximum": "5"}, "maximum: expected a non-negative integer or null, got string '5'"),
        ({"maximum": False}, "maximum: expected a non-negative integer or null, got bool"),
        ({"active": "yes"}, "active: expected a bool, got string 'yes'"),
        ({"minimum": 3, "maximum": 2}, "minimum: 3 is greater than maximum 2"),
        ({"min": 3}, "unknown key 'min' in request body; expected active, group, maximum, minimum"),
    ],
)
async def test_bad_adapt_requests_are_422(api: Api, body: Any, needle: str) -> None:
    name = await api.running()
    await api.refused("POST", f"/api/v1/clusters/{name}/adapt", 422, needle, json=body)


async def test_adapt_unknown_or_foreign_cluster(api: Api) -> None:
    await api.refused("POST", "/api/v1/clusters/nope/adapt", 404, "'nope' not found", json={})
    name = await api.running(user="bob")
    await api.refused("POST", f"/api/v1/clusters/{name}/adapt", 403, "may not adapt", json={})


# --------------------------------------------------------------------------------------------
# Heartbeats
# --------------------------------------------------------------------------------------------

HEARTBEAT = {
    "scheduler_address": "tls://127.0.0.1:9000",
    "dashboard_address": "http://127.0.0.1:8787",
    "api_address": "http://127.0.0.1:9001",
    "count": 2,
    "active_workers": ["w1"],
    "closing_workers": [],
    "closed_workers": ["w0"],
}


async def test_heartbeat_with_the_cluster_token(api: Api) -> None:
    name = await api.create()
    token = api.backend.clusters[name].token
    logins = api.auth.calls
    resp = await api.call(
        "POST",
        f"/api/v1/clusters/{name}/heartbeat",
        user=None,
        headers={"Authorization": f"token {token}"},
        json=HEARTBEAT,
    )
    assert resp.status == 200
    assert api.backend.heartbeats == [(name, HEARTBEAT)]
    assert api.backend.clusters[name].status == ClusterStatus.RUNNING
    assert api.auth.calls == logins


async def test_heartbeat_without_or_with_a_wrong_token_is_401(api: Api) -> None:
    name = await api.create()
    other = await api.create()
    path = f"/api/v1/clusters/{name}/heartbeat"
    resp = await api.refused(
        "POST", path, 401, "needs `Authorization: token <cluster token>`", user=None, json=HEARTBEAT
    )
    assert resp.headers["WWW-Authenticate"] == "token"
    await api.refused("POST", path, 401, "token", json=HEARTBEAT)  # Basic auth is not enough
    for token in ("wrong", api.backend.clusters[other].token, ""):
        resp = await api.refused(
            "POST",
            path,
            401,
            "token",
            user=None,
            headers={"Authorization": f"token {token}"},
            json=HEARTBEAT,
        )
        assert resp.headers["WWW-Authenticate"] == "token"


async def test_heartbeat_for_an_unknown_cluster_is_404(api: Api) -> None:
    await api.refused(
        "POST",
        "/api/v1/clusters/gone/heartbeat",
        404,
        "'gone' not found",
        user=None,
        headers={"Authorization": "token abc"},
        json=HEARTBEAT,
    )


async def test_heartbeat_rejected_by_the_backend_is_409(api: Api) -> None:
    name = await api.create()
    api.backend.set_status(name, ClusterStatus.STOPPED)
    token = api.backend.clusters[name].token
    await api.refused(
        "POST",
        f"/api/v1/clusters/{name}/heartbeat",
        409,
        "is STOPPED; exit",
        user=None,
        headers={"Authorization": f"token {token}"},
        json=HEARTBEAT,
    )


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({**HEARTBEAT, "count": -1}, "count: expected a non-negative integer"),
        ({**HEARTBEAT, "count": True}, "count: expected a non-negative integer, got bool"),
        ({**HEARTBEAT, "active_workers": "w1"}, "active_workers: expected an array"),
        ({**HEARTBEAT, "closed_workers": [1]}, "closed_workers: expected an array"),
        ({**HEARTBEAT, "api_address": 5}, "api_address: expected a string, got int"),
        ([HEARTBEAT], "request body must be a JSON object, got array"),
    ],
)
async def test_bad_heartbeats_are_422(api: Api, body: Any, needle: str) -> None:
    name = await api.create()
    token = api.backend.clusters[name].token
    await api.refused(
        "POST",
        f"/api/v1/clusters/{name}/heartbeat",
        422,
        needle,
        user=None,
        headers={"Authorization": f"token {token}"},
        json=body,
    )


async def test_heartbeat_malformed_json_is_422(api: Api) -> None:
    name = await api.create()
    token = api.backend.clusters[name].token
    await api.refused(
        "POST",
        f"/api/v1/clusters/{name}/heartbeat",
        422,
        "malformed JSON",
        user=None,
        headers={"Authorization": f"token {token}"},
        data=b'{"count": 1',
    )


# --------------------------------------------------------------------------------------------
# The proxy routes feed
# --------------------------------------------------------------------------------------------

PROXY = {"Authorization": f"token {PROXY_TOKEN}"}


def sni(name: str) -> Route:
    return Route(kind="SNI", key=name, target="tls://127.0.0.1:9000")


async def test_routes_snapshot(api: Api) -> None:
    api.context.routes.put(Route(kind="PATH", key="/", target="http://127.0.0.1:1"))
    api.context.routes.put(sni("c1"))
    resp = await api.call("GET", "/api/v1/routes", user=None, headers=PROXY)
    assert resp.status == 200
    assert await resp.json() == {
        "routes": [
            {"kind": "PATH", "path": "/", "target": "http://127.0.0.1:1"},
            {"kind": "SNI", "sni": "c1", "target": "tls://127.0.0.1:9000"},
        ],
        "id": 2,
    }


@pytest.mark.parametrize(
    ("headers", "needle"),
    [
        ({}, "needs `Authorization: token <proxy token>`"),
        ({"Authorization": "token wrong"}, "invalid proxy token"),
        ({"Authorization": f"Bearer {PROXY_TOKEN}"}, "needs `Authorization: token"),
        ({"Authorization": basic("alice")}, "needs `Authorization: token"),
    ],
)
async def test_routes_feed_needs_the_proxy_token(
    api: Api, headers: dict[str, str], needle: str
) -> None:
    resp = await api.refused(
        "GET", "/api/v1/routes?watch=1&last_id=0", 401, needle, user=None, headers=headers
    )
    assert resp.headers["WWW-Authenticate"] == "token"
    await api.refused("GET", "/api/v1/routes", 401, needle, user=None, headers=headers)


async def test_routes_watch_streams_events(api: Api) -> None:
    table = api.context.routes
    table.put(sni("c1"))
    table.put(sni("c2"))
    resp = await api.call("GET", "/api/v1/routes?watch=1&last_id=0", user=None, headers=PROXY)
    assert resp.status == 200
    first = json.loads(await asyncio.wait_for(resp.content.readline(), 5))
    assert [(e["id"], e["type"], e["route"]["sni"]) for e in first["events"]] == [
        (1, "PUT", "c1"),
        (2, "PUT", "c2"),
    ]
    table.delete("SNI", "c1")
    second = json.loads(await asyncio.wait_for(resp.content.readline(), 5))
    assert second == {
        "events": [
            {
                "id": 3,
                "type": "DELETE",
                "route": {"kind": "SNI", "sni": "c1", "target": "tls://127.0.0.1:9000"},
            }
        ]
    }
    resp.close()
    # the server is still fine after the reader left
    assert (await api.call("GET", "/api/health", user=None)).status == 200


async def test_routes_watch_from_the_current_id_waits_for_new_events(api: Api) -> None:
    api.context.routes.put(sni("c1"))
    resp = await api.call("GET", "/api/v1/routes?watch=1&last_id=1", user=None, headers=PROXY)
    assert resp.status == 200
    pending = asyncio.ensure_future(resp.content.readline())
    await asyncio.sleep(0.05)
    assert not pending.done()
    api.context.routes.put(sni("c2"))
    line = json.loads(await asyncio.wait_for(pending, 5))
    assert [e["id"] for e in line["events"]] == [2]
    resp.close()


async def test_routes_watch_with_a_too_old_last_id_is_410(make_api: ApiFactory) -> None:
    api = await make_api(max_events=2)
    for i in range(5):
        api.context.routes.put(sni(f"c{i}"))
    with pytest.raises(EventsGone, match="no longer retained") as gone:
        api.context.routes.events_since(1)
    assert gone.value.last_id == 1
    await api.refused(
        "GET",
        "/api/v1/routes?watch=1&last_id=1",
        410,
        "no longer retained",
        user=None,
        headers=PROXY,
    )
    await api.refused(
        "GET",
        "/api/v1/routes?watch=1&last_id=99",
        410,
        "not a known event id",
        user=None,
        headers=PROXY,
    )
    await api.refused(
        "GET",
        "/api/v1/routes?watch=1&last_id=two",
        422,
        "last_id: expected an integer",
        user=None,
        headers=PROXY,
    )
    resp = await api.call("GET", "/api/v1/routes?watch=1&last_id=3", user=None, headers=PROXY)
    line = json.loads(await asyncio.wait_for(resp.content.readline(), 5))
    assert [e["id"] for e in line["events"]] == [4, 5]
    resp.close()


async def test_open_streams_end_at_shutdown(make_api: ApiFactory) -> None:
    api = await make_api()
    resp = await api.call("GET", "/api/v1/routes?watch=1", user=None, headers=PROXY)
    assert resp.status == 200
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.wait_for(api.client.server.close(), 10)
    assert loop.time() - start < 2  # not held open until the reader leaves
    assert await asyncio.wait_for(resp.content.read(), 5) == b""
    resp.close()


# --------------------------------------------------------------------------------------------
# Option hooks from plugins
# --------------------------------------------------------------------------------------------


class GroupOptions:
    """Users in the ``gpu`` group (here: named ``gpu-*``) get their own form."""

    @hookimpl
    def gateway_cluster_options(self, user: User, config: Any) -> Options | None:
        if user.name.startswith("gpu-"):
            return Options(fields=[Integer(field="gpus", default=1, min=0, max=2)])
        return None


class SyncOverrides:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.seen: list[tuple[User, dict[str, Any], ClusterConfig]] = []

    @hookimpl
    def gateway_apply_options(self, user: User, options: Any, config: ClusterConfig) -> Any:
        self.seen.append((user, dict(options), config))
        return self.answer


class AsyncOverrides:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    @hookimpl
    async def gateway_apply_options(self, user: User, options: Any, config: ClusterConfig) -> Any:
        await asyncio.sleep(0)
        return self.answer


async def test_a_plugin_can_give_a_user_its_own_form(make_api: ApiFactory) -> None:
    api = await make_api(plugins=[GroupOptions()])
    spec = (await (await api.call("GET", "/api/v1/options", user="gpu-ann")).json())[
        "cluster_options"
    ]
    assert [s["field"] for s in spec] == ["gpus"]
    spec = (await (await api.call("GET", "/api/v1/options")).json())["cluster_options"]
    assert spec[0]["field"] == "worker_cores"
    await api.refused(
        "POST",
        "/api/v1/clusters/",
        422,
        "unknown option 'worker_cores'; known options are gpus",
        user="gpu-ann",
        json={"cluster_options": {"worker_cores": 2}},
    )


class AsyncDeferringOptions:
    """Answers for nobody, from a coroutine: the next plugin (the `[options]` form) decides."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl
    async def gateway_cluster_options(self, user: User, config: Any) -> Options | None:
        await asyncio.sleep(0)
        self.asked.append(user.name)
        return None


async def test_async_options_plugin_returning_none_defers_to_the_next(
    make_api: ApiFactory,
) -> None:
    deferring = AsyncDeferringOptions()
    api = await make_api(plugins=[deferring])
    spec = (await (await api.call("GET", "/api/v1/options")).json())["cluster_options"]
    assert [s["field"] for s in spec] == ["worker_cores", "idle_timeout", "profile", "environment"]
    name = await api.create(worker_cores=3)
    assert api.backend.clusters[name].config["worker_cores"] == 3
    assert deferring.asked == ["alice", "alice"]


async def test_environment_option_merges_into_the_cluster_environment(
    make_api: ApiFactory,
) -> None:
    config = dict(BASE_CONFIG)
    config["cluster"] = {
        "cluster_max_workers": 4,
        "environment": {"SITE": "1", "SHARED": "cluster"},
        "scheduler_cmd": ["dask", "scheduler", "--x"],
    }
    plugin = SyncOverrides({"environment": {"PLUGIN": "p"}, "scheduler_cmd": ["my-scheduler"]})
    api = await make_api(config, plugins=[plugin])
    name = await api.create(environment={"SHARED": "user", "USER_VAR": "u"})
    config_of = api.backend.clusters[name].config
    # [cluster] < the user's option < the plugin; the option's and the plugin's keys win
    assert config_of["environment"] == {
        "SITE": "1",
        "SHARED": "user",
        "USER_VAR": "u",
        "PLUGIN": "p",
    }
    assert config_of["scheduler_cmd"] == ["my-scheduler"]  # not a merged key: replaced
    plain = await make_api(config)
    name = await plain.create()  # the option's default, {}, keeps the cluster's table
    assert plain.backend.clusters[name].config["environment"] == {
        "SITE": "1",
        "SHARED": "cluster",
    }


@attrs.define(kw_only=True, frozen=True)
class LabelledClusterConfig(ClusterConfig):
    """A backend's cluster config with one more merged mapping."""

    merged_keys = ClusterConfig.merged_keys | {"labels"}
    labels: dict[str, str] = attrs.field(factory=dict)
    annotations: dict[str, str] = attrs.field(factory=dict)


async def test_a_cluster_config_class_may_merge_more_mappings() -> None:
    context = GatewayContext(config=load_config({}))
    manager = ClusterManager(
        backend=FakeBackend(context=context),
        context=context,
        cluster_config_class=LabelledClusterConfig,
        cluster_defaults={"labels": {"site": "x"}, "annotations": {"site": "x"}},
    )
    form = Options(fields=[OptionsMapping(field="labels"), OptionsMapping(field="annotations")])
    normalized = form.validate({"labels": {"team": "y"}, "annotations": {"team": "y"}})
    config = await manager.resolve_config(User(name="a"), form, normalized)
    assert isinstance(config, LabelledClusterConfig)
    assert config.labels == {"site": "x", "team": "y"}
    assert config.annotations == {"team": "y"}  # not in merged_keys: replaced


async def test_apply_options_merge_order_later_registration_wins(make_api: ApiFactory) -> None:
    first = SyncOverrides({"worker_cores": 3, "idle_timeout": 60.0})
    second = AsyncOverrides({"worker_cores": 4, "adaptive_period": 1.5})
    third = SyncOverrides(None)
    api = await make_api(plugins=[first, second, third])
    name = await api.create(worker_cores=2)
    config = api.backend.clusters[name].config
    assert config["worker_cores"] == 4  # registered after `first`: wins over it and the target
    assert config["idle_timeout"] == 60.0  # keys only `first` set survive
    assert config["adaptive_period"] == 1.5  # the awaitable answer was awaited
    user, options, base = first.seen[0]
    assert user.name == "alice"
    assert options["worker_cores"] == 2  # the normalized options, not the overrides
    assert isinstance(base, ClusterConfig) and base.cluster_max_workers == 4


async def test_tryfirst_plugin_has_the_last_word(make_api: ApiFactory) -> None:
    class Priority:
        @hookimpl(tryfirst=True)
        def gateway_apply_options(self, user: User, options: Any, config: Any) -> Any:
            return {"worker_cores": 1}

    api = await make_api(plugins=[Priority(), SyncOverrides({"worker_cores": 3})])
    name = await api.create(worker_cores=2)
    assert api.backend.clusters[name].config["worker_cores"] == 1


@pytest.mark.parametrize(
    ("answer", "needles"),
    [
        ({"worker_cores": "many"}, ["worker_cores: expected int, got str"]),
        ({"bogus_key": 1}, ["bogus_key: unknown key"]),
        ({"worker_cores": 0}, ["worker_cores: must be at least 1"]),
        ({"worker_memory": "lots"}, ["worker_memory", "invalid memory size 'lots'"]),
    ],
)
async def test_override_failing_validation_is_422(
    make_api: ApiFactory, answer: dict[str, Any], needles: list[str]
) -> None:
    api = await make_api(plugins=[AsyncOverrides(answer)])
    await api.refused(
        "POST",
        "/api/v1/clusters/",
        422,
        "invalid cluster configuration",
        *needles,
        json={"cluster_options": {}},
    )


async def test_plugin_may_refuse_options(make_api: ApiFactory) -> None:
    class Policy:
        @hookimpl
        def gateway_apply_options(self, user: User, options: Any, config: Any) -> Any:
            if options["worker_cores"] > 2:
                raise OptionsError(["worker_cores: at most 2 for students"])
            return None

    api = await make_api(plugins=[Policy()])
    await api.refused(
        "POST",
        "/api/v1/clusters/",
        422,
        "worker_cores: at most 2 for students",
        json={"cluster_options": {"worker_cores": 3}},
    )
    await api.create(worker_cores=2)


async def test_options_passed_to_plugins_are_read_only(make_api: ApiFactory) -> None:
    class Mutator:
        @hookimpl
        def gateway_apply_options(self, user: User, options: Any, config: Any) -> Any:
            options["worker_cores"] = 4
            return None

    api = await make_api(plugins=[Mutator()])
    await api.refused("POST", "/api/v1/clusters/", 500, "internal server error", json={})


async def test_plugin_returning_a_non_mapping_is_a_500(make_api: ApiFactory) -> None:
    api = await make_api(plugins=[SyncOverrides(["worker_cores", 2])])
    await api.refused("POST", "/api/v1/clusters/", 500, "internal server error", json={})


async def test_no_options_plugin_means_an_empty_form(api: Api) -> None:
    pm = pluggy.PluginManager("gateway")
    pm.add_hookspecs(gateway_core.hookspecs)
    context = GatewayContext(config=load_config({}), hook=GatewayHooks.from_plugin_manager(pm))
    manager = ClusterManager(backend=FakeBackend(context=context), context=context)
    form = await manager.options_for(User(name="a"))
    assert form.spec_json() == []


def test_bad_cluster_defaults_are_refused_at_construction() -> None:
    pm = pluggy.PluginManager("gateway")
    pm.add_hookspecs(gateway_core.hookspecs)
    context = GatewayContext(config=load_config({}), hook=GatewayHooks.from_plugin_manager(pm))
    with pytest.raises(ConfigError) as exc:
        ClusterManager(
            backend=FakeBackend(context=context),
            context=context,
            cluster_defaults={"worker_cores": "two"},
        )
    assert exc.value.problems == ["cluster.worker_cores: expected int, got str"]


class RoutedAuth(CountingAuth):
    """Serves its own login route (as an OAuth callback would): ``?as=<name>`` logs in."""

    def web_routes(self) -> list[web.RouteDef]:
        async def login(request: web.Request) -> web.StreamResponse:
            user = User(name=request.query["as"])
            response = web.json_response({"logged_in": user.name})
            log_in(request, response, user)
            return response

        return [web.get("/api/v2/test/login", login)]


@pytest.mark.parametrize("prefix", ["", "/gw"])
async def test_an_authenticators_own_routes_are_public_and_can_log_a_user_in(
    make_api: ApiFactory, prefix: str
) -> None:
    api = await make_api(cookies=True, auth_class=RoutedAuth, prefix=prefix)
    resp = await api.call("GET", f"{prefix}/api/v2/test/login?as=bob", user=None)
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"logged_in": "bob"}
    assert resp.headers["X-Login"] == "fresh"  # pre_response, as for any full login
    name = await api.create("bob")  # through the authenticator: bob's cluster
    api.auth.calls = 0
    # The route's cookie alone logs bob in: the authenticator is not asked.
    listed = await api.call("GET", "/api/v1/clusters/", user=None)
    assert listed.status == 200, await listed.text()
    assert list(await listed.json()) == [name]
    assert api.auth.calls == 0


async def test_an_authenticator_route_outside_the_api_is_refused(make_api: ApiFactory) -> None:
    class Stray(CountingAuth):
        def web_routes(self) -> list[web.RouteDef]:
            async def page(request: web.Request) -> web.StreamResponse:
                return web.Response(text="hi")

            return [web.get("/login", page)]

    with pytest.raises(ValueError, match="route '/login' must start with /api/"):
        await make_api(auth_class=Stray)

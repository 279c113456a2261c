"""Tests of sharing a cluster with users and groups (issue 14, point 4) through the REST API.

Every cluster route for the owner, a sharee by name, a sharee by group, a stranger and an
admin (one table); creating shared clusters and changing the sharing with PATCH, bad input
refused with nothing changed; quotas counting a shared cluster against its owner only; and the
sharing kept across a restart of a `ProcessBackend` on a persistent store.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from test_api import BASE_CONFIG, Api, ApiFactory, CountingAuth, make_api  # noqa: F401
from test_lifetime import Site

from gateway_core.models import ClusterStatus, User
from gateway_core.sharing import SHARE_MAX_NAME_LENGTH, SHARE_MAX_NAMES

pytestmark = pytest.mark.unit

GROUPS = {"alice": {"staff"}, "bob": {"staff"}, "carol": {"physics"}, "dave": {"chemistry"}}
"""alice owns the clusters; bob is a sharee by name, carol through physics, dave a stranger."""

ROLES = ("owner", "user_sharee", "group_sharee", "stranger", "admin")
USER_OF = {
    "owner": "alice",
    "user_sharee": "bob",
    "group_sharee": "carol",
    "stranger": "dave",
    "admin": "admin",
}
SHARING = {"share_with_users": ["bob"], "share_with_groups": ["physics"]}


class GroupAuth(CountingAuth):
    """The test authenticator, with the groups of `GROUPS`."""

    async def authenticate(self, request: web.Request) -> User:
        user = await super().authenticate(request)
        return User(name=user.name, admin=user.admin, groups=GROUPS.get(user.name, set()))


@pytest.fixture
async def api(make_api: ApiFactory) -> Api:  # noqa: F811 - test_api's fixture, by name
    return await make_api(BASE_CONFIG, auth_class=GroupAuth)


async def shared_cluster(api: Api, **sharing: Any) -> str:
    """A RUNNING cluster of alice's, shared as ``sharing`` says (default `SHARING`)."""
    body = {"cluster_options": {}, **(sharing or SHARING)}
    resp = await api.call("POST", "/api/v2/clusters", user="alice", json=body)
    assert resp.status == 201, await resp.text()
    name: str = (await resp.json())["name"]
    api.backend.set_status(name, ClusterStatus.RUNNING)
    return name


# --------------------------------------------------------------------------------------------
# Every route, every role
# --------------------------------------------------------------------------------------------

SEES = {"owner", "user_sharee", "group_sharee", "admin"}
"""Who may see a shared cluster, wait for it, connect to it and read its logs."""
ACTS = {"owner", "admin"}
"""Who may scale, adapt, stop it and change its sharing."""

# (method, path under the cluster, body, the roles answered 2xx, the 2xx status)
CLUSTER_ROUTES: list[tuple[str, str, Any, set[str], int]] = [
    ("GET", "/api/v1/clusters/{name}", None, SEES, 200),
    ("GET", "/api/v1/clusters/{name}?wait", None, SEES, 200),
    ("GET", "/api/v2/clusters/{name}", None, SEES, 200),
    ("GET", "/api/v2/clusters/{name}?wait", None, SEES, 200),
    ("GET", "/api/v2/clusters/{name}/reason", None, SEES, 200),
    ("GET", "/api/v2/clusters/{name}/logs", None, SEES, 200),
    ("POST", "/api/v1/clusters/{name}/scale", {"count": 2}, ACTS, 200),
    ("POST", "/api/v1/clusters/{name}/adapt", {"minimum": 0, "maximum": 2}, ACTS, 200),
    ("PATCH", "/api/v2/clusters/{name}", {"share_with_users": ["erin"]}, ACTS, 200),
    ("DELETE", "/api/v1/clusters/{name}", None, ACTS, 204),
]

VERB = {
    "scale": "scale",
    "adapt": "adapt",
    "PATCH": "change the sharing of",
    "DELETE": "stop",
    "logs": "read the logs of",
}


def verb(method: str, path: str) -> str:
    for key, text in VERB.items():
        if key == method or path.endswith("/" + key):
            return text
    return "view"


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    ("method", "path", "body", "allowed", "ok"),
    CLUSTER_ROUTES,
    ids=[f"{m} {p.removeprefix('/api/')}" for m, p, *_ in CLUSTER_ROUTES],
)
async def test_every_cluster_route_for_every_role(
    api: Api, role: str, method: str, path: str, body: Any, allowed: set[str], ok: int
) -> None:
    name = await shared_cluster(api)
    url = path.format(name=name)
    user = USER_OF[role]
    kwargs: dict[str, Any] = {} if body is None else {"json": body}
    if role not in allowed:
        sharee = role in ("user_sharee", "group_sharee")
        needles = [f"user {user!r} may not {verb(method, path)} cluster {name!r}"]
        if sharee:
            needles.append("only its owner 'alice' and admins may")
        await api.refused(method, url, 403, *needles, user=user, **kwargs)
        return
    resp = await api.call(method, url, user=user, **kwargs)
    assert resp.status == ok, await resp.text()
    if method == "GET" and path.startswith("/api/v1/clusters/{name}"):
        # What connecting needs, as the owner gets it: the TLS credentials and dashboard.
        answer = await resp.json()
        assert answer["tls_cert"] == "CERT" and answer["tls_key"] == "KEY"
        assert answer["dashboard_route"] == f"/clusters/{name}/status"
        assert "share_with_users" not in answer  # v1 keeps its keys: the original client
    if method == "GET" and path.startswith("/api/v2/clusters/{name}?"):
        answer = await resp.json()
        assert answer["owner"] == "alice" and answer["tls_key"] == "KEY"
        expected = {"owner": "owner", "admin": "admin"}.get(role, "sharee")
        assert answer["access"] == expected
        if role in ACTS:
            assert answer["share_with_users"] == ["bob"]
            assert answer["share_with_groups"] == ["physics"]
        else:  # who else it is shared with is the owner's business
            assert answer["share_with_users"] is None and answer["share_with_groups"] is None
    if method == "DELETE":
        assert api.backend.clusters[name].status == ClusterStatus.STOPPED
    if method == "PATCH":
        assert api.backend.clusters[name].shared_users == ["erin"]


@pytest.mark.parametrize("role", ROLES)
async def test_listings_for_every_role(api: Api, role: str) -> None:
    name = await shared_cluster(api)
    user = USER_OF[role]
    v1 = await (await api.call("GET", "/api/v1/clusters/", user=user)).json()
    v2 = await (await api.call("GET", "/api/v2/clusters", user=user)).json()
    unshared = await (await api.call("GET", "/api/v2/clusters?shared=0", user=user)).json()
    # v1 (the original client's list_clusters) lists one's own clusters only, as before.
    assert list(v1) == ([name] if role == "owner" else [])
    assert list(unshared) == ([name] if role == "owner" else [])
    listed = role in ("owner", "user_sharee", "group_sharee")  # admins: their own only
    assert list(v2) == ([name] if listed else [])
    if listed:
        assert v2[name]["access"] == ("owner" if role == "owner" else "sharee")
        assert v2[name]["tls_cert"] == "CERT"


async def test_the_v2_list_filters_shared_clusters_by_status_too(api: Api) -> None:
    running = await shared_cluster(api)
    pending = await shared_cluster(api)
    api.backend.set_status(pending, ClusterStatus.PENDING)
    stopped = await shared_cluster(api)
    await api.call("DELETE", f"/api/v1/clusters/{stopped}", user="alice")
    own = await api.create(user="bob")

    async def names(query: str) -> set[str]:
        resp = await api.call("GET", f"/api/v2/clusters{query}", user="bob")
        assert resp.status == 200, await resp.text()
        return set(await resp.json())

    assert await names("") == {running, pending, own}
    assert await names("?status=running") == {running}
    assert await names("?status=stopped") == {stopped}
    assert await names("?shared=false") == {own}
    await api.refused("GET", "/api/v2/clusters?shared=maybe", 422, "shared", user="bob")
    await api.refused("GET", "/api/v2/clusters?status=gone", 422, "status", user="bob")


async def test_sharees_read_the_logs(api: Api) -> None:
    name = await shared_cluster(api)
    api.backend.logs[name] = {"scheduler": "hello from the scheduler\n"}
    resp = await api.call("GET", f"/api/v2/clusters/{name}/logs?component=scheduler", user="carol")
    assert resp.status == 200
    assert await resp.json() == {"scheduler": "hello from the scheduler\n"}


async def test_an_unknown_cluster_is_404_on_the_v2_routes(api: Api) -> None:
    await api.refused("GET", "/api/v2/clusters/nope", 404, "'nope' not found")
    body = {"share_with_users": ["bob"]}
    await api.refused("PATCH", "/api/v2/clusters/nope", 404, "'nope' not found", json=body)
    await api.refused("PATCH", "/api/v2/clusters/nope", 401, user=None, json=body)


# --------------------------------------------------------------------------------------------
# Creating and changing the sharing
# --------------------------------------------------------------------------------------------


async def test_create_shared_and_the_default_of_no_one(api: Api) -> None:
    name = await shared_cluster(api)
    cluster = api.backend.clusters[name]
    assert cluster.shared_users == ["bob"] and cluster.shared_groups == ["physics"]
    plain = await api.create()  # v1, as the original client creates: shared with no one
    assert api.backend.clusters[plain].shared_users == []
    assert api.backend.clusters[plain].shared_groups == []
    resp = await api.call("POST", "/api/v2/clusters", json={})
    assert resp.status == 201
    made = api.backend.clusters[(await resp.json())["name"]]
    assert made.shared_users == [] and made.shared_groups == []
    await api.refused(
        "POST",
        "/api/v1/clusters/",
        422,
        "unknown key 'share_with_users'",
        json={"cluster_options": {}, "share_with_users": ["bob"]},
    )


async def test_patch_replaces_the_lists_it_names_and_keeps_the_others(api: Api) -> None:
    name = await shared_cluster(api)
    url = f"/api/v2/clusters/{name}"
    resp = await api.call("PATCH", url, json={"share_with_groups": ["chemistry", "chemistry"]})
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer["share_with_users"] == ["bob"]
    assert answer["share_with_groups"] == ["chemistry"]  # duplicates dropped
    assert (await api.call("GET", url, user="dave")).status == 200  # dave is in chemistry now
    assert (await api.call("GET", url, user="carol")).status == 403  # physics no longer
    resp = await api.call("PATCH", url, json={"share_with_users": [], "share_with_groups": None})
    assert resp.status == 200
    cluster = api.backend.clusters[name]
    assert cluster.shared_users == [] and cluster.shared_groups == []
    assert (await api.call("GET", url, user="bob")).status == 403
    shared = [e for e in api.observer.events if e.kind == "shared"]
    assert [e.detail for e in shared] == [
        {"shared_users": ["bob"], "shared_groups": ["chemistry"], "by": "alice"},
        {"shared_users": [], "shared_groups": [], "by": "alice"},
    ]
    assert {e.username for e in shared} == {"alice"}


BAD_SHARING: list[tuple[Any, list[str]]] = [
    ({}, ["names nothing to change", "share_with_users and/or share_with_groups"]),
    ({"share_with_users": ["bob"], "colour": "red"}, ["unknown key 'colour'"]),
    ({"share_with_users": "bob"}, ["share_with_users: expected an array", "got string"]),
    ({"share_with_groups": {"a": 1}}, ["share_with_groups: expected an array", "got object"]),
    ({"share_with_users": ["bob", 3]}, ["share_with_users[1]: expected a non-empty name"]),
    ({"share_with_users": [""]}, ["share_with_users[0]: expected a non-empty name"]),
    ({"share_with_groups": ["  "]}, ["share_with_groups[0]: expected a non-empty name"]),
    ({"share_with_users": [" bob"]}, ["share_with_users[0]", "leading or trailing whitespace"]),
    (
        {"share_with_users": ["x" * (SHARE_MAX_NAME_LENGTH + 1)]},
        [f"at most {SHARE_MAX_NAME_LENGTH} characters"],
    ),
    (
        {"share_with_users": [f"u{i}" for i in range(SHARE_MAX_NAMES + 1)]},
        [f"at most {SHARE_MAX_NAMES} names, got {SHARE_MAX_NAMES + 1}"],
    ),
    (["bob"], ["request body must be a JSON object"]),
]


@pytest.mark.parametrize(("body", "needles"), BAD_SHARING)
async def test_bad_patch_is_422_and_changes_nothing(
    api: Api, body: Any, needles: list[str]
) -> None:
    name = await shared_cluster(api)
    await api.refused("PATCH", f"/api/v2/clusters/{name}", 422, *needles, json=body)
    assert not [e for e in api.observer.events if e.kind == "shared"]


@pytest.mark.parametrize(("body", "needles"), BAD_SHARING[2:-1])
async def test_bad_sharing_at_creation_is_422_and_creates_nothing(
    api: Api, body: Any, needles: list[str]
) -> None:
    await api.refused("POST", "/api/v2/clusters", 422, *needles, json=body)
    assert api.backend.clusters == {}


async def test_malformed_patch_body_is_422(api: Api) -> None:
    name = await shared_cluster(api)
    await api.refused(
        "PATCH", f"/api/v2/clusters/{name}", 422, "malformed JSON", data=b"{nope", user="alice"
    )


# --------------------------------------------------------------------------------------------
# Quotas: a shared cluster is its owner's
# --------------------------------------------------------------------------------------------


async def test_a_shared_cluster_counts_against_its_owner_only(make_api: ApiFactory) -> None:  # noqa: F811
    config = {
        **BASE_CONFIG,
        "quotas": {"default": {"max_clusters": 1}, "groups": {"physics": {"max_clusters": 1}}},
    }
    api = await make_api(config, auth_class=GroupAuth)
    name = await shared_cluster(api)
    for sharee in ("bob", "carol"):
        quota = await (await api.call("GET", "/api/v2/quota", user=sharee)).json()
        assert quota["usage"]["clusters"] == 0, quota
    physics = await (await api.call("GET", "/api/v2/quota", user="carol")).json()
    assert physics["group_pools"]["physics"]["usage"]["clusters"] == 0
    owner = await (await api.call("GET", "/api/v2/quota", user="alice")).json()
    assert owner["usage"]["clusters"] == 1
    # Each sharee still has its own room; the owner has none left.
    assert (await api.call("POST", "/api/v2/clusters", user="bob", json={})).status == 201
    assert (await api.call("POST", "/api/v2/clusters", user="carol", json={})).status == 201
    await api.refused("POST", "/api/v2/clusters", 409, "max_clusters", user="alice", json={})
    assert name in api.backend.clusters


# --------------------------------------------------------------------------------------------
# Persistence: the sharing survives a restart on the same database
# --------------------------------------------------------------------------------------------


async def test_sharing_survives_a_restart(tmp_path: Path) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    config = {
        "gateway": {
            "db_url": f"sqlite:///{tmp_path / 'gateway.sqlite'}",
            "db_encrypt_keys": [key],
            "stop_clusters_on_shutdown": False,
        }
    }
    alice = User(name="alice")
    first = Site(config)
    await first.backend.setup()
    try:
        name = await first.manager.create_cluster(
            alice, {}, sharing={"shared_users": ["bob"], "shared_groups": ["physics"]}
        )
        other = await first.manager.create_cluster(alice, {})
        await first.manager.share_cluster(alice, other, {"shared_groups": ["chemistry"]})
    finally:
        await first.backend.cleanup()
        await first.driver.shutdown()

    second = Site(config)
    loaded = {c.name: c for c in second.backend.store.load()}
    assert loaded[name].shared_users == ["bob"]
    assert loaded[name].shared_groups == ["physics"]
    assert loaded[other].shared_users == []
    assert loaded[other].shared_groups == ["chemistry"]
    second.backend.store.close()
    await second.driver.shutdown()

"""Tests of the admin view through the REST API (fake backend): ``/api/v2/admin/clusters``
with its filters, ``/api/v2/admin/usage``, stopping any cluster, and refusals."""

from __future__ import annotations

from typing import Any

import pytest
from test_api import Api, ApiFactory, make_api  # noqa: F401 - the fixture

from gateway_core.models import ClusterStatus

pytestmark = pytest.mark.unit

CONFIG: dict[str, Any] = {
    "gateway": {"admin_users": ["admin"]},
    "cluster": {"worker_cores": 1, "scheduler_cores": 1},
    "quotas": {"default": {"max_clusters": 3}, "users": {"dora": {"max_clusters": 1}}},
}


@pytest.fixture
async def admin_api(make_api: ApiFactory) -> Api:  # noqa: F811 - test_api's fixture
    return await make_api(CONFIG)


async def listed(api: Api, query: str = "", user: str = "admin") -> list[dict[str, Any]]:
    resp = await api.call("GET", "/api/v2/admin/clusters" + query, user=user)
    assert resp.status == 200, await resp.text()
    clusters: list[dict[str, Any]] = (await resp.json())["clusters"]
    return clusters


async def test_admin_lists_every_users_clusters(admin_api: Api) -> None:
    a = await admin_api.running("alice")
    b = await admin_api.create("bob")
    clusters = await listed(admin_api)
    assert {(c["name"], c["username"], c["status"]) for c in clusters} == {
        (a, "alice", "RUNNING"),
        (b, "bob", "PENDING"),
    }
    one = next(c for c in clusters if c["name"] == a)
    assert one["cores"] == 1 and one["workers"] == {} and one["reason"] is None


def names_in_order(clusters: list[dict[str, Any]]) -> list[str]:
    """The names listed, after checking the listing's order: by start time, then name (two
    clusters made in the same millisecond are ordered by name)."""
    keys = [(c["start_time"], c["name"]) for c in clusters]
    assert keys == sorted(keys), keys
    return [c["name"] for c in clusters]


async def test_admin_filters_by_user_and_status(admin_api: Api) -> None:
    a = await admin_api.running("alice")
    b = await admin_api.create("bob")
    c = await admin_api.running("bob")
    assert sorted(names_in_order(await listed(admin_api, "?user=bob"))) == sorted([b, c])
    assert sorted(names_in_order(await listed(admin_api, "?status=running"))) == sorted([a, c])
    assert [x["name"] for x in await listed(admin_api, "?user=bob&status=PENDING")] == [b]
    assert await listed(admin_api, "?user=nobody") == []
    await admin_api.call("DELETE", f"/api/v1/clusters/{a}", user="alice")
    assert [x["name"] for x in await listed(admin_api, "?status=stopped")] == [a]
    assert a not in [x["name"] for x in await listed(admin_api)]  # default: active only


@pytest.mark.parametrize(
    ("query", "status", "needle"),
    [
        ("?status=sleeping", 422, "unknown cluster status 'sleeping'"),
        ("?status=running,", 422, "unknown cluster status ''"),
        ("?user=", 422, "user: expected a user name"),
    ],
)
async def test_bad_admin_filters_are_refused(
    admin_api: Api, query: str, status: int, needle: str
) -> None:
    await admin_api.running("alice")
    await admin_api.refused("GET", "/api/v2/admin/clusters" + query, status, needle, user="admin")


@pytest.mark.parametrize("path", ["/api/v2/admin/clusters", "/api/v2/admin/usage"])
async def test_non_admins_are_refused_the_admin_routes(admin_api: Api, path: str) -> None:
    await admin_api.running("alice")
    await admin_api.refused("GET", path, 403, "'alice' is not an admin", user="alice")
    await admin_api.refused("GET", path, 401, user=None)


async def test_admin_stops_any_cluster_through_the_delete_route(admin_api: Api) -> None:
    name = await admin_api.running("alice")
    await admin_api.refused("DELETE", f"/api/v1/clusters/{name}", 403, "may not stop", user="bob")
    assert (await admin_api.call("DELETE", f"/api/v1/clusters/{name}", user="admin")).status == 204
    assert admin_api.backend.clusters[name].status == ClusterStatus.STOPPED
    assert await listed(admin_api) == []


async def test_admin_usage_lists_each_user_against_quotas(admin_api: Api) -> None:
    await admin_api.running("alice")
    await admin_api.running("alice")
    await admin_api.running("bob")
    resp = await admin_api.call("GET", "/api/v2/admin/usage", user="admin")
    assert resp.status == 200, await resp.text()
    users = (await resp.json())["users"]
    # users with clusters, users named in [quotas.users], users seen (the admin itself)
    assert sorted(users) == ["admin", "alice", "bob", "dora"]
    assert users["alice"]["usage"]["clusters"] == 2
    assert users["alice"]["quota"]["max_clusters"] == 3
    assert users["bob"]["usage"]["clusters"] == 1
    assert users["dora"]["usage"]["clusters"] == 0
    assert users["dora"]["quota"]["max_clusters"] == 1

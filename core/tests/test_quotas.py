"""Tests of `[quotas]` through the REST API (fake backend) and `gateway config check`.

Per-user defaults and overrides, group pools shared by their members, refusals on create that
name used/asked/limit, clamped scale and adapt, freed quota after a stop, ``GET /api/v2/quota``,
and the ``max_lifetime`` ceiling on user options.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from test_api import Api, ApiFactory, CountingAuth, make_api  # noqa: F401 - the fixture
from test_cli import GOOD_CONFIG, dists, run, write_config  # noqa: F401 - the fixture

from gateway_core.config import ConfigError, load_config
from gateway_core.models import ClusterStatus, User

pytestmark = pytest.mark.unit

GIB = 2**30
GROUPS = {"alice": {"physics"}, "bob": {"physics"}, "carol": {"chemistry"}}


class GroupAuth(CountingAuth):
    """The test authenticator, with groups for alice and bob (physics) and carol."""

    async def authenticate(self, request: web.Request) -> User:
        user = await super().authenticate(request)
        return User(name=user.name, admin=user.admin, groups=GROUPS.get(user.name, set()))


def config(quotas: dict[str, Any], **cluster: Any) -> dict[str, Any]:
    """A gateway config: 1-core, 1 GiB schedulers and workers, the given `[quotas]`."""
    return {
        "gateway": {"admin_users": ["admin"]},
        "cluster": {
            "scheduler_cores": 1,
            "scheduler_memory": "1 GiB",
            "worker_cores": 1,
            "worker_memory": "1 GiB",
            **cluster,
        },
        "options": {
            "worker_cores": {"type": "int", "min": 1, "max": 4, "default": 1},
            "profile": {
                "type": "select",
                "options": [{"key": "small", "value": 1}, {"key": "big", "value": 2}],
                "target": "scheduler_cores",
            },
        },
        "quotas": copy.deepcopy(quotas),
    }


@pytest.fixture
def new_api(make_api: ApiFactory) -> ApiFactory:  # noqa: F811 - test_api's fixture, by name
    """test_api's API factory, under the name this module's tests take it by."""
    return make_api


async def quota_api(new_api: ApiFactory, quotas: dict[str, Any], **cluster: Any) -> Api:
    return await new_api(config(quotas, **cluster), auth_class=GroupAuth)


async def scale(api: Api, name: str, count: int, user: str = "alice") -> dict[str, Any]:
    path = f"/api/v1/clusters/{name}/scale"
    resp = await api.call("POST", path, user=user, json={"count": count})
    assert resp.status == 200, await resp.text()
    answer: dict[str, Any] = await resp.json()
    return answer


def forwarded_count(api: Api, name: str) -> Any:
    return [m for n, m in api.backend.forwarded if n == name][-1]["count"]


# --------------------------------------------------------------------------------------------
# Creating clusters
# --------------------------------------------------------------------------------------------


async def test_default_quota_limits_each_users_clusters(new_api: ApiFactory) -> None:
    api = await quota_api(new_api, {"default": {"max_clusters": 2}})
    await api.create("alice")
    await api.create("alice")
    await api.refused(
        "POST",
        "/api/v1/clusters/",
        409,
        "cannot create the cluster: quota of user alice exceeded: max_clusters is 2 clusters, "
        "2 clusters in use, the new cluster asks 1 cluster more",
        json={"cluster_options": {}},
    )
    # Per user: bob has his own two.
    await api.create("bob")
    await api.create("bob")
    assert len(api.backend.clusters) == 4


async def test_a_users_table_overrides_the_default_key_by_key(new_api: ApiFactory) -> None:
    api = await quota_api(
        new_api,
        {"default": {"max_clusters": 1, "max_workers": 3}, "users": {"alice": {"max_clusters": 3}}},
    )
    names = [await api.running("alice") for _ in range(3)]
    await api.refused(
        "POST", "/api/v1/clusters/", 409, "max_clusters is 3 clusters", json={"cluster_options": {}}
    )
    # The default's max_workers still applies to alice.
    answer = await scale(api, names[0], 10)
    assert answer["ok"] is False
    assert forwarded_count(api, names[0]) == 3
    await api.create("bob")
    await api.refused(
        "POST",
        "/api/v1/clusters/",
        409,
        "quota of user bob exceeded: max_clusters is 1 cluster",
        user="bob",
        json={"cluster_options": {}},
    )


async def test_a_scheduler_alone_beyond_the_cores_quota_is_refused(new_api: ApiFactory) -> None:
    api = await quota_api(new_api, {"default": {"max_cores": 2, "max_memory": "3 GiB"}})
    await api.create("alice", profile="big")  # a 2-core scheduler: exactly the quota
    await api.refused(
        "POST",
        "/api/v1/clusters/",
        409,
        "quota of user alice exceeded: max_cores is 2 cores, 2 cores in use, "
        "the new cluster's scheduler asks 1 core more",
        json={"cluster_options": {}},
    )


async def test_memory_quota_refuses_a_scheduler_that_does_not_fit(new_api: ApiFactory) -> None:
    api = await quota_api(new_api, {"default": {"max_memory": "1.5 GiB"}})
    await api.create("alice")
    await api.refused(
        "POST",
        "/api/v1/clusters/",
        409,
        "max_memory is 1.5 GiB, 1 GiB in use, the new cluster's scheduler asks 1 GiB more",
        json={"cluster_options": {}},
    )


# --------------------------------------------------------------------------------------------
# Scaling and adapting
# --------------------------------------------------------------------------------------------


async def test_scale_beyond_the_quota_scales_to_what_fits_and_says_so(
    new_api: ApiFactory,
) -> None:
    api = await quota_api(new_api, {"default": {"max_cores": 8}})
    first = await api.running()
    second = await api.running()
    assert await scale(api, first, 3) == {"ok": True, "msg": None}
    # 8 cores: first holds 1 + 3, second's scheduler 1, so 3 workers of 1 core fit.
    answer = await scale(api, second, 10)
    assert answer["ok"] is False
    assert answer["msg"] == (
        "Asked for 10 workers but the quota of user alice allows 3: max_cores is 8 cores, "
        "5 cores in use, 10 workers ask 10 cores more; scaling to 3 workers instead."
    )
    assert forwarded_count(api, second) == 3
    assert api.backend.clusters[second].status.name == "RUNNING"  # never failed
    # Scaling down is never clamped, and frees room at once.
    assert await scale(api, first, 0) == {"ok": True, "msg": None}
    assert await scale(api, second, 6) == {"ok": True, "msg": None}


async def test_workers_of_a_group_count_at_their_own_size(new_api: ApiFactory) -> None:
    api = await quota_api(
        new_api,
        {"default": {"max_cores": 12}},
        worker_groups={"gpu": {"worker_cores": 4}},
    )
    name = await api.running()
    api.backend.clusters[name].count = 3  # as a heartbeat reports it: 1 + 3 cores held
    path = f"/api/v1/clusters/{name}/scale"
    resp = await api.call("POST", path, json={"count": 5, "group": "gpu"})
    answer = await resp.json()
    assert answer["msg"] == (
        "Asked for 5 workers but the quota of user alice allows 2: max_cores is 12 cores, "
        "4 cores in use, 5 workers ask 20 cores more; scaling to 2 workers instead."
    )
    assert api.backend.forwarded[-1] == (name, {"op": "scale", "count": 2, "group": "gpu"})
    api.backend.clusters[name].group_counts = {"gpu": 2}  # reported: 8 cores more
    # The default group gets what the scheduler and the two 4-core workers leave.
    answer = await scale(api, name, 10)
    assert "allows 3: max_cores is 12 cores, 9 cores in use" in answer["msg"]
    assert forwarded_count(api, name) == 3
    # Another cluster's scheduler sees the GPU workers at 4 cores each: 1 + 3 + 8 = 12 held.
    await api.refused(
        "POST",
        "/api/v1/clusters/",
        409,
        "max_cores is 12 cores, 12 cores in use",
        json={"cluster_options": {}},
    )


async def test_the_cluster_limit_still_applies_under_a_looser_quota(new_api: ApiFactory) -> None:
    api = await quota_api(new_api, {"default": {"max_workers": 50}}, cluster_max_workers=4)
    name = await api.running()
    answer = await scale(api, name, 10)
    assert "cluster " + name + " may have at most 4" in answer["msg"]
    assert forwarded_count(api, name) == 4


async def test_adapt_beyond_the_quota_is_clamped(new_api: ApiFactory) -> None:
    api = await quota_api(new_api, {"default": {"max_workers": 5}})
    first = await api.running()
    second = await api.running()
    await scale(api, first, 2)
    resp = await api.call(
        "POST", f"/api/v1/clusters/{second}/adapt", json={"minimum": 1, "maximum": 10}
    )
    answer = await resp.json()
    assert answer["ok"] is False
    assert (
        "the quota of user alice allows 3: max_workers is 5 workers, 2 workers in use"
        in (answer["msg"])
    )
    assert "using minimum=1, maximum=3 instead" in answer["msg"]
    assert api.backend.forwarded[-1] == (
        second,
        {"op": "adapt", "minimum": 1, "maximum": 3, "active": True},
    )
    # The adaptive maximum is reserved: the first cluster cannot take that room.
    answer = await scale(api, first, 5)
    assert forwarded_count(api, first) == 2
    assert "allows 2" in answer["msg"]
    # Without a maximum the quota sets it.
    resp = await api.call("POST", f"/api/v1/clusters/{second}/adapt", json={})
    assert (await resp.json())["ok"] is True
    assert api.backend.forwarded[-1][1]["maximum"] == 3


async def test_workers_the_scheduler_reports_count(new_api: ApiFactory) -> None:
    api = await quota_api(new_api, {"default": {"max_workers": 4}})
    first = await api.running()
    second = await api.running()
    api.backend.clusters[first].count = 3  # as a heartbeat (adaptive scaling) reports it
    answer = await scale(api, second, 4)
    assert forwarded_count(api, second) == 1
    assert "3 workers in use" in answer["msg"]


async def test_a_stopped_cluster_frees_its_quota(new_api: ApiFactory) -> None:
    api = await quota_api(new_api, {"default": {"max_clusters": 2, "max_workers": 4}})
    first = await api.running()
    second = await api.running()
    await scale(api, first, 4)
    assert (await scale(api, second, 2))["ok"] is False
    await api.refused(
        "POST", "/api/v1/clusters/", 409, "max_clusters", json={"cluster_options": {}}
    )
    resp = await api.call("DELETE", f"/api/v1/clusters/{first}")
    assert resp.status == 204
    assert await scale(api, second, 2) == {"ok": True, "msg": None}
    await api.create()


async def test_a_cluster_asked_to_stop_frees_its_quota_while_stopping(
    new_api: ApiFactory,
) -> None:
    api = await quota_api(new_api, {"default": {"max_clusters": 1}})
    api.backend.slow_stop = True
    first = await api.running()
    await api.call("DELETE", f"/api/v1/clusters/{first}")
    assert api.backend.clusters[first].status.name == "STOPPING"
    await api.create()


# --------------------------------------------------------------------------------------------
# Group pools
# --------------------------------------------------------------------------------------------


async def test_a_group_pool_is_shared_by_its_members(new_api: ApiFactory) -> None:
    api = await quota_api(new_api, {"groups": {"physics": {"max_cores": 6, "max_clusters": 3}}})
    mine = await api.running("alice")
    bobs = await api.running("bob")
    # alice: 6 cores - bob's scheduler (1) - her scheduler (1) = 4 workers.
    answer = await scale(api, mine, 10)
    assert (
        "the quota of group physics allows 4: max_cores is 6 cores, 2 cores in use"
        in (answer["msg"])
    )
    assert forwarded_count(api, mine) == 4
    # bob shares what is left: nothing.
    answer = await scale(api, bobs, 1, user="bob")
    assert answer["ok"] is False
    assert forwarded_count(api, bobs) == 0
    await scale(api, mine, 2)  # alice gives some back
    await api.running("bob")
    await api.refused(
        "POST",
        "/api/v1/clusters/",
        409,
        "quota of group physics exceeded: max_clusters is 3 clusters, 3 clusters in use",
        json={"cluster_options": {}},
    )
    # carol is not a member: the pool does not touch her.
    carols = await api.running("carol")
    assert await scale(api, carols, 20, user="carol") == {"ok": True, "msg": None}


async def test_the_tightest_of_user_and_group_quotas_wins(new_api: ApiFactory) -> None:
    api = await quota_api(
        new_api,
        {"default": {"max_workers": 2}, "groups": {"physics": {"max_workers": 10}}},
    )
    name = await api.running("alice")
    answer = await scale(api, name, 5)
    assert "the quota of user alice allows 2" in answer["msg"]


# --------------------------------------------------------------------------------------------
# GET /api/v2/quota
# --------------------------------------------------------------------------------------------

QUOTAS = {
    "default": {"max_clusters": 2, "max_workers": 20, "max_cores": 16, "max_memory": "64 GiB"},
    "users": {"alice": {"max_clusters": 5}},
    "groups": {"physics": {"max_cores": 100}},
}


async def test_quota_route_shows_the_callers_usage_and_limits(new_api: ApiFactory) -> None:
    api = await quota_api(new_api, QUOTAS)
    name = await api.running("alice")
    await scale(api, name, 2)
    await api.running("bob")
    resp = await api.call("GET", "/api/v2/quota")
    assert resp.status == 200
    assert await resp.json() == {
        "user": "alice",
        "groups": ["physics"],
        "quota": {"max_clusters": 5, "max_workers": 20, "max_cores": 16.0, "max_memory": 64 * GIB},
        "usage": {"clusters": 1, "workers": 2, "cores": 3.0, "memory": 3 * GIB},
        "group_pools": {
            "physics": {
                "quota": {
                    "max_clusters": None,
                    "max_workers": None,
                    "max_cores": 100.0,
                    "max_memory": None,
                },
                "usage": {"clusters": 2, "workers": 2, "cores": 4.0, "memory": 4 * GIB},
            }
        },
    }


async def test_admins_see_any_users_quota(new_api: ApiFactory) -> None:
    api = await quota_api(new_api, QUOTAS)
    await api.running("bob")
    resp = await api.call("GET", "/api/v2/quota?user=bob", user="admin")
    assert resp.status == 200
    body = await resp.json()
    assert body["user"] == "bob"
    assert body["quota"]["max_clusters"] == 2
    assert body["usage"]["clusters"] == 1


async def test_a_user_may_not_see_another_users_quota(new_api: ApiFactory) -> None:
    api = await quota_api(new_api, QUOTAS)
    await api.refused(
        "GET", "/api/v2/quota?user=bob", 403, "user 'alice' may not see the quota of user 'bob'"
    )
    resp = await api.call("GET", "/api/v2/quota?user=alice")
    assert resp.status == 200
    await api.refused("GET", "/api/v2/quota?user=", 422, "user: expected a user name")
    await api.refused("GET", "/api/v2/quota", 401, user=None)


async def test_without_quotas_the_route_shows_no_limits(new_api: ApiFactory) -> None:
    api = await new_api()
    await api.running()
    body = await (await api.call("GET", "/api/v2/quota")).json()
    assert body["quota"] == dict.fromkeys(
        ("max_clusters", "max_workers", "max_cores", "max_memory")
    )
    assert body["usage"]["clusters"] == 1
    assert body["group_pools"] == {}


# --------------------------------------------------------------------------------------------
# The max_lifetime ceiling
# --------------------------------------------------------------------------------------------


async def test_options_may_lower_max_lifetime_but_never_raise_it(new_api: ApiFactory) -> None:
    cfg = config({}, max_lifetime="1h")
    cfg["options"]["lifetime"] = {"type": "string", "default": "1h", "target": "max_lifetime"}
    api = await new_api(cfg)
    name = await api.create(lifetime="30m")
    assert api.backend.clusters[name].config["max_lifetime"] == 1800.0
    await api.refused(
        "POST",
        "/api/v1/clusters/",
        422,
        "max_lifetime: 2h is above the configured maximum of 1h",
        json={"cluster_options": {"lifetime": "2h"}},
    )
    await api.refused(
        "POST",
        "/api/v1/clusters/",
        422,
        "max_lifetime: invalid duration 'soon'",
        json={"cluster_options": {"lifetime": "soon"}},
    )


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_quotas_config_structures_as_documented() -> None:
    cfg = load_config({"quotas": copy.deepcopy(QUOTAS)}, environ={})
    assert cfg.quotas.for_user("alice").max_clusters == 5
    assert cfg.quotas.for_user("alice").max_memory == 64 * GIB
    assert cfg.quotas.for_user("bob").max_clusters == 2
    assert cfg.quotas.groups["physics"].max_cores == 100


def test_bad_quotas_are_config_errors() -> None:
    bad = {
        "quotas": {
            "default": {"max_clusterz": 2, "max_memory": "64 XB"},
            "users": {"alice": {"max_workers": -1}},
            "groups": {"physics": 3},
            "everyone": {},
        }
    }
    with pytest.raises(ConfigError) as info:
        load_config(bad, environ={})
    problems = info.value.problems
    assert "quotas.default.max_clusterz: unknown key" in problems
    bad_size = "quotas.default.max_memory: invalid memory size '64 XB'"
    assert any(p.startswith(bad_size) for p in problems)
    assert "quotas.users.alice.max_workers: must not be negative, got -1" in problems
    assert "quotas.groups.physics: expected a table of limits, got int" in problems
    assert "quotas.everyone: unknown key" in problems


@pytest.mark.usefixtures("dists")
def test_config_check_validates_the_quotas_section(tmp_path: Path) -> None:
    text = (
        GOOD_CONFIG
        + """
[quotas.default]
max_clusters = 2
max_memory = "lots"

[quotas.users.alice]
max_cpus = 5
"""
    )
    result = run("config", "check", "--config", write_config(tmp_path, text))
    assert result.exit_code == 1, result.output
    problems = result.stdout.splitlines()
    bad_size = "quotas.default.max_memory: invalid memory size 'lots'"
    assert any(p.startswith(bad_size) for p in problems)
    assert "quotas.users.alice.max_cpus: unknown key" in problems
    good = GOOD_CONFIG + '\n[quotas.default]\nmax_memory = "64 GiB"\n'
    result = run("config", "check", "--config", write_config(tmp_path, good))
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------------------------
# What this repository's client shows
# --------------------------------------------------------------------------------------------


async def test_the_client_shows_the_quota_messages_as_they_are(new_api: ApiFactory) -> None:
    from gateway_client import BasicAuth, Gateway, GatewayClusterError, GatewayWarning

    api = await quota_api(new_api, {"default": {"max_clusters": 1, "max_workers": 2}})
    address = str(api.client.make_url("")).rstrip("/")
    async with Gateway(address, auth=BasicAuth("alice", ""), asynchronous=True) as gateway:
        name = await gateway.submit()
        api.backend.set_status(name, ClusterStatus.RUNNING)
        with pytest.raises(GatewayClusterError) as info:
            await gateway.submit()
        assert str(info.value) == (
            "cannot create the cluster: quota of user alice exceeded: max_clusters is "
            "1 cluster, 1 cluster in use, the new cluster asks 1 cluster more"
        )
        with pytest.warns(GatewayWarning) as record:
            await gateway.scale_cluster(name, 5)
        assert str(record[0].message) == (
            "Asked for 5 workers but the quota of user alice allows 2: max_workers is "
            "2 workers, 0 workers in use, 5 workers ask 5 workers more; "
            "scaling to 2 workers instead."
        )


@pytest.mark.usefixtures("dists")
def test_config_show_includes_the_quotas(tmp_path: Path) -> None:
    text = GOOD_CONFIG + (
        '\n[quotas.default]\nmax_memory = "64 GiB"\n[quotas.users.alice]\nmax_clusters = 5\n'
    )
    result = run("config", "show", "--config", write_config(tmp_path, text))
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.stdout)
    assert shown["quotas"]["default"] == {"max_memory": 64 * GIB}
    assert shown["quotas"]["users"] == {"alice": {"max_clusters": 5}}
    assert "# max_lifetime = (unset)" in result.stdout.splitlines()

"""Tests of the store's indexes (by owner, status, sharee user and group) and of the listings
that use them: they agree with a scan after any sequence of changes, and never scan.

A seeded random sequence of creates, updates, deletes, purges and reloads is checked against a
brute-force scan after every step; the listings of the backend, the cluster manager (own and
shared clusters, quotas) and the store run on a store that refuses to be scanned.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from typing import Any, NoReturn

import pytest
from test_lifetime import Site

from gateway_core.models import Cluster, ClusterStatus, User, new_token, now_ms
from gateway_core.store import Store

pytestmark = pytest.mark.unit

USERS = ["alice", "bob", "carol", "dave", "erin"]
GROUPS = ["physics", "chemistry", "biology"]
HOUR_MS = 3_600_000


def record(name: str, username: str, **kw: Any) -> Cluster:
    return Cluster(name=name, username=username, token=new_token(), **kw)


# --------------------------------------------------------------------------------------------
# The indexes agree with a scan after random changes
# --------------------------------------------------------------------------------------------


def scan_of(store: Store, username: str, statuses: set[ClusterStatus] | None) -> set[str]:
    return {
        c.name
        for c in store.clusters.values()
        if c.username == username and (statuses is None or c.status in statuses)
    }


def scan_shared(
    store: Store, username: str, groups: set[str], statuses: set[ClusterStatus] | None
) -> set[str]:
    return {
        c.name
        for c in store.clusters.values()
        if (username in c.shared_users or not groups.isdisjoint(c.shared_groups))
        and (statuses is None or c.status in statuses)
    }


def names(found: list[Cluster], store: Store) -> set[str]:
    """The names of ``found``, checking each is the store's own record (not a stale one) and
    listed once."""
    for cluster in found:
        assert store.get(cluster.name) is cluster, f"stale record {cluster.name} in an index"
    listed = [c.name for c in found]
    assert len(listed) == len(set(listed)), f"a cluster listed twice: {sorted(listed)}"
    return set(listed)


def check_indexes(store: Store, rng: random.Random) -> None:
    status_sets: list[set[ClusterStatus] | None] = [
        None,
        {s for s in ClusterStatus if s.is_active},
        {s for s in ClusterStatus if not s.is_active},
        {rng.choice(list(ClusterStatus))},
    ]
    for statuses in status_sets:
        if statuses is not None:
            expected = {c.name for c in store.clusters.values() if c.status in statuses}
            assert names(store.clusters_with_status(statuses), store) == expected
        for user in [*USERS, "nobody"]:
            assert names(store.clusters_of(user, statuses), store) == scan_of(store, user, statuses)
            groups = set(rng.sample(GROUPS, rng.randint(0, len(GROUPS))))
            found = store.clusters_shared_with(user, groups, statuses)
            assert names(found, store) == scan_shared(store, user, groups, statuses)
    # No stale keys: every index key still has a cluster under it.
    assert set(store._by_owner) == {c.username for c in store.clusters.values()}
    assert set(store._by_status) == {c.status for c in store.clusters.values()}
    assert set(store._by_sharee_user) == {
        u for c in store.clusters.values() for u in c.shared_users
    }
    assert set(store._by_sharee_group) == {
        g for c in store.clusters.values() for g in c.shared_groups
    }


def sharing(rng: random.Random) -> dict[str, list[str]]:
    return {
        "shared_users": rng.sample(USERS, rng.randint(0, 2)),
        "shared_groups": rng.sample(GROUPS, rng.randint(0, 2)),
    }


@pytest.mark.parametrize("seed", range(5))
def test_the_indexes_agree_with_a_scan_after_random_changes(seed: int) -> None:
    rng = random.Random(seed)
    store = Store()
    made = 0
    try:
        for _ in range(300):
            clusters = list(store.clusters.values())
            op = rng.choice(
                ["create", "create", "status", "share", "owner", "other", "delete", "purge", "load"]
            )
            if op == "create" or not clusters:
                made += 1
                status = rng.choice(list(ClusterStatus))
                store.create_cluster(
                    record(
                        f"c{made}",
                        rng.choice(USERS),
                        status=status,
                        stop_time=None if status.is_active else now_ms() - rng.choice([0, HOUR_MS]),
                        **sharing(rng),
                    )
                )
            elif op == "status":
                status = rng.choice(list(ClusterStatus))
                store.update_cluster(
                    rng.choice(clusters),
                    status=status,
                    stop_time=None if status.is_active else now_ms() - rng.choice([0, HOUR_MS]),
                )
            elif op == "share":
                changes = sharing(rng)
                keep = rng.choice([["shared_users"], ["shared_groups"], list(changes)])
                store.update_cluster(rng.choice(clusters), **{k: changes[k] for k in keep})
            elif op == "owner":
                store.update_cluster(rng.choice(clusters), username=rng.choice(USERS))
            elif op == "other":
                store.update_cluster(rng.choice(clusters), count=rng.randint(0, 5))
            elif op == "delete":
                victim = rng.choice(clusters)
                store.delete_cluster(victim if rng.random() < 0.5 else victim.name)
            elif op == "purge":
                store.purge(60)
            else:
                store.load()
            check_indexes(store, rng)
    finally:
        store.close()


def test_updating_a_record_the_store_does_not_hold_leaves_the_indexes_alone() -> None:
    store = Store()
    try:
        held = record("c1", "alice", shared_users=["bob"])
        store.create_cluster(held)
        store.delete_cluster("c1")
        store.update_cluster(held, status=ClusterStatus.RUNNING, shared_users=["carol"])
        assert store.clusters_of("alice") == []
        assert store.clusters_shared_with("carol") == []
        assert store.clusters_with_status([ClusterStatus.RUNNING]) == []
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# Listings never scan the store
# --------------------------------------------------------------------------------------------


class Unscannable(dict[str, Cluster]):
    """The store's records, refusing every walk over them (lookups by name are fine)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError("the store's clusters were scanned")

    __iter__ = values = items = keys = _refuse  # type: ignore[assignment]

    def plain(self) -> dict[str, Cluster]:
        """The records as an ordinary dict again (for closing the store)."""
        return dict(dict.items(self))


def unguard(store: Store) -> dict[str, Cluster]:
    guarded = store._clusters
    return guarded.plain() if isinstance(guarded, Unscannable) else guarded


OTHERS = 2_000
"""Other users' clusters around the ones listed."""


def fill(store: Store) -> None:
    """alice's clusters (one stopped, one shared with bob) amid many of other users, some
    shared with groups bob is not in."""
    store.create_cluster(record("a-old", "alice", status=ClusterStatus.STOPPED, start_time=1))
    store.create_cluster(record("a-new", "alice", status=ClusterStatus.RUNNING, start_time=3))
    store.create_cluster(
        record("a-mid", "alice", status=ClusterStatus.PENDING, start_time=2, shared_users=["bob"])
    )
    store.create_cluster(
        record("c-lab", "carol", status=ClusterStatus.RUNNING, start_time=4, shared_groups=["lab"])
    )
    for i in range(OTHERS):
        store.create_cluster(
            record(
                f"o{i}",
                f"user{i % 100}",
                status=ClusterStatus.RUNNING,
                start_time=10 + i,
                shared_groups=["elsewhere"] if i % 2 else [],
            )
        )
    store._clusters = Unscannable(store._clusters)


@pytest.fixture
def site() -> Iterator[Site]:
    made = Site(
        {"quotas": {"default": {"max_clusters": 5}, "groups": {"lab": {"max_clusters": 9}}}}
    )
    fill(made.backend.store)
    yield made
    made.backend.store._clusters = unguard(made.backend.store)
    made.backend.store.close()


@pytest.fixture
async def shut_driver(site: Site) -> AsyncIterator[None]:
    yield
    await site.driver.shutdown()


ACTIVE = [s for s in ClusterStatus if s.is_active]


def test_the_store_lists_one_user_without_visiting_the_others() -> None:
    store = Store()
    try:
        fill(store)
        assert {c.name for c in store.clusters_of("alice")} == {"a-old", "a-mid", "a-new"}
        assert {c.name for c in store.clusters_of("alice", ACTIVE)} == {"a-mid", "a-new"}
        assert [c.name for c in store.clusters_shared_with("bob")] == ["a-mid"]
        assert [c.name for c in store.clusters_shared_with("dave", ["lab"])] == ["c-lab"]
        assert store.clusters_with_status([ClusterStatus.STOPPED])[0].name == "a-old"
        assert store.purge(60) == 0  # through the status index too
    finally:
        store._clusters = unguard(store)
        store.close()


async def test_the_backend_lists_one_user_without_a_scan(site: Site, shut_driver: None) -> None:
    backend = site.backend
    assert [c.name for c in await backend.list_clusters(username="alice")] == [
        "a-old",
        "a-mid",
        "a-new",
    ]
    assert [c.name for c in await backend.list_clusters(username="alice", statuses=ACTIVE)] == [
        "a-mid",
        "a-new",
    ]
    stopped = await backend.list_clusters(statuses=[ClusterStatus.STOPPED])
    assert [c.name for c in stopped] == ["a-old"]
    bob = User(name="bob", groups={"lab"})
    shared = await backend.list_shared_clusters(bob, statuses=ACTIVE)
    assert [c.name for c in shared] == ["a-mid", "c-lab"]
    alice = User(name="alice")
    assert await backend.list_shared_clusters(alice) == []  # never one's own


async def test_the_manager_lists_visible_clusters_without_a_scan(
    site: Site, shut_driver: None
) -> None:
    bob = User(name="bob", groups={"lab"})
    visible = await site.manager.list_visible_clusters(bob)
    assert [c.name for c in visible] == ["a-mid", "c-lab"]
    alice = User(name="alice")
    assert [c.name for c in await site.manager.list_visible_clusters(alice)] == [
        "a-mid",
        "a-new",
    ]


async def test_quotas_count_only_the_pools_members_without_a_scan(
    site: Site, shut_driver: None
) -> None:
    carol = User(name="carol", groups={"lab"})
    dave = User(name="dave", groups={"lab"})
    site.manager.quotas.note(dave)
    answer = await site.manager.quota(carol)
    assert answer["usage"]["clusters"] == 1
    assert answer["group_pools"]["lab"]["usage"]["clusters"] == 1
    alice = await site.manager.quota(User(name="alice"))
    assert alice["usage"]["clusters"] == 2  # the stopped one does not count


async def test_quotas_forget_the_grants_of_the_members_clusters_that_no_longer_count(
    site: Site, shut_driver: None
) -> None:
    claims = site.manager.quotas.claims
    claims.update({"a-old": 3, "a-new": 2, "o1": 4})
    await site.manager.quota(User(name="alice"))
    # alice's stopped cluster's grant is dropped; her running one's and others' stay.
    assert claims == {"a-new": 2, "o1": 4}

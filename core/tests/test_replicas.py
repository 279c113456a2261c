"""Several gateways on one PostgreSQL database: each sees what the others made, one reconciles
each cluster (a lease per shard), a dead one's clusters are taken over, a fenced call is not made.

Real `gateway serve` processes with real Dask clusters (unsafe-local) for what only they prove
(the proxy of one replica to a cluster another started; SIGKILL and takeover with no second
scheduler), the in-process driver for the fence. All on the real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from replicaset import (
    Replica,
    ReplicaSet,
    cluster_processes,
    processes_in,
    replica_set,
    wait_for,
)

from gateway_core.backends.kit import read_stat
from gateway_core.crashpoints import CRASH_VARIABLE
from gateway_core.models import ClusterStatus, WorkerStatus
from gateway_core.reconciler.replicas import SHARDS, shard_lease, shard_of

LEASE_TTL = 3.0
"""The replicas' `lease_ttl` in these tests: takeover within 4/3 of it plus a sync."""


class Pair(ReplicaSet):
    """Two replicas: ``a`` and ``b``."""

    @property
    def a(self) -> Replica:
        return self.replicas[0]

    @property
    def b(self) -> Replica:
        return self.replicas[1]


@pytest.fixture
def pair(tmp_path: Path, postgres_url: str) -> Iterator[Pair]:
    """Two replicas (not started) on one PostgreSQL database, one clusters directory, with a
    load balancer in front of their API for the schedulers' heartbeats."""
    with replica_set(tmp_path, postgres_url, ("a", "b"), lease_ttl=LEASE_TTL) as made:
        yield Pair(
            replicas=made.replicas, db_url=made.db_url, folder=made.folder, balancer=made.balancer
        )


def replica_id(replica: Replica) -> str:
    return replica.replica_id


def balanced(pair: Pair) -> bool:
    """Each replica holds half the shards (the first one handed half to the second)."""
    counts: dict[str, int] = {}
    for holder in pair.holders().values():
        counts[holder] = counts.get(holder, 0) + 1
    return counts == {replica_id(pair.a): SHARDS // 2, replica_id(pair.b): SHARDS // 2}


def owner_and_other(pair: Pair, name: str) -> tuple[Replica, Replica]:
    holder = pair.holders()[shard_lease(shard_of(name))]
    return (pair.a, pair.b) if holder == replica_id(pair.a) else (pair.b, pair.a)


def status(replica: Replica, name: str) -> str:
    return replica.status(name)


def compute(replica: Replica, name: str, workers: int) -> int:
    """Through ``replica``'s API and proxy, with our client."""
    from gateway_client import BasicAuth, Gateway

    with Gateway(replica.address, auth=BasicAuth("alice")) as gateway:
        cluster = gateway.connect(name)
        client = cluster.get_client(set_as_default=False)
        try:
            client.wait_for_workers(workers, timeout=60)
            return int(client.submit(sum, range(10)).result(timeout=60))
        finally:
            client.close()
            cluster.close()


@pytest.mark.system
@pytest.mark.integration
@pytest.mark.usefixtures("no_process_left_behind")
def test_a_cluster_made_on_one_replica_is_used_through_the_other(pair: Pair) -> None:
    pair.a.start()
    pair.b.start()
    # The first replica took every shard; it hands half to the second within a few rounds.
    wait_for("the shards are shared", lambda: balanced(pair), timeout=LEASE_TTL * 4)

    # Made through A, then used through each replica; "owner" reconciles it (started its
    # processes), "other" does not.
    name = pair.a.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    owner, other = owner_and_other(pair, name)
    for replica in (owner, other):
        # At once: a miss reads the row before answering.
        assert replica.call("GET", f"/v1/clusters/{name}")["name"] == name
        # Listed within the sync period.
        wait_for(
            "it is listed",
            lambda r=replica: name in r.call("GET", "/v1/clusters/"),
            timeout=5,
        )
    wait_for("the other sees it running", lambda: status(other, name) == "RUNNING")

    # Scaled through the other (the heartbeat carrying the count may reach either replica),
    # computing through the other's proxy, then the owner's.
    other.call("POST", f"/v1/clusters/{name}/scale", {"count": 1})
    assert compute(other, name, 1) == 45
    assert compute(owner, name, 1) == 45

    # Stopped through the other: the owner stops it; both see it stopped.
    before = pair.processes(name)
    assert len(before) == 2
    other.call("DELETE", f"/v1/clusters/{name}")
    wait_for("the owner stopped it", lambda: status(owner, name) == "STOPPED")
    wait_for("the other sees it stopped", lambda: status(other, name) == "STOPPED", timeout=5)
    a, b = pair.a, pair.b
    wait_for("its processes are gone", lambda: not any(r.running() for r in before.values()))
    assert a.stop() == 0 and b.stop() == 0
    assert list((pair.folder / "clusters").glob("*")) == []


@pytest.mark.system
@pytest.mark.integration
@pytest.mark.usefixtures("no_process_left_behind")
def test_sigkill_of_the_owner_hands_its_clusters_to_the_other_within_the_bound(
    pair: Pair,
) -> None:
    pair.a.start()
    pair.b.start()
    wait_for("the shards are shared", lambda: balanced(pair), timeout=LEASE_TTL * 4)
    name = pair.a.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    # a: the replica reconciling the cluster, killed below; b: the survivor.
    a, b = owner_and_other(pair, name)
    wait_for("it runs", lambda: status(a, name) == "RUNNING")
    a.call("POST", f"/v1/clusters/{name}/scale", {"count": 2})
    assert compute(a, name, 2) == 45
    wait_for("the scheduler and both workers are stored", lambda: len(pair.processes(name)) == 3)
    before = pair.processes(name)
    assert a.proc is not None and b.proc is not None
    procs_before = cluster_processes({a.proc.pid, b.proc.pid})
    assert {ref.pid for ref in before.values()} <= procs_before

    assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    killed = time.monotonic()
    b_id = replica_id(b)
    wait_for(
        "B holds every shard",
        lambda: list(pair.holders().values()) == [b_id] * SHARDS,
        timeout=LEASE_TTL * 4,
    )
    took = time.monotonic() - killed
    # The bound: the dead lease expires within lease_ttl, B looks every third of it.
    assert took <= LEASE_TTL * 4 / 3 + 1.5, took
    assert pair.holders()[shard_lease(shard_of(name))] == b_id

    # B carries on with the same processes: adopted, nothing started twice.
    time.sleep(3 * 2 + 1)  # three cluster and worker status periods (2 s each)
    assert status(b, name) == "RUNNING"
    assert pair.processes(name) == before
    assert all(ref.running() for ref in before.values())
    assert cluster_processes({b.proc.pid}) == procs_before
    assert compute(b, name, 2) == 45

    # B reconciles it now: a scale-up starts a worker, a stop stops everything.
    b.call("POST", f"/v1/clusters/{name}/scale", {"count": 3})
    assert compute(b, name, 3) == 45
    b.call("DELETE", f"/v1/clusters/{name}")
    wait_for("B stopped it", lambda: status(b, name) == "STOPPED")
    wait_for("every process is gone", lambda: not any(r.running() for r in before.values()))
    assert b.stop() == 0
    assert list((pair.folder / "clusters").glob("*")) == []


# -------------------------------------------------------------------------------------------
# The fence, with the in-process driver


@pytest.mark.system
async def test_a_replica_whose_lease_was_taken_starts_no_worker(postgres_url: str) -> None:
    from test_reconciler import Gateway, until

    key = base64.b64encode(os.urandom(32)).decode()
    gw = Gateway(
        gateway={
            "db_url": postgres_url,
            "db_encrypt_keys": [key],
            "replica_id": "replica-a",
            "lease_ttl": 60.0,  # no renewal during the test: the fence alone must notice
            "stop_clusters_on_shutdown": False,
        }
    )
    await gw.backend.setup()
    try:
        replicas = gw.backend.reconciler.replicas
        assert replicas is not None and len(replicas.held) == SHARDS
        cluster = await gw.running()
        shard = shard_of(cluster.name)
        lease = replicas.held[shard]

        # Another replica takes the shard (as if this one had paused past its expiry).
        store = gw.backend.store
        stolen = await asyncio.to_thread(
            store.acquire_lease, lease.name, "replica-b", 60.0, now=lease.expires + 1
        )
        assert stolen is not None and stolen.token == lease.token + 1
        assert replicas.owns(cluster.name)  # by its own clock it still does: only the fence knows

        await gw.scale(cluster, 1)
        await until(lambda: cluster.count == 1)
        await until(lambda: shard not in replicas.held, timeout=10)
        await asyncio.sleep(0.5)
        assert gw.driver.calls["start_worker"] == 0
        assert not replicas.owns(cluster.name)
        assert cluster.status == ClusterStatus.RUNNING
        assert all(w.status == WorkerStatus.PENDING for w in cluster.workers.values())
    finally:
        await gw.backend.cleanup()
        await gw.driver.shutdown()


@pytest.mark.system
async def test_fences_asking_together_share_one_statement_and_a_later_one_sends_its_own(
    postgres_url: str,
) -> None:
    from test_reconciler import Gateway

    key = base64.b64encode(os.urandom(32)).decode()
    gw = Gateway(
        gateway={
            "db_url": postgres_url,
            "db_encrypt_keys": [key],
            "replica_id": "replica-a",
            "lease_ttl": 60.0,
            "stop_clusters_on_shutdown": False,
        }
    )
    await gw.backend.setup()
    try:
        replicas = gw.backend.reconciler.replicas
        assert replicas is not None
        store = gw.backend.store
        asked: list[list[str]] = []
        held = store.leases_held

        def counted(leases: Any, **kw: Any) -> set[tuple[str, int]]:
            asked.append(sorted(lease.name for lease in leases))
            return held(leases, **kw)

        store.leases_held = counted  # type: ignore[method-assign]
        name = "c" * 32
        # Ten fences in one turn of the loop (a cluster's workers starting together): one
        # statement for all of them.
        assert await asyncio.gather(*(replicas.fence(name) for _ in range(10))) == [True] * 10
        assert asked == [[shard_lease(shard_of(name))]]
        # Fences of clusters in other shards asking in the same turn: one statement too.
        others = [f"{i:032x}" for i in range(40)]
        shards = sorted({shard_lease(shard_of(n)) for n in others})
        assert len(shards) > 10
        assert await asyncio.gather(*(replicas.fence(n) for n in others)) == [True] * 40
        assert asked[1:] == [shards]
        asked.clear()
        # Once the statement was sent, a fence gets a statement of its own, which sees the
        # lease taken by another replica meanwhile.
        lease = replicas.held[shard_of(name)]
        first = asyncio.ensure_future(replicas.fence(name))
        await asyncio.sleep(0)  # the shared check has started: its statement is on its way
        stolen = await asyncio.to_thread(
            store.acquire_lease, lease.name, "replica-b", 60.0, now=lease.expires + 1
        )
        assert stolen is not None
        assert await replicas.fence(name) is False
        await first
        assert len(asked) == 2
    finally:
        await gw.backend.cleanup()
        await gw.driver.shutdown()


@pytest.mark.system
async def test_the_owner_learns_through_the_database_what_another_replica_was_told(
    postgres_url: str,
) -> None:
    """Every heartbeat goes to replica B, which does not own the cluster; A, which does,
    learns the scheduler's address, the worker count and connected workers only from the
    rows B writes, and a stop asked of B. B never calls the driver."""
    from test_reconciler import Gateway, until

    key = base64.b64encode(os.urandom(32)).decode()

    def settings(replica: str) -> dict[str, Any]:
        return {
            "db_url": postgres_url,
            "db_encrypt_keys": [key],
            "replica_id": replica,
            "lease_ttl": 60.0,
            "replica_sync_period": 0.1,
            "stop_clusters_on_shutdown": False,
        }

    a = Gateway(gateway=settings("replica-a"))
    b = Gateway(gateway=settings("replica-b"))
    await a.backend.setup()
    await b.backend.setup()
    try:
        assert a.backend.reconciler.replicas is not None
        assert b.backend.reconciler.replicas is not None
        assert len(a.backend.reconciler.replicas.held) == SHARDS
        assert b.backend.reconciler.replicas.held == {}
        a.driver.deliver_to(b.backend)  # A's schedulers heartbeat to B only

        cluster = await a.start()
        seen = await b.backend.get_cluster(cluster.name)  # at once: read on a miss
        assert seen is not None and seen is not cluster and seen.token == cluster.token
        await until(lambda: cluster.status == ClusterStatus.RUNNING, timeout=10)
        await until(lambda: seen.status == ClusterStatus.RUNNING, timeout=5)
        assert b.context.routes.get("SNI", cluster.name) is not None  # B's proxy routes to it

        await b.scale(seen, 2)  # through B's copy of the record
        await until(
            lambda: sum(w.status == WorkerStatus.RUNNING for w in cluster.workers.values()) == 2,
            timeout=10,
        )
        assert a.driver.calls["start_worker"] == 2

        await b.backend.stop_cluster(cluster.name)
        await until(lambda: cluster.status == ClusterStatus.STOPPED, timeout=10)
        await until(lambda: seen.status == ClusterStatus.STOPPED, timeout=5)
        assert a.driver.calls["stop_scheduler"] == 1
        assert b.driver.calls == {}  # B reconciled nothing
        assert b.context.routes.get("SNI", cluster.name) is None
    finally:
        for gw in (b, a):
            await gw.backend.cleanup()
            await gw.driver.shutdown()


@pytest.mark.system
async def test_the_owner_reads_the_database_before_failing_a_cluster_for_silence(
    postgres_url: str,
) -> None:
    """Every heartbeat goes to replica B; A, the owner, stops syncing (a period far longer
    than the heartbeat timeout, as a loaded replica's sync can lag). A keeps the cluster while
    B records its heartbeats, and fails it once the scheduler falls silent."""
    from test_reconciler import Gateway, until

    key = base64.b64encode(os.urandom(32)).decode()
    timing = {"heartbeat_period": 0.2, "cluster_heartbeat_timeout": 1.0}

    def settings(replica: str) -> dict[str, Any]:
        return {
            "db_url": postgres_url,
            "db_encrypt_keys": [key],
            "replica_id": replica,
            "lease_ttl": 60.0,
            "replica_sync_period": 0.1,
            "stop_clusters_on_shutdown": False,
        }

    a = Gateway(gateway=settings("replica-a"), **timing)
    b = Gateway(gateway=settings("replica-b"), **timing)
    await a.backend.setup()
    await b.backend.setup()
    try:
        replicas = a.backend.reconciler.replicas
        assert replicas is not None and len(replicas.held) == SHARDS
        a.driver.deliver_to(b.backend)  # A's schedulers heartbeat to B only
        cluster = await a.start()
        await until(lambda: cluster.status == ClusterStatus.RUNNING, timeout=10)
        replicas.sync_period = 3600.0  # from its next round on, A reads nothing B writes
        await asyncio.sleep(0.5)
        synced = cluster.last_heartbeat
        await asyncio.sleep(4.0)  # four heartbeat timeouts
        assert cluster.status == ClusterStatus.RUNNING, cluster.reason
        assert cluster.last_heartbeat is not None and synced is not None
        assert cluster.last_heartbeat > synced  # taken from the database, not from a sync

        a.driver.schedulers[cluster.name].pause()
        await until(lambda: cluster.status == ClusterStatus.FAILED, timeout=10)
        assert cluster.reason is not None and "heartbeat" in cluster.reason
    finally:
        for gw in (b, a):
            await gw.backend.cleanup()
            await gw.driver.shutdown()


@pytest.mark.system
async def test_a_replica_that_joins_gets_half_the_shards_and_carries_on_their_clusters(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first replica holds every shard; when a second joins, the first hands it half
    (quiet shards only, after its writes are in), and the second resumes their clusters as a
    restarted gateway would: one owner for each cluster, nothing started twice."""
    from test_reconciler import Gateway, until

    key = base64.b64encode(os.urandom(32)).decode()

    def settings(replica: str) -> dict[str, Any]:
        return {
            "db_url": postgres_url,
            "db_encrypt_keys": [key],
            "replica_id": replica,
            "lease_ttl": 1.5,
            "replica_sync_period": 0.1,
            "stop_clusters_on_shutdown": False,
        }

    # One cluster in every shard, so that whichever half is handed over holds clusters.
    names = []
    for shard in range(SHARDS):
        while shard_of(name := uuid.uuid4().hex) != shard:
            pass
        names.append(name)
    monkeypatch.setattr("gateway_core.backends.process.new_name", names.pop)
    slow = {"heartbeat_period": 0.5, "cluster_heartbeat_timeout": 5.0}
    a = Gateway(gateway=settings("replica-a"), **slow)
    await a.backend.setup()
    b: Gateway | None = None
    try:
        ra = a.backend.reconciler.replicas
        assert ra is not None and len(ra.held) == SHARDS
        clusters = [await a.start() for _ in range(SHARDS)]
        await until(lambda: all(c.status == ClusterStatus.RUNNING for c in clusters), timeout=30)
        # B adopts A's fake schedulers, as a replica on the same host adopts processes.
        b = Gateway(gateway=settings("replica-b"), schedulers=a.driver.schedulers, **slow)
        await b.backend.setup()
        rb = b.backend.reconciler.replicas
        assert rb is not None
        await until(lambda: len(ra.held) == len(rb.held) == SHARDS // 2, timeout=10)
        assert not set(ra.held) & set(rb.held)
        for cluster in clusters:
            assert ra.owns(cluster.name) != rb.owns(cluster.name)
        moved = [c for c in clusters if rb.owns(c.name)][:3]
        kept = [c for c in clusters if ra.owns(c.name)][:3]
        assert len(moved) == len(kept) == 3

        # Clusters of both halves scale through whoever owns them; nothing starts twice.
        for cluster in moved + kept:
            await a.scale(cluster, 1)
        for cluster in kept:
            await until(lambda c=cluster: len(a.running_workers(c)) == 1, timeout=10)
        for cluster in moved:
            mirror = b.backend.store.get(cluster.name)
            assert mirror is not None
            await until(lambda m=mirror: len(b.running_workers(m)) == 1, timeout=10)
        assert a.driver.calls["start_worker"] == len(kept)
        assert b.driver.calls["start_worker"] == len(moved)
        assert a.driver.calls["start_scheduler"] == SHARDS
        assert b.driver.calls["start_scheduler"] == 0
    finally:
        if b is not None:
            await b.backend.cleanup()
        await a.backend.cleanup()
        await a.driver.shutdown()


@pytest.mark.system
def test_shards_nobody_took_for_a_round_are_taken_past_the_fair_share(postgres_url: str) -> None:
    """The chaos test's finding (seed 11): replica b died; a, restarted meanwhile, registered
    (so the survivor's fair share stayed at half) and died before taking anything; the
    survivor, at its share, left b's expired shards alone until a's registration expired too:
    6.4 s for lease_ttl 3, past the bound. A shard free at two looks in a row is now taken."""
    from types import SimpleNamespace

    from gateway_core.reconciler.replicas import REPLICA_PREFIX, Replicas
    from gateway_core.store import Store

    store = Store(url=postgres_url, encrypt_keys=[base64.b64encode(os.urandom(32)).decode()])
    try:
        dead = [store.acquire_lease(shard_lease(s), "dead", 60) for s in range(SHARDS // 2)]
        store.acquire_lease(REPLICA_PREFIX + "ghost", "ghost", 60)  # registered, holds nothing
        survivor = Replicas(
            reconciler=SimpleNamespace(store=store),  # type: ignore[arg-type]
            replica_id="survivor",
            lease_ttl=60,
            sync_period=1,
        )
        assert sorted(survivor.take()) == list(range(SHARDS // 2, SHARDS))  # its fair share
        for lease in dead:  # "dead" is gone: its leases expire
            assert lease is not None and store.release_lease(lease)
        assert survivor.take() == []  # at its share, and the ghost may yet take them
        assert sorted(survivor.take()) == list(range(SHARDS // 2))  # nobody did: taken
        assert len(survivor.held) == SHARDS
    finally:
        store.close()


@pytest.mark.system
@pytest.mark.integration
@pytest.mark.usefixtures("no_process_left_behind")
def test_a_worker_its_owner_launched_just_before_dying_is_adopted_by_the_other(
    pair: Pair,
) -> None:
    """The owner is SIGKILLed right after forking a worker, before storing its pid (the crash
    point ``launched:worker``); the other replica takes the cluster over and adopts that
    worker instead of starting another (both carry the crash point: a second launch would
    kill the survivor too)."""
    for replica in pair.replicas:
        replica.env = {CRASH_VARIABLE: "launched:worker"}
    pair.a.start()
    pair.b.start()
    wait_for("the shards are shared", lambda: balanced(pair), timeout=LEASE_TTL * 4)
    name = pair.a.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    a, b = owner_and_other(pair, name)
    wait_for("it runs", lambda: status(a, name) == "RUNNING")
    scheduler = pair.processes(name)["scheduler"]
    with contextlib.suppress(OSError):  # the answer may be cut short by the crash
        a.call("POST", f"/v1/clusters/{name}/scale", {"count": 1})
    assert a.proc is not None and a.proc.wait(timeout=120) == -signal.SIGKILL, a.log_tail()
    assert "Crashing at launched:worker" in a.log_tail(10**6)
    orphans = leaders_in(pair, name) - {scheduler.pid}
    assert len(orphans) == 1, f"not one worker after the crash: {orphans}"
    assert pair.processes(name) == {"scheduler": scheduler}, "the worker was stored"

    wait_for("B stores the worker it adopted", lambda: len(pair.processes(name)) == 2, timeout=60)
    assert compute(b, name, 1) == 45
    time.sleep(3 * 2 + 1)  # three status periods: nothing replaced, nothing doubled since
    refs = pair.processes(name)
    assert {ref.pid for what, ref in refs.items() if what != "scheduler"} == orphans
    assert leaders_in(pair, name) == {scheduler.pid, *orphans}
    assert b.alive(), "the survivor launched a second worker (and crashed)"
    assert "launched before the gateway stopped but never recorded" in b.log_tail(10**6)

    b.call("DELETE", f"/v1/clusters/{name}")
    wait_for("B stopped it", lambda: status(b, name) == "STOPPED")
    wait_for("every process is gone", lambda: not processes_in(pair.folder / "clusters"))
    assert b.stop() == 0
    assert list((pair.folder / "clusters").glob("*")) == []


def leaders_in(pair: Pair, name: str) -> set[int]:
    """The processes leading their own group in cluster ``name``'s directory (what was
    launched there; a nanny's worker is not one)."""
    pids = processes_in(pair.folder / "clusters").get(name, set())
    return {pid for pid in pids if (st := read_stat(pid)) is not None and st.pgrp == pid}

"""Replicas on one PostgreSQL database: which gateway reconciles which cluster, and what the
others changed.

Owns `Replicas`: this replica's shard leases (taken, renewed, lost, given back, checked before a
driver call: the fence), the periodic read of rows other replicas wrote into this one's store,
the rules merging them, and a miss read through to the database. See "Replicas" in
docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import zlib
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from ..models import ClusterStatus, WorkerStatus, now_ms

if TYPE_CHECKING:
    from ..models import Cluster, Worker
    from ..store import Changes, Lease
    from .heartbeat import Heartbeat
    from .runner import Reconciler

log = logging.getLogger("gateway.replicas")

SHARDS = 64
"""Clusters are split into this many shards by a hash of their name; a replica reconciles the
clusters of the shards it holds a lease on. Every replica must use the same number."""

SHARD_PREFIX = "shard:"
REPLICA_PREFIX = "replica:"

_MIRRORED = (
    "username",
    "token",
    "options",
    "config",
    "status",
    "target",
    "count",
    "state",
    "scheduler_address",
    "dashboard_address",
    "api_address",
    "tls_cert",
    "tls_key",
    "start_time",
    "stop_time",
    "last_heartbeat",
    "worker_start_failures",
    "reason",
    "shared_users",
    "shared_groups",
)
"""The stored fields of a cluster another replica owns, copied as the database has them."""

_WORKER_FIELDS = (
    "status",
    "target",
    "state",
    "start_time",
    "stop_time",
    "close_expected",
    "reason",
)


def shard_of(name: str) -> int:
    """The shard of cluster ``name`` (stable across processes and hosts)."""
    return zlib.crc32(name.encode()) % SHARDS


def shard_lease(shard: int) -> str:
    return f"{SHARD_PREFIX}{shard}"


class Replicas:
    """This replica's part in sharing a database with other gateways.

    Built by `Reconciler` when its store is shared (PostgreSQL). ``replica_id`` names this
    replica in the leases table; ``lease_ttl`` is how long a lease lasts unrenewed (renewed every
    third of it); ``sync_period`` is how often the rows others changed are read.
    """

    def __init__(
        self, *, reconciler: Reconciler, replica_id: str, lease_ttl: float, sync_period: float
    ) -> None:
        problems = [
            f"gateway.{key}: must be greater than 0, got {value!r}"
            for key, value in (("lease_ttl", lease_ttl), ("replica_sync_period", sync_period))
            if not value > 0
        ]
        if problems:
            raise ConfigError(problems)
        self.reconciler = reconciler
        self.store = reconciler.store
        self.replica_id = replica_id
        self.lease_ttl = lease_ttl
        self.sync_period = sync_period
        self.held: dict[int, Lease] = {}
        self.leaving: set[int] = set()
        """Shards being handed to another replica: no new work starts for their clusters."""
        self.surplus = 0
        """Shards above this replica's fair share while another live replica is short of
        its own (from the last `take`): given back by `hand_over`."""
        self._free_before: set[int] = set()
        """The shards free (unheld or expired) at the previous `take`."""
        self._sync_lock = asyncio.Lock()
        self._fence_asked: dict[tuple[str, int], tuple[Lease, asyncio.Future[bool]]] = {}
        """Lease checks asked for and not sent yet, by lease name and token (`_still_held`)."""
        self._fence_sender: asyncio.Future[None] | None = None
        """Sends the checks asked, one statement at a time (`_send_fences`)."""

    # ---------------------------------------------------------------------------------------
    # Ownership

    def owns(self, name: str) -> bool:
        """Whether this replica reconciles cluster ``name`` now (its shard's lease is held and,
        by this host's clock, unexpired)."""
        shard = shard_of(name)
        lease = self.held.get(shard)
        return lease is not None and lease.expires > now_ms() and shard not in self.leaving

    async def fence(self, name: str) -> bool:
        """Just before a driver call that must not run twice: True when this replica still
        holds the lease of ``name``'s shard with the token it had (one statement). Otherwise
        the shard is dropped from this replica's reconciler and the call must not be made."""
        shard = shard_of(name)
        lease = self.held.get(shard)
        if lease is not None and await self._still_held(lease):
            return True
        log.warning(
            "Fenced: replica %s no longer holds shard %d; not acting on cluster %s",
            self.replica_id,
            shard,
            name,
        )
        self.lose([shard])
        return False

    async def _still_held(self, lease: Lease) -> bool:
        """`Store.lease_held` for ``lease``, in one statement (`Store.leases_held`) with every
        other lease check asked before it is sent: the fences asked in the same turn of the
        event loop, or while the previous statement was on its way (a cluster's workers
        starting together, the clusters of other shards starting meanwhile). A statement is
        sent only after every check it answers was asked, so its answer is no older than
        any of their questions; a check asked once it was sent waits for the next one."""
        key = (lease.name, lease.token)
        asked = self._fence_asked.get(key)
        if asked is None:
            asked = (lease, asyncio.get_running_loop().create_future())
            self._fence_asked[key] = asked
        if self._fence_sender is None or self._fence_sender.done():
            self._fence_sender = asyncio.ensure_future(self._send_fences())
        return await asyncio.shield(asked[1])

    async def _send_fences(self) -> None:
        """Answer the lease checks asked, one statement for all those asked before it."""
        while self._fence_asked:
            asked, self._fence_asked = self._fence_asked, {}
            try:
                held = await asyncio.to_thread(
                    self.store.leases_held, [lease for lease, _ in asked.values()]
                )
            except asyncio.CancelledError:
                for _, future in asked.values():
                    future.cancel()  # the gateway is stopping: so are the fences waiting
                raise
            except Exception as exc:  # noqa: BLE001 - each fence that asked raises it
                for _, future in asked.values():
                    if not future.done():
                        future.set_exception(exc)
                continue
            for key, (_, future) in asked.items():
                if not future.done():
                    future.set_result(key in held)

    def take(self) -> list[int]:
        """Register this replica and take its fair share of the free shards, and any shard
        found free at the previous call too, whatever the share (the shards taken); note the
        surplus to give back when another replica is short. Three statements, plus one per
        shard tried. Blocks on the database: at start or off the event loop."""
        ttl = self.lease_ttl
        store = self.store
        store.acquire_lease(REPLICA_PREFIX + self.replica_id, self.replica_id, ttl)
        live = {name.removeprefix(REPLICA_PREFIX) for name in store.live_leases(REPLICA_PREFIX)} | {
            self.replica_id
        }
        fair = math.ceil(SHARDS / len(live))
        taken = store.live_leases(SHARD_PREFIX)
        counts: dict[str, int] = {}
        for holder in taken.values():
            counts[holder] = counts.get(holder, 0) + 1
        short = any(counts.get(r, 0) < fair - 1 for r in live if r != self.replica_id)
        self.surplus = max(0, len(self.held) - fair) if short else 0
        free = [
            i
            for i in range(SHARDS)
            if i not in self.held and taken.get(shard_lease(i), self.replica_id) == self.replica_id
        ]
        # Free at this look and the previous one: no replica took it for a whole round (the
        # one whose share it is died too, or registered and died before taking anything).
        # Taken whatever the fair share, so the takeover bound holds; hand-overs rebalance.
        orphaned = set(free) & self._free_before
        self._free_before = set(free)
        random.shuffle(free)  # replicas starting together do not all race for the same ones
        gained: list[int] = []
        for shard in free:
            if len(self.held) >= fair and shard not in orphaned:
                continue
            lease = store.acquire_lease(shard_lease(shard), self.replica_id, ttl)
            if lease is not None:
                self.held[shard] = lease
                gained.append(shard)
        return gained

    def renew(self) -> list[int]:
        """Renew every held lease in one statement; the shards lost. Blocks on the database."""
        store = self.store
        store.acquire_lease(REPLICA_PREFIX + self.replica_id, self.replica_id, self.lease_ttl)
        held = dict(self.held)
        renewed = {
            lease.name: lease
            for lease in store.renew_leases(self.replica_id, held.values(), self.lease_ttl)
        }
        lost: list[int] = []
        for shard, lease in held.items():
            fresh = renewed.get(lease.name)
            if fresh is None:
                lost.append(shard)
            elif self.held.get(shard) is lease:
                self.held[shard] = fresh
        return lost

    def lose(self, shards: list[int], *, given: bool = False) -> None:
        """Stop reconciling the clusters of ``shards`` (lost, or ``given`` back): forget their
        runtime state (a start already past its fence finishes; nothing new starts here)."""
        gone = {s for s in shards if self.held.pop(s, None) is not None}
        if not gone:
            return
        if not given:
            log.warning("Replica %s lost shard(s) %s", self.replica_id, sorted(gone))
        runtimes = self.reconciler.runtimes
        for name in list(self.store.clusters):
            if shard_of(name) in gone and name in runtimes:
                runtimes.drop(name)

    async def run_leases(self) -> None:
        """Every third of ``lease_ttl``: renew, then take free shards up to a fair share, and
        resume the clusters of the shards gained (after reading what changed)."""
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                lost = await asyncio.to_thread(self.renew)
                self.lose(lost)
                gained = await asyncio.to_thread(self.take)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Renewing or taking shard leases failed; trying again")
                continue
            if gained:
                log.info("Replica %s took over shard(s) %s", self.replica_id, sorted(gained))
                await self.sync()
                self.resume(gained)
            if self.surplus:
                try:
                    await self.hand_over(self.surplus)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("Handing shards over failed; trying again")

    async def hand_over(self, count: int) -> None:
        """Give up to ``count`` shards back for a replica short of its share (one that joined):
        the shards with the fewest active clusters stop taking new work, and those whose work
        in hand (queue handlers, start operations) ends within a third of ``lease_ttl`` are
        released once this replica's writes are in the database. The rest carry on here."""
        active: dict[int, int] = dict.fromkeys(self.held, 0)
        for cluster in self.store.clusters.values():
            shard = shard_of(cluster.name)
            if cluster.status.is_active and shard in active:
                active[shard] += 1
        chosen = sorted(active, key=lambda s: (active[s], s))[:count]
        if not chosen:
            return
        self.leaving.update(chosen)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease_ttl / 3
        busy = self._busy(chosen)
        while busy and loop.time() < deadline:
            await asyncio.sleep(0.05)
            busy = self._busy(chosen)
        quiet = [s for s in chosen if s not in busy]
        await self.store.flush()
        released: list[int] = []
        for shard in quiet:
            lease = self.held.get(shard)
            if lease is not None and await asyncio.to_thread(self.store.release_lease, lease):
                released.append(shard)
        self.lose(released, given=True)
        self.leaving.difference_update(chosen)
        kept = set(chosen) - set(released)
        if released:
            log.info("Replica %s handed over shard(s) %s", self.replica_id, sorted(released))
        for cluster in list(self.store.clusters.values()):
            if cluster.status.is_active and shard_of(cluster.name) in kept:
                self.reconciler.enqueue(cluster.name)  # work skipped while it was leaving

    def _busy(self, shards: list[int]) -> set[int]:
        """The shards of ``shards`` with work in hand: a queue handler or a start running."""
        wanted = set(shards)
        busy = {
            shard_of(name)
            for name, _ in self.reconciler.queue.processing()
            if shard_of(name) in wanted
        }
        runtimes = self.reconciler.runtimes
        for name in list(self.store.clusters):
            shard = shard_of(name)
            if shard in wanted and shard not in busy and runtimes.starting(name):
                busy.add(shard)
        return busy

    def resume(self, shards: list[int]) -> None:
        """Pick up the active clusters of ``shards`` as a restarted gateway does."""
        wanted = set(shards)
        for cluster in list(self.store.clusters.values()):
            if cluster.status.is_active and shard_of(cluster.name) in wanted:
                self._prepare(cluster)
                self.reconciler.resume_one(cluster)

    def release(self) -> None:
        """Give every held lease back (a clean shutdown): others take the shards at once."""
        for shard, lease in list(self.held.items()):
            try:
                self.store.release_lease(lease)
            except Exception:  # shutting down: the lease expires anyway
                log.warning("Releasing shard %d failed", shard, exc_info=True)
        self.held.clear()
        try:
            self.store.acquire_lease(REPLICA_PREFIX + self.replica_id, self.replica_id, 0.001)
        except Exception:
            log.debug("Retiring replica lease failed", exc_info=True)

    # ---------------------------------------------------------------------------------------
    # Seeing what the others changed

    async def run_sync(self) -> None:
        """Every ``sync_period``: read and apply what changed."""
        while True:
            await asyncio.sleep(self.sync_period)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Reading what other replicas changed failed; trying again")

    async def sync(self) -> None:
        """Read the rows changed since the last read and merge them into the store."""
        async with self._sync_lock:
            changes = await asyncio.to_thread(self.store.fetch_changes)
            applied = self.apply(changes)
            self.store.advance(changes, applied)

    def apply(self, changes: Changes) -> list[tuple[str, str]]:
        """Merge ``changes``; the row keys applied (rows of records with a newer write of
        this replica queued are left for the next read, which that write stamps again)."""
        store = self.store
        applied: list[tuple[str, str]] = []
        for fresh in changes.clusters:
            if store.pending_since(fresh.name, changes.written):
                continue
            applied.append((fresh.name, ""))
            applied.extend((fresh.name, w) for w in fresh.workers)
            local = store.get(fresh.name)
            if local is None:
                self.adopt(fresh)
            elif self.owns(fresh.name):
                self._merge_owned(local, fresh)
                self._merge_workers(local, list(fresh.workers.values()))
            else:
                self._mirror(local, fresh)
        for worker in changes.workers:
            if store.pending_since(worker.cluster_name, changes.written):
                continue
            applied.append((worker.cluster_name, worker.name))
            local = store.get(worker.cluster_name)
            if local is not None:
                self._merge_workers(local, [worker])
        return applied

    async def recorded_heartbeat(self, name: str) -> float | None:
        """The last heartbeat of cluster ``name`` in the database now (this replica's sync may
        be up to a period behind the heartbeats other replicas recorded)."""
        fresh = await asyncio.to_thread(self.store.read_cluster, name)
        return None if fresh is None else fresh.last_heartbeat

    async def find(self, name: str) -> Cluster | None:
        """A cluster this replica does not hold yet (made on another replica since the last
        read): read from the database, held, and returned; None when there is none."""
        fresh = await asyncio.to_thread(self.store.read_cluster, name)
        if fresh is None:
            return None
        return self.adopt(fresh)

    def adopt(self, fresh: Cluster) -> Cluster:
        """Hold a record first seen in the database; reconcile it when its shard is ours,
        else route to it when it runs."""
        store = self.store
        cluster = store.hold(fresh)
        if cluster is not fresh:
            return cluster
        if self.owns(cluster.name):
            if cluster.status.is_active:
                self._prepare(cluster)
                self.reconciler.resume_one(cluster)
        elif cluster.status == ClusterStatus.RUNNING:
            self.reconciler.shared.routes.put(cluster)
        return cluster

    def _prepare(self, cluster: Cluster) -> None:
        """Type the config of a cluster this replica is to reconcile; one that no longer fits
        fails (as at start)."""
        try:
            self.reconciler.driver.cluster_config(cluster)
        except ConfigError as exc:
            self.reconciler.request_stop(
                cluster.name,
                failed=True,
                reason="The cluster's stored config no longer fits this gateway's cluster "
                f"config ({'; '.join(exc.problems)}); the config changed since it started",
            )

    def _mirror(self, local: Cluster, fresh: Cluster) -> None:
        """Another replica's cluster: take the database's record, route to it while it runs."""
        before = local.status
        changes = {
            f: getattr(fresh, f) for f in _MIRRORED if getattr(fresh, f) != getattr(local, f)
        }
        if changes:
            self.store.set_local(local, **changes)
        for worker in fresh.workers.values():
            mine = local.workers.get(worker.name)
            if mine is None:
                local.workers[worker.name] = worker
            else:
                for f in _WORKER_FIELDS:
                    setattr(mine, f, getattr(worker, f))
        routes = self.reconciler.shared.routes
        if local.status == ClusterStatus.RUNNING:
            routes.put(local)
        elif not local.status.is_active:
            routes.delete(local)
        if local.status != before:
            self.reconciler.shared.events.notify(local.name)

    def _merge_owned(self, local: Cluster, fresh: Cluster) -> None:
        """A cluster this replica reconciles: take what others may change (a stop, the worker
        count and addresses from a heartbeat they took, sharing); the rest is this replica's."""
        changes: dict[str, Any] = {}
        if fresh.target != ClusterStatus.RUNNING and local.target == ClusterStatus.RUNNING:
            changes.update(target=fresh.target, reason=fresh.reason)
        for f in (
            "count",
            "shared_users",
            "shared_groups",
            "scheduler_address",
            "dashboard_address",
            "api_address",
        ):
            value = getattr(fresh, f)
            address = f.endswith("_address")
            if value != getattr(local, f) and (value or not address):
                changes[f] = value
        if changes:
            self.store.set_local(local, **changes)
            self.reconciler.enqueue(local.name)
        beat = fresh.last_heartbeat
        if beat is not None and (local.last_heartbeat is None or beat > local.last_heartbeat):
            local.last_heartbeat = beat

    def _merge_workers(self, local: Cluster, workers: list[Worker]) -> None:
        reconciler = self.reconciler
        if not self.owns(local.name):
            for worker in workers:
                mine = local.workers.get(worker.name)
                if mine is None:
                    local.workers[worker.name] = worker
                else:
                    for f in _WORKER_FIELDS:
                        setattr(mine, f, getattr(worker, f))
            return
        for worker in workers:
            mine = local.workers.get(worker.name)
            if mine is None:
                local.workers[worker.name] = worker  # written by a former owner
                if worker.status.is_active:
                    reconciler.resume_worker(local, worker)
                continue
            if (
                worker.status == WorkerStatus.RUNNING
                and mine.status == WorkerStatus.PENDING
                and mine.target == WorkerStatus.RUNNING
            ):
                reconciler.workers.running(local, mine)
            if (
                worker.target != WorkerStatus.RUNNING
                and worker.close_expected
                and mine.target == WorkerStatus.RUNNING
                and mine.status.is_active
            ):
                self.store.update_worker(mine, target=WorkerStatus.STOPPED, close_expected=True)
                reconciler.queue.put((local.name, mine.name))
                reconciler.enqueue(local.name)

    # ---------------------------------------------------------------------------------------
    # Heartbeats for clusters another replica reconciles

    def record_heartbeat(self, cluster: Cluster, beat: Heartbeat, now: float) -> None:
        """Store what a heartbeat for another replica's cluster says, for its owner to read:
        addresses and counts (per group too) at once; liveness at most every quarter of the
        heartbeat timeout (one write behind, no driver call, no event)."""
        store = self.store
        changes = beat.changes_for(cluster)
        quiet = self.reconciler.config.heartbeat_timeout / 4
        if changes or cluster.last_heartbeat is None or now - cluster.last_heartbeat > quiet:
            store.update_cluster(cluster, last_heartbeat=now, **changes)
        for name in beat.active_workers:
            worker = cluster.workers.get(name)
            if (
                worker is not None
                and worker.status == WorkerStatus.PENDING
                and worker.target == WorkerStatus.RUNNING
            ):
                store.update_worker(worker, status=WorkerStatus.RUNNING)
        for name in beat.closing_workers | beat.closed_workers:
            worker = cluster.workers.get(name)
            if (
                worker is not None
                and worker.status.is_active
                and worker.target == WorkerStatus.RUNNING
            ):
                store.update_worker(worker, target=WorkerStatus.STOPPED, close_expected=True)

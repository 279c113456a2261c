"""The store of cluster and worker records: in memory for reads, written behind to a database.

Owns the SQLAlchemy Core tables, `Store` (load, create, update, delete, purge, flush; leases:
acquire, renew, release, check; the in-memory indexes of clusters by owner, status and sharee;
on a database shared by replicas, the ``changed`` stamps and the read of what changed,
`Changes`), its one writer thread, `Lease`, and the encryption of secrets at rest (cluster
tokens and TLS keys, Fernet).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from attrs import Factory, define
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from .migrations import SchemaError, prepare
from .models import DEFAULT_GROUP, Cluster, ClusterStatus, Worker, WorkerStatus, now_ms

log = logging.getLogger("gateway.store")

KEY_HELP = (
    "set `[gateway] db_encrypt_keys` or the GATEWAY_ENCRYPT_KEYS environment variable "
    "(keys separated by ';'); make a key with `openssl rand -base64 32`"
)


class StoreError(Exception):
    """The store cannot be used as configured (bad URL, missing or bad keys, unreadable data)."""


metadata = sa.MetaData()

clusters_table = sa.Table(
    "clusters",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("username", sa.String(255), nullable=False, index=True),
    sa.Column("token", sa.LargeBinary, nullable=False),
    sa.Column("options", sa.JSON, nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("target", sa.Integer, nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("state", sa.JSON, nullable=False),
    sa.Column("scheduler_address", sa.Text, nullable=False),
    sa.Column("dashboard_address", sa.Text, nullable=False),
    sa.Column("api_address", sa.Text, nullable=False),
    sa.Column("tls_cert", sa.LargeBinary, nullable=False),
    sa.Column("tls_key", sa.LargeBinary, nullable=False),
    sa.Column("start_time", sa.BigInteger, nullable=False),
    sa.Column("stop_time", sa.BigInteger, nullable=True),
    sa.Column("last_heartbeat", sa.Float, nullable=True),
    sa.Column("worker_start_failures", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    # Sharing (migration 0003): nullable, NULL read as no one.
    sa.Column("shared_users", sa.JSON, nullable=True),
    sa.Column("shared_groups", sa.JSON, nullable=True),
    # Replica sync (migration 0004): ms since the epoch by the database's clock at the row's
    # last write; stamped on PostgreSQL only (NULL elsewhere: one gateway, nothing to sync).
    sa.Column("changed", sa.BigInteger, nullable=True, index=True),
    # Worker groups (migration 0005): nullable, NULL read as no named group.
    sa.Column("group_counts", sa.JSON, nullable=True),
)

workers_table = sa.Table(
    "workers",
    metadata,
    sa.Column(
        "cluster_name",
        sa.String(255),
        sa.ForeignKey("clusters.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("target", sa.Integer, nullable=False),
    sa.Column("state", sa.JSON, nullable=False),
    sa.Column("start_time", sa.BigInteger, nullable=False),
    sa.Column("stop_time", sa.BigInteger, nullable=True),
    sa.Column("close_expected", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("changed", sa.BigInteger, nullable=True, index=True),
    # Worker groups (migration 0005): nullable, NULL read as the default group.
    sa.Column("group", sa.String(64), nullable=True),
)

leases_table = sa.Table(
    "leases",
    metadata,
    # What is leased: a cluster's name, or a shard of clusters.
    sa.Column("name", sa.String(255), primary_key=True),
    # The replica holding it (until `expires`).
    sa.Column("holder", sa.String(255), nullable=False),
    # Milliseconds since the epoch, by the holder's clock.
    sa.Column("expires", sa.BigInteger, nullable=False),
    # The fencing token: 1 for the first holder, one more at every change of holder.
    sa.Column("token", sa.BigInteger, nullable=False),
)


@define(kw_only=True, frozen=True)
class Lease:
    """A lease held: ``name`` is ``holder``'s until ``expires`` (ms since the epoch). Its
    ``token`` grows at every change of holder: a driver call fenced by the lease carries it,
    and a call with a smaller token than the last one seen comes from a holder that lost it."""

    name: str
    holder: str
    token: int
    expires: int


_CLUSTER_FIELDS = frozenset(c.name for c in clusters_table.columns) - {"changed"}
_WORKER_FIELDS = frozenset(c.name for c in workers_table.columns) - {"cluster_name", "changed"}

SYNC_OVERLAP_MS = 5_000
"""How far back `Store.fetch_changes` reads before its cursor: a write stamped before a read
may commit after it; any write that commits within this long of its stamp is still seen."""


def _db_now_ms() -> sa.ColumnElement[int]:
    """The database's clock in ms since the epoch (PostgreSQL: the time of the statement)."""
    return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()) * 1000, sa.BigInteger)


@define(kw_only=True)
class Changes:
    """What `Store.fetch_changes` read: rows other replicas (or this one) wrote since the last
    fetch, as records not held by the store; apply them on the event loop."""

    clusters: list[Cluster]
    """Changed cluster rows, each with its changed workers (the others are not read)."""
    workers: list[Worker]
    """Changed worker rows whose cluster row did not change."""
    written: int
    """The store's write number when the read began: every write up to it is in the rows."""
    cursor: int
    """The database's clock when the read began: the next fetch reads from there."""
    stamps: dict[tuple[str, str], int]
    """(cluster, worker or "") -> the row's ``changed`` stamp."""


_INDEXED_FIELDS = frozenset({"username", "status", "shared_users", "shared_groups"})
"""Cluster fields the store's indexes are keyed on: a change to one re-indexes the record."""

_Bucket = dict[str, Cluster]
"""The clusters under one index key, by name (insertion ordered)."""


def is_in_memory(url: str) -> bool:
    """True for SQLite URLs that keep the database in memory (nothing persists)."""
    try:
        parsed = sa.make_url(url)
    except ArgumentError:
        return False
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    return database in ("", ":memory:") or (
        database.startswith("file:") and "mode=memory" in database
    )


def fernet_from_key(key: str, *, index: int = 0) -> Fernet:
    """A Fernet from a base64-encoded 32-byte key (standard or URL-safe alphabet).

    Raises StoreError naming the key by its position (never printing it).
    """
    text = key.strip().encode()
    raw: bytes | None = None
    for altchars in (None, b"-_"):
        try:
            raw = base64.b64decode(text, altchars=altchars, validate=True)
            break
        except (binascii.Error, ValueError):
            continue
    if raw is None:
        raise StoreError(
            f"db_encrypt_keys[{index}] is not valid base64; each key must be a base64-encoded "
            "32-byte value, make one with `openssl rand -base64 32`"
        )
    if len(raw) != 32:
        raise StoreError(
            f"db_encrypt_keys[{index}] decodes to {len(raw)} bytes, expected 32; "
            "make a key with `openssl rand -base64 32`"
        )
    return Fernet(base64.urlsafe_b64encode(raw))


WRITE_ATTEMPTS = 5
"""Tries of one write when the database reports an operational error (locked, gone away)."""

WRITE_RETRY_DELAY = 0.1
"""Seconds before the first retry of a write; each next one waits twice as long."""

WRITE_BATCH = 200
"""Most queued writes the writer commits in one transaction. Each commit of a file or server
database waits for the disk, so committing what piled up meanwhile together (and releasing
every `Store.flush` waiting among them after that one commit) lets creates and scales go as
fast as the database can take a batch, not one commit per change or per flush."""


class Store:
    """Every cluster (with its workers) in memory; each change written behind, in order.

    Build with ``Store(url=..., encrypt_keys=[...], debug=False)``; construction checks the
    database's schema (`gateway_core.migrations.prepare`: an empty database gets the tables, one
    whose schema is behind is refused with the command that upgrades it), then `load` reads
    the records. Methods that change a record
    change the object in memory at once (readers never wait) and queue the row change for one
    writer thread, which applies the changes in the order they were made; the event loop never
    waits for the database. `flush` (async) returns once every change made before it is
    written: await it where a change must be durable before acting on it (see "Durability
    points" in docs/architecture.md). `aclose` (or `close`, for synchronous callers) writes
    what is queued and releases the database. A write that fails is retried while the
    database reports an operational error, then logged at ERROR and dropped (counted in
    ``failed_writes``); later writes go on.

    With ``encrypt_keys`` the first key encrypts secrets and every key decrypts them (rotation);
    a persistent database needs at least one key.

    The store indexes its clusters by owner (`clusters_of`), status (`clusters_with_status`)
    and sharee user and group (`clusters_shared_with`), so that a listing costs what it
    returns, not what other users hold. The indexes follow every change made through
    `create_cluster`, `update_cluster`, `delete_cluster`, `purge` and `load`: change a
    record's ``username``, ``status``, ``shared_users`` or ``shared_groups`` only through
    `update_cluster` (never by assignment or by changing a list in place).
    """

    def __init__(
        self,
        *,
        url: str = "sqlite:///:memory:",
        encrypt_keys: Iterable[str] = (),
        debug: bool = False,
    ) -> None:
        self.url = url
        keys = [k for k in encrypt_keys if k.strip()]
        self.persistent = not is_in_memory(url)
        if self.persistent and not keys:
            raise StoreError(
                f"the database {_safe_url(url)} is persistent, so cluster secrets must be "
                f"encrypted at rest: {KEY_HELP}"
            )
        fernets = [fernet_from_key(k, index=i) for i, k in enumerate(keys)]
        self._fernet: MultiFernet | None = MultiFernet(fernets) if fernets else None
        self._rotate = len(fernets) > 1
        self._clusters: dict[str, Cluster] = {}
        self._by_owner: dict[str, _Bucket] = {}
        self._by_status: dict[ClusterStatus, _Bucket] = {}
        self._by_sharee_user: dict[str, _Bucket] = {}
        self._by_sharee_group: dict[str, _Bucket] = {}
        self._writes: queue.Queue[_Write | _Barrier | _Nudge | None] = queue.Queue()
        # Writes that go ahead of the queue (`create_cluster(ahead=True)`) and their barriers
        # (`flush_ahead`); each put is followed by a `_NUDGE` on ``_writes``.
        self._ahead: queue.Queue[_Write | _Barrier] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._closed = False
        # Replica sync: writes are numbered; a record with a write queued after a fetch began
        # is newer in memory than in that fetch (see `pending_since`).
        self._submitted = 0
        self._written = 0
        self._last_write: dict[str, int] = {}
        self._stamps: dict[tuple[str, str], int] = {}
        self._cursor: int | None = None
        self.failed_writes = 0
        """Writes given up on since the store was built (each logged at ERROR)."""
        self.commits = 0
        """Batches of writes the writer has applied (one transaction each, unless one failed
        and its writes were retried one by one) since the store was built."""
        # In memory the writer and lease calls share one connection: one at a time.
        self._serial: threading.Lock | contextlib.nullcontext[None] = (
            contextlib.nullcontext() if self.persistent else threading.Lock()
        )
        self.engine = _make_engine(url, debug=debug)
        try:
            self.schema = prepare(self.engine, metadata, where=_safe_url(url))
            """The database's schema revision at start (see `gateway_core.migrations`)."""
        except SchemaError as exc:
            self.engine.dispose()
            raise StoreError(str(exc)) from exc
        except SQLAlchemyError as exc:
            self.engine.dispose()
            raise StoreError(f"cannot open the database {_safe_url(url)}: {_reason(exc)}") from exc
        self.shared = self.engine.dialect.name == "postgresql"
        """Whether several gateways may share this database: rows carry a ``changed`` stamp,
        and `fetch_changes` reads what changed (PostgreSQL only)."""
        self._insert_cluster = self._stamp(clusters_table.insert())
        self._insert_worker = self._stamp(workers_table.insert())
        self._worker_updates: dict[tuple[str, ...], Any] = {}
        self._cluster_updates: dict[tuple[str, ...], Any] = {}

    # ---------------------------------------------------------------------------------------
    # Reading

    @property
    def clusters(self) -> Mapping[str, Cluster]:
        """Every cluster in the store, by name (read-only view; change through the methods)."""
        return self._clusters

    def get(self, name: str) -> Cluster | None:
        return self._clusters.get(name)

    def clusters_of(
        self, username: str, statuses: Collection[ClusterStatus] | None = None
    ) -> list[Cluster]:
        """The clusters of ``username`` (with a status in ``statuses``, any when None), from
        the owner index: costs what that user holds, whatever the other users hold."""
        found = self._by_owner.get(username, {}).values()
        if statuses is None:
            return list(found)
        wanted = frozenset(statuses)
        return [c for c in found if c.status in wanted]

    def clusters_with_status(self, statuses: Collection[ClusterStatus]) -> list[Cluster]:
        """Every cluster whose status is in ``statuses``, from the status index (clusters in
        other statuses are not visited)."""
        found: list[Cluster] = []
        for status in frozenset(statuses):
            found.extend(self._by_status.get(status, {}).values())
        return found

    def clusters_shared_with(
        self,
        username: str,
        groups: Iterable[str] = (),
        statuses: Collection[ClusterStatus] | None = None,
    ) -> list[Cluster]:
        """The clusters shared with user ``username`` by name or with one of ``groups`` (each
        once; the user's own included when shared with it or its groups), with a status in
        ``statuses`` (any when None), from the sharee indexes: costs what is shared with
        them, whatever else the store holds."""
        found: _Bucket = dict(self._by_sharee_user.get(username, {}))
        for group in groups:
            found.update(self._by_sharee_group.get(group, {}))
        if statuses is None:
            return list(found.values())
        wanted = frozenset(statuses)
        return [c for c in found.values() if c.status in wanted]

    def load(self) -> list[Cluster]:
        """Read every record from the database into memory and return the clusters.

        With more than one key, secrets are re-encrypted with the first key as they are read,
        so the old keys can be dropped after one start.
        """
        self.wait_written()
        clusters: dict[str, Cluster] = {}
        rotated: list[dict[str, Any]] = []
        try:
            with self.engine.begin() as conn:
                if self.shared:
                    self._cursor = int(conn.execute(sa.select(_db_now_ms())).scalar_one())
                for row in conn.execute(sa.select(clusters_table)).mappings():
                    cluster = self._cluster_from_row(row)
                    clusters[cluster.name] = cluster
                    if self._rotate:
                        rotated.append(
                            {
                                "b_name": cluster.name,
                                "token": self._encrypt(cluster.token.encode()),
                                "tls_key": self._encrypt(cluster.tls_key),
                            }
                        )
                for row in conn.execute(sa.select(workers_table)).mappings():
                    owner = clusters.get(row["cluster_name"])
                    if owner is None:
                        continue
                    worker = _worker_from_row(row)
                    owner.workers[worker.name] = worker
                if rotated:
                    conn.execute(
                        clusters_table.update()
                        .where(clusters_table.c.name == sa.bindparam("b_name"))
                        .values(token=sa.bindparam("token"), tls_key=sa.bindparam("tls_key")),
                        rotated,
                    )
        except SQLAlchemyError as exc:
            raise StoreError(
                f"cannot read the database {_safe_url(self.url)}: {_reason(exc)}"
            ) from exc
        self._clusters = clusters
        self._reindex()
        return list(clusters.values())

    # ---------------------------------------------------------------------------------------
    # Writing: memory at once, the database behind

    def create_cluster(self, cluster: Cluster, *, ahead: bool = False) -> None:
        """Insert ``cluster`` (and any workers it already holds).

        With ``ahead`` the insert goes ahead of the writes queued so far (the writer commits
        it before them, or with them), and `flush_ahead` waits for it without waiting for
        them: for a cluster whose name was never stored (`gateway_core.models.new_name`), on
        whose row no earlier write can be queued."""
        if cluster.name in self._clusters:
            raise StoreError(f"cluster {cluster.name} already exists")
        steps: list[_Step] = [(self._insert_cluster, self._cluster_row(cluster))]
        steps.extend((self._insert_worker, _worker_row(w)) for w in cluster.workers.values())
        self._submit(
            f"new cluster {cluster.name}",
            steps,
            cluster=cluster.name,
            rows={cluster.name: ALL},
            ahead=ahead,
        )
        self._clusters[cluster.name] = cluster
        self._index(cluster)

    def update_cluster(self, cluster: Cluster, **changes: Any) -> None:
        """Set ``changes`` (field name → value) on ``cluster`` and queue their write."""
        unknown = set(changes) - _CLUSTER_FIELDS
        if unknown:
            raise TypeError(f"update_cluster: unknown fields {sorted(unknown)}")
        if not changes:
            return
        # Only the stored record is indexed (an object the store does not hold stays out).
        reindex = not _INDEXED_FIELDS.isdisjoint(changes) and (
            self._clusters.get(cluster.name) is cluster
        )
        if reindex:
            self._unindex(cluster)
        try:
            for name, value in changes.items():
                setattr(cluster, name, value)
        finally:
            if reindex:
                self._index(cluster)
        values = self._cluster_row(cluster, only=changes)
        if not values:
            return  # only columns this database lacks changed
        fields = tuple(sorted(values))
        statement = self._cluster_updates.get(fields)
        if statement is None:
            # As for workers: compiled once per set of fields, like updates run as one.
            statement = self._cluster_updates[fields] = self._stamp(
                clusters_table.update()
                .where(clusters_table.c.name == sa.bindparam("c_name"))
                .values({f: sa.bindparam(f) for f in fields})
            )
        values["c_name"] = cluster.name
        self._submit(
            f"cluster {cluster.name}",
            [(statement, values)],
            cluster=cluster.name,
            rows={cluster.name: ""},
        )

    def delete_cluster(self, cluster: Cluster | str) -> None:
        """Remove a cluster and its workers; unknown names are ignored."""
        name = cluster if isinstance(cluster, str) else cluster.name
        self._delete([name])

    def create_worker(self, worker: Worker) -> None:
        """Insert ``worker`` and add it to its cluster's ``workers``."""
        cluster = self._clusters.get(worker.cluster_name)
        if cluster is None:
            raise StoreError(f"worker {worker.name}: no cluster {worker.cluster_name}")
        if worker.name in cluster.workers:
            raise StoreError(f"worker {worker.name} already exists")
        self._submit(
            f"new worker {worker.name}",
            [(self._insert_worker, _worker_row(worker))],
            cluster=worker.cluster_name,
            rows={worker.cluster_name: worker.name},
        )
        cluster.workers[worker.name] = worker

    def update_worker(self, worker: Worker, **changes: Any) -> None:
        """Set ``changes`` (field name → value) on ``worker`` and queue their write."""
        unknown = set(changes) - _WORKER_FIELDS
        if unknown:
            raise TypeError(f"update_worker: unknown fields {sorted(unknown)}")
        if not changes:
            return
        for name, value in changes.items():
            setattr(worker, name, value)
        values = _worker_row(worker, only=changes)
        fields = tuple(sorted(values))
        statement = self._worker_updates.get(fields)
        if statement is None:
            # One statement per set of fields, with bound parameters: compiled once, and
            # consecutive updates of the same fields go to the database as one executemany.
            statement = self._worker_updates[fields] = self._stamp(
                workers_table.update()
                .where(workers_table.c.cluster_name == sa.bindparam("w_cluster"))
                .where(workers_table.c.name == sa.bindparam("w_name"))
                .values({f: sa.bindparam(f) for f in fields})
            )
        values["w_cluster"] = worker.cluster_name
        values["w_name"] = worker.name
        self._submit(
            f"worker {worker.name}",
            [(statement, values)],
            cluster=worker.cluster_name,
            rows={worker.cluster_name: worker.name},
        )

    def delete_worker(self, worker: Worker) -> None:
        """Remove one worker record."""
        statement = (
            workers_table.delete()
            .where(workers_table.c.cluster_name == worker.cluster_name)
            .where(workers_table.c.name == worker.name)
        )
        self._submit(
            f"deleted worker {worker.name}",
            [(statement, None)],
            rows={worker.cluster_name: worker.name},
        )
        cluster = self._clusters.get(worker.cluster_name)
        if cluster is not None:
            cluster.workers.pop(worker.name, None)

    def purge(self, max_age_s: float) -> int:
        """Delete finished (STOPPED or FAILED) clusters that stopped more than ``max_age_s``
        seconds ago, with their workers; return how many clusters were deleted."""
        cutoff = now_ms() - int(max_age_s * 1000)
        finished = [s for s in ClusterStatus if not s.is_active]
        old = [
            c.name
            for c in self.clusters_with_status(finished)
            if c.stop_time is not None and c.stop_time < cutoff
        ]
        self._delete(old)
        return len(old)

    async def flush(self) -> None:
        """Return once every change made before this call is in the database (or was given
        up on and logged); the event loop runs on meanwhile."""
        if self._writer is None:
            return
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()
        self._writes.put(_Barrier(loop=loop, future=written))
        await written

    async def flush_ahead(self) -> None:
        """Return once every write queued ahead (`create_cluster` with ``ahead``) before this
        call is in the database (or was given up on and logged), without waiting for the
        other writes queued before it: a create answers after its own row's commit, not
        after the backlog of the clusters and workers being started."""
        if self._writer is None:
            return
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()
        self._ahead.put(_Barrier(loop=loop, future=written))
        self._writes.put(_NUDGE)
        await written

    def wait_written(self) -> None:
        """Block until every change made so far is in the database: for synchronous callers
        (start-up, tools, tests); on the event loop, await `flush` instead."""
        if self._writer is not None:
            self._writes.join()

    async def aclose(self) -> None:
        """Write what is queued, then release the database connections."""
        await self.flush()
        self.close()

    def close(self) -> None:
        """Write what is queued (blocking), stop the writer and release the database."""
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            self._writes.put(None)
            writer.join()
        self.engine.dispose()

    def _stamp(self, statement: Any) -> Any:
        """``statement`` setting the row's ``changed`` stamp, on a shared database."""
        return statement.values(changed=_db_now_ms()) if self.shared else statement

    def _submit(
        self,
        what: str,
        steps: Sequence[_Step],
        *,
        cluster: str | None = None,
        rows: Mapping[str, str] | None = None,
        ahead: bool = False,
    ) -> None:
        """Queue ``steps`` as one write. ``rows``: what the steps touch, cluster name -> ""
        (its own row), a worker's name (that worker's row) or `ALL` (its row and all its
        workers'); a batch moves a write ahead of writes touching none of it (`_regrouped`).
        None: not known, no write crosses it. ``ahead``: see `create_cluster`."""
        if self._closed:
            raise StoreError(f"the store is closed; cannot write {what}")
        self._submitted += 1
        if cluster is not None and self.shared and not ahead:
            # (A row written ahead is as new as the record until its next change, which is
            # not ahead and counts here.)
            self._last_write[cluster] = self._submitted
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name="gateway-store-writer", daemon=True
            )
            self._writer.start()
        write = _Write(what=what, steps=tuple(steps), number=self._submitted, rows=rows)
        if ahead:
            self._ahead.put(write)
            self._writes.put(_NUDGE)
        else:
            self._writes.put(write)

    def _write_loop(self) -> None:
        """The writer thread: apply queued writes in order until `close`, committing the
        writes queued meanwhile (up to `WRITE_BATCH`) together, and releasing the `flush`
        barriers among them once that commit is done: concurrent flushes share one commit
        (group commit), and no barrier is released before every write queued ahead of it is
        committed (or given up on and logged).

        Writes queued ahead (`create_cluster` with ``ahead``) are taken after the others of a
        turn, so that each of them queued before one of those is among them, and committed
        first, in a transaction of their own; then their `flush_ahead` barriers are released.
        """
        while True:
            item: _Write | _Barrier | _Nudge | None = self._writes.get()
            taken = 1
            batch: list[_Write] = []
            barriers: list[_Barrier] = []
            stop = False
            try:
                while True:
                    if item is None:
                        stop = True
                        break
                    if isinstance(item, _Barrier):
                        barriers.append(item)
                    elif isinstance(item, _Write):
                        batch.append(item)
                        if len(batch) >= WRITE_BATCH:
                            break
                    try:
                        item = self._writes.get_nowait()
                    except queue.Empty:
                        break
                    taken += 1
                self._write_ahead()
                if batch:
                    try:
                        self._apply_batch(batch)
                    finally:
                        self._written = batch[-1].number
                        self.commits += 1
                for barrier in barriers:
                    barrier.release()
            finally:
                for _ in range(taken):
                    self._writes.task_done()
            if stop:
                return

    def _write_ahead(self) -> None:
        """Commit every write queued ahead so far, then release the barriers among them."""
        batch: list[_Write] = []
        barriers: list[_Barrier] = []
        while True:
            try:
                item = self._ahead.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Barrier):
                barriers.append(item)
            else:
                batch.append(item)
        if batch:
            try:
                self._apply_batch(batch)
            finally:
                self.commits += 1
        for barrier in barriers:
            barrier.release()

    def _apply_batch(self, batch: list[_Write]) -> None:
        """Commit ``batch`` in one transaction; when that fails, apply each write on its own
        (with its retries), so one bad write is the only one lost."""
        if len(batch) > 1:
            try:
                with self._serial, self.engine.begin() as conn:
                    for statement, params in _regrouped(batch):
                        conn.execute(statement, params)
                return
            except Exception as exc:  # noqa: BLE001 - retried below, one write at a time
                log.debug("A batch of %d writes failed (%s); one by one now", len(batch), exc)
        for write in batch:
            self._apply(write)

    def _apply(self, write: _Write) -> None:
        delay = WRITE_RETRY_DELAY
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self._serial, self.engine.begin() as conn:
                    for statement, params in write.steps:
                        conn.execute(statement, params)
                return
            except OperationalError as exc:
                if attempt == WRITE_ATTEMPTS:
                    error: Exception = exc
                    break
                log.warning(
                    "Writing %s to %s failed (attempt %d of %d), retrying in %.1f s: %s",
                    write.what,
                    _safe_url(self.url),
                    attempt,
                    WRITE_ATTEMPTS,
                    delay,
                    exc.orig if exc.orig is not None else exc,
                )
                time.sleep(delay)
                delay *= 2
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any one write
                error = exc
                break
        self.failed_writes += 1
        log.error(
            "LOST WRITE: %s could not be written to %s; the database now lags the gateway's "
            "memory for this record until its next change (a restart would load the old row)",
            write.what,
            _safe_url(self.url),
            exc_info=error,
        )

    # ---------------------------------------------------------------------------------------
    # Sharing the database with other replicas (see "Replicas" in docs/architecture.md)

    def pending_since(self, name: str, written: int) -> bool:
        """True when cluster ``name`` (or one of its workers) has a write queued after write
        number ``written`` (`Changes.written`): its record in memory is newer than what that
        fetch read, and that write will stamp the row again for the next fetch."""
        return self._last_write.get(name, 0) > written

    def fetch_changes(self) -> Changes:
        """Read the cluster and worker rows stamped since the last fetch (or `load`), less
        `SYNC_OVERLAP_MS`, skipping rows whose stamp was already seen. One transaction of three
        indexed statements; blocks on the database: call it off the event loop."""
        if not self.shared:
            raise StoreError("fetch_changes needs a shared (PostgreSQL) database")
        written = self._written  # every write up to here is committed before the reads
        seen = self._stamps
        clusters: dict[str, Cluster] = {}
        workers: list[Worker] = []
        stamps: dict[tuple[str, str], int] = {}
        try:
            with self.engine.begin() as conn:
                cursor = int(conn.execute(sa.select(_db_now_ms())).scalar_one())
                since = (self._cursor if self._cursor is not None else cursor) - SYNC_OVERLAP_MS
                query = sa.select(clusters_table).where(clusters_table.c.changed >= since)
                for row in conn.execute(query).mappings():
                    key = (row["name"], "")
                    if seen.get(key) == row["changed"]:
                        continue
                    stamps[key] = row["changed"]
                    clusters[row["name"]] = self._cluster_from_row(row)
                query = sa.select(workers_table).where(workers_table.c.changed >= since)
                for row in conn.execute(query).mappings():
                    key = (row["cluster_name"], row["name"])
                    if seen.get(key) == row["changed"]:
                        continue
                    stamps[key] = row["changed"]
                    worker = _worker_from_row(row)
                    owner = clusters.get(worker.cluster_name)
                    if owner is not None:
                        owner.workers[worker.name] = worker
                    else:
                        workers.append(worker)
        except SQLAlchemyError as exc:
            raise StoreError(f"reading changes from {_safe_url(self.url)}: {_reason(exc)}") from exc
        return Changes(
            clusters=list(clusters.values()),
            workers=workers,
            written=written,
            cursor=cursor,
            stamps=stamps,
        )

    def advance(self, changes: Changes, applied: Iterable[tuple[str, str]]) -> None:
        """After applying ``changes``: the next fetch starts at its cursor, and the rows in
        ``applied`` are not read again until they change (rows skipped are)."""
        self._cursor = changes.cursor
        for key in applied:
            stamp = changes.stamps.get(key)
            if stamp is not None:
                self._stamps[key] = stamp

    def read_cluster(self, name: str) -> Cluster | None:
        """The cluster ``name`` with all its workers as the database has it now (None when it
        has no such row), not held by the store. Blocks: call it off the event loop."""
        try:
            with self.engine.begin() as conn:
                query = sa.select(clusters_table).where(clusters_table.c.name == name)
                row = conn.execute(query).mappings().first()
                if row is None:
                    return None
                cluster = self._cluster_from_row(row)
                query = sa.select(workers_table).where(workers_table.c.cluster_name == name)
                for wrow in conn.execute(query).mappings():
                    worker = _worker_from_row(wrow)
                    cluster.workers[worker.name] = worker
        except SQLAlchemyError as exc:
            raise StoreError(f"reading cluster {name}: {_reason(exc)}") from exc
        return cluster

    def hold(self, cluster: Cluster) -> Cluster:
        """Keep ``cluster`` (another replica's record, read from the database) in memory
        without writing it; an already held record of that name wins (returned)."""
        found = self._clusters.get(cluster.name)
        if found is not None:
            return found
        self._clusters[cluster.name] = cluster
        self._index(cluster)
        return cluster

    def set_local(self, cluster: Cluster, **changes: Any) -> None:
        """Set ``changes`` on a held ``cluster`` in memory only (they came from the database),
        keeping the indexes in step."""
        unknown = set(changes) - _CLUSTER_FIELDS
        if unknown:
            raise TypeError(f"set_local: unknown fields {sorted(unknown)}")
        reindex = not _INDEXED_FIELDS.isdisjoint(changes) and (
            self._clusters.get(cluster.name) is cluster
        )
        if reindex:
            self._unindex(cluster)
        try:
            for name, value in changes.items():
                setattr(cluster, name, value)
        finally:
            if reindex:
                self._index(cluster)

    # ---------------------------------------------------------------------------------------
    # Leases: which replica works on what (not written behind: each call is one transaction)

    def acquire_lease(
        self, name: str, holder: str, ttl_s: float, *, now: int | None = None
    ) -> Lease | None:
        """Take or extend the lease ``name`` for ``holder`` for ``ttl_s`` seconds, or return None
        while another holder's lease has not expired. Atomic among replicas: one UPDATE that
        matches only an expired lease or ``holder``'s own, else one INSERT of a new lease; of
        several replicas asking at once exactly one gets it. A change of holder increments the
        fencing token; ``holder`` taking back its own lease keeps it. ``now`` (ms since the
        epoch, default this host's clock): the replicas' clocks must agree to well within
        ``ttl_s``. Blocks on the database: call it off the event loop."""
        at = now_ms() if now is None else now
        expires = at + int(ttl_s * 1000)
        t = leases_table.c
        take = (
            leases_table.update()
            .where(t.name == name)
            .where(sa.or_(t.expires < at, t.holder == holder))
            .values(
                holder=holder,
                expires=expires,
                token=sa.case((t.holder == holder, t.token), else_=t.token + 1),
            )
            .returning(t.token)
        )
        with self._serial:
            try:
                with self.engine.begin() as conn:
                    token = conn.execute(take).scalar_one_or_none()
                if token is not None:
                    return Lease(name=name, holder=holder, token=int(token), expires=expires)
                with self.engine.begin() as conn:
                    conn.execute(
                        leases_table.insert().values(
                            name=name, holder=holder, expires=expires, token=1
                        )
                    )
                return Lease(name=name, holder=holder, token=1, expires=expires)
            except IntegrityError:
                return None  # another replica inserted it first: it holds the lease
            except SQLAlchemyError as exc:
                raise StoreError(f"lease {name}: {_reason(exc)}") from exc

    def renew_leases(
        self, holder: str, leases: Iterable[Lease], ttl_s: float, *, now: int | None = None
    ) -> list[Lease]:
        """Extend every lease of ``leases`` (all ``holder``'s) by ``ttl_s`` seconds from now in
        one statement; return those renewed (the others were lost: stop their work)."""
        wanted = {lease.name: lease for lease in leases}
        if not wanted:
            return []
        at = now_ms() if now is None else now
        expires = at + int(ttl_s * 1000)
        t = leases_table.c
        statement = (
            leases_table.update()
            .where(t.name.in_(list(wanted)), t.holder == holder, t.expires >= at)
            .values(expires=expires)
            .returning(t.name, t.token)
        )
        with self._serial:
            try:
                with self.engine.begin() as conn:
                    rows = conn.execute(statement).all()
            except SQLAlchemyError as exc:
                raise StoreError(f"renewing leases of {holder}: {_reason(exc)}") from exc
        # A lease that changed hands and came back has a new token: not the one we hold.
        return [
            Lease(name=name, holder=holder, token=int(token), expires=expires)
            for name, token in rows
            if wanted[name].token == int(token)
        ]

    def lease_held(self, lease: Lease, *, now: int | None = None) -> bool:
        """Whether ``lease`` is still its holder's, with the same token, unexpired: the fence
        before a driver call that must not run twice. One statement."""
        at = now_ms() if now is None else now
        t = leases_table.c
        query = sa.select(t.name).where(
            t.name == lease.name, t.holder == lease.holder, t.token == lease.token, t.expires >= at
        )
        with self._serial:
            try:
                with self.engine.begin() as conn:
                    return conn.execute(query).first() is not None
            except SQLAlchemyError as exc:
                raise StoreError(f"lease {lease.name}: {_reason(exc)}") from exc

    def leases_held(
        self, leases: Iterable[Lease], *, now: int | None = None
    ) -> set[tuple[str, int]]:
        """(name, token) of each of ``leases`` still its holder's with that token, unexpired:
        `lease_held` for many leases in one statement (the fences asked meanwhile)."""
        wanted = {(lease.name, lease.holder, lease.token) for lease in leases}
        if not wanted:
            return set()
        at = now_ms() if now is None else now
        t = leases_table.c
        query = sa.select(t.name, t.holder, t.token).where(
            t.name.in_(sorted({name for name, _, _ in wanted})), t.expires >= at
        )
        with self._serial:
            try:
                with self.engine.begin() as conn:
                    rows = conn.execute(query).all()
            except SQLAlchemyError as exc:
                names = ", ".join(sorted({name for name, _, _ in wanted}))
                raise StoreError(f"leases {names}: {_reason(exc)}") from exc
        return {
            (name, int(token))
            for name, holder, token in rows
            if (name, holder, int(token)) in wanted
        }

    def live_leases(self, prefix: str, *, now: int | None = None) -> dict[str, str]:
        """Unexpired leases whose name starts with ``prefix``: name -> holder. One statement."""
        at = now_ms() if now is None else now
        t = leases_table.c
        query = sa.select(t.name, t.holder).where(t.name.startswith(prefix), t.expires >= at)
        with self._serial:
            try:
                with self.engine.begin() as conn:
                    return {name: holder for name, holder in conn.execute(query)}
            except SQLAlchemyError as exc:
                raise StoreError(f"leases {prefix}*: {_reason(exc)}") from exc

    def renew_lease(self, lease: Lease, ttl_s: float, *, now: int | None = None) -> Lease | None:
        """Extend ``lease`` by ``ttl_s`` seconds from now; None when it was lost (it expired,
        or another holder took it over: stop the work it guarded)."""
        at = now_ms() if now is None else now
        expires = at + int(ttl_s * 1000)
        t = leases_table.c
        statement = (
            leases_table.update()
            .where(t.name == lease.name, t.holder == lease.holder, t.token == lease.token)
            .where(t.expires >= at)
            .values(expires=expires)
        )
        with self._serial:
            try:
                with self.engine.begin() as conn:
                    renewed = conn.execute(statement).rowcount == 1
            except SQLAlchemyError as exc:
                raise StoreError(f"lease {lease.name}: {_reason(exc)}") from exc
        return (
            Lease(name=lease.name, holder=lease.holder, token=lease.token, expires=expires)
            if renewed
            else None
        )

    def release_lease(self, lease: Lease) -> bool:
        """Give ``lease`` up (it expires at once, for the next holder; its token stays, so the
        next one is larger). False when it was no longer held."""
        t = leases_table.c
        statement = (
            leases_table.update()
            .where(t.name == lease.name, t.holder == lease.holder, t.token == lease.token)
            .values(expires=0)
        )
        with self._serial:
            try:
                with self.engine.begin() as conn:
                    return bool(conn.execute(statement).rowcount == 1)
            except SQLAlchemyError as exc:
                raise StoreError(f"lease {lease.name}: {_reason(exc)}") from exc

    # ---------------------------------------------------------------------------------------
    # Rows

    def _delete(self, names: list[str]) -> None:
        if not names:
            return
        steps: list[_Step] = [
            (workers_table.delete().where(workers_table.c.cluster_name.in_(names)), None),
            (clusters_table.delete().where(clusters_table.c.name.in_(names)), None),
        ]
        self._submit(
            f"deleted cluster(s) {', '.join(names)}", steps, rows=dict.fromkeys(names, ALL)
        )
        for name in names:
            self._last_write.pop(name, None)
            cluster = self._clusters.pop(name, None)
            if cluster is not None:
                self._unindex(cluster)

    def _reindex(self) -> None:
        """Build every index afresh from ``_clusters`` (after `load`)."""
        self._by_owner = {}
        self._by_status = {}
        self._by_sharee_user = {}
        self._by_sharee_group = {}
        for cluster in self._clusters.values():
            self._index(cluster)

    def _index(self, cluster: Cluster) -> None:
        name = cluster.name
        self._by_owner.setdefault(cluster.username, {})[name] = cluster
        self._by_status.setdefault(cluster.status, {})[name] = cluster
        for user in cluster.shared_users:
            self._by_sharee_user.setdefault(user, {})[name] = cluster
        for group in cluster.shared_groups:
            self._by_sharee_group.setdefault(group, {})[name] = cluster

    def _unindex(self, cluster: Cluster) -> None:
        name = cluster.name
        _drop(self._by_owner, cluster.username, name)
        _drop(self._by_status, cluster.status, name)
        for user in cluster.shared_users:
            _drop(self._by_sharee_user, user, name)
        for group in cluster.shared_groups:
            _drop(self._by_sharee_group, group, name)

    def _encrypt(self, data: bytes) -> bytes:
        return data if self._fernet is None else self._fernet.encrypt(data)

    def _decrypt(self, data: bytes, cluster_name: str) -> bytes:
        if self._fernet is None:
            return data
        try:
            return self._fernet.decrypt(data)
        except InvalidToken:
            raise StoreError(
                f"cannot decrypt the secrets of cluster {cluster_name} with any of "
                "db_encrypt_keys; keep the key that encrypted them in the list (the first key "
                "encrypts, every key decrypts)"
            ) from None

    def _cluster_row(self, cluster: Cluster, only: Iterable[str] | None = None) -> dict[str, Any]:
        convert: dict[str, Callable[[Any], Any]] = {
            "token": lambda v: self._encrypt(v.encode()),
            "tls_key": self._encrypt,
            "status": int,
            "target": int,
        }
        names = _CLUSTER_FIELDS if only is None else only
        return {n: convert.get(n, _plain)(getattr(cluster, n)) for n in names}

    def _cluster_from_row(self, row: Mapping[Any, Any]) -> Cluster:
        name = row["name"]
        return Cluster(
            name=name,
            username=row["username"],
            token=self._decrypt(bytes(row["token"]), name).decode(),
            options=row["options"] or {},
            config=row["config"] or {},
            status=ClusterStatus(row["status"]),
            target=ClusterStatus(row["target"]),
            count=row["count"],
            state=row["state"] or {},
            scheduler_address=row["scheduler_address"],
            dashboard_address=row["dashboard_address"],
            api_address=row["api_address"],
            tls_cert=bytes(row["tls_cert"]),
            tls_key=self._decrypt(bytes(row["tls_key"]), name),
            start_time=row["start_time"],
            stop_time=row["stop_time"],
            last_heartbeat=row["last_heartbeat"],
            worker_start_failures=row["worker_start_failures"],
            reason=row["reason"],
            shared_users=list(row.get("shared_users") or []),
            shared_groups=list(row.get("shared_groups") or []),
            group_counts=dict(row.get("group_counts") or {}),
        )


ALL = "*"
"""In a write's rows: every row of the cluster, its own and its workers' (an insert or delete
of the cluster)."""


def _regrouped(batch: Iterable[_Write]) -> list[_Step]:
    """The steps of ``batch`` regrouped so that each kind of statement goes out as few times as
    the rows allow: a step with a parameter dict joins the earliest group of the same
    statement object and parameter keys that is followed by no group touching a row it
    touches (one executemany per group); any other step starts a group at the end.

    Only steps on different rows change places: every row sees its changes in the order they
    were made, a worker's row comes after its cluster's insert and before its delete (`ALL`),
    and a write whose rows are not known (`_Write.rows` None) is a fence no step crosses."""
    groups: list[_Group] = []
    for write in batch:
        rows = write.rows
        for statement, params in write.steps:
            keys = params.keys() if isinstance(params, dict) else None
            home: _Group | None = None
            if keys is not None and rows is not None:
                for group in reversed(groups):
                    if group.touches(rows):
                        break  # the step must stay after this group
                    if group.statement is statement and group.keys == keys:
                        home = group
            if home is None:
                home = _Group(statement=statement, keys=keys)
                groups.append(home)
            home.add(rows, params)
    return [(g.statement, g.params if len(g.params) > 1 else g.params[0]) for g in groups]


@define(kw_only=True, eq=False)
class _Group:
    """Steps of one statement sent together (`_regrouped`), and the rows they touch."""

    statement: Any
    keys: Any
    params: list[Any] = Factory(list)
    rows: dict[str, set[str]] = Factory(dict)
    """Cluster name -> "" (its row), worker names, `ALL`: what the steps touch."""
    fence: bool = False
    """A step of it touches rows not known: nothing crosses it."""

    def add(self, rows: Mapping[str, str] | None, params: Any) -> None:
        self.params.append(params)
        if rows is None:
            self.fence = True
            return
        for cluster, row in rows.items():
            self.rows.setdefault(cluster, set()).add(row)

    def touches(self, rows: Mapping[str, str]) -> bool:
        """Whether a step touching ``rows`` must stay after this group."""
        if self.fence:
            return True
        for cluster, row in rows.items():
            mine = self.rows.get(cluster)
            if mine is not None and (row == ALL or row in mine or ALL in mine):
                return True
        return False


def _drop(index: dict[Any, _Bucket], key: Any, name: str) -> None:
    """Remove ``name`` from ``index[key]``, and the key once nothing is left under it."""
    bucket = index.get(key)
    if bucket is None:
        return
    bucket.pop(name, None)
    if not bucket:
        del index[key]


def _plain(value: Any) -> Any:
    # A copy: the row is written later, by another thread, and must not see later changes.
    return copy.deepcopy(value) if isinstance(value, dict | list) else value


_Step = tuple[Any, Any]
"""One statement of a write and its parameters (None when the values are in the statement)."""


@define(kw_only=True, frozen=True)
class _Write:
    """Statements applied in one transaction by the writer thread."""

    what: str
    """The change, for log lines: ``cluster abc``."""
    steps: tuple[_Step, ...]
    number: int = 0
    """Its place in the order of writes (`Store.pending_since`)."""
    rows: Mapping[str, str] | None = None
    """The rows its steps touch, cluster name -> "" (the cluster's row), a worker's name or
    `ALL` (see `Store._submit`); None when not known (no step crosses it)."""


@define(kw_only=True, frozen=True)
class _Barrier:
    """Queued by `Store.flush`: resolves its future once every write before it is done."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]

    def release(self) -> None:
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more


class _Nudge:
    """Queued after a write or barrier queued ahead: wakes the writer to take it."""


_NUDGE = _Nudge()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _worker_row(worker: Worker, only: Iterable[str] | None = None) -> dict[str, Any]:
    names = (_WORKER_FIELDS | {"cluster_name"}) if only is None else only
    out = {n: _plain(getattr(worker, n)) for n in names}
    for n in ("status", "target"):
        if n in out:
            out[n] = int(out[n])
    return out


def _worker_from_row(row: Mapping[Any, Any]) -> Worker:
    return Worker(
        name=row["name"],
        cluster_name=row["cluster_name"],
        status=WorkerStatus(row["status"]),
        target=WorkerStatus(row["target"]),
        state=row["state"] or {},
        start_time=row["start_time"],
        stop_time=row["stop_time"],
        close_expected=bool(row["close_expected"]),
        reason=row["reason"],
        group=row.get("group") or DEFAULT_GROUP,
    )


def pool_size() -> int:
    """Connections kept open to a persistent database: one per thread that may use the store
    at once (the writer, and asyncio's default executor, which runs the lease, fence and sync
    statements: ``min(32, cpus + 4)`` threads), plus one to spare. SQLAlchemy's default of 5 is
    fewer, so connections beyond it were opened and closed again under load."""
    return min(32, (os.cpu_count() or 1) + 4) + 2


def _make_engine(url: str, *, debug: bool) -> Engine:
    kwargs: dict[str, Any] = {"echo": debug}
    if is_in_memory(url):
        # One shared connection, or every pooled connection would see its own empty database.
        kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    elif _backend(url) == "postgresql":
        kwargs.update(pool_size=pool_size(), max_overflow=pool_size())
    try:
        return sa.create_engine(url, **kwargs)
    except (ArgumentError, ImportError, SQLAlchemyError) as exc:
        raise StoreError(f"cannot use db_url {_safe_url(url)}: {_reason(exc)}") from exc


def _backend(url: str) -> str:
    try:
        return str(sa.make_url(url).get_backend_name())
    except ArgumentError:
        return ""


def _reason(exc: BaseException) -> str:
    """Why a database operation failed, on one line: the driver's own message when there is one
    (without SQLAlchemy's statement dump and "Background on this error" link)."""
    orig = getattr(exc, "orig", None)
    text = str(orig if isinstance(orig, BaseException) else exc) or type(exc).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _safe_url(url: str) -> str:
    """The URL with any password hidden, for messages."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return repr(url)

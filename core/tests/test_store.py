"""Tests of the store: records round trip, secrets encrypted at rest, key rotation, purge, and
writes behind (in order, flushed on demand, failures logged).

Uses in-memory SQLite, and runs the tests of a persistent store twice: on a SQLite file under
pytest's tmp_path and on a database of its own on the real PostgreSQL (the `postgres_url`
fixture: core/ci/start-postgres.sh; a missing server fails the test under CI).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.pool import NullPool

from gateway_core import store as store_module
from gateway_core.models import Cluster, ClusterStatus, Worker, WorkerStatus, new_token, now_ms
from gateway_core.store import Store, StoreError, is_in_memory


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.unit),
        pytest.param("postgresql", marks=pytest.mark.system),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A persistent database of this test's own: a SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gw.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def connect(db_url: str) -> Iterator[sqlalchemy.Engine]:
    """An engine of its own on the test's database, to look at what the store wrote."""
    engine = sqlalchemy.create_engine(db_url, poolclass=NullPool)
    yield engine
    engine.dispose()


def make_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def make_cluster(name: str = "c1", **kw: object) -> Cluster:
    return Cluster(
        name=name,
        username="alice",
        token=new_token(),
        options={"worker_cores": 2},
        config={"worker_cores": 2, "environment": {"A": "1"}},
        tls_cert=b"-----BEGIN CERTIFICATE-----\nCERT\n",
        tls_key=b"-----BEGIN PRIVATE KEY-----\nSECRETKEYMATERIAL\n",
        **kw,  # type: ignore[arg-type]
    )


def test_round_trip_every_field(db_url: str) -> None:
    url = db_url
    key = make_key()
    store = Store(url=url, encrypt_keys=[key])
    assert store.load() == []
    cluster = make_cluster(state={"pid": 12})
    store.create_cluster(cluster)
    store.update_cluster(
        cluster,
        status=ClusterStatus.RUNNING,
        count=3,
        scheduler_address="tls://127.0.0.1:1",
        dashboard_address="http://127.0.0.1:2",
        api_address="http://127.0.0.1:3",
        last_heartbeat=123.5,
        worker_start_failures=2,
        reason="why not",
        shared_users=["bob", "carol"],
        shared_groups=["physics"],
        group_counts={"gpu": 2},
    )
    worker = Worker(name="c1-w1", cluster_name="c1", state={"job": "7"})
    store.create_worker(worker)
    store.update_worker(worker, status=WorkerStatus.RUNNING, close_expected=True, reason="r")
    gpu = Worker(name="c1-gpu-w2", cluster_name="c1", group="gpu")
    store.create_worker(gpu)
    store.close()

    again = Store(url=url, encrypt_keys=[key])
    (loaded,) = again.load()
    assert loaded == cluster
    assert loaded.status is ClusterStatus.RUNNING and loaded.target is ClusterStatus.RUNNING
    assert loaded.token == cluster.token and loaded.tls_key == cluster.tls_key
    assert loaded.shared_users == ["bob", "carol"] and loaded.shared_groups == ["physics"]
    assert loaded.group_counts == {"gpu": 2}
    assert loaded.workers == {"c1-w1": worker, "c1-gpu-w2": gpu}
    assert loaded.workers["c1-gpu-w2"].group == "gpu" and loaded.workers["c1-w1"].group == "default"
    assert again.get("c1") is loaded
    again.delete_cluster("c1")
    assert again.get("c1") is None
    again.close()
    third = Store(url=url, encrypt_keys=[key])
    assert third.load() == []
    third.close()


@pytest.mark.unit
def test_in_memory_store_needs_no_keys() -> None:
    assert is_in_memory("sqlite:///:memory:") and is_in_memory("sqlite://")
    assert not is_in_memory("sqlite:////tmp/x.db")
    assert not is_in_memory("postgresql+psycopg://u:p@h/db")
    store = Store()
    store.create_cluster(make_cluster())
    assert store.load()[0].name == "c1"  # both pooled reads see the same in-memory database
    with pytest.raises(StoreError, match="already exists"):
        store.create_cluster(make_cluster())
    store.close()


@pytest.mark.unit
def test_persistent_store_requires_keys(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        Store(url=f"sqlite:///{tmp_path / 'gw.sqlite'}")
    message = str(info.value)
    assert "db_encrypt_keys" in message
    assert "GATEWAY_ENCRYPT_KEYS" in message
    assert "openssl rand -base64 32" in message


@pytest.mark.unit
def test_bad_keys_are_named_by_position(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gw.sqlite'}"
    with pytest.raises(StoreError, match=r"db_encrypt_keys\[1\] decodes to 16 bytes"):
        Store(url=url, encrypt_keys=[make_key(), base64.b64encode(b"x" * 16).decode()])
    with pytest.raises(StoreError, match=r"db_encrypt_keys\[0\] is not valid base64"):
        Store(url=url, encrypt_keys=["not a key!"])
    urlsafe = base64.urlsafe_b64encode(os.urandom(32)).decode()
    Store(url=url, encrypt_keys=[urlsafe]).close()


@pytest.mark.unit
def test_bad_url_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="cannot use db_url"):
        Store(url="nosuchdialect://x/y", encrypt_keys=[make_key()])


def test_secrets_are_not_in_plaintext_on_disk(db_url: str, connect: sqlalchemy.Engine) -> None:
    store = Store(url=db_url, encrypt_keys=[make_key()])
    cluster = make_cluster()
    store.create_cluster(cluster)
    store.close()
    with connect.connect() as conn:
        token, tls_key, tls_cert = conn.exec_driver_sql(
            "SELECT token, tls_key, tls_cert FROM clusters"
        ).one()
    token, tls_key = bytes(token), bytes(tls_key)
    assert token.startswith(b"gAAAA") and tls_key.startswith(b"gAAAA")  # Fernet tokens
    assert cluster.token.encode() not in token and b"SECRETKEYMATERIAL" not in tls_key
    assert bytes(tls_cert) == cluster.tls_cert  # the certificate is public and stored as is
    if db_url.startswith("sqlite"):  # nowhere in the file either (free pages, journal)
        raw = Path(sqlalchemy.make_url(db_url).database or "").read_bytes()
        assert cluster.token.encode() not in raw
        assert b"SECRETKEYMATERIAL" not in raw
        assert b"BEGIN CERTIFICATE" in raw


def test_key_rotation(db_url: str) -> None:
    url = db_url
    old, new = make_key(), make_key()
    store = Store(url=url, encrypt_keys=[old])
    cluster = make_cluster()
    store.create_cluster(cluster)
    store.close()

    with pytest.raises(StoreError, match="cannot decrypt the secrets of cluster c1"):
        Store(url=url, encrypt_keys=[new]).load()

    rotating = Store(url=url, encrypt_keys=[new, old])
    (loaded,) = rotating.load()  # old records decrypt with the second key, then re-encrypt
    assert loaded.token == cluster.token
    rotating.create_cluster(make_cluster("c2"))
    rotating.close()

    only_new = Store(url=url, encrypt_keys=[new])
    names = {c.name: c for c in only_new.load()}
    assert set(names) == {"c1", "c2"}
    assert names["c1"].tls_key == cluster.tls_key
    only_new.close()


def test_purge_deletes_old_finished_clusters_with_their_workers(db_url: str) -> None:
    store = Store(url=db_url, encrypt_keys=[make_key()])
    long_ago = now_ms() - 3_600_000
    old_stopped = make_cluster("old", status=ClusterStatus.STOPPED, stop_time=long_ago)
    old_failed = make_cluster("failed", status=ClusterStatus.FAILED, stop_time=long_ago)
    recent = make_cluster("recent", status=ClusterStatus.STOPPED, stop_time=now_ms())
    running = make_cluster("running", status=ClusterStatus.RUNNING)
    for c in (old_stopped, old_failed, recent, running):
        store.create_cluster(c)
    store.create_worker(Worker(name="old-w", cluster_name="old"))
    assert store.purge(60) == 2
    assert set(store.clusters) == {"recent", "running"}
    assert {c.name for c in store.load()} == {"recent", "running"}
    assert store.purge(60) == 0
    store.wait_written()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM workers").scalar() == 0
    store.close()


@pytest.mark.unit
def test_updates_refuse_unknown_fields() -> None:
    store = Store()
    cluster = make_cluster()
    store.create_cluster(cluster)
    with pytest.raises(TypeError, match="nonsense"):
        store.update_cluster(cluster, nonsense=1)
    worker = Worker(name="w", cluster_name="c1")
    store.create_worker(worker)
    with pytest.raises(TypeError, match="workers"):
        store.update_worker(worker, workers=1)
    with pytest.raises(StoreError, match="no cluster"):
        store.create_worker(Worker(name="w", cluster_name="nope"))
    store.delete_worker(worker)
    assert cluster.workers == {}
    store.close()


def test_a_database_from_before_sharing_is_upgraded_and_keeps_its_clusters(tmp_path: Path) -> None:
    """A database at revision 0002 (an older gateway's, no sharing columns) is refused until
    `gateway db upgrade` (migration 0003) adds them; its clusters load unshared, then sharing
    is written and read back."""
    from alembic import command

    from gateway_core import migrations

    path = tmp_path / "gw.sqlite"
    url = f"sqlite:///{path}"
    key = make_key()
    old = Store(url=url, encrypt_keys=[key])
    old.create_cluster(make_cluster("c1"))
    old.close()
    with old.engine.begin() as conn:  # back to what a gateway before sharing made
        command.downgrade(migrations.alembic_config(conn), "0002")
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(clusters)")}
    assert "shared_users" not in columns and "name" in columns
    with pytest.raises(StoreError, match="gateway db upgrade"):
        Store(url=url, encrypt_keys=[key])

    engine = store_module._make_engine(url, debug=False)
    before, after = migrations.upgrade(engine, where="test")
    engine.dispose()
    assert before.revision == "0002" and after.current
    store = Store(url=url, encrypt_keys=[key])
    (loaded,) = store.load()
    assert loaded.name == "c1" and loaded.shared_users == [] and loaded.shared_groups == []
    store.update_cluster(loaded, shared_users=["bob"], shared_groups=["physics"])
    store.close()
    assert store.failed_writes == 0
    again = Store(url=url, encrypt_keys=[key])
    (reloaded,) = again.load()
    assert reloaded.shared_users == ["bob"] and reloaded.shared_groups == ["physics"]
    again.close()


# -------------------------------------------------------------------------------------------
# Writing behind: memory at once, the database in order, off the event loop


def count_rows(engine: sqlalchemy.Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())


async def test_changes_are_in_memory_at_once_and_in_the_database_after_flush(
    db_url: str, connect: sqlalchemy.Engine
) -> None:
    key = make_key()
    store = Store(url=db_url, encrypt_keys=[key])
    gate = threading.Event()

    @sqlalchemy.event.listens_for(store.engine, "before_cursor_execute")
    def hold(*args: object) -> None:
        assert gate.wait(10), "the test never opened the gate"

    cluster = make_cluster()
    store.create_cluster(cluster)  # returns while the writer waits at the gate
    store.update_cluster(cluster, count=2)
    assert store.get("c1") is cluster and cluster.count == 2
    assert count_rows(connect, "clusters") == 0
    flushed = asyncio.ensure_future(store.flush())
    await asyncio.sleep(0.05)
    assert not flushed.done()  # flush waits for the writes made before it
    gate.set()
    await asyncio.wait_for(flushed, 10)
    assert count_rows(connect, "clusters") == 1
    await store.aclose()
    again = Store(url=db_url, encrypt_keys=[key])
    assert again.load()[0].count == 2
    again.close()


def test_writes_keep_their_order_and_the_values_they_had(db_url: str) -> None:
    url = db_url
    key = make_key()
    store = Store(url=url, encrypt_keys=[key])
    cluster = make_cluster()
    store.create_cluster(cluster)
    for count in range(1, 51):
        store.update_cluster(cluster, count=count)
    state = {"job": "1"}
    store.update_cluster(cluster, state=state)
    state["job"] = "changed behind the store's back"  # not a store change: not written
    worker = Worker(name="c1-w", cluster_name="c1")
    store.create_worker(worker)
    store.update_worker(worker, status=WorkerStatus.RUNNING)
    store.delete_worker(worker)
    store.create_cluster(make_cluster("c2"))
    store.delete_cluster("c2")
    store.close()  # writes what is queued
    with pytest.raises(StoreError, match="the store is closed; cannot write cluster c1"):
        store.update_cluster(cluster, count=1)

    again = Store(url=url, encrypt_keys=[key])
    (loaded,) = again.load()
    assert loaded.count == 50 and loaded.state == {"job": "1"} and loaded.workers == {}
    again.close()


async def test_a_failed_write_is_logged_loudly_and_later_writes_go_on(
    db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "WRITE_RETRY_DELAY", 0.001)
    url = db_url
    key = make_key()
    store = Store(url=url, encrypt_keys=[key])
    cluster = make_cluster()
    store.create_cluster(cluster)

    @sqlalchemy.event.listens_for(store.engine, "before_cursor_execute")
    def refuse_workers(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "INSERT INTO workers" in statement:
            raise sqlalchemy.exc.OperationalError(statement, (), Exception("disk I/O error"))

    store.create_worker(Worker(name="c1-w", cluster_name="c1"))
    store.update_cluster(cluster, count=3)
    await store.flush()
    lost = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lost) == 1 and "LOST WRITE: new worker c1-w" in lost[0].getMessage()
    retries = [r for r in caplog.records if "attempt" in r.getMessage()]
    assert len(retries) == store_module.WRITE_ATTEMPTS - 1
    assert store.failed_writes == 1
    await store.aclose()
    again = Store(url=url, encrypt_keys=[key])
    (loaded,) = again.load()
    assert loaded.count == 3 and loaded.workers == {}
    again.close()


async def test_writes_queued_meanwhile_commit_together_and_a_bad_one_loses_only_itself(
    db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "WRITE_RETRY_DELAY", 0.001)
    key = make_key()
    store = Store(url=db_url, encrypt_keys=[key])
    gate = threading.Event()
    commits: list[int] = []

    @sqlalchemy.event.listens_for(store.engine, "before_cursor_execute")
    def hold(conn: object, cursor: object, statement: str, *args: object) -> None:
        assert gate.wait(10), "the test never opened the gate"
        if "INSERT INTO workers" in statement and "bad" in str(args[0]):
            raise sqlalchemy.exc.OperationalError(statement, (), Exception("disk I/O error"))

    @sqlalchemy.event.listens_for(store.engine, "commit")
    def count(conn: object) -> None:
        commits.append(1)

    cluster = make_cluster()
    store.create_cluster(cluster)  # the writer takes it and waits at the gate
    await asyncio.sleep(0.05)
    for n in range(1, 101):  # queued meanwhile: one batch
        store.update_cluster(cluster, count=n)
    store.create_worker(Worker(name="c1-bad", cluster_name="c1"))
    store.create_worker(Worker(name="c1-good", cluster_name="c1"))
    gate.set()
    await store.flush()
    # The first write, then the batch fails on the bad worker and is written one by one.
    lost = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lost) == 1 and "LOST WRITE: new worker c1-bad" in lost[0].getMessage()
    assert store.failed_writes == 1
    writes_one_by_one = len(commits)
    caplog.clear()
    commits.clear()
    for n in range(101, 201):
        store.update_cluster(cluster, count=n)
    await store.flush()
    # 100 changes queued while the writer was busy or idle: far fewer commits than changes.
    assert 1 <= len(commits) < 20, (len(commits), writes_one_by_one)
    await store.aclose()
    again = Store(url=db_url, encrypt_keys=[key])
    (loaded,) = again.load()
    assert loaded.count == 200 and sorted(loaded.workers) == ["c1-good"]
    again.close()


async def test_flushes_waiting_together_share_one_commit_and_none_returns_early(
    db_url: str, connect: sqlalchemy.Engine
) -> None:
    """Group commit: the writes and `flush` barriers queued while the writer was busy are
    one transaction, every barrier released after it; no flush returns before its write is
    committed (read back by another connection)."""
    store = Store(url=db_url, encrypt_keys=[make_key()])
    gate = threading.Event()
    commits: list[int] = []

    @sqlalchemy.event.listens_for(store.engine, "before_cursor_execute")
    def hold(*args: object) -> None:
        assert gate.wait(10), "the test never opened the gate"

    @sqlalchemy.event.listens_for(store.engine, "commit")
    def count(conn: object) -> None:
        commits.append(1)

    store.create_cluster(make_cluster("c0"))  # the writer takes it and waits at the gate
    await asyncio.sleep(0.05)
    flushes = []
    for i in range(1, 41):  # 40 creates, each flushed, as 40 concurrent API creates do
        store.create_cluster(make_cluster(f"c{i}"))
        flushes.append(asyncio.ensure_future(store.flush()))
    await asyncio.sleep(0.05)
    assert not any(f.done() for f in flushes)  # nothing is committed yet
    gate.set()
    await asyncio.wait_for(asyncio.gather(*flushes), 30)
    # The held write, then the 40 creates and their 40 barriers: one more commit, not 40.
    assert len(commits) == 2
    with connect.connect() as conn:
        stored = conn.execute(sqlalchemy.text("SELECT count(*) FROM clusters")).scalar_one()
    assert stored == 41
    await store.aclose()


async def test_a_batch_sends_its_new_workers_and_their_updates_as_one_statement_each(
    db_url: str,
) -> None:
    """Consecutive inserts of workers, and consecutive updates of the same worker fields, in
    one batch go to the database as one executemany each, in their order; what is stored is
    what each write said."""
    key = make_key()
    store = Store(url=db_url, encrypt_keys=[key])
    cluster = make_cluster()
    store.create_cluster(cluster)
    await store.flush()
    gate = threading.Event()
    statements: list[tuple[str, bool]] = []

    @sqlalchemy.event.listens_for(store.engine, "before_cursor_execute")
    def hold(
        conn: object,
        cursor: object,
        statement: str,
        params: object,
        context: object,
        executemany: bool,
    ) -> None:
        assert gate.wait(10), "the test never opened the gate"
        statements.append((" ".join(statement.split()[:3]), executemany))

    store.update_cluster(cluster, count=10)  # the writer takes it and waits at the gate
    await asyncio.sleep(0.05)
    workers = [Worker(name=f"c1-w{i}", cluster_name="c1") for i in range(10)]
    for worker in workers:
        store.create_worker(worker)
    for i, worker in enumerate(workers):
        store.update_worker(worker, state={"pid": i})
    for worker in workers:
        store.update_worker(worker, status=WorkerStatus.RUNNING)
    gate.set()
    await store.flush()
    assert statements[1:] == [
        ("INSERT INTO workers", True),
        ("UPDATE workers SET", True),
        ("UPDATE workers SET", True),
    ]
    await store.aclose()
    again = Store(url=db_url, encrypt_keys=[key])
    (loaded,) = again.load()
    assert {w.name: (w.status, w.state) for w in loaded.workers.values()} == {
        f"c1-w{i}": (WorkerStatus.RUNNING, {"pid": i}) for i in range(10)
    }
    again.close()


async def test_a_batch_regroups_statements_by_kind_keeping_each_rows_order(db_url: str) -> None:
    """Interleaved writes of several clusters and their workers in one batch go out as one
    executemany per kind of statement where the rows allow; each row still sees its changes
    in order (same-field updates of one row, an update after another of the same row, a
    worker after its cluster's insert, a worker re-made after its delete)."""
    key = make_key()
    store = Store(url=db_url, encrypt_keys=[key])
    first = make_cluster("c0")
    store.create_cluster(first)
    await store.flush()
    gate = threading.Event()
    statements: list[str] = []

    @sqlalchemy.event.listens_for(store.engine, "before_cursor_execute")
    def hold(conn: object, cursor: object, statement: str, *args: object) -> None:
        assert gate.wait(10), "the test never opened the gate"
        statements.append(" ".join(statement.split()[:3]))

    store.update_cluster(first, count=1)  # the writer takes it and waits at the gate
    await asyncio.sleep(0.05)
    clusters = [make_cluster(f"c{i}") for i in range(1, 4)]
    for cluster in clusters:  # as concurrent creates interleave their writes
        store.create_cluster(cluster)
        store.update_cluster(cluster, state={"pid": cluster.name})
    for cluster in clusters:
        store.update_cluster(cluster, count=2)
        for i in range(3):
            store.create_worker(Worker(name=f"{cluster.name}-w{i}", cluster_name=cluster.name))
        store.update_cluster(cluster, status=ClusterStatus.RUNNING)
        store.update_cluster(cluster, count=3)  # after the status update of the same row
    for cluster in clusters:
        for worker in cluster.workers.values():
            store.update_worker(worker, state={"n": 1})
            store.update_worker(worker, status=WorkerStatus.RUNNING)
            store.update_worker(worker, state={"n": 2})  # the last state wins
    gone = clusters[0].workers["c1-w0"]
    store.delete_worker(gone)
    store.create_worker(Worker(name="c1-w0", cluster_name="c1", state={"again": True}))
    gate.set()
    await store.flush()
    batch = statements[1:]
    # Per kind of statement one executemany for the 3 clusters (or 9 workers), not one
    # statement per write: 3 inserts and 15 updates of clusters, 9 + 1 inserts, 27 updates
    # of workers and a delete were written in 10 statements.
    assert batch == [
        "INSERT INTO clusters",
        "UPDATE clusters SET",  # state
        "UPDATE clusters SET",  # count = 2
        "INSERT INTO workers",
        "UPDATE clusters SET",  # status
        "UPDATE clusters SET",  # count = 3
        "UPDATE workers SET",  # state n = 1
        "UPDATE workers SET",  # status
        "UPDATE workers SET",  # state n = 2
        "DELETE FROM workers",
        "INSERT INTO workers",
    ], batch
    await store.aclose()
    again = Store(url=db_url, encrypt_keys=[key])
    loaded = {c.name: c for c in again.load()}
    for cluster in clusters:
        stored = loaded[cluster.name]
        assert (stored.count, stored.status, stored.state) == (
            3,
            ClusterStatus.RUNNING,
            {"pid": cluster.name},
        )
        assert sorted(stored.workers) == [f"{cluster.name}-w{i}" for i in range(3)]
        for worker in stored.workers.values():
            if worker.name == "c1-w0":
                assert (worker.status, worker.state) == (WorkerStatus.PENDING, {"again": True})
            else:
                assert (worker.status, worker.state) == (WorkerStatus.RUNNING, {"n": 2})
    again.close()


async def test_a_create_queued_ahead_commits_before_the_backlog_and_keeps_its_rows_order(
    db_url: str, connect: sqlalchemy.Engine
) -> None:
    """`create_cluster(ahead=True)` and `flush_ahead`: the insert is committed in the writer's
    next turn, before the writes queued ahead of it (more than a batch), so a create answers
    without waiting for the backlog; a change of the new cluster queued after it still lands
    after it, and the backlog is all written."""
    key = make_key()
    store = Store(url=db_url, encrypt_keys=[key])
    busy = make_cluster("c0")
    store.create_cluster(busy)
    await store.flush()
    gate = threading.Event()
    log: list[str] = []

    @sqlalchemy.event.listens_for(store.engine, "before_cursor_execute")
    def hold(conn: object, cursor: object, statement: str, params: object, *args: object) -> None:
        assert gate.wait(10), "the test never opened the gate"
        words = statement.split()
        log.append(" ".join(words[:3]) + (" new" if "new" in str(params) else ""))

    @sqlalchemy.event.listens_for(store.engine, "commit")
    def count(conn: object) -> None:
        log.append("COMMIT")

    store.update_cluster(busy, count=1)  # the writer takes it and waits at the gate
    await asyncio.sleep(0.05)
    backlog = store_module.WRITE_BATCH + 50
    for i in range(backlog):  # the workers of a cluster being started, and more
        store.create_worker(Worker(name=f"c0-w{i}", cluster_name="c0"))
    everything = asyncio.ensure_future(store.flush())
    new = make_cluster("new")
    store.create_cluster(new, ahead=True)
    created = asyncio.ensure_future(store.flush_ahead())
    store.update_cluster(new, count=7)  # queued after the insert, not ahead
    await asyncio.sleep(0.05)
    assert not created.done()  # nothing is committed yet
    gate.set()
    await asyncio.wait_for(created, 30)
    with connect.connect() as conn:
        row = conn.execute(sqlalchemy.text("SELECT name FROM clusters WHERE name = 'new'")).all()
    assert row == [("new",)]
    await asyncio.wait_for(everything, 30)
    await store.flush()
    # The held write; then the insert ahead, alone, before the first batch of the backlog.
    assert log[:5] == [
        "UPDATE clusters SET",
        "COMMIT",
        "INSERT INTO clusters new",
        "COMMIT",
        "INSERT INTO workers",
    ], log[:5]
    await store.aclose()
    again = Store(url=db_url, encrypt_keys=[key])
    loaded = {c.name: c for c in again.load()}
    assert loaded["new"].count == 7
    assert len(loaded["c0"].workers) == backlog
    again.close()


@pytest.mark.system
def test_a_postgres_store_keeps_a_connection_for_each_thread_that_may_use_it(
    postgres_url: str,
) -> None:
    """The writer and every thread of asyncio's default executor (lease, fence and sync
    statements) can hold a connection at once without the pool opening and closing more."""
    import concurrent.futures

    store = Store(url=postgres_url, encrypt_keys=[make_key()])
    try:
        executor_threads = concurrent.futures.ThreadPoolExecutor()._max_workers
        pool = store.engine.pool
        assert isinstance(pool, sqlalchemy.pool.QueuePool)
        assert pool.size() >= executor_threads + 1
    finally:
        store.close()


# -------------------------------------------------------------------------------------------
# The PostgreSQL the tests need: a failure under CI, a skip naming the script elsewhere


@pytest.mark.unit
@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_a_missing_postgres_fails_under_ci_and_is_skipped_elsewhere(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    from gateway_core.testing.postgres import POSTGRES_URL_ENV, postgres_database

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv(POSTGRES_URL_ENV, f"postgresql+psycopg://u:p@127.0.0.1:{closed}/db")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome) as info, postgres_database():
        pass
    assert "core/ci/start-postgres.sh" in str(info.value)
    assert "Connection refused" in str(info.value)
    assert "u:p@" not in str(info.value)  # no password in the message

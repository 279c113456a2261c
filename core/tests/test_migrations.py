"""Tests of the store's schema migrations: the revisions build exactly the store's tables, a
database made before migrations is recognised and upgraded with its data, a database behind or
ahead is refused at start with what to run, and replicas starting at once create it once.

Each test runs on a SQLite file and on a database of its own on the real PostgreSQL (the
`postgres_url` fixture; a missing server fails under CI).
"""

from __future__ import annotations

import base64
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from cryptography.fernet import Fernet
from sqlalchemy.pool import NullPool

from gateway_core import migrations
from gateway_core.models import ClusterStatus, new_token
from gateway_core.store import Store, StoreError, metadata


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.unit),
        pytest.param("postgresql", marks=pytest.mark.system),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gw.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(db_url, poolclass=NullPool)
    yield engine
    engine.dispose()


def make_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def differences(engine: sa.Engine, target: sa.MetaData) -> list[object]:
    """What autogenerate would write to bring the database to ``target`` (empty: the same)."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, target))


# -------------------------------------------------------------------------------------------
# The revisions and the tables are the same schema


def test_the_revisions_build_exactly_the_stores_tables(engine: sa.Engine) -> None:
    before, after = migrations.upgrade(engine, where="test")  # every revision, from empty
    assert before.empty and after.current and after.revision == migrations.head_revision()
    assert differences(engine, metadata) == [], (
        "the store's tables differ from what the migrations build: add a revision with "
        '`python -m gateway_core.migrations revision -m "..."` (docs/architecture.md)'
    )


def test_the_check_sees_a_table_change_without_a_migration(engine: sa.Engine) -> None:
    migrations.upgrade(engine, where="test")
    changed = sa.MetaData()
    for table in metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["clusters"].append_column(sa.Column("shared_with", sa.JSON, nullable=True))
    found = differences(engine, changed)
    assert [(d[0], d[3].name) for d in found if isinstance(d, tuple)] == [
        ("add_column", "shared_with")
    ]


def test_a_new_store_is_made_at_the_newest_revision_and_stamped(db_url: str) -> None:
    store = Store(url=db_url, encrypt_keys=[make_key()])
    assert store.schema.current
    with store.engine.connect() as conn:
        assert migrations.inspect_schema(conn).revision == migrations.head_revision()
    store.close()
    engine = sa.create_engine(db_url, poolclass=NullPool)
    assert differences(engine, metadata) == []  # create_all and the revisions agree
    engine.dispose()
    Store(url=db_url, encrypt_keys=[make_key()]).close()  # a second start finds it current


# -------------------------------------------------------------------------------------------
# A database made by the gateway before migrations (main before this change)

# The tables exactly as the store defined them before migrations existed (frozen: never edit).
LEGACY = sa.MetaData()
sa.Table(
    "clusters",
    LEGACY,
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
)
sa.Table(
    "workers",
    LEGACY,
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
)


def make_legacy_database(engine: sa.Engine, key: str) -> str:
    """What the store before migrations left: its tables (create_all), a running cluster with
    a worker, no alembic_version. Returns the cluster's token."""
    fernet = Fernet(base64.urlsafe_b64encode(base64.b64decode(key)))
    token = new_token()
    LEGACY.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            LEGACY.tables["clusters"].insert(),
            {
                "name": "old",
                "username": "alice",
                "token": fernet.encrypt(token.encode()),
                "options": {"worker_cores": 2},
                "config": {"worker_cores": 2},
                "status": int(ClusterStatus.RUNNING),
                "target": int(ClusterStatus.RUNNING),
                "count": 1,
                "state": {"pid": 12},
                "scheduler_address": "tls://127.0.0.1:1",
                "dashboard_address": "",
                "api_address": "",
                "tls_cert": b"CERT",
                "tls_key": fernet.encrypt(b"KEY"),
                "start_time": 1,
                "stop_time": None,
                "last_heartbeat": None,
                "worker_start_failures": 0,
                "reason": None,
            },
        )
        conn.execute(
            LEGACY.tables["workers"].insert(),
            {
                "cluster_name": "old",
                "name": "old-w",
                "status": 3,
                "target": 3,
                "state": {"pid": 13},
                "start_time": 2,
                "stop_time": None,
                "close_expected": False,
                "reason": None,
            },
        )
    return token


def test_the_baseline_is_the_schema_from_before_migrations(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), migrations.BASELINE)
    assert differences(engine, LEGACY) == []
    assert {t: {c.name for c in LEGACY.tables[t].columns} for t in LEGACY.tables} == {
        t: set(cols) for t, cols in migrations.LEGACY_TABLES.items()
    }


def test_a_database_from_before_migrations_is_recognised_and_upgraded(
    db_url: str, engine: sa.Engine
) -> None:
    key = make_key()
    token = make_legacy_database(engine, key)
    with engine.connect() as conn:
        state = migrations.inspect_schema(conn)
    assert state.legacy and state.revision == migrations.BASELINE

    if migrations.head_revision() == migrations.BASELINE:
        store = Store(url=db_url, encrypt_keys=[key])  # stamped at start: nothing to change
    else:
        with pytest.raises(StoreError) as info:
            Store(url=db_url, encrypt_keys=[key])
        message = str(info.value)
        assert "gateway db upgrade" in message and "made before migrations" in message
        with engine.connect() as conn:  # refused, and left as it was
            assert migrations.inspect_schema(conn) == state
        before, after = migrations.upgrade(engine, where="test")
        assert before.legacy and after.current
        store = Store(url=db_url, encrypt_keys=[key])
    (cluster,) = store.load()
    assert cluster.name == "old" and cluster.token == token and cluster.tls_key == b"KEY"
    assert cluster.status is ClusterStatus.RUNNING and cluster.state == {"pid": 12}
    assert list(cluster.workers) == ["old-w"]
    store.close()
    assert differences(engine, metadata) == []
    with engine.connect() as conn:
        assert migrations.inspect_schema(conn).current


def test_a_database_behind_is_refused_with_the_command_and_upgraded_by_it(
    db_url: str, engine: sa.Engine
) -> None:
    assert migrations.head_revision() != migrations.BASELINE
    with engine.begin() as conn:  # a database a gateway of the baseline revision made
        command.upgrade(migrations.alembic_config(conn), migrations.BASELINE)
    with pytest.raises(StoreError) as info:
        Store(url=db_url, encrypt_keys=[make_key()])
    message = str(info.value)
    assert f"at revision {migrations.BASELINE} (Baseline" in message
    assert f"behind the newest, {migrations.head_revision()}" in message
    assert "run `gateway db upgrade`" in message and "back the database up first" in message
    before, after = migrations.upgrade(engine, where="test")
    assert before.revision == migrations.BASELINE and after.current
    Store(url=db_url, encrypt_keys=[make_key()]).close()


def test_a_database_ahead_or_foreign_is_refused(db_url: str, engine: sa.Engine) -> None:
    Store(url=db_url, encrypt_keys=[make_key()]).close()
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    for attempt in (
        lambda: Store(url=db_url, encrypt_keys=[make_key()]),
        lambda: migrations.upgrade(engine, where="db"),
    ):
        with pytest.raises((StoreError, migrations.SchemaError)) as info:
            attempt()
        assert "revision 9999, which this gateway does not know" in str(info.value)
        assert "a newer gateway upgraded it" in str(info.value)

    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE workers"))
        conn.execute(sa.text("DROP TABLE alembic_version"))
    with pytest.raises(
        StoreError, match=r"not those of a gateway made before migrations: .*no table workers"
    ):
        Store(url=db_url, encrypt_keys=[make_key()])


@pytest.mark.system
def test_replicas_starting_at_once_on_an_empty_database_create_it_once(postgres_url: str) -> None:
    db_url = postgres_url
    key = make_key()
    stores: list[Store] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait(10)
            stores.append(Store(url=db_url, encrypt_keys=[key]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(stores) == 4
    for store in stores:
        store.close()
    engine = sa.create_engine(db_url, poolclass=NullPool)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    engine.dispose()


@pytest.mark.unit
def test_a_new_revision_is_numbered_after_the_newest_and_runs(tmp_path: Path) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(
        migrations.HERE, directory, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    head = migrations.head_revision()
    path = migrations.new_revision("cluster sharing", directory=directory)
    number = f"{int(head) + 1:04d}"
    assert path == directory / "versions" / f"{number}_cluster_sharing.py"
    text = path.read_text()
    assert f'revision = "{number}"' in text and f'down_revision = "{head}"' in text
    assert "op." not in text  # the tables match the newest revision: nothing to do
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'gw.sqlite'}")
    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn, directory=directory), "head")
        assert MigrationContext.configure(conn).get_current_revision() == number
    engine.dispose()
    assert migrations.head_revision() == head  # the package's own revisions are untouched

"""Schema migrations of the store's database: Alembic revisions (versions/), and what the store
and the ``gateway db`` commands do with them.

Owns `prepare` (run by `Store` at start: makes an empty database at the newest revision,
recognises a database made before migrations existed, refuses one that is behind or ahead),
`upgrade`, `inspect_schema` and its `SchemaState`, `head_revision`, `new_revision` (for
developers adding a revision) and `SchemaError`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from attrs import define
from sqlalchemy.engine import Connection, Engine

HERE = Path(__file__).resolve().parent

BASELINE = "0001"
"""The revision of the schema the store made before it had migrations."""

LEGACY_TABLES: dict[str, frozenset[str]] = {
    "clusters": frozenset(
        [
            "name",
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
        ]
    ),
    "workers": frozenset(
        [
            "cluster_name",
            "name",
            "status",
            "target",
            "state",
            "start_time",
            "stop_time",
            "close_expected",
            "reason",
        ]
    ),
}
"""The tables (and their columns) of a database made before migrations: revision `BASELINE`."""

VERSION_TABLE = "alembic_version"

_LOCK_KEY = 0x6761_7465_7761_7900
"""PostgreSQL advisory lock held while a process checks, creates or upgrades the schema, so
replicas starting at once on an empty database create it once."""

UPGRADE_COMMAND = "gateway db upgrade"


log = logging.getLogger("gateway.store")


class SchemaError(Exception):
    """The database's schema is not the one this gateway runs on (behind, ahead, or foreign)."""


@define(kw_only=True, frozen=True)
class SchemaState:
    """What a database holds, as far as the migrations are concerned."""

    revision: str | None
    """The revision it is at: its ``alembic_version``, `BASELINE` for a database made before
    migrations, None for an empty one."""
    head: str
    """The newest revision this gateway knows."""
    legacy: bool
    """The store's tables without ``alembic_version``: made before migrations, not stamped."""

    @property
    def empty(self) -> bool:
        """None of the store's tables: the first start (or `upgrade`) creates them."""
        return self.revision is None

    @property
    def current(self) -> bool:
        """At the newest revision and stamped: the gateway runs on it as it is."""
        return self.revision == self.head and not self.legacy

    @property
    def known(self) -> bool:
        """Empty, or at a revision this gateway has (False: a newer gateway upgraded it)."""
        return self.revision is None or _has_revision(self.revision)

    def describe(self) -> str:
        """One line: where the database is and what, if anything, to do about it."""
        if self.empty:
            return (
                f"empty (no gateway tables); the gateway's first start creates them at "
                f"revision {self.head}, or run `{UPGRADE_COMMAND}`"
            )
        assert self.revision is not None
        if not self.known:
            return (
                f"at revision {self.revision}, which this gateway does not know (its newest is "
                f"{self.head}): a newer gateway upgraded it; run that version or a later one"
            )
        label = f"{self.revision} ({_title(self.revision)})"
        if self.legacy:
            label += ", made before migrations and not stamped yet"
        if self.current:
            return f"at revision {label}, the newest: up to date"
        if self.revision == self.head:
            return f"at revision {label}, the newest; the next start stamps it"
        return (
            f"at revision {label}, behind the newest, {self.head} ({_title(self.head)}); "
            f"run `{UPGRADE_COMMAND}`"
        )


def alembic_config(connection: Connection | None = None, *, directory: Path = HERE) -> Config:
    """Alembic's config for the gateway's revisions (those in ``directory``), using
    ``connection`` when given."""
    config = Config()
    config.set_main_option("script_location", str(directory))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def script_directory() -> ScriptDirectory:
    """The revisions shipped with this gateway (read once per process)."""
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this gateway knows."""
    head = script_directory().get_current_head()
    if head is None:  # pragma: no cover - the package always ships the baseline
        raise SchemaError(f"no migration revisions in {HERE / 'versions'}")
    return head


def inspect_schema(conn: Connection) -> SchemaState:
    """Where the database behind ``conn`` is (see `SchemaState`)."""
    tables = set(sa.inspect(conn).get_table_names())
    revision = None
    if VERSION_TABLE in tables:
        revision = MigrationContext.configure(conn).get_current_revision()
    legacy = revision is None and bool(tables & set(LEGACY_TABLES))
    return SchemaState(
        revision=BASELINE if legacy else revision, head=head_revision(), legacy=legacy
    )


def prepare(engine: Engine, metadata: sa.MetaData, *, where: str) -> SchemaState:
    """Make the database behind ``engine`` ready for the store, or raise `SchemaError`.

    An empty database gets ``metadata``'s tables and is stamped with the newest revision; a
    database made before migrations that matches the baseline is stamped with it. The store
    never changes the schema of a database that holds data: one that is behind is refused with
    the command that upgrades it (`upgrade`), one that is ahead with what to run instead.
    ``where`` names the database in messages (a URL without password).
    """
    with _quiet_alembic(), engine.begin() as conn:
        _lock(conn)
        state = inspect_schema(conn)
        if state.empty:
            metadata.create_all(conn)
            _stamp(conn, state.head)
            if engine.url.database not in (None, "", ":memory:"):
                log.info("Created the tables of %s at schema revision %s", where, state.head)
            return SchemaState(revision=state.head, head=state.head, legacy=False)
        if state.legacy:
            _check_legacy(conn, where)
            if state.head == BASELINE:
                _stamp(conn, BASELINE)
                log.info("Stamped %s, made before migrations, as revision %s", where, BASELINE)
                return SchemaState(revision=BASELINE, head=state.head, legacy=False)
        if state.current:
            return state
    if not state.known:
        raise SchemaError(f"the database {where} is {state.describe()}")
    raise SchemaError(
        f"the database {where} is {state.describe()} (with this config; back the database "
        "up first). The gateway does not change the schema of a database by itself: stop "
        "every gateway on it, upgrade once, then start them again"
    )


def upgrade(engine: Engine, *, where: str) -> tuple[SchemaState, SchemaState]:
    """Bring the database behind ``engine`` to the newest revision: create an empty one by
    running every revision, stamp one made before migrations with the baseline first, then
    apply the revisions it lacks. Returns its state before and after; raises `SchemaError`
    for a database a newer gateway upgraded, or tables that are not the gateway's."""
    with engine.begin() as conn:
        _lock(conn)
        before = inspect_schema(conn)
        if not before.known:
            raise SchemaError(f"the database {where} is {before.describe()}")
        if before.legacy:
            _check_legacy(conn, where)
            _stamp(conn, BASELINE)
        if not before.current:
            command.upgrade(alembic_config(conn), "head")
        after = inspect_schema(conn)
    return before, after


def new_revision(message: str, *, autogenerate: bool = True, directory: Path = HERE) -> Path:
    """Write versions/<next number>_<message>.py in ``directory`` (the gateway's migrations by
    default) and return it: with ``autogenerate``, the operations that bring a database at the
    current head to the store's tables, for the developer to review. Run it in a source
    checkout: ``python -m gateway_core.migrations revision -m "what changes"``."""
    scripts = ScriptDirectory.from_config(alembic_config(directory=directory))
    numbers = [int(r.revision) for r in scripts.walk_revisions() if r.revision.isdigit()]
    rev_id = f"{max(numbers, default=0) + 1:04d}"
    with tempfile.TemporaryDirectory() as tmp:
        # A scratch database at the current head, for autogenerate to compare the tables with.
        engine = sa.create_engine(f"sqlite:///{Path(tmp) / 'head.sqlite'}")
        try:
            with engine.begin() as conn:
                command.upgrade(alembic_config(conn, directory=directory), "head")
                script = command.revision(
                    alembic_config(conn, directory=directory),
                    message=message,
                    autogenerate=autogenerate,
                    rev_id=rev_id,
                )
        finally:
            engine.dispose()
    if directory == HERE:
        script_directory.cache_clear()
    if script is None or isinstance(script, list):  # pragma: no cover - one head, one script
        raise SchemaError("alembic wrote no single revision")
    return Path(script.path)


def _has_revision(revision: str) -> bool:
    try:
        return script_directory().get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - alembic raises several kinds for an unknown id
        return False


def _title(revision: str) -> str:
    """The first line of a revision's docstring, without its trailing period."""
    script = script_directory().get_revision(revision)
    lines = str(script.doc if script is not None else "").strip().splitlines()
    return re.sub(r"\.$", "", lines[0]) if lines else "no title"


@contextlib.contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Alembic logs two INFO lines ("Context impl ...") each time it looks at a database: not
    worth a gateway's start-up log."""
    logger = logging.getLogger("alembic.runtime.migration")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})


def _stamp(conn: Connection, revision: str) -> None:
    MigrationContext.configure(conn).stamp(script_directory(), revision)


def _check_legacy(conn: Connection, where: str) -> None:
    """Refuse tables named like the store's that are not what a gateway made."""
    inspector = sa.inspect(conn)
    problems = []
    tables = set(inspector.get_table_names())
    for table, expected in LEGACY_TABLES.items():
        if table not in tables:
            problems.append(f"no table {table}")
            continue
        columns = {c["name"] for c in inspector.get_columns(table)}
        if missing := sorted(expected - columns):
            problems.append(f"{table} lacks {', '.join(missing)}")
        if extra := sorted(columns - expected):
            problems.append(f"{table} has unexpected {', '.join(extra)}")
    if problems:
        raise SchemaError(
            f"the database {where} has tables without a schema revision ({VERSION_TABLE}) that "
            f"are not those of a gateway made before migrations: {'; '.join(problems)}. Point "
            "db_url at the gateway's own database"
        )

"""A throwaway PostgreSQL database per test, on the server core/ci/start-postgres.sh starts.

Owns `POSTGRES_URL_ENV`, `DEFAULT_POSTGRES_URL`, `server_url`, `postgres_database` (makes one
database, yields its URL, drops it) and the rule for a server that cannot be reached: the test
fails under CI (``CI`` set), and is skipped elsewhere with the command that starts one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import pytest

POSTGRES_URL_ENV = "GATEWAY_TEST_POSTGRES_URL"
"""The environment variable naming the server (and a database on it the tests may connect to)."""

DEFAULT_POSTGRES_URL = "postgresql+psycopg://gateway:gateway@127.0.0.1:54329/gateway_test"
"""What core/ci/start-postgres.sh sets up and prints, used when `POSTGRES_URL_ENV` is unset."""

START_SCRIPT = "core/ci/start-postgres.sh"


def server_url() -> str:
    """The URL of the tests' PostgreSQL: `POSTGRES_URL_ENV`, else `DEFAULT_POSTGRES_URL`."""
    return os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL


def in_ci() -> bool:
    """Whether this run is CI's (``CI`` set to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """Fail (under CI) or skip (elsewhere) a test that needs PostgreSQL, saying how to get it."""
    message = (
        f"PostgreSQL is not available: {reason}. Start it with `{START_SCRIPT}` (as root; "
        f"`--install` also installs Debian's postgresql), or set {POSTGRES_URL_ENV} to a "
        "server where the role may create databases"
    )
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@contextmanager
def postgres_database(prefix: str = "gw_test") -> Iterator[str]:
    """Create an empty database on the tests' server, yield its URL (with password: pass it
    to a Store or a gateway config), and drop it afterwards, disconnecting whoever is left."""
    import sqlalchemy as sa
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    url = server_url()
    try:
        parsed = sa.make_url(url)
        admin = sa.create_engine(parsed, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    except (ArgumentError, ImportError) as exc:
        unavailable(f"cannot use {POSTGRES_URL_ENV}={url!r}: {exc}")
    shown = parsed.render_as_string(hide_password=True)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except SQLAlchemyError as exc:
        admin.dispose()
        orig = getattr(exc, "orig", None) or exc
        unavailable(f"{shown}: {' '.join(str(orig).split())}")
    try:
        yield parsed.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

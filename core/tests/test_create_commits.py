"""Concurrent creates through the API share the store's commits and are durable when answered.

Owns the check of the create path's group commit: the quota lock covers the record, not the
wait for its commit, so N creates at once cost a few commits of the store, not N.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy.pool import NullPool

CREATES = 40


pytestmark = pytest.mark.unit


@pytest.fixture
def db_url(tmp_path: Any) -> str:
    """A SQLite file of this test's own. (Not run on PostgreSQL: there the replicas' lease
    statements queue at the same gate and make the test take minutes; the store's own group
    commit test, core/tests/test_store.py, runs on both.)"""
    return f"sqlite:///{tmp_path / 'gw.sqlite'}"


async def test_concurrent_creates_share_commits_and_each_is_stored_when_answered(
    make_gateway: Any, make_api_client: Any, db_url: str
) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    gw = await make_gateway(
        {
            "gateway": {"backend": "simulated", "db_url": db_url, "db_encrypt_keys": [key]},
            "backend": {"simulated": {"cluster_start_timeout": 600.0}},
        }
    )
    store = gw.backend.store
    await store.flush()
    gate = threading.Event()
    commits: list[int] = []

    # Every statement of the store's engine waits for the gate: the writes of the creates pile
    # up behind the first one, as they do behind a slow disk.
    @sqlalchemy.event.listens_for(store.engine, "before_cursor_execute")
    def hold(*args: object) -> None:
        assert gate.wait(30), "the test never opened the gate"

    @sqlalchemy.event.listens_for(store.engine, "commit")
    def count(conn: object) -> None:
        commits.append(1)

    users = [make_api_client(gw, f"user{i}") for i in range(CREATES)]
    posts = [
        asyncio.ensure_future(u.post("/api/v1/clusters/", {"cluster_options": {}})) for u in users
    ]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    # All creates get their record while the first write waits: none waits for another's
    # commit (before, the quota lock was held across the commit: one create at a time).
    while len(store.clusters) < CREATES:
        assert loop.time() < deadline, f"{len(store.clusters)} of {CREATES} creates got in"
        assert not any(p.done() for p in posts), [p.result() for p in posts if p.done()]
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    assert not any(p.done() for p in posts)  # none answered before its record is committed
    gate.set()
    answers = await asyncio.wait_for(asyncio.gather(*posts), 60)
    assert [a.status for a in answers] == [201] * CREATES
    used = len(commits)
    # Each answered create is in the database, read by a connection of its own.
    engine = sqlalchemy.create_engine(db_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            stored = set(conn.execute(sqlalchemy.text("SELECT name FROM clusters")).scalars())
    finally:
        engine.dispose()
    assert {a.body["name"] for a in answers} <= stored
    # The held write, then everything queued behind it (the creates, their starts) in a few
    # batches: far fewer commits than creates.
    assert used <= CREATES // 4, used

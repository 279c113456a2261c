"""The original `dask-gateway` client (PyPI) on the clusters the chaos test leaves running.

Runs only in `nox -s compat` (which installs the client and the PostgreSQL driver; CI starts
the server first): the chaos of test_chaos.py on three replicas, then the original client
connects to each running cluster through a replica that did not start it, and computes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from replicaset import replica_set
from test_chaos import (
    LEASE_TTL,
    chaos_seconds,
    chaos_seed,
    check_settled,
    check_takeovers,
    compute,
    finish,
    other_than_starter,
    run_chaos,
)

pytestmark = pytest.mark.compat


@pytest.mark.system
@pytest.mark.integration
@pytest.mark.usefixtures("no_process_left_behind")
def test_the_original_client_computes_through_another_replica_after_chaos(
    tmp_path: Path, postgres_url: str
) -> None:
    try:
        from dask_gateway import BasicAuth, Gateway
    except ImportError:
        pytest.fail("the compat tier needs the original client: run it with `nox -s compat`")
    with replica_set(tmp_path, postgres_url, ("a", "b", "c"), lease_ttl=LEASE_TTL) as three:
        chaos = run_chaos(three, seconds=chaos_seconds(60), seed=chaos_seed())
        check_takeovers(chaos)
        check_settled(chaos)
        active = chaos.active()
        assert active, "the chaos left no cluster running"
        for wanted in active:
            via = other_than_starter(chaos, wanted.name)
            assert compute(Gateway, BasicAuth("alice"), via, wanted.name, wanted.count) == 45
        finish(chaos)

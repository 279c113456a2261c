"""Tests of the store's leases: one holder at a time, takeover after expiry with a larger
fencing token, renew and release only by the holder, and replicas asking at once on the real
PostgreSQL (exactly one wins each round).

Runs on in-memory SQLite, a SQLite file and a database of its own on PostgreSQL.
"""

from __future__ import annotations

import base64
import os
import threading
from pathlib import Path

import pytest

from gateway_core.store import Lease, Store


@pytest.fixture(
    params=[
        pytest.param("memory", marks=pytest.mark.unit),
        pytest.param("sqlite", marks=pytest.mark.unit),
        pytest.param("postgresql", marks=pytest.mark.system),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    key = base64.b64encode(os.urandom(32)).decode()
    if request.param == "memory":
        made = Store()
    elif request.param == "sqlite":
        made = Store(url=f"sqlite:///{tmp_path / 'gw.sqlite'}", encrypt_keys=[key])
    else:
        made = Store(url=str(request.getfixturevalue("postgres_url")), encrypt_keys=[key])
    request.addfinalizer(made.close)
    return made


T0 = 1_000_000_000_000  # ms since the epoch: the tests' own clock


def test_one_holder_at_a_time_and_takeover_after_expiry_fences_the_old_one(store: Store) -> None:
    a = store.acquire_lease("c1", "replica-a", 10, now=T0)
    assert a == Lease(name="c1", holder="replica-a", token=1, expires=T0 + 10_000)
    assert store.acquire_lease("c1", "replica-b", 10, now=T0 + 9_999) is None  # still a's
    again = store.acquire_lease("c1", "replica-a", 10, now=T0 + 5_000)  # a extends its own
    assert again is not None and again.token == 1 and again.expires == T0 + 15_000

    b = store.acquire_lease("c1", "replica-b", 10, now=T0 + 15_001)  # a's has expired
    assert b is not None and b.holder == "replica-b" and b.token == 2
    # a, back from a pause, has lost it: no renew, no release, no extending b's lease.
    assert store.renew_lease(again, 10, now=T0 + 15_002) is None
    assert not store.release_lease(again)
    assert store.acquire_lease("c1", "replica-a", 10, now=T0 + 15_003) is None

    renewed = store.renew_lease(b, 10, now=T0 + 20_000)
    assert renewed == Lease(name="c1", holder="replica-b", token=2, expires=T0 + 30_000)
    assert store.release_lease(renewed)
    c = store.acquire_lease("c1", "replica-a", 10, now=T0 + 20_001)  # released: free at once
    assert c is not None and c.token == 3
    other = store.acquire_lease("c2", "replica-b", 10, now=T0 + 20_001)  # leases are separate
    assert other is not None and other.token == 1


def test_an_expired_lease_cannot_be_renewed_but_its_holder_may_take_it_again(
    store: Store,
) -> None:
    a = store.acquire_lease("c1", "replica-a", 1, now=T0)
    assert a is not None
    assert store.renew_lease(a, 1, now=T0 + 1_001) is None  # expired: the work must stop
    back = store.acquire_lease("c1", "replica-a", 1, now=T0 + 1_002)
    assert back is not None and back.token == 1  # nobody held it meanwhile: same token


@pytest.mark.system
def test_replicas_asking_at_once_on_postgres_get_one_holder_per_round(postgres_url: str) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    replicas = [Store(url=postgres_url, encrypt_keys=[key]) for _ in range(6)]
    try:
        previous: Lease | None = None
        for round_ in range(10):
            now = T0 + round_ * 10_000  # each round after the last round's lease expired
            barrier = threading.Barrier(len(replicas))
            won: list[Lease] = []
            errors: list[BaseException] = []

            def ask(
                i: int,
                now: int = now,
                barrier: threading.Barrier = barrier,
                won: list[Lease] = won,
                errors: list[BaseException] = errors,
            ) -> None:
                try:
                    barrier.wait(30)
                    lease = replicas[i].acquire_lease("c1", f"replica-{i}", 5, now=now)
                    if lease is not None:
                        won.append(lease)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(replicas))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert errors == []
            assert len(won) == 1, f"round {round_}: {won}"
            (lease,) = won
            assert lease.expires == now + 5_000
            # One more at each change of holder; the same holder again keeps its token.
            if previous is None:
                assert lease.token == 1
            elif lease.holder == previous.holder:
                assert lease.token == previous.token
            else:
                assert lease.token == previous.token + 1
            previous = lease
    finally:
        for replica in replicas:
            replica.close()

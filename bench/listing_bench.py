"""Benchmark of one user's cluster listing with few and with many other users' clusters.
Owns the run: the store fills, the timed calls, and bench/results/listing.{md,json}.
"""

# What is timed, in this process, on a `ProcessBackend` (in-memory store, the in-process test
# driver, nothing started) with the `ClusterManager` in front, for one user who owns
# ``--own`` clusters and has ``--own`` more shared with it (half by name, half through a
# group), amid N other clusters of 100 other users (some shared with a group the user is
# not in), N = each of ``--others``:
#
# - ``own``: the user's active clusters (`ProcessBackend.list_clusters(username=...,
#   statuses=active)`, what ``GET /api/v1/clusters`` asks);
# - ``visible``: its own plus those shared with it (`ClusterManager.list_visible_clusters`,
#   what ``GET /api/v2/clusters`` asks).
#
# Each is timed twice side by side: through the store's indexes (the code as it is) and
# through a scan of every record (`scan_own`, `scan_visible`: the code before the indexes,
# kept here for the ratio). Both answers are checked equal before timing. Each figure is the
# median over rounds of the mean time per call in a round of at least ``--round`` seconds.
# JSON encoding of the answer is not included: it is the same for both.
# Run ``python bench/listing_bench.py --help``.

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway_core.backends.process import ProcessBackend
from gateway_core.config import ClusterConfig, load_config
from gateway_core.context import GatewayContext
from gateway_core.manager import ClusterManager
from gateway_core.models import Cluster, ClusterStatus, User, new_token
from gateway_core.sharing import is_sharee
from gateway_core.store import Store
from gateway_core.testing.driver import InProcessConfig, InProcessDriver

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ACTIVE = [s for s in ClusterStatus if s.is_active]
USER = User(name="me", groups={"lab"})


# ---------------------------------------------------------------------------------------------
# Before the indexes: a scan of every record (ProcessBackend.list_clusters and
# ClusterManager.list_visible_clusters as they were)


def scan(store: Store, username: str | None, statuses: list[ClusterStatus]) -> list[Cluster]:
    found = [
        c
        for c in store.clusters.values()
        if (username is None or c.username == username) and c.status in statuses
    ]
    return sorted(found, key=lambda c: c.start_time)


def scan_own(store: Store, user: User) -> list[Cluster]:
    return scan(store, user.name, ACTIVE)


def scan_visible(store: Store, user: User) -> list[Cluster]:
    own = [c for c in scan(store, user.name, ACTIVE) if c.target <= ClusterStatus.RUNNING]
    others = [
        c
        for c in scan(store, None, ACTIVE)
        if c.username != user.name and is_sharee(user, c) and c.target <= ClusterStatus.RUNNING
    ]
    return own + others


# ---------------------------------------------------------------------------------------------
# The site


def make_site() -> tuple[ProcessBackend, ClusterManager, InProcessDriver]:
    config = load_config({}, environ={})
    context = GatewayContext(config=config)
    backend_config = InProcessConfig()
    driver = InProcessDriver(config=backend_config, context=context)
    backend = ProcessBackend(
        config=backend_config, cluster_config_class=ClusterConfig, context=context, driver=driver
    )
    manager = ClusterManager(backend=backend, context=context, cluster_defaults=config.cluster)
    return backend, manager, driver


def fill(store: Store, *, own: int, others: int) -> None:
    """``own`` clusters of USER, ``own`` shared with it, ``others`` of 100 other users."""
    at = 0

    def add(username: str, **kw: Any) -> None:
        nonlocal at
        at += 1
        store.create_cluster(
            Cluster(
                name=f"c{at:06d}",
                username=username,
                token=new_token(),
                status=ClusterStatus.RUNNING,
                start_time=at,
                **kw,
            )
        )

    for _ in range(own):
        add(USER.name)
    for i in range(own):
        by_name = {"shared_users": [USER.name]}
        add(f"friend{i}", **(by_name if i % 2 else {"shared_groups": ["lab"]}))
    for i in range(others):
        add(f"user{i % 100}", **({"shared_groups": ["elsewhere"]} if i % 10 == 0 else {}))


def timed(call: Callable[[], Awaitable[Any]], *, rounds: int, round_s: float) -> float:
    """Median over ``rounds`` of the mean seconds per call in a round of ``round_s``."""

    async def one_round() -> float:
        calls = 0
        start = time.perf_counter()
        while True:
            await call()
            calls += 1
            took = time.perf_counter() - start
            if took >= round_s:
                return took / calls

    async def run() -> list[float]:
        return [await one_round() for _ in range(rounds)]

    return statistics.median(asyncio.run(run()))


def measure(others: int, args: argparse.Namespace) -> dict[str, Any]:
    backend, manager, driver = make_site()
    store = backend.store
    fill(store, own=args.own, others=others)
    store.wait_written()  # no writer thread competing with the timed calls

    async def index_own() -> list[Cluster]:
        return await backend.list_clusters(username=USER.name, statuses=ACTIVE)

    async def index_visible() -> list[Cluster]:
        return await manager.list_visible_clusters(USER)

    async def before_own() -> list[Cluster]:
        return scan_own(store, USER)

    async def before_visible() -> list[Cluster]:
        return scan_visible(store, USER)

    out: dict[str, Any] = {"others": others, "total": len(store.clusters)}
    for what, index, before in (
        ("own", index_own, before_own),
        ("visible", index_visible, before_visible),
    ):
        got = [c.name for c in asyncio.run(index())]
        expected = [c.name for c in asyncio.run(before())]
        if got != expected:
            raise SystemExit(f"{what}: the indexed listing differs from the scan")
        out[what] = {
            "listed": len(got),
            "scan_s": timed(before, rounds=args.rounds, round_s=args.round),
            "index_s": timed(index, rounds=args.rounds, round_s=args.round),
        }
    store.close()
    asyncio.run(driver.shutdown())
    return out


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def write(runs: list[dict[str, Any]], args: argparse.Namespace, took: float) -> None:
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    meta = {
        "run": stamp,
        "host": platform.node(),
        "python": platform.python_version(),
        "command": "python bench/listing_bench.py " + " ".join(sys.argv[1:]),
        "own": args.own,
        "rounds": args.rounds,
        "round_s": args.round,
        "seconds": round(took, 1),
    }
    (RESULTS / "listing.json").write_text(json.dumps({**meta, "runs": runs}, indent=2) + "\n")
    labels = {
        "own": "own active clusters (`list_clusters`, API v1)",
        "visible": "own + shared with it (`list_visible_clusters`, API v2)",
    }
    lines = [
        "# Listing benchmark: one user's clusters amid other users' clusters",
        "",
        f"Run {stamp} on {meta['host']}, Python {meta['python']}, `{meta['command']}` "
        f"({took:.0f} s). One user with {args.own} clusters of its own and {args.own} shared "
        "with it; the other clusters belong to 100 other users. In-process calls on a "
        "`ProcessBackend` (in-memory store, nothing started); microseconds per call, the median "
        f"of {args.rounds} rounds of at least {args.round:g} s. *scan* is the code before the "
        "store's indexes (every record visited, kept in the benchmark), *index* the code as it "
        "is; both answers are checked equal first.",
        "",
        "| listing | other clusters | listed | scan (µs) | index (µs) | scan / index |",
        "|---|---|---|---|---|---|",
    ]
    for what, label in labels.items():
        for run in runs:
            row = run[what]
            lines.append(
                f"| {label} | {run['others']:,} | {row['listed']} | {us(row['scan_s'])} | "
                f"{us(row['index_s'])} | {row['scan_s'] / row['index_s']:,.0f}x |"
            )
    first, last = runs[0], runs[-1]
    lines += [
        "",
        f"## Growth from {first['others']:,} to {last['others']:,} other clusters",
        "",
        "| listing | scan | index |",
        "|---|---|---|",
    ]
    for what, label in labels.items():
        grow_scan = last[what]["scan_s"] / first[what]["scan_s"]
        grow_index = last[what]["index_s"] / first[what]["index_s"]
        lines.append(f"| {label} | {grow_scan:.1f}x | {grow_index:.2f}x |")
    lines += [
        "",
        "A ratio near 1 in the *index* column is the goal of issue 15: the listing's cost does "
        "not depend on other users' clusters. JSON encoding of the answer is not included (the "
        "same for both).",
        "",
    ]
    (RESULTS / "listing.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--others",
        type=int,
        nargs="+",
        default=[100, 10_000],
        help="numbers of other users' clusters to measure with (default: 100 10000)",
    )
    parser.add_argument("--own", type=int, default=10, help="the user's own clusters (10)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per figure (7)")
    parser.add_argument("--round", type=float, default=0.3, help="seconds per round (0.3)")
    args = parser.parse_args()
    start = time.perf_counter()
    runs = []
    for others in args.others:
        runs.append(measure(others, args))
        print(json.dumps(runs[-1]), flush=True)
    write(runs, args, time.perf_counter() - start)
    print(f"wrote {RESULTS / 'listing.md'}")


if __name__ == "__main__":
    main()

"""Benchmark of the slurm backend on a real Slurm: cluster life cycle, status commands per period.
Owns the run: a throwaway user, its jobs' Python, the gateways, bench/results/slurm.{md,json}.
"""

# Two parts, one gateway each (in this process, through gateway_core.testing.harness), both as a
# throwaway account made with useradd and removed at the end (its jobs cancelled first):
#
# 1. life cycle, ``--reps`` times: ``Gateway.new_cluster()`` until it returns (the cluster is
#    RUNNING), ``scale(N)`` until ``client.wait_for_workers(N)``, ``shutdown()`` until it returns,
#    until the gateway's record says STOPPED, and until Slurm no longer lists the jobs as alive;
# 2. status load: ``--jobs`` clusters created through the REST API (each a real scheduler job;
#    the node runs what fits, the rest stay PENDING), then, over a ``--window`` of seconds, the
#    status commands the driver runs are counted by wrapping its one status method
#    (``JobQueueDriver._query``, which runs squeue) and by reading ``driver.status_calls``.
#    The design goal is one squeue per period whatever the number of clusters.
#
# Jobs run as the throwaway user, so their Python must be readable by it: ``--job-python``, else
# the venv at ``--job-venv`` (reused when that user can import our packages from it, else built
# from /usr/bin/python3 with pip). Needs root and a Slurm that answers ``sinfo``.
# Run ``python bench/slurm_bench.py --help``.

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from gateway_core.testing.jobqueue import (
    JobTestSetupError,
    add_user,
    jobqueue_test_config,
    shared_tempdir,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
JOB_PACKAGES = ["./proxy", "./client", "./core[local]", "./plugins/gateway-slurm"]
ALIVE_STATES = {"PD", "R", "CF", "CG", "S", "RQ", "RS", "RF", "SO", "ST"}
METRICS: dict[str, str] = {
    "start_s": "new_cluster() → RUNNING",
    "scale_s": "scale(N) → N workers",
    "shutdown_call_s": "shutdown() returns",
    "stopped_s": "→ STOPPED (gateway)",
    "jobs_gone_s": "→ jobs no longer alive in squeue",
}


def run(argv: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout, **kw)


def user_jobs(name: str) -> list[tuple[str, str]]:
    """(job id, state code) of every job of ``name`` squeue lists."""
    out = run(["squeue", "-h", "-u", name, "-o", "%i %t"], timeout=30)
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    return [(r[0], r[1]) for r in rows if len(r) == 2]


def probe_python(python: str) -> str | None:
    """None when user nobody can import our packages with ``python``, else why not."""
    try:
        done = subprocess.run(
            [python, "-c", "import distributed, gateway_client, gateway_core, gateway_slurm"],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            user=65534,
            group=65534,
            extra_groups=[],
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.returncode == 0 else done.stderr.strip()[-500:]


def job_python(args: argparse.Namespace, notes: list[str]) -> str:
    if args.job_python:
        problem = probe_python(args.job_python)
        if problem:
            raise SystemExit(f"--job-python {args.job_python} is not usable by others: {problem}")
        return str(args.job_python)
    venv = Path(args.job_venv)
    python = str(venv / "bin" / "python")
    if (venv / "bin" / "python").exists() and probe_python(python) is None:
        notes.append(f"jobs' Python: reused venv {venv} (built earlier, not rebuilt)")
        return python
    print(f"building the jobs' venv at {venv} (pip, from /usr/bin/python3)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    for argv in (
        ["/usr/bin/python3", "-m", "venv", str(venv)],
        [python, "-m", "pip", "install", "--quiet", *JOB_PACKAGES],
    ):
        done = run(argv, timeout=900, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"building the jobs' venv failed: {argv}\n{done.stderr[-3000:]}")
    run(["chmod", "-R", "a+rX", str(venv)])
    problem = probe_python(python)
    if problem:
        raise SystemExit(f"the built venv {venv} is not usable by others: {problem}")
    notes.append(f"jobs' Python: venv {venv} built by this run")
    return python


def gateway_config(python: str, backend: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    """The Slurm tests' gateway config (short periods, small jobs), with start timeouts that
    leave room for a loaded machine."""
    timeouts = {"cluster_start_timeout": 120, "worker_start_timeout": 120}
    return jobqueue_test_config(
        "slurm", python=python, backend={**timeouts, **backend}, cluster=cluster
    )


# ============================================================================================
# Part 1: life cycle
# ============================================================================================


def one_cycle(gw: Any, username: str, n: int, timeout: float) -> dict[str, Any]:
    """One repetition, in a thread: the client is synchronous."""
    from gateway_client import BasicAuth, Gateway
    from gateway_core.models import ClusterStatus

    out: dict[str, Any] = {}
    with Gateway(f"http://{gw.public_address}", auth=BasicAuth(username)) as gateway:
        began = time.perf_counter()
        cluster = gateway.new_cluster()
        out["start_s"] = time.perf_counter() - began
        record = gw.backend.store.get(cluster.name)
        client = cluster.get_client(set_as_default=False)
        try:
            began = time.perf_counter()
            cluster.scale(n)
            client.wait_for_workers(n, timeout=timeout)
            out["scale_s"] = time.perf_counter() - began
            out["sum_ok"] = client.submit(sum, range(100)).result(timeout=60) == 4950
            jobs = [record.state["job_id"]] + [
                w.state["job_id"] for w in record.workers.values() if w.state.get("job_id")
            ]
        finally:
            client.close()
            began = time.perf_counter()
            cluster.shutdown()
            out["shutdown_call_s"] = time.perf_counter() - began
    deadline = time.monotonic() + 60
    while record.status != ClusterStatus.STOPPED and time.monotonic() < deadline:
        time.sleep(0.05)
    if record.status == ClusterStatus.STOPPED:
        out["stopped_s"] = time.perf_counter() - began
    while time.monotonic() < deadline:
        alive = [j for j, s in user_jobs(username) if j in jobs and s in ALIVE_STATES]
        if not alive:
            out["jobs_gone_s"] = time.perf_counter() - began
            break
        time.sleep(0.1)
    out["jobs"] = len(jobs)
    return out


async def part_lifecycle(args: argparse.Namespace, python: str, username: str) -> dict[str, Any]:
    from gateway_core.testing.harness import start_gateway

    gw = await start_gateway(gateway_config(python, {}, {}))
    reps: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        for rep in range(args.reps):
            print(f"life cycle: repetition {rep + 1}/{args.reps}", flush=True)
            try:
                reps.append(await asyncio.to_thread(one_cycle, gw, username, args.workers, 120))
            except Exception as exc:  # noqa: BLE001 - reported
                errors.append(f"repetition {rep + 1}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
            print(f"  {reps[-1] if reps else errors[-1]}", flush=True)
    finally:
        await gw.stop()
    return {"reps": reps, "errors": errors}


# ============================================================================================
# Part 2: status commands per period with many jobs
# ============================================================================================


async def part_status(args: argparse.Namespace, python: str, username: str) -> dict[str, Any]:
    from gateway_core.testing.harness import client_for, start_gateway

    period = args.period
    backend = {
        "cluster_status_period": period,
        "worker_status_period": period,
        # Pending clusters must stay pending through the window, not time out.
        "cluster_start_timeout": args.budget,
    }
    gw = await start_gateway(gateway_config(python, backend, {}))
    driver = gw.backend.driver
    queries: list[tuple[float, int]] = []
    original = driver._query

    async def counting_query(job_ids: list[str]) -> dict[str, str | None]:
        queries.append((time.monotonic(), len(job_ids)))
        return await original(job_ids)

    driver._query = counting_query  # the one method that runs the status command (squeue)
    api = client_for(gw, username)
    out: dict[str, Any] = {"period_s": period, "window_s": args.window, "clusters": args.jobs}
    try:
        began = time.monotonic()
        names = []
        for _ in range(args.jobs):
            resp = await api.post("/api/v1/clusters/", json={"cluster_options": {}})
            if resp.status not in (200, 201):
                raise RuntimeError(f"creating a cluster: HTTP {resp.status}: {resp.body}")
            names.append(resp.body["name"])
        out["create_api_s"] = time.monotonic() - began
        records = [gw.backend.store.get(n) for n in names]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            submitted = [r for r in records if r.state.get("job_id")]
            if len(submitted) == len(records):
                break
            await asyncio.sleep(0.2)
        out["submitted"] = len([r for r in records if r.state.get("job_id")])
        out["all_submitted_s"] = time.monotonic() - began
        await asyncio.sleep(period)  # let the periodic checks see every job
        before_calls, before_queries = driver.status_calls, len(queries)
        states_before = await asyncio.to_thread(user_jobs, username)
        w0 = time.monotonic()
        await asyncio.sleep(args.window)
        window = time.monotonic() - w0
        states_after = await asyncio.to_thread(user_jobs, username)
        in_window = queries[before_queries:]
        out["window_measured_s"] = window
        out["status_commands"] = driver.status_calls - before_calls
        out["status_queries"] = len(in_window)
        out["jobs_per_query_max"] = max((n for _, n in in_window), default=0)
        out["jobs_per_query_median"] = (
            statistics.median(n for _, n in in_window) if in_window else 0
        )
        out["periods"] = window / period
        out["commands_per_period"] = out["status_commands"] / out["periods"]
        out["queries_per_period"] = out["status_queries"] / out["periods"]
        for label, rows in (("before", states_before), ("after", states_after)):
            counts: dict[str, int] = {}
            for _, state in rows:
                counts[state] = counts.get(state, 0) + 1
            out[f"squeue_states_{label}"] = counts
        out["gateway_statuses"] = {}
        for r in records:
            key = r.status.name
            out["gateway_statuses"][key] = out["gateway_statuses"].get(key, 0) + 1
    finally:
        await api.close()
        print("status load: stopping the gateway", flush=True)
        await gw.stop()
    return out


# ============================================================================================
# Main
# ============================================================================================


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def write_results(result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "slurm.json").write_text(json.dumps(result, indent=2) + "\n")
    a = result["args"]
    lines = [
        "# Slurm backend benchmark",
        "",
        f"Run {result['started']} on {result['host']} ({result['slurm']}), "
        f"`python bench/slurm_bench.py` ({result['elapsed_s']:.0f} s). "
        "Numbers from one run on a one-node Slurm; jobs as a throwaway user.",
        "",
        f"## Life cycle ({a['reps']} repetitions, N = {a['workers']} workers)",
        "",
        "| step | median (s) | min (s) | max (s) | n |",
        "|---|---|---|---|---|",
    ]
    life = result.get("lifecycle") or {}
    for key, label in METRICS.items():
        vals = [r[key] for r in life.get("reps", []) if key in r]
        if vals:
            s = summary(vals)
            lines.append(
                f"| {label} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} | {len(vals)} |"
            )
        else:
            lines.append(f"| {label} | - | - | - | 0 |")
    lines += [
        "",
        "*shutdown* steps are measured from the moment `shutdown()` is called. Status periods 1 s.",
        "",
    ]
    st = result.get("status") or {}
    lines += [f"## Status commands with {a['jobs']} scheduler jobs", ""]
    if "commands_per_period" in st:
        lines += [
            "| clusters | jobs submitted | squeue states at window start | period (s) "
            "| window (s) | squeue runs | per period | jobs per run (median / max) |",
            "|---|---|---|---|---|---|---|---|",
            f"| {st['clusters']} | {st['submitted']} | "
            + ", ".join(f"{k} {v}" for k, v in sorted(st["squeue_states_before"].items()))
            + f" | {st['period_s']:g} | {st['window_measured_s']:.1f} | {st['status_commands']} "
            f"| {st['commands_per_period']:.2f} | {st['jobs_per_query_median']:g} / "
            f"{st['jobs_per_query_max']} |",
            "",
            "Cluster and worker status periods both set to the period; squeue runs counted by "
            "wrapping `JobQueueDriver._query` (and `driver.status_calls`, which also counts "
            f"retries: {st['status_queries']} queries, {st['status_commands']} commands). "
            f"Gateway statuses of the clusters at the end: {st['gateway_statuses']}.",
            "",
        ]
    else:
        lines += ["(not measured: see notes)", ""]
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    (RESULTS / "slurm.md").write_text("\n".join(lines))


async def measure(args: argparse.Namespace, python: str, username: str, result: dict) -> None:
    if not args.skip_lifecycle:
        result["lifecycle"] = await part_lifecycle(args, python, username)
    result["status"] = await part_status(args, python, username)


def cleanup_user(name: str, homes: Path) -> list[str]:
    notes = []
    rows = user_jobs(name)
    jobs = [j for j, _ in rows]
    if jobs:
        states = ", ".join(sorted({s for _, s in rows}))
        notes.append(f"cleanup: cancelled {len(jobs)} job(s) of {name} still listed ({states})")
        run(["scancel", *jobs])
        deadline = time.monotonic() + 60
        while user_jobs(name) and time.monotonic() < deadline:
            time.sleep(0.5)
    done = run(["userdel", "--force", name])
    if done.returncode != 0:
        notes.append(f"userdel {name} failed: {done.stderr.strip()}")
    shutil.rmtree(homes, ignore_errors=True)
    return notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=3, help="life-cycle repetitions")
    p.add_argument("--workers", type=int, default=2, help="N of scale(N)")
    p.add_argument("--jobs", type=int, default=50, help="clusters (scheduler jobs) under load")
    p.add_argument("--period", type=float, default=1.0, help="cluster/worker status period (s)")
    p.add_argument("--window", type=float, default=10.0, help="measured window (s)")
    p.add_argument("--budget", type=float, default=600.0, help="abort after this many seconds")
    p.add_argument("--job-python", default="", help="a Python the throwaway user can run")
    p.add_argument("--job-venv", default="/tmp/gw-slurm-venv", help="jobs' venv (reused/built)")
    p.add_argument("--skip-lifecycle", action="store_true")
    args = p.parse_args()

    # The jobs' Python (/usr/bin/python3) may differ in patch version from this one.
    warnings.filterwarnings("ignore", message="Mismatched versions found")
    if os.geteuid() != 0:
        raise SystemExit("needs root: it creates a user and the gateway switches to it")
    info = run(["sinfo", "-h", "-o", "%T"], timeout=20)
    if info.returncode != 0 or not info.stdout.strip():
        raise SystemExit(
            "Slurm does not answer sinfo: start it (plugins/gateway-slurm/ci/start-slurm.sh)"
        )
    version = run(["sinfo", "--version"]).stdout.strip()

    t0 = time.monotonic()
    notes: list[str] = []
    python = job_python(args, notes)
    homes = shared_tempdir("gw-slurm-bench-homes-")
    try:
        name = add_user("gwb", homes).pw_name
    except JobTestSetupError as exc:
        raise SystemExit(str(exc)) from None
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "slurm": version,
        "args": vars(args),
        "job_python": python,
        "notes": notes,
    }
    try:
        left = args.budget - (time.monotonic() - t0)
        asyncio.run(asyncio.wait_for(measure(args, python, name, result), timeout=left))
    except TimeoutError:
        notes.append(f"ABORTED: the {args.budget:.0f} s budget ran out; partial results")
    except Exception as exc:  # noqa: BLE001 - reported in the results
        traceback.print_exc()
        notes.append(f"ABORTED: {type(exc).__name__}: {exc}")
    finally:
        notes.extend(cleanup_user(name, homes))
        result["elapsed_s"] = time.monotonic() - t0
        write_results(result)
    print((RESULTS / "slurm.md").read_text())


if __name__ == "__main__":
    main()

"""A gateway killed with SIGKILL and restarted on its persistent store finds its clusters.

Real `gateway serve` processes, real Dask clusters (unsafe-local, forked by the fork server),
our client: one cluster running with a worker and one still starting when the gateway dies;
a cluster running with two workers whose processes outlive the gateway and its fork server and
are adopted, not replaced, by the restarted gateway; and a normal shutdown, which stops the
clusters only when `stop_clusters_on_shutdown` says so.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from replicaset import Replica as Server
from replicaset import free_port, processes_in

from gateway_core.backends.kit import ProcessRef, read_stat
from gateway_core.crashpoints import CRASH_VARIABLE
from gateway_core.models import WorkerStatus

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_process_left_behind")]


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """A gateway on a SQLite file store, or (parametrized "postgresql") on a PostgreSQL
    database of the test's own."""
    db_url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    if getattr(request, "param", "sqlite") == "postgresql":
        db_url = str(request.getfixturevalue("postgres_url"))
    port = free_port()
    config = tmp_path / "gateway.toml"
    key = base64.b64encode(os.urandom(32)).decode()
    config.write_text(
        f"""
[gateway]
backend = "unsafe-local"
db_url = "{db_url}"
db_encrypt_keys = ["{key}"]
stop_clusters_on_shutdown = false

[proxy]
address = "127.0.0.1:{port}"

[backend.unsafe-local]
cluster_heartbeat_period = 1
cluster_status_period = 2
worker_status_period = 2
clusters_directory = "{tmp_path / "clusters"}"

[cluster]
worker_memory = "512 MiB"
"""
    )
    srv = Server(name="gateway", folder=tmp_path, config=config, address=f"http://127.0.0.1:{port}")
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()


def wait_status(server: Server, name: str, wanted: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        report = server.call("GET", f"/v1/clusters/{name}")
        if report["status"] in wanted:
            return report
        if report["status"] == "FAILED":
            reason = server.call("GET", f"/v2/clusters/{name}/reason")["reason"]
            pytest.fail(f"{name} failed: {reason}\n{server.log_tail()}")
        assert time.monotonic() < deadline, f"{name} stuck in {report['status']}"
        time.sleep(0.2)


def compute(server: Server, name: str, workers: int) -> int:
    from gateway_client import BasicAuth, Gateway

    with Gateway(server.address, auth=BasicAuth(server.user)) as gateway:
        cluster = gateway.connect(name)
        client = cluster.get_client(set_as_default=False)
        try:
            client.wait_for_workers(workers, timeout=60)
            return int(client.submit(sum, range(10)).result(timeout=60))
        finally:
            client.close()
            cluster.close()


@pytest.mark.parametrize(
    "server",
    ["sqlite", pytest.param("postgresql", marks=pytest.mark.system)],
    indirect=True,
)
def test_sigkill_and_restart_keeps_clusters(server: Server) -> None:
    server.start()
    running = server.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    wait_status(server, running, {"RUNNING"})
    server.call("POST", f"/v1/clusters/{running}/scale", {"count": 1})
    assert compute(server, running, 1) == 45

    starting = server.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL  # dies while `starting` starts

    server.start()
    # The running cluster is reachable again, with its worker, through the new proxy.
    assert wait_status(server, running, {"RUNNING"})["status"] == "RUNNING"
    assert compute(server, running, 1) == 45
    # The one that was starting finishes or fails cleanly, with a reason if it fails.
    report = wait_status(server, starting, {"RUNNING", "FAILED"})
    if report["status"] == "RUNNING":
        server.call("POST", f"/v1/clusters/{starting}/scale", {"count": 1})
        assert compute(server, starting, 1) == 45
    else:
        reason = server.call("GET", f"/v2/clusters/{starting}/reason")["reason"]
        assert reason, "a failed cluster must say why"

    for name in (running, starting):
        server.call("DELETE", f"/v1/clusters/{name}")
    for name in (running, starting):
        assert wait_status(server, name, {"STOPPED", "FAILED"})["status"] in {"STOPPED", "FAILED"}
    assert server.stop() == 0
    leftovers = list((server.folder / "clusters").glob("*"))
    assert leftovers == [], f"cluster directories left behind: {leftovers}"


def active_processes(server: Server, name: str) -> dict[str, ProcessRef]:
    """What the store holds of ``name``'s live records: ``"scheduler"`` and each active
    worker's name -> the process it runs as (read from the gateway's SQLite file)."""
    db = sqlite3.connect(server.folder / "gateway.sqlite")
    try:
        found: dict[str, ProcessRef] = {}
        for (state,) in db.execute("SELECT state FROM clusters WHERE name = ?", (name,)):
            ref = ProcessRef.from_state(json.loads(state))
            if ref is not None:
                found["scheduler"] = ref
        rows = db.execute("SELECT name, status, state FROM workers WHERE cluster_name = ?", (name,))
        for worker, status, state in rows:
            ref = ProcessRef.from_state(json.loads(state))
            if WorkerStatus(status).is_active and ref is not None:
                found[worker] = ref
        return found
    finally:
        db.close()


def wait_for(what: str, check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def scheduler_workers(server: Server, name: str) -> int:
    """How many workers the cluster's scheduler has, as our client sees it."""
    from gateway_client import BasicAuth, Gateway

    with Gateway(server.address, auth=BasicAuth(server.user)) as gateway:
        cluster = gateway.connect(name)
        client = cluster.get_client(set_as_default=False)
        try:
            return len(client.scheduler_info()["workers"])
        finally:
            client.close()
            cluster.close()


def test_sigkill_leaves_a_running_cluster_running_and_the_next_gateway_adopts_it(
    server: Server,
) -> None:
    server.start()
    name = server.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    wait_status(server, name, {"RUNNING"})
    server.call("POST", f"/v1/clusters/{name}/scale", {"count": 2})
    assert compute(server, name, 2) == 45
    wait_for(
        "the store has the scheduler and both workers",
        lambda: len(active_processes(server, name)) == 3,
    )
    before = active_processes(server, name)
    assert all(ref.running() for ref in before.values()), before

    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    # The fork server sees the end of its control socket and exits; what it forked does not
    # go with it. Give any late death (SIGHUP, parent-death signal, teardown) time to happen.
    time.sleep(3)
    dead = [what for what, ref in before.items() if not ref.running()]
    assert dead == [], f"died with the gateway: {dead}"

    server.start()
    time.sleep(3 * 2 + 1)  # three cluster and worker status periods (2 s each)
    assert wait_status(server, name, {"RUNNING"})["status"] == "RUNNING"
    # Adopted, not replaced: the same two workers, the same processes, nothing new started.
    assert active_processes(server, name) == before
    assert all(ref.running() for ref in before.values())
    assert scheduler_workers(server, name) == 2
    assert compute(server, name, 2) == 45

    server.call("POST", f"/v1/clusters/{name}/scale", {"count": 3})
    assert compute(server, name, 3) == 45
    server.call("POST", f"/v1/clusters/{name}/scale", {"count": 1})
    wait_for("one worker is left", lambda: len(active_processes(server, name)) == 2)
    wait_for("the scheduler has one worker", lambda: scheduler_workers(server, name) == 1)
    assert compute(server, name, 1) == 45

    server.call("DELETE", f"/v1/clusters/{name}")
    assert wait_status(server, name, {"STOPPED"})["status"] == "STOPPED"
    wait_for(
        "every adopted process is gone", lambda: not any(ref.running() for ref in before.values())
    )
    assert server.stop() == 0
    leftovers = list((server.folder / "clusters").glob("*"))
    assert leftovers == [], f"cluster directories left behind: {leftovers}"


def test_sigkill_mid_start_scale_and_stop_each_cluster_ends_where_it_was_headed(
    server: Server,
) -> None:
    server.start()
    scaling = server.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    stopping = server.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    for name in (scaling, stopping):
        wait_status(server, name, {"RUNNING"})
        server.call("POST", f"/v1/clusters/{name}/scale", {"count": 1})
        assert compute(server, name, 1) == 45
    wait_for(
        "the store has both schedulers and workers",
        lambda: all(len(active_processes(server, n)) == 2 for n in (scaling, stopping)),
    )
    stopped = active_processes(server, stopping)

    # All at once, then the kill: a stop, a scale-up and a new cluster, each under way.
    server.call("DELETE", f"/v1/clusters/{stopping}")
    server.call("POST", f"/v1/clusters/{scaling}/scale", {"count": 2})
    starting = server.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL

    server.start()
    # Where each was headed: the stopped one is gone, processes and all...
    assert wait_status(server, stopping, {"STOPPED"})["status"] == "STOPPED"
    wait_for(
        "the stopped cluster's processes are gone",
        lambda: not any(ref.running() for ref in stopped.values()),
    )
    # ... the new one runs and computes...
    assert wait_status(server, starting, {"RUNNING"})["status"] == "RUNNING"
    server.call("POST", f"/v1/clusters/{starting}/scale", {"count": 1})
    assert compute(server, starting, 1) == 45
    # ... and the scaled one has its two workers, no more, after a few status periods.
    assert compute(server, scaling, 2) == 45
    time.sleep(3 * 2 + 1)
    assert scheduler_workers(server, scaling) == 2
    assert len(active_processes(server, scaling)) == 3
    assert all(ref.running() for ref in active_processes(server, scaling).values())

    for name in (scaling, starting):
        server.call("DELETE", f"/v1/clusters/{name}")
    for name in (scaling, starting):
        assert wait_status(server, name, {"STOPPED"})["status"] == "STOPPED"
    assert server.stop() == 0
    leftovers = list((server.folder / "clusters").glob("*"))
    assert leftovers == [], f"cluster directories left behind: {leftovers}"


@pytest.mark.parametrize("stop_clusters", [True, False])
def test_a_normal_shutdown_stops_the_clusters_only_when_configured(
    server: Server, stop_clusters: bool
) -> None:
    text = server.config.read_text()
    server.config.write_text(
        text.replace(
            "stop_clusters_on_shutdown = false",
            f"stop_clusters_on_shutdown = {str(stop_clusters).lower()}",
        )
    )
    server.start()
    name = server.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    wait_status(server, name, {"RUNNING"})
    server.call("POST", f"/v1/clusters/{name}/scale", {"count": 1})
    assert compute(server, name, 1) == 45
    wait_for(
        "the store has the scheduler and the worker",
        lambda: len(active_processes(server, name)) == 2,
    )
    before = active_processes(server, name)

    assert server.stop() == 0  # SIGTERM: a normal shutdown
    if stop_clusters:
        assert not any(ref.running() for ref in before.values())
        assert list((server.folder / "clusters").glob("*")) == []
        return
    time.sleep(1)
    assert all(ref.running() for ref in before.values())
    server.start()
    assert compute(server, name, 1) == 45
    server.call("DELETE", f"/v1/clusters/{name}")
    assert wait_status(server, name, {"STOPPED"})["status"] == "STOPPED"
    assert server.stop() == 0
    assert not any(ref.running() for ref in before.values())


# -------------------------------------------------------------------------------------------
# A crash between a launch and its record (the crash point `launched:<role>`)


def launched(server: Server, clusters: Path | None = None) -> dict[str, set[int]]:
    """Per cluster, the processes a launcher started in its working directory under
    ``clusters`` (default: the server's ``clusters``), found by the directory as the chaos
    test counts them: those leading their own process group, not what they started (a
    nanny's worker)."""
    found: dict[str, set[int]] = {}
    for name, pids in processes_in(clusters or server.folder / "clusters").items():
        leaders = set()
        for pid in pids:
            st = read_stat(pid)
            if st is not None and st.pgrp == pid:
                leaders.add(pid)
        found[name] = leaders
    return found


def with_start_method(server: Server, method: str) -> None:
    text = server.config.read_text()
    server.config.write_text(
        text.replace(
            "worker_status_period = 2\n", f'worker_status_period = 2\nstart_method = "{method}"\n'
        )
    )


def crashed(server: Server, point: str) -> None:
    """The gateway killed itself at ``point`` (and said so in its log)."""
    assert server.proc is not None
    assert server.proc.wait(timeout=120) == -signal.SIGKILL, server.log_tail()
    assert f"Crashing at {point}" in server.log_tail(10**6)


def finish_and_check_nothing_left(server: Server, name: str, clusters: Path | None = None) -> None:
    clusters = clusters or server.folder / "clusters"
    server.call("DELETE", f"/v1/clusters/{name}")
    assert wait_status(server, name, {"STOPPED"})["status"] == "STOPPED"
    wait_for("no process is left in a cluster's directory", lambda: not processes_in(clusters))
    assert server.stop() == 0
    assert list(clusters.glob("*")) == []


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_worker_launched_just_before_a_crash_is_adopted_not_doubled(
    server: Server, start_method: str
) -> None:
    with_start_method(server, start_method)
    server.env = {CRASH_VARIABLE: "launched:worker"}
    server.start()
    name = server.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    wait_status(server, name, {"RUNNING"})
    scheduler = active_processes(server, name)["scheduler"]
    with contextlib.suppress(OSError):  # the answer may be cut short by the crash
        server.call("POST", f"/v1/clusters/{name}/scale", {"count": 2})
    crashed(server, "launched:worker")

    # The window: a worker runs, and the store does not know it.
    orphans = launched(server)[name] - {scheduler.pid}
    recorded = {ref.pid for ref in active_processes(server, name).values()}
    assert orphans - recorded, f"no unrecorded worker after the crash: {orphans}, {recorded}"

    server.env = {}
    server.start()
    assert compute(server, name, 2) == 45
    time.sleep(3 * 2 + 1)  # three status periods: nothing replaced, nothing doubled since
    refs = active_processes(server, name)
    workers = {ref.pid for what, ref in refs.items() if what != "scheduler"}
    assert len(workers) == 2 and all(ref.running() for ref in refs.values()), refs
    assert orphans <= workers, "the workers launched before the crash were replaced"
    assert launched(server)[name] == {scheduler.pid, *workers}, "a worker process is doubled"
    assert scheduler_workers(server, name) == 2
    assert "launched before the gateway stopped but never recorded" in server.log_tail(10**6)
    finish_and_check_nothing_left(server, name)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_scheduler_launched_just_before_a_crash_is_adopted_not_doubled(
    server: Server, start_method: str
) -> None:
    with_start_method(server, start_method)
    server.env = {CRASH_VARIABLE: "launched:scheduler"}
    server.start()
    try:
        name = server.call("POST", "/v1/clusters/", {"cluster_options": {}})["name"]
    except OSError:  # the crash came first: the name is in the store (made durable before)
        name = stored_cluster_names(server)[0]
    crashed(server, "launched:scheduler")
    orphan = launched(server).get(name, set())
    assert len(orphan) == 1, f"not one scheduler after the crash: {orphan}"
    assert active_processes(server, name) == {}, "the scheduler was recorded before the crash"

    server.env = {}
    server.start()
    wait_status(server, name, {"RUNNING"})
    refs = active_processes(server, name)
    assert {refs["scheduler"].pid} == orphan, "the scheduler was replaced, not adopted"
    server.call("POST", f"/v1/clusters/{name}/scale", {"count": 1})
    assert compute(server, name, 1) == 45
    refs = active_processes(server, name)
    assert launched(server)[name] == {ref.pid for ref in refs.values()}
    assert len(refs) == 2
    finish_and_check_nothing_left(server, name)


def stored_cluster_names(server: Server) -> list[str]:
    db = sqlite3.connect(server.folder / "gateway.sqlite")
    try:
        return [name for (name,) in db.execute("SELECT name FROM clusters")]
    finally:
        db.close()

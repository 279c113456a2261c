"""The original `dask-gateway` client from PyPI against this server: the whole user flow.

Runs only in `nox -s compat`, whose venv holds `dask-gateway` beside our packages; the server is
a real `gateway serve` process with the unsafe-local backend and the built-in proxy.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.compat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SLOW_STOP_BACKEND = "sigint_timeout = 8"
SLOW_STOP_CLUSTER = (
    # A shell that ignores SIGINT runs the scheduler and outlives it until SIGTERM, so a stop
    # takes sigint_timeout (8 s) whatever the scheduler does: long enough to see STOPPING.
    """scheduler_cmd = ["sh", "-c", 'trap "" INT; dask scheduler "$@"; sleep 60', "sh"]"""
)


def run_gateway(
    tmp_path_factory: pytest.TempPathFactory, *, backend_extra: str = "", cluster_extra: str = ""
) -> Iterator[str]:
    """A `gateway serve` process; yields its public address, checks it stops cleanly."""
    try:
        import dask_gateway  # noqa: F401
    except ImportError:
        pytest.fail("the compat tier needs the original client: run it with `nox -s compat`")
    folder = tmp_path_factory.mktemp("compat")
    port = free_port()
    config = folder / "gateway.toml"
    config.write_text(
        f"""
[gateway]
backend = "unsafe-local"

[proxy]
address = "127.0.0.1:{port}"

[backend.unsafe-local]
cluster_heartbeat_period = 2
clusters_directory = "{folder / "clusters"}"
{backend_extra}

[cluster]
worker_memory = "512 MiB"
scheduler_memory = "512 MiB"
{cluster_extra}

# A named worker group the original client knows nothing of: its requests stay on the default.
[cluster.worker_groups.spare]
worker_cores = 1

[options.worker_cores]
type = "int"
default = 1
min = 1
max = 2
label = "Worker Cores"

[options.environment]
type = "mapping"
target = "environment"
"""
    )
    log = open(folder / "gateway.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway_core", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
    )
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.close()
            pytest.fail("gateway did not start:\n" + (folder / "gateway.log").read_text()[-3000:])
        time.sleep(0.2)
    yield address
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    finally:
        log.close()
    assert proc.returncode == 0, (folder / "gateway.log").read_text()[-3000:]
    leftovers = list((folder / "clusters").glob("*")) if (folder / "clusters").exists() else []
    assert leftovers == [], f"cluster directories left behind: {leftovers}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway whose clusters stop as fast as their processes exit."""
    yield from run_gateway(tmp_path_factory)


@pytest.fixture(scope="module")
def slow_stop_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway whose clusters stay STOPPING for about 8 s once asked to stop."""
    yield from run_gateway(
        tmp_path_factory, backend_extra=SLOW_STOP_BACKEND, cluster_extra=SLOW_STOP_CLUSTER
    )


def test_the_original_client_runs_the_whole_flow(server: str) -> None:
    from dask_gateway import BasicAuth, Gateway

    with Gateway(server, auth=BasicAuth("alice")) as gateway:
        options = gateway.cluster_options()
        assert options.worker_cores == 1
        options.worker_cores = 2
        options.environment = {"COMPAT_MARK": "from-the-original-client"}

        cluster = gateway.new_cluster(options)
        try:
            assert cluster.scheduler_address.startswith("gateway://127.0.0.1:")
            cluster.scale(2)
            client = cluster.get_client(set_as_default=False)
            client.wait_for_workers(2, timeout=120)
            assert sum(client.gather(client.map(lambda x: x * x, range(10)))) == 285
            marks = client.run(lambda: os.environ.get("COMPAT_MARK"))
            assert set(marks.values()) == {"from-the-original-client"}
            threads = client.nthreads()
            assert sorted(threads.values()) == [2, 2]
            # The gateway hears of the workers in the agent's next heartbeat, which follows
            # Dask's own view by a moment (0.1 s gather plus the request).
            deadline = time.monotonic() + 30
            while True:
                groups = api_call(server, "GET", f"/api/v2/clusters/{cluster.name}", "alice")[
                    "groups"
                ]
                if groups["default"]["running"] == 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert (groups["default"]["count"], groups["default"]["running"]) == (2, 2)
            assert groups["spare"]["count"] == 0

            listed = gateway.list_clusters()
            assert [c.name for c in listed] == [cluster.name]
            assert listed[0].options["worker_cores"] == 2

            # A second Gateway in the same process rides the first one's event loop: each
            # extra loop thread is one more thing to start on a loaded 2-core machine, and
            # distributed gives a new loop thread only 10 s to come up.
            with Gateway(server, auth=BasicAuth("alice"), loop=gateway.loop) as second:
                again = second.connect(cluster.name)
                assert again.name == cluster.name
                other = again.get_client(set_as_default=False)
                assert other.submit(sum, [1, 2, 3]).result(timeout=60) == 6
                other.close()

            with urllib.request.urlopen(cluster.dashboard_link, timeout=30) as resp:
                page = resp.read().decode()
            assert resp.status == 200
            assert "Bokeh" in page or "bokeh" in page
            assert "pip install" not in page.lower(), "the dashboard says bokeh is missing"
            client.close()
        finally:
            cluster.shutdown()
        # Asked to stop, the cluster leaves the default list at once (its target is stopped)
        # and is STOPPED once its processes are gone.
        assert gateway.list_clusters() == []
        wait_for_status(gateway, cluster.name, "stopped")


def wait_for_status(gateway: Any, name: str, status: str, timeout: float = 60) -> None:
    """Wait until ``gateway.list_clusters(status=status)`` lists ``name``."""
    deadline = time.monotonic() + timeout
    while name not in [c.name for c in gateway.list_clusters(status=status)]:
        assert time.monotonic() < deadline, f"cluster {name} is not {status} after {timeout} s"
        time.sleep(0.2)


def test_a_cluster_asked_to_stop_leaves_the_default_list_at_once(slow_stop_server: str) -> None:
    """As with the original gateway: the default list holds the clusters whose target is not
    stopped, so a STOPPING cluster is not in it but ``status="stopping"`` finds it."""
    from dask_gateway import BasicAuth, Gateway

    with Gateway(slow_stop_server, auth=BasicAuth("dave")) as gateway:
        cluster = gateway.new_cluster()
        name = cluster.name
        assert [c.name for c in gateway.list_clusters()] == [name]
        cluster.shutdown()
        assert gateway.list_clusters() == []
        stopping = gateway.list_clusters(status="stopping")
        assert [c.name for c in stopping] == [name]  # it takes ~8 s to stop: still STOPPING
        assert stopping[0].status.name == "STOPPING"
        assert [c.name for c in gateway.list_clusters(status=["running", "stopping"])] == [name]
        wait_for_status(gateway, name, "stopped")
        assert gateway.list_clusters(status="stopping") == []


def test_bad_options_are_refused_with_the_field_named(server: str) -> None:
    from dask_gateway import BasicAuth, Gateway

    with Gateway(server, auth=BasicAuth("bob")) as gateway, pytest.raises(ValueError) as info:
        gateway.new_cluster(worker_cores=99)
    assert "worker_cores" in str(info.value)


def test_another_users_cluster_is_out_of_reach(server: str) -> None:
    from dask_gateway import BasicAuth, Gateway

    with Gateway(server, auth=BasicAuth("carol")) as carol:
        cluster = carol.new_cluster()
        try:
            with Gateway(server, auth=BasicAuth("mallory"), loop=carol.loop) as mallory:
                assert mallory.list_clusters() == []
                with pytest.raises(Exception) as info:
                    mallory.connect(cluster.name)
                assert "403" in str(info.value) or "may not" in str(info.value)
        finally:
            cluster.shutdown()


def api_call(server: str, method: str, path: str, user: str, body: Any = None) -> Any:
    """One request to the gateway's API as ``user`` (the simple authenticator)."""
    token = base64.b64encode(f"{user}:".encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{server}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        text = resp.read()
    return json.loads(text) if text else None


def test_a_sharee_uses_a_shared_cluster_with_the_original_client(server: str) -> None:
    """erin shares a cluster with frank through the v2 API; frank's original client does not
    list it (v1 lists one's own), connects, computes and opens the dashboard, but may not
    scale or stop it."""
    from dask_gateway import BasicAuth, Gateway

    created = api_call(
        server,
        "POST",
        "/api/v2/clusters",
        "erin",
        {"cluster_options": {}, "share_with_users": ["frank"]},
    )
    name = created["name"]
    try:
        with Gateway(server, auth=BasicAuth("frank")) as frank:
            assert frank.list_clusters() == []
            cluster = frank.connect(name)  # waits until it runs
            scaled = api_call(
                server, "POST", f"/api/v1/clusters/{name}/scale", "erin", {"count": 1}
            )
            assert scaled["ok"], scaled
            client = cluster.get_client(set_as_default=False)
            client.wait_for_workers(1, timeout=120)
            assert client.submit(sum, [1, 2, 3]).result(timeout=120) == 6
            client.close()
            with urllib.request.urlopen(cluster.dashboard_link, timeout=30) as resp:
                assert resp.status == 200
            with pytest.raises(Exception) as info:
                frank.scale_cluster(name, 1)
            assert "403" in str(info.value) or "may not" in str(info.value)
            with pytest.raises(Exception) as info:
                frank.stop_cluster(name)
            assert "403" in str(info.value) or "may not" in str(info.value)
        shared = api_call(server, "GET", "/api/v2/clusters", "frank")
        assert list(shared) == [name] and shared[name]["access"] == "sharee"
    finally:
        api_call(server, "DELETE", f"/api/v1/clusters/{name}", "erin")
    with Gateway(server, auth=BasicAuth("erin")) as erin:
        wait_for_status(erin, name, "stopped")

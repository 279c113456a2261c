"""GatewayCluster against the fake gateway: start, attach, scale, close, shut down, failures,
progress and display, blocking and async. (The scheduler connection itself: test_comm.py.)
"""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from distributed.core import Status
from distributed.utils import Log, Logs
from fakes import FakeCluster, FakeGateway, make_cert

from gateway_client import BasicAuth, ClusterState, Gateway, GatewayCluster, GatewayClusterError

pytestmark = pytest.mark.unit

ALICE = BasicAuth(username="alice", password="secret")


def closed_port() -> int:
    """A loopback port nothing listens on (the scheduler is out of reach in these tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def gateway(fake: FakeGateway) -> Iterator[Gateway]:
    with Gateway(fake.address, proxy_address=closed_port(), auth=ALICE) as gw:
        yield gw


def deletes(fake: FakeGateway, name: str) -> int:
    return len(fake.requests_to("DELETE", f"/api/v1/clusters/{name}"))


def test_new_cluster_runs_scales_and_stops_on_exit(fake: FakeGateway, gateway: Gateway) -> None:
    fake.new_cluster = {"polls_until_done": 2, "outcome": "RUNNING"}
    with gateway.new_cluster(worker_cores=2, env={"A": "1"}) as cluster:
        name = cluster.name
        assert name in fake.clusters
        assert fake.clusters[name].options == {"worker_cores": 2, "env": {"A": "1"}}
        assert cluster.status is ClusterState.running
        port = gateway.proxy_address.rsplit(":", 1)[1]
        assert cluster.scheduler_address == f"gateway://127.0.0.1:{port}/{name}"
        assert cluster.dashboard_link == f"{fake.address}/clusters/{name}/status"
        assert cluster.security is not None and cluster.security.require_encryption
        assert cluster.security.tls_client_cert == fake.clusters[name].cert
        assert repr(cluster) == f"GatewayCluster<{name}, status=running>"
        page = cluster._repr_html_()
        assert cluster.dashboard_link in page and name in page and "Workers: unknown" in page

        cluster.scale(3)
        cluster.adapt(minimum=1, maximum=5)
        assert fake.requests_to("POST", f"/api/v1/clusters/{name}/scale")[-1].body == {"count": 3}
        assert fake.requests_to("POST", f"/api/v1/clusters/{name}/adapt")[-1].body == {
            "minimum": 1,
            "maximum": 5,
            "active": True,
        }
        assert deletes(fake, name) == 0
    assert cluster.status is ClusterState.closed
    assert fake.clusters[name].status == "STOPPED" and deletes(fake, name) == 1
    cluster.close()  # closing again does nothing
    assert deletes(fake, name) == 1


def test_cluster_scales_and_adapts_worker_groups(fake: FakeGateway, gateway: Gateway) -> None:
    with gateway.new_cluster() as cluster:
        name = cluster.name
        fake.clusters[name].group_counts["gpu"] = 0
        cluster.scale(2, group="gpu")
        cluster.adapt(minimum=0, maximum=4, group="gpu")
        assert fake.requests_to("POST", f"/api/v1/clusters/{name}/scale")[-1].body == {
            "count": 2,
            "group": "gpu",
        }
        assert fake.requests_to("POST", f"/api/v1/clusters/{name}/adapt")[-1].body["group"] == (
            "gpu"
        )
        assert cluster.worker_groups()["gpu"]["count"] == 4
        with pytest.raises(ValueError, match="its groups are default, gpu"):
            cluster.scale(1, group="fpga")


def test_status_equals_the_original_clients_strings_and_distributeds_status(
    fake: FakeGateway, gateway: Gateway
) -> None:
    """Like the original client's, ``status`` is the string ``"running"``; `distributed` compares
    it with its own `Status` members (a Client refuses a closed cluster), which must hold too."""
    from distributed import Client

    with gateway.new_cluster() as cluster:
        assert cluster.status == "running" and cluster.status != "closed"
        assert cluster.status == Status.running and cluster.status != Status.closed
        assert Status.running == cluster.status  # distributed writes it both ways round
        assert cluster.status in (Status.running, Status.closing)
        assert f"{cluster.status}" == str(cluster.status) == "running"
        assert {cluster.status} == {"running"} and hash(cluster.status) == hash(Status.running)
    assert cluster.status == "closed" and cluster.status in (Status.closed, Status.closing)
    with pytest.raises(RuntimeError, match="already closed or closing Cluster"):
        Client(cluster, set_as_default=False)
    assert [str(s) for s in ClusterState] == [
        "created",
        "starting",
        "running",
        "closing",
        "closed",
        "failed",
    ]
    assert all(s == Status[s.value] for s in ClusterState)


def test_connect_attaches_without_stopping_on_close(fake: FakeGateway, gateway: Gateway) -> None:
    cert, key = make_cert("c1")
    fake.clusters["c1"] = FakeCluster(name="c1", options={}, status="RUNNING", cert=cert, key=key)
    cluster = gateway.connect("c1")
    assert cluster.name == "c1" and cluster.status is ClusterState.running
    assert not fake.requests_to("POST", "/api/v1/clusters/")
    cluster.close()
    assert cluster.status is ClusterState.closed and deletes(fake, "c1") == 0
    assert fake.clusters["c1"].status == "RUNNING"
    with pytest.raises(
        RuntimeError,
        match=r"already closed; stop the cluster with Gateway\(\).stop_cluster\('c1'\)",
    ):
        cluster.shutdown()

    again = gateway.connect("c1", shutdown_on_close=True)
    again.close()
    assert fake.clusters["c1"].status == "STOPPED"


def test_get_logs_is_shaped_like_distributeds(fake: FakeGateway, gateway: Gateway) -> None:
    cert, key = make_cert("c1")
    fake.clusters["c1"] = FakeCluster(
        name="c1",
        options={},
        status="RUNNING",
        cert=cert,
        key=key,
        logs={"scheduler": "s1\ns2\ns3", "w1": "one", "w2": "two"},
    )
    cluster = gateway.connect("c1")
    logs = cluster.get_logs()
    # distributed's Logs of Log texts (their notebook display), keyed as distributed keys them.
    assert isinstance(logs, Logs) and all(isinstance(text, Log) for text in logs.values())
    assert logs == {"Scheduler": "s1\ns2\ns3", "w1": "one", "w2": "two"}
    assert "Cluster" not in logs  # the gateway has no failure reason for a running cluster
    (seen,) = fake.requests_to("GET", "/api/v2/clusters/c1/logs")
    assert seen.query == "component=scheduler,workers"

    assert cluster.get_logs(scheduler=False, workers=["w2"]) == {"w2": "two"}
    assert cluster.get_logs(workers=False, tail=2) == {"Scheduler": "s2\ns3"}
    assert fake.requests_to("GET", "/api/v2/clusters/c1/logs")[-1].query == (
        "component=scheduler&tail=2"
    )
    assert cluster.get_logs(scheduler=False, workers=False, cluster=False) == {}
    with pytest.raises(ValueError, match="no log component 'ghost'"):
        cluster.get_logs(workers=["ghost"])
    with pytest.raises(TypeError, match="iterable of worker names"):
        cluster.get_logs(workers="w1")
    cluster.close()


def test_connect_to_an_unknown_cluster_is_a_value_error(gateway: Gateway) -> None:
    with pytest.raises(ValueError, match="Cluster ghost not found"):
        gateway.connect("ghost")


def test_shutdown_and_close_without_shutdown(fake: FakeGateway, gateway: Gateway) -> None:
    cluster = gateway.new_cluster()
    cluster.shutdown()
    assert fake.clusters[cluster.name].status == "STOPPED"

    keep = gateway.new_cluster(shutdown_on_close=True)
    keep.close(shutdown=False)
    assert fake.clusters[keep.name].status == "RUNNING" and deletes(fake, keep.name) == 0


def test_direct_construction_with_options(fake: FakeGateway) -> None:
    with Gateway(fake.address, auth=ALICE) as gw:
        options = gw.cluster_options()
    options.worker_cores = 4
    with GatewayCluster(
        address=fake.address,
        proxy_address=closed_port(),
        auth=ALICE,
        cluster_options=options,
        image="x:1",
    ) as cluster:
        assert fake.clusters[cluster.name].options["worker_cores"] == 4
        assert fake.clusters[cluster.name].options["image"] == "x:1"
    with pytest.raises(GatewayClusterError, match=f"Cluster '{cluster.name}' is already stopped"):
        GatewayCluster.from_name(cluster.name, address=fake.address, auth=ALICE)


def test_failed_start_raises_the_reason_and_cleans_up(fake: FakeGateway, gateway: Gateway) -> None:
    fake.new_cluster = {
        "polls_until_done": 1,
        "outcome": "FAILED",
        "reason": "Slurm job 4242 was cancelled: QOSMaxCpuPerUserLimit",
    }
    before = set(GatewayCluster._instances)
    with pytest.raises(
        GatewayClusterError, match="failed to start: Slurm job 4242 was cancelled"
    ) as info:
        gateway.new_cluster()
    (name,) = fake.clusters
    assert repr(name) in str(info.value)
    assert deletes(fake, name) == 1  # shutdown_on_close: the failed cluster is not left behind
    assert set(GatewayCluster._instances) == before


def test_progress_line_on_a_terminal(
    fake: FakeGateway, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    class TTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = TTY()
    monkeypatch.setattr("sys.stderr", err)
    fake.new_cluster = {"polls_until_done": 2, "outcome": "RUNNING"}
    cluster = gateway.new_cluster()
    cluster.close()
    text = err.getvalue()
    assert text.startswith(f"\rCluster {cluster.name}: PENDING (0 s)")
    assert text.endswith("\n") and f"\rCluster {cluster.name}: RUNNING after " in text
    assert text.count("\n") == 1


def test_widget_scales_and_reports_clamping(fake: FakeGateway, gateway: Gateway) -> None:
    with gateway.new_cluster() as cluster:
        widget = cluster._widget()
        assert widget is cluster._widget()
        _title, row, message, name_html, link = widget.children
        assert cluster.name in name_html.value and cluster.dashboard_link in link.value
        _status, panels = row.children
        count, scale = panels.children[0].children
        minimum, maximum, adapt = panels.children[1].children
        count.value = 50
        scale.click()
        assert fake.requests_to("POST", f"/api/v1/clusters/{cluster.name}/scale")[-1].body == {
            "count": 50
        }
        assert "scaled to 10 instead" in message.value
        minimum.value, maximum.value = 1, 3
        adapt.click()
        assert (
            fake.requests_to("POST", f"/api/v1/clusters/{cluster.name}/adapt")[-1].body["maximum"]
            == 3
        )
        assert message.value == ""
        fake.clusters[cluster.name].status = "STOPPING"
        scale.click()
        assert "cluster is STOPPING" in message.value


def test_worker_updates_refresh_the_totals(fake: FakeGateway, gateway: Gateway) -> None:
    with gateway.new_cluster() as cluster:
        widget = cluster._widget()
        status_html = widget.children[1].children[0]
        cluster.scheduler_info = {"workers": {}}
        worker = {"nthreads": 2, "memory_limit": 2**30}
        cluster._apply_worker_update("add", {"workers": {"tls://w1": worker, "tls://w2": worker}})
        assert "<td>2</td>" in status_html.value and "<td>4</td>" in status_html.value
        assert "2.00 GiB" in status_html.value
        assert repr(cluster).endswith("status=running, workers=2>")
        cluster._apply_worker_update("remove", "tls://w1")
        assert "<td>1</td>" in status_html.value


async def test_async_clusters(fake: FakeGateway) -> None:
    async with Gateway(
        fake.address, proxy_address=closed_port(), auth=ALICE, asynchronous=True
    ) as gw:
        async with gw.new_cluster(worker_cores=3) as cluster:
            assert cluster.status is ClusterState.running
            assert fake.clusters[cluster.name].options == {"worker_cores": 3}
            await cluster.scale(2)
            await cluster.adapt(maximum=4)
            attached = await gw.connect(cluster.name)
            assert attached.scheduler_address == cluster.scheduler_address
            await attached.close()
            assert fake.clusters[cluster.name].status == "RUNNING"
        assert cluster.status is ClusterState.closed
        assert fake.clusters[cluster.name].status == "STOPPED"

        other: Any = await GatewayCluster(
            address=fake.address, proxy_address=closed_port(), auth=ALICE, asynchronous=True
        )
        assert other.status is ClusterState.running
        await other.shutdown()
        assert fake.clusters[other.name].status == "STOPPED"

        fake.new_cluster = {"polls_until_done": 0, "outcome": "FAILED", "reason": "no capacity"}
        with pytest.raises(GatewayClusterError, match="no capacity"):
            await gw.new_cluster()

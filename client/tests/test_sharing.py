"""Sharing a cluster from the client: at creation, with `Gateway.share_cluster`, and the
sharing lists in `ClusterReport`s, against the fake gateway.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from fakes import FakeCluster, FakeGateway

from gateway_client import BasicAuth, ClusterReport, ClusterState, Gateway

pytestmark = pytest.mark.unit

ALICE = BasicAuth(username="alice", password="secret")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def gateway(fake: FakeGateway) -> Iterator[Gateway]:
    with Gateway(fake.address, proxy_address=closed_port(), auth=ALICE) as gw:
        yield gw


def test_submit_shares_through_the_v2_route_only_when_asked(
    fake: FakeGateway, gateway: Gateway
) -> None:
    plain = gateway.submit(worker_cores=2)
    assert fake.requests_to("POST", "/api/v2/clusters") == []  # as the original client sends
    assert fake.requests_to("POST", "/api/v1/clusters/")[-1].body == {
        "cluster_options": {"worker_cores": 2}
    }
    assert fake.clusters[plain].share_with_users == []

    name = gateway.submit(worker_cores=3, share_with_users=("bob",), share_with_groups=["lab"])
    assert fake.requests_to("POST", "/api/v2/clusters")[-1].body == {
        "cluster_options": {"worker_cores": 3},
        "share_with_users": ["bob"],
        "share_with_groups": ["lab"],
    }
    cluster = fake.clusters[name]
    assert cluster.options == {"worker_cores": 3}
    assert (cluster.share_with_users, cluster.share_with_groups) == (["bob"], ["lab"])
    with pytest.raises(TypeError, match="share_with_users must be a list of names"):
        gateway.submit(share_with_users="bob")


def test_new_cluster_shares_at_creation(fake: FakeGateway, gateway: Gateway) -> None:
    with gateway.new_cluster(
        worker_cores=2, share_with_users=["bob"], share_with_groups=["lab"]
    ) as cluster:
        assert cluster.status is ClusterState.running
        made = fake.clusters[cluster.name]
        assert made.options == {"worker_cores": 2}
        assert (made.share_with_users, made.share_with_groups) == (["bob"], ["lab"])


def test_share_cluster_patches_and_returns_the_report(fake: FakeGateway, gateway: Gateway) -> None:
    fake.clusters["c1"] = FakeCluster(name="c1", options={}, status="RUNNING")
    report = gateway.share_cluster("c1", users=["bob", "carol"])
    assert fake.requests_to("PATCH", "/api/v2/clusters/c1")[-1].body == {
        "share_with_users": ["bob", "carol"]
    }
    assert isinstance(report, ClusterReport)
    assert report.owner == "alice" and report.access == "owner"
    assert report.share_with_users == ("bob", "carol") and report.share_with_groups == ()

    report = gateway.share_cluster("c1", groups=["lab"], users=[])
    assert fake.requests_to("PATCH", "/api/v2/clusters/c1")[-1].body == {
        "share_with_users": [],
        "share_with_groups": ["lab"],
    }
    assert report.share_with_users == () and report.share_with_groups == ("lab",)

    with pytest.raises(ValueError, match="give users, groups or both"):
        gateway.share_cluster("c1")
    with pytest.raises(ValueError, match="share_with_users: bad names"):
        gateway.share_cluster("c1", users=[""])
    with pytest.raises(ValueError, match="not found"):
        gateway.share_cluster("nope", users=["bob"])
    fake.clusters["theirs"] = FakeCluster(name="theirs", options={}, owner="bob")
    with pytest.raises(PermissionError, match="only its owner may"):
        gateway.share_cluster("theirs", users=["alice"])


def test_list_clusters_shared_adds_the_clusters_shared_with_you(
    fake: FakeGateway, gateway: Gateway
) -> None:
    fake.clusters["mine"] = FakeCluster(
        name="mine", options={}, status="RUNNING", share_with_groups=["lab"]
    )
    fake.clusters["theirs"] = FakeCluster(name="theirs", options={}, status="RUNNING", owner="bob")

    assert [r.name for r in gateway.list_clusters()] == ["mine"]  # v1: one's own
    mine = gateway.list_clusters()[0]
    assert mine.owner is None and mine.share_with_groups is None  # v1 says nothing of it

    reports = {r.name: r for r in gateway.list_clusters(shared=True)}
    assert set(reports) == {"mine", "theirs"}
    assert reports["mine"].access == "owner" and reports["mine"].share_with_groups == ("lab",)
    assert reports["theirs"].owner == "bob" and reports["theirs"].access == "sharee"
    assert reports["theirs"].share_with_users is None  # not shown to sharees
    assert fake.requests_to("GET", "/api/v2/clusters")[-1].query == ""
    gateway.list_clusters(status="running", shared=True)
    assert fake.requests_to("GET", "/api/v2/clusters")[-1].query == "status=RUNNING"

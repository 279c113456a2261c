"""Gateway's REST calls against the fake gateway, blocking and async.

Covers every Gateway method, the error mapping, re-authentication, cookies and the failure
reason of a cluster that does not start.
"""

from __future__ import annotations

import base64
import warnings
from typing import Any

import aiohttp
import pytest
from fakes import FakeCluster, FakeGateway

from gateway_client import (
    BasicAuth,
    ClusterReport,
    ClusterStatus,
    Gateway,
    GatewayAuth,
    GatewayAuthError,
    GatewayClusterError,
    GatewayServerError,
    GatewayWarning,
    JupyterHubAuth,
    Options,
)
from gateway_client.progress import NullProgress

pytestmark = pytest.mark.unit

ALICE = BasicAuth(username="alice", password="secret")


def running(fake: FakeGateway, name: str = "c1", **kw: Any) -> FakeCluster:
    cluster = FakeCluster(
        name=name, options={"worker_cores": 2}, status="RUNNING", cert="CERT", key="KEY", **kw
    )
    fake.clusters[name] = cluster
    return cluster


@pytest.fixture
def gateway(fake: FakeGateway) -> Any:
    with Gateway(fake.address, proxy_address=8786, auth=ALICE) as gw:
        yield gw


def test_list_clusters_filters_by_status_and_builds_reports(
    fake: FakeGateway, gateway: Gateway
) -> None:
    running(fake, "a")
    fake.clusters["b"] = FakeCluster(
        name="b", options={}, status="STOPPED", stop_time=1_700_000_000_000
    )

    active = gateway.list_clusters()
    assert [r.name for r in active] == ["a"]
    report = active[0]
    assert isinstance(report, ClusterReport)
    assert report.status is ClusterStatus.RUNNING
    assert report.scheduler_address == "gateway://127.0.0.1:8786/a"
    assert report.dashboard_link == f"{fake.address}/clusters/a/status"
    assert report.options == {"worker_cores": 2}
    assert report.security is not None and report.security.require_encryption

    stopped = gateway.list_clusters(status=["stopped", ClusterStatus.FAILED])
    assert [(r.name, r.status) for r in stopped] == [("b", ClusterStatus.STOPPED)]
    assert stopped[0].scheduler_address is None and stopped[0].security is None
    assert stopped[0].stop_time is not None and stopped[0].stop_time.year == 2023
    assert fake.seen[-1].query == "status=STOPPED,FAILED"
    with pytest.raises(ValueError, match="not a cluster status"):
        gateway.list_clusters(status="sleeping")


def test_get_cluster_and_unknown_cluster_is_value_error(
    fake: FakeGateway, gateway: Gateway
) -> None:
    running(fake, "a")
    assert gateway.get_cluster("a").name == "a"
    with pytest.raises(ValueError, match="Cluster nope not found"):
        gateway.get_cluster("nope")


def test_unknown_keys_in_cluster_json_are_ignored(fake: FakeGateway, gateway: Gateway) -> None:
    running(fake, "a", reason="scheduler lost")
    fake.reason_in_json = True
    (report,) = gateway.list_clusters()  # the JSON carries an extra "reason" key
    assert (report.name, report.status) == ("a", ClusterStatus.RUNNING)
    assert gateway.get_cluster("a").options == {"worker_cores": 2}


def test_server_errors_map_to_exceptions(fake: FakeGateway, gateway: Gateway) -> None:
    with pytest.raises(GatewayServerError, match="database on fire"):
        gateway.get_cluster("boom")
    with pytest.raises(PermissionError, match="not your cluster"):
        gateway.get_cluster("not-yours")
    fake.clusters["p"] = FakeCluster(name="p", options={}, status="PENDING")
    with pytest.raises(GatewayClusterError, match="cluster is PENDING"):
        gateway.scale_cluster("p", 2)
    running(fake, "a")
    with pytest.raises(ValueError, match="non-negative"):
        gateway.scale_cluster("a", -1)


def test_versions(gateway: Gateway) -> None:
    from gateway_client import __version__

    assert gateway.get_versions() == {
        "server": {"version": "9.9.9"},
        "client": {"version": __version__},
    }


def test_cluster_options_come_from_the_server_with_local_defaults(
    fake: FakeGateway, gateway: Gateway
) -> None:
    import dask

    options = gateway.cluster_options()
    assert isinstance(options, Options)
    assert dict(options) == {
        "worker_cores": 1,
        "worker_memory": 2.0,
        "image": "dask:latest",
        "gpu": False,
        "environment": "basic",
        "env": {},
    }
    with dask.config.set({"gateway.cluster.options": {"worker_cores": 3, "image": "{USER_IMAGE}"}}):
        import os

        os.environ["USER_IMAGE"] = "custom:1"
        try:
            local = gateway.cluster_options()
            server_only = gateway.cluster_options(use_local_defaults=False)
        finally:
            del os.environ["USER_IMAGE"]
    assert (local.worker_cores, local.image) == (3, "custom:1")
    assert server_only.worker_cores == 1


def test_submit_merges_options_and_kwargs(fake: FakeGateway, gateway: Gateway) -> None:
    options = gateway.cluster_options()
    options.worker_cores = 2
    name = gateway.submit(options, image="other:2", env={"A": "1"})
    sent = fake.requests_to("POST", "/api/v1/clusters/")[-1].body["cluster_options"]
    assert sent["worker_cores"] == 2 and sent["image"] == "other:2" and sent["env"] == {"A": "1"}
    assert fake.clusters[name].options == sent

    import dask

    with dask.config.set({"gateway.cluster.options": {"worker_cores": 4}}):
        name2 = gateway.submit(gpu=True)
    assert fake.clusters[name2].options == {"worker_cores": 4, "gpu": True}

    with pytest.raises(ValueError, match="Unknown options"):
        gateway.submit(bogus=1)
    with pytest.raises(TypeError, match="cluster_options must be"):
        gateway.submit(cluster_options=[("worker_cores", 1)])  # type: ignore[arg-type]


def test_stop_scale_adapt(fake: FakeGateway, gateway: Gateway) -> None:
    running(fake, "a")
    gateway.scale_cluster("a", 3)
    assert fake.requests_to("POST", "/api/v1/clusters/a/scale")[-1].body == {"count": 3}
    gateway.adapt_cluster("a", minimum=1, maximum=5)
    assert fake.requests_to("POST", "/api/v1/clusters/a/adapt")[-1].body == {
        "minimum": 1,
        "maximum": 5,
        "active": True,
    }
    gateway.adapt_cluster("a", active=False)
    assert fake.requests_to("POST", "/api/v1/clusters/a/adapt")[-1].body["active"] is False
    with pytest.warns(GatewayWarning, match="scaled to 10 instead"):
        gateway.scale_cluster("a", 50)
    with pytest.warns(GatewayWarning, match="scaled to 10 instead"):
        gateway.adapt_cluster("a", maximum=50)

    gateway.stop_cluster("a")
    assert fake.clusters["a"].status == "STOPPED"
    gateway.stop_cluster("never-existed")  # idempotent: 204 for unknown names too


def test_scale_and_adapt_a_worker_group(fake: FakeGateway, gateway: Gateway) -> None:
    running(fake, "a")
    fake.clusters["a"].group_counts["gpu"] = 0
    gateway.scale_cluster("a", 2, group="gpu")
    assert fake.requests_to("POST", "/api/v1/clusters/a/scale")[-1].body == {
        "count": 2,
        "group": "gpu",
    }
    gateway.adapt_cluster("a", minimum=1, maximum=3, group="gpu")
    assert fake.requests_to("POST", "/api/v1/clusters/a/adapt")[-1].body == {
        "minimum": 1,
        "maximum": 3,
        "active": True,
        "group": "gpu",
    }
    gateway.scale_cluster("a", 1)
    groups = gateway.worker_groups("a")
    assert {g: c["count"] for g, c in groups.items()} == {"default": 1, "gpu": 3}
    assert list(groups) == ["default", "gpu"]
    with pytest.raises(ValueError, match="no worker group 'tpu'; its groups are default, gpu"):
        gateway.scale_cluster("a", 1, group="tpu")


def test_basic_auth_is_sent_first_then_the_cookie_replaces_it(
    fake: FakeGateway, gateway: Gateway
) -> None:
    gateway.list_clusters()
    gateway.list_clusters()
    gateway.get_versions()
    first, second, third = fake.seen
    assert first.authorization == "Basic " + base64.b64encode(b"alice:secret").decode()
    assert first.cookie is None
    assert second.authorization is None and second.cookie in fake.sessions
    assert third.cookie == second.cookie


def test_a_401_triggers_one_reauthentication_with_the_auth_hooks(fake: FakeGateway) -> None:
    calls: list[Any] = []

    class Challenge(GatewayAuth):
        """Original-client style: waits for the 401, returns (headers, context)."""

        def pre_request(self, resp: aiohttp.ClientResponse | None) -> Any:
            calls.append(("pre", resp.status if resp is not None else None))
            return {"Authorization": "jupyterhub hub-token"}, "ctx"

        def post_response(self, resp: aiohttp.ClientResponse, context: Any = None) -> None:
            calls.append(("post", resp.status, context))

    with Gateway(fake.address, auth=Challenge()) as gw:
        assert gw.list_clusters() == []
        assert gw.list_clusters() == []  # the cookie from the first login suffices
    assert calls == [("pre", 401), ("post", 200, "ctx")]
    assert [s.authorization for s in fake.seen] == [None, "jupyterhub hub-token", None]


def test_rejected_credentials_fail_clearly_after_one_retry(fake: FakeGateway) -> None:
    wrong = BasicAuth(username="alice", password="wrong")
    with (
        Gateway(fake.address, auth=wrong) as gw,
        pytest.raises(GatewayAuthError, match="refused our credentials") as info,
    ):
        gw.list_clusters()
    assert isinstance(info.value, PermissionError)
    assert len(fake.seen) == 2


def test_jupyterhub_auth(fake: FakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "hub-token")
    with Gateway(fake.address, auth="jupyterhub") as gw:
        gw.list_clusters()
    assert fake.seen[0].authorization == "jupyterhub hub-token"


def test_unreachable_gateway_is_a_connection_error() -> None:
    with (
        Gateway("http://127.0.0.1:9", auth=ALICE) as gw,
        pytest.raises(ConnectionError, match=r"cannot reach the gateway at http://127\.0\.0\.1:9"),
    ):
        gw.list_clusters()


# -- waiting for a start --------------------------------------------------------------------------


def test_wait_for_start_returns_the_running_report(fake: FakeGateway, gateway: Gateway) -> None:
    fake.new_cluster = {"polls_until_done": 2, "outcome": "RUNNING"}
    name = gateway.submit()
    report = gateway.sync(gateway._wait_for_start, name, NullProgress())
    assert report.status is ClusterStatus.RUNNING and report.tls_cert is not None
    waits = [s for s in fake.requests_to("GET", f"/api/v1/clusters/{name}") if s.query == "wait"]
    assert len(waits) == 3


@pytest.mark.parametrize(
    ("route", "in_json", "expected"),
    [
        (
            True,
            False,
            "failed to start: scheduler exited with code 1: ImportError: no module named foo",
        ),
        (
            False,
            True,
            "failed to start: scheduler exited with code 1: ImportError: no module named foo",
        ),
        (False, False, "failed to start: the gateway gave no reason"),
    ],
    ids=["v2-route", "json-key", "no-reason"],
)
def test_failed_start_raises_with_the_server_reason(
    fake: FakeGateway, gateway: Gateway, route: bool, in_json: bool, expected: str
) -> None:
    fake.reason_route, fake.reason_in_json = route, in_json
    fake.new_cluster = {
        "polls_until_done": 0,
        "outcome": "FAILED",
        "reason": "scheduler exited with code 1: ImportError: no module named foo",
    }
    name = gateway.submit()
    with pytest.raises(GatewayClusterError, match=expected) as info:
        gateway.sync(gateway._wait_for_start, name, NullProgress())
    assert name in str(info.value)


def test_get_logs_by_name_with_the_failure_reason_as_the_cluster_log(
    fake: FakeGateway, gateway: Gateway
) -> None:
    running(fake, "a", reason="scheduler exited: out of memory", logs={"scheduler": "bye"})
    assert gateway.get_logs("a") == {
        "Cluster": "scheduler exited: out of memory",
        "Scheduler": "bye",
    }
    assert gateway.get_logs("a", cluster=False, workers=False) == {"Scheduler": "bye"}
    with pytest.raises(ValueError, match="Cluster ghost not found"):
        gateway.get_logs("ghost", cluster=False)
    with pytest.raises(PermissionError, match="not your cluster"):
        gateway.get_logs("not-yours", cluster=False)


def test_waiting_on_a_stopped_cluster_says_so(fake: FakeGateway, gateway: Gateway) -> None:
    fake.new_cluster = {"polls_until_done": 0, "outcome": "STOPPED", "reason": "idle timeout"}
    name = gateway.submit()
    with pytest.raises(GatewayClusterError, match="is already stopped: idle timeout"):
        gateway.sync(gateway._wait_for_start, name, NullProgress())


# -- async API ------------------------------------------------------------------------------------


async def test_async_api(fake: FakeGateway) -> None:
    running(fake, "a")
    async with Gateway(fake.address, auth=ALICE, asynchronous=True) as gw:
        assert gw.asynchronous
        reports = await gw.list_clusters()
        assert [r.name for r in reports] == ["a"]
        assert (await gw.get_cluster("a")).status is ClusterStatus.RUNNING
        options = await gw.cluster_options()
        assert options.worker_cores == 1
        name = await gw.submit(options, worker_cores=2)
        assert fake.clusters[name].options["worker_cores"] == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            await gw.scale_cluster("a", 2)
            await gw.adapt_cluster("a", minimum=0, maximum=4)
        await gw.stop_cluster(name)
        assert fake.clusters[name].status == "STOPPED"
        with pytest.raises(ValueError, match="not found"):
            await gw.get_cluster("nope")
    closed = Gateway(fake.address, auth=ALICE, asynchronous=True)
    await closed.list_clusters()
    await closed.close()
    assert closed._http._session is None


def test_blocking_calls_after_close_fail_clearly(fake: FakeGateway) -> None:
    gw = Gateway(fake.address, auth=ALICE)
    gw.close()
    gw.close()  # closing twice is fine
    with pytest.raises(RuntimeError, match="is closed"):
        gw.list_clusters()


def test_jupyterhub_auth_without_token_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="JUPYTERHUB_API_TOKEN"):
        JupyterHubAuth()


def test_requests_go_through_the_configured_http_proxy(fake: FakeGateway) -> None:
    import dask

    # The fake answers proxied (absolute-URI) requests too, so it can stand in for the proxy.
    proxy = fake.address.replace("http://", "http://user:pw@")
    with (
        dask.config.set({"gateway.http-client.proxy": proxy}),
        Gateway("http://gateway.invalid:8000", auth=ALICE) as gw,
    ):
        assert gw.get_versions()["server"] == {"version": "9.9.9"}
    (seen,) = fake.seen
    assert seen.host == "gateway.invalid:8000"
    assert seen.proxy_authorization == "Basic " + base64.b64encode(b"user:pw").decode()


def test_an_expired_session_cookie_is_replaced_by_logging_in_again(
    fake: FakeGateway, gateway: Gateway
) -> None:
    gateway.list_clusters()
    fake.sessions.clear()  # the server forgot every session (restart, cache_max_age passed)
    gateway.list_clusters()
    assert [(s.authorization is not None, s.cookie is not None) for s in fake.seen] == [
        (True, False),  # first login
        (False, True),  # stale cookie: 401
        (True, True),  # re-authenticated once
    ]


def test_a_gateway_collected_in_another_thread_never_blocks_that_thread(
    fake: FakeGateway,
) -> None:
    """The garbage collector may finalize a Gateway in a thread that is still starting, while
    the thread starting it holds distributed's loop lock and waits for it: closing there must
    not wait for that lock (it deadlocked the suite), it closes from a thread of its own."""
    import threading

    from distributed.utils import LoopRunner

    gw = Gateway(fake.address, proxy_address=8786, auth=ALICE)
    finalizer = threading.Thread(target=gw.__del__)
    with LoopRunner._lock:  # what a Gateway starting in this thread holds
        finalizer.start()
        finalizer.join(timeout=5)
        assert not finalizer.is_alive(), "the finalizer blocked on the loop lock"
        closers = [t for t in threading.enumerate() if t.name == "close-collected-gateway"]
        assert closers, "nobody was left to close the gateway"
        assert gw._loop_runner.is_started()  # its loop cannot stop while the lock is held here
    for closer in closers:  # once the lock is free, the closer stops the loop and ends
        closer.join(timeout=10)
        assert not closer.is_alive()
    assert gw._closed and not gw._loop_runner.is_started()

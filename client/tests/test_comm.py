"""The gateway:// comm against a real Dask scheduler behind an SNI-routing splice.

In-process Scheduler and Worker (TLS only, a per-cluster certificate made here), the fake
gateway handing out that certificate, and a Client computing through `gateway://`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from distributed import Scheduler, Worker
from distributed.comm import connect
from distributed.comm.core import CommClosedError, FatalCommClosedError
from distributed.core import rpc
from distributed.security import Security
from fakes import FakeCluster, FakeGateway, LoopThread, SNISplice, make_cert

from gateway_client import BasicAuth, ClusterState, Gateway, GatewayCluster
from gateway_client.comm import GatewayBackend, parse_gateway_address
from gateway_client.models import cluster_security

pytestmark = pytest.mark.unit

ALICE = BasicAuth(username="alice", password="secret")


@dataclass(kw_only=True)
class DaskCluster:
    name: str
    cert: str
    key: str
    scheduler: Scheduler
    worker: Worker


def server_security(cert: str, key: str) -> Security:
    return Security(
        require_encryption=True,
        tls_ca_file=cert,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
    )


@pytest.fixture
def splice(loop_thread: LoopThread) -> Iterator[SNISplice]:
    proxy = SNISplice()
    loop_thread.run(proxy.start())
    yield proxy
    loop_thread.run(proxy.stop())


@pytest.fixture
def dask_cluster(loop_thread: LoopThread, splice: SNISplice) -> Iterator[DaskCluster]:
    """A TLS scheduler with one worker, routed by the splice as cluster ``c0ffee``."""
    name = "c0ffee"
    cert, key = make_cert(name)
    security = server_security(cert, key)

    async def start() -> tuple[Scheduler, Worker]:
        scheduler = await Scheduler(
            host="127.0.0.1", port=0, protocol="tls", security=security, dashboard=False
        )
        worker = await Worker(scheduler.address, security=security, nthreads=1, host="127.0.0.1")
        return scheduler, worker

    scheduler, worker = loop_thread.run(start())
    splice.routes[f"daskgateway-{name}"] = ("127.0.0.1", scheduler.port)
    yield DaskCluster(name=name, cert=cert, key=key, scheduler=scheduler, worker=worker)

    async def stop() -> None:
        await worker.close()
        await scheduler.close()

    loop_thread.run(stop())


def test_address_parsing_and_backend() -> None:
    assert parse_gateway_address("gateway://proxy.example.org:8786/abc") == (
        "proxy.example.org",
        8786,
        "abc",
    )
    assert parse_gateway_address("127.0.0.1:1/abc/") == ("127.0.0.1", 1, "abc")
    with pytest.raises(ValueError, match="names no cluster"):
        parse_gateway_address("gateway://host:1")
    with pytest.raises(ValueError, match="needs a host and a port"):
        parse_gateway_address("gateway://host/abc")
    backend = GatewayBackend()
    assert backend.get_address_host("localhost:8786/abc") == "localhost"
    assert backend.get_address_host_port("localhost:8786/abc") == ("localhost", 8786)
    assert backend.resolve_address("localhost:8786/abc") == "127.0.0.1:8786/abc"
    assert backend.get_local_address_for("127.0.0.1:8786/abc") == "127.0.0.1:8786/abc"
    with pytest.raises(NotImplementedError, match="dialled, not listened on"):
        backend.get_listener("127.0.0.1:1/abc", None, True)


async def test_connects_with_the_cluster_sni_and_speaks_dask(
    dask_cluster: DaskCluster, splice: SNISplice
) -> None:
    security = cluster_security(tls_cert=dask_cluster.cert, tls_key=dask_cluster.key)
    address = f"gateway://127.0.0.1:{splice.port}/{dask_cluster.name}"
    comm = await connect(address, **security.get_connection_args("client"))
    try:
        assert comm.peer_address == address
        assert comm.local_address.startswith("tls://127.0.0.1:")
        assert comm.extra_info["peercert"]  # the scheduler proved its identity over TLS
    finally:
        await comm.close()
    async with rpc(address, connection_args=security.get_connection_args("client")) as scheduler:
        identity = await scheduler.identity()
    assert identity["type"] == "Scheduler" and len(identity["workers"]) == 1
    assert set(splice.seen_sni) == {f"daskgateway-{dask_cluster.name}"}


async def test_an_unknown_cluster_name_is_refused(
    dask_cluster: DaskCluster, splice: SNISplice
) -> None:
    security = cluster_security(tls_cert=dask_cluster.cert, tls_key=dask_cluster.key)
    with pytest.raises((OSError, CommClosedError)):
        await connect(
            f"gateway://127.0.0.1:{splice.port}/other",
            timeout=0.5,
            **security.get_connection_args("client"),
        )
    assert "daskgateway-other" in splice.seen_sni


async def test_another_clusters_credentials_are_refused(
    dask_cluster: DaskCluster, splice: SNISplice
) -> None:
    cert, key = make_cert("someone-else")
    security = cluster_security(tls_cert=cert, tls_key=key)
    with pytest.raises((FatalCommClosedError, OSError)):
        await connect(
            f"gateway://127.0.0.1:{splice.port}/{dask_cluster.name}",
            timeout=2,
            **security.get_connection_args("client"),
        )


async def test_encryption_is_required(dask_cluster: DaskCluster, splice: SNISplice) -> None:
    with pytest.raises(TypeError, match="ssl_context"):
        await connect(f"gateway://127.0.0.1:{splice.port}/{dask_cluster.name}", timeout=1)


def serve_cluster(fake: FakeGateway, dask_cluster: DaskCluster) -> None:
    """Make the fake gateway hand out ``dask_cluster`` for every new cluster."""

    def on_create(cluster: FakeCluster) -> None:
        fake.clusters.pop(cluster.name)
        cluster.name = dask_cluster.name
        cluster.cert, cluster.key = dask_cluster.cert, dask_cluster.key
        fake.clusters[cluster.name] = cluster

    fake.on_create = on_create


def test_blocking_client_computes_through_the_gateway(
    fake: FakeGateway, dask_cluster: DaskCluster, splice: SNISplice
) -> None:
    serve_cluster(fake, dask_cluster)
    with Gateway(fake.address, proxy_address=splice.port, auth=ALICE) as gateway:
        cluster = gateway.new_cluster(worker_cores=1)
        assert cluster.name == dask_cluster.name
        assert cluster.scheduler_address == f"gateway://127.0.0.1:{splice.port}/{dask_cluster.name}"
        client = cluster.get_client(set_as_default=False)
        assert client.submit(lambda x: x + 1, 1).result() == 2
        assert client.dashboard_link == cluster.dashboard_link
        client.shutdown()  # a Client made from the cluster shuts the cluster down too
        assert cluster.status is ClusterState.closed
        assert fake.clusters[dask_cluster.name].status == "STOPPED"
    assert f"daskgateway-{dask_cluster.name}" in splice.seen_sni


async def test_async_client_computes_and_sees_workers(
    fake: FakeGateway, dask_cluster: DaskCluster, splice: SNISplice
) -> None:
    fake.clusters[dask_cluster.name] = FakeCluster(
        name=dask_cluster.name,
        options={},
        status="RUNNING",
        cert=dask_cluster.cert,
        key=dask_cluster.key,
    )
    async with Gateway(
        fake.address, proxy_address=splice.port, auth=ALICE, asynchronous=True
    ) as gateway:
        cluster: Any = await gateway.connect(dask_cluster.name)
        async with cluster:
            async with cluster.get_client(set_as_default=False) as client:
                assert await client.submit(sum, [1, 2, 3]) == 6
            for _ in range(500):
                if cluster.scheduler_info.get("workers"):
                    break
                await asyncio.sleep(0.01)
            (worker,) = cluster.scheduler_info["workers"].values()
            assert worker["nthreads"] == 1
            assert (
                repr(cluster) == f"GatewayCluster<{dask_cluster.name}, status=running, workers=1>"
            )
    assert isinstance(cluster, GatewayCluster) and cluster.status is ClusterState.closed
    assert fake.clusters[dask_cluster.name].status == "RUNNING"  # connect() does not shut down

"""The original `dask-gateway` client's KerberosAuth (pykerberos) against this gateway with the
``kerberos`` authenticator and a real KDC: log in, start a cluster, compute, shut down.

Runs only in `nox -s compat_kerberos`, whose venv holds `dask-gateway` and `pykerberos`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.compat, pytest.mark.usefixtures("no_process_left_behind")]


def original_client_flow(address: str) -> tuple[str, int]:
    """Log in with the original client's KerberosAuth, compute on a new cluster; the cluster's
    name and the result."""
    from dask_gateway import Gateway, KerberosAuth

    with Gateway(address, auth=KerberosAuth()) as gateway:
        cluster = gateway.new_cluster()
        try:
            cluster.scale(1)
            client = cluster.get_client(set_as_default=False)
            try:
                client.wait_for_workers(1, timeout=60)
                return cluster.name, int(client.submit(sum, range(10)).result(timeout=60))
            finally:
                client.close()
        finally:
            cluster.shutdown()


async def test_the_original_clients_kerberos_auth_logs_in_and_computes(
    realm: Any,
    ccache: Path,
    make_gateway: Callable[..., Any],
    kerberos_config: Any,
    local_backend_config: Any,
) -> None:
    try:
        import dask_gateway  # noqa: F401
        import kerberos  # noqa: F401
    except ImportError as exc:
        pytest.fail(
            "the compat tier needs dask-gateway and pykerberos: "
            f"run `nox -s compat_kerberos` ({exc})"
        )
    realm.kinit("alice", password="alice-password")
    server = await make_gateway(local_backend_config(kerberos_config()))
    port = server.public_address.rpartition(":")[2]
    # The original client is synchronous: run it off this loop, which serves the gateway.
    name, result = await asyncio.to_thread(original_client_flow, f"http://localhost:{port}")
    assert result == 45
    cluster = await server.backend.get_cluster(name)
    assert cluster is not None and cluster.username == "alice"

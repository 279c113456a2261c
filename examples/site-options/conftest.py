"""Shared fixtures of the site-options example's tests.
Owns the ``inprocess-slurm`` test backend: core's in-process fakes with Slurm's cluster config.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway_core import hookimpl
from gateway_core.specs import BackendSpec

SLURM_LIKE = "inprocess-slurm"
"""Backend name of core's in-process driver structured with `SlurmClusterConfig`, so a real
in-process gateway resolves ``[cluster]`` exactly as the Slurm site does (setup scripts,
partition) without submitting jobs."""


class SlurmLikeBackend:
    """A plugin registering `SLURM_LIKE`."""

    @hookimpl
    def gateway_register_backends(self) -> list[BackendSpec]:
        from gateway_core.testing.driver import InProcessConfig, InProcessDriver
        from gateway_slurm.backend import SlurmClusterConfig

        return [
            BackendSpec(
                name=SLURM_LIKE,
                driver=InProcessDriver,
                config=InProcessConfig,
                cluster_config=SlurmClusterConfig,
                description="in-process fakes with Slurm's [cluster] keys (tests only)",
            )
        ]


@pytest.fixture
def site_plugins() -> list[object]:
    """The plugins of a test gateway: `SLURM_LIKE` and the site's options module."""
    import site_policy

    return [SlurmLikeBackend(), site_policy]


@pytest.fixture
def site_gateway_config() -> dict[str, Any]:
    """A gateway config like the example's gateway.toml, on the `SLURM_LIKE` backend."""
    return {
        "gateway": {"backend": SLURM_LIKE},
        "cluster": {
            "partition": "dask",
            "worker_cores": 1,
            "worker_memory": "4 G",
            "worker_setup": "module load gcc",
            "environment": {"SITE_VAR": "site", "MY_VAR": "from-site"},
        },
    }

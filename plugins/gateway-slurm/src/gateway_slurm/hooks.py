"""Entry point of gateway-slurm (``[project.entry-points.gateway] slurm``): the ``slurm`` backend.

Every ``gateway`` command loads this module, so it imports only core's hook marker and spec;
`gateway_slurm.backend` (the driver and its config classes) is imported when the registry asks.
"""

from __future__ import annotations

from gateway_core import hookimpl
from gateway_core.specs import BackendSpec


@hookimpl
def gateway_register_backends() -> list[BackendSpec]:
    from .backend import SlurmClusterConfig, SlurmConfig, SlurmDriver

    return [
        BackendSpec(
            name="slurm",
            driver=SlurmDriver,
            config=SlurmConfig,
            cluster_config=SlurmClusterConfig,
            description="Dask schedulers and workers as Slurm jobs of the requesting user",
        )
    ]

"""The plugin's entry point: registers the ``slurm`` backend.

Kept light on purpose: every gateway process imports it, so the driver is imported inside the
hook, only when asked for.
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

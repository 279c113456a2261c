"""The plugin's entry point: registers the ``pbs`` backend.

Kept light on purpose: every gateway process imports it, so the driver is imported inside the
hook, only when asked for.
"""

from __future__ import annotations

from gateway_core import hookimpl
from gateway_core.specs import BackendSpec


@hookimpl
def gateway_register_backends() -> list[BackendSpec]:
    from .backend import PBSClusterConfig, PBSConfig, PBSDriver

    return [
        BackendSpec(
            name="pbs",
            driver=PBSDriver,
            config=PBSConfig,
            cluster_config=PBSClusterConfig,
            description="Dask schedulers and workers as PBS jobs of the requesting user",
        )
    ]

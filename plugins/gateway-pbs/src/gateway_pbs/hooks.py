"""Registers the ``pbs`` backend with the gateway; named by gateway-pbs's ``gateway`` entry point.

Owns only the registration. The PBS driver module is imported inside the hook, on demand,
which keeps ``gateway plugins`` and a gateway that uses another backend from loading it.
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

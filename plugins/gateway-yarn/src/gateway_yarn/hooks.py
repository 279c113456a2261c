"""Registers the ``yarn`` backend with the gateway; named by gateway-yarn's ``gateway`` entry point.

Owns only the registration. The driver module (and skein, grpc) is imported inside the hook, on
demand, which keeps ``gateway plugins`` and a gateway that uses another backend from loading it.
"""

from __future__ import annotations

from gateway_core import hookimpl
from gateway_core.specs import BackendSpec


@hookimpl
def gateway_register_backends() -> list[BackendSpec]:
    from .backend import YarnClusterConfig, YarnConfig, YarnDriver

    return [
        BackendSpec(
            name="yarn",
            driver=YarnDriver,
            config=YarnConfig,
            cluster_config=YarnClusterConfig,
            description="Each Dask cluster one YARN application (through skein), run as the user",
        )
    ]

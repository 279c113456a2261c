"""Hook implementations of the test helpers: registers the ``inprocess`` and ``simulated``
backends.

Owns nothing but the registration; tests register this module with their plugin manager
explicitly (it is not an entry point, so real gateways never see it).
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..specs import BackendSpec


@hookimpl
def gateway_register_backends() -> list[BackendSpec]:
    from .driver import InProcessConfig, InProcessDriver
    from .simulated import SimulatedConfig, SimulatedDriver

    return [
        BackendSpec(
            name="inprocess",
            driver=InProcessDriver,
            config=InProcessConfig,
            description="Fake schedulers and workers inside the gateway process (tests only)",
        ),
        BackendSpec(
            name="simulated",
            driver=SimulatedDriver,
            config=SimulatedConfig,
            description="Starts nothing; schedulers are played by whoever sends heartbeats "
            "(the scale benchmark)",
        ),
    ]

"""Hook implementations of the test helpers: registers the ``inprocess`` backend.

Owns nothing but the registration; tests register this module with their plugin manager
explicitly (it is not an entry point, so real gateways never see it).
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from ..specs import BackendSpec


@hookimpl
def gateway_register_backends() -> list[BackendSpec]:
    from .driver import InProcessConfig, InProcessDriver

    return [
        BackendSpec(
            name="inprocess",
            driver=InProcessDriver,
            config=InProcessConfig,
            description="Fake schedulers and workers inside the gateway process (tests only)",
        )
    ]

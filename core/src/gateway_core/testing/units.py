"""Drivers and cluster records built by hand, for the unit tests of a driver (no gateway).

Owns `unit_driver` and `unit_cluster`: a driver from its `BackendSpec` with a bare context, and
a `Cluster` record whose config is structured the way `ProcessBackend` would hand it over.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ..backends.base import ClusterDriver
from ..config import load_config, structure, unstructure
from ..context import GatewayContext
from ..models import Cluster
from ..specs import BackendSpec

D = TypeVar("D", bound=ClusterDriver[Any, Any])

UNIT_API_URL = "http://127.0.0.1:8000/api"
"""The gateway API URL `unit_driver`'s context advertises to clusters."""


def unit_driver(spec: BackendSpec, driver_type: type[D], /, **config: Any) -> D:
    """The driver of ``spec`` built as a gateway would (`BackendSpec.make_driver`), with
    ``config`` structured as its ``[backend.<name>]`` table and a context that has no plugins
    and advertises `UNIT_API_URL`. Bad settings raise `ConfigError` naming the key; a driver
    that is not a ``driver_type`` raises TypeError.

    Example::

        driver = unit_driver(SLURM_SPEC, SlurmDriver, submit_command="/usr/bin/sbatch")
        sub = driver.submission(cluster, driver.cluster_config(cluster), ...)
    """
    context = GatewayContext(config=load_config({}, environ={}), hook=None)
    context.api_url = UNIT_API_URL
    settings = structure(config, spec.config, path=f"backend.{spec.name}")
    driver = spec.make_driver(config=settings, context=context)
    if not isinstance(driver, driver_type):
        raise TypeError(
            f"backend {spec.name!r} made a {type(driver).__name__}, not a {driver_type}"
        )
    return driver


def unit_cluster(
    spec: BackendSpec,
    *,
    name: str = "abc123",
    username: str = "alice",
    scheduler_address: str = "tls://10.1.1.1:4000",
    **config: Any,
) -> Cluster:
    """A cluster record of ``username`` with ``config`` as its `[cluster]` settings (checked
    and filled with defaults by ``spec.cluster_config``), placeholder credentials, and a
    scheduler already at ``scheduler_address`` (so worker operations can be built)."""
    typed = structure(config, spec.cluster_config, path="cluster")
    return Cluster(
        name=name,
        username=username,
        token="tok",
        config=unstructure(typed),
        typed_config=typed,
        tls_cert=b"C",
        tls_key=b"K",
        scheduler_address=scheduler_address,
    )


__all__ = ["UNIT_API_URL", "unit_cluster", "unit_driver"]

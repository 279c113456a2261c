"""The records registration hooks return: one attrs class per plugin kind.

Owns `BackendSpec`, `AuthenticatorSpec` and `ProxySpec`, which name an implementation class and
the attrs class its config section is structured into.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from attrs import define, field

from .config import AuthConfig, BackendConfig, ClusterConfig, ProxyConfig

if TYPE_CHECKING:
    from .auth.base import Authenticator
    from .backends.base import Backend, ClusterDriver
    from .context import GatewayContext
    from .proxies import Proxy

DriverFactory: TypeAlias = "Callable[..., ClusterDriver[Any, Any]]"
"""What `BackendSpec.driver` holds: a `ClusterDriver` subclass, or any callable taking the same
keyword arguments (``config``, ``context``, ``cluster_config_class``, ``name``) and returning a
driver, e.g. ``functools.partial(LocalDriver, processes=GATEWAY_USER)`` to register one driver
class twice with different parts."""


@define(kw_only=True, frozen=True)
class BackendSpec:
    """A cluster backend: either ``driver``, a `ClusterDriver` subclass (or a `DriverFactory`)
    that core's `ProcessBackend` runs (the usual case), or ``backend``, a full `Backend`
    subclass. ``config`` structures `[backend.<name>]`; ``cluster_config`` structures
    `[cluster]` when this backend is selected. These two are the only declaration of a
    backend's config classes: a driver gets them from here (`make_driver`)."""

    name: str
    driver: DriverFactory | None = None
    backend: type[Backend] | None = None
    config: type[BackendConfig] = BackendConfig
    cluster_config: type[ClusterConfig] = ClusterConfig
    description: str = ""
    plugin: str = field(default="", eq=False)
    """Filled in by the registry: the plugin (entry-point name) that registered it."""

    def __attrs_post_init__(self) -> None:
        if (self.driver is None) == (self.backend is None):
            raise TypeError(f"BackendSpec {self.name!r}: give exactly one of driver= or backend=")

    def make_driver(
        self, *, config: BackendConfig, context: GatewayContext, **kwargs: Any
    ) -> ClusterDriver[Any, Any]:
        """The driver for this backend: ``driver`` called with ``config`` (structured with
        ``self.config``), ``context``, this spec's ``cluster_config`` and ``name``, and
        ``kwargs``."""
        if self.driver is None:
            raise TypeError(f"BackendSpec {self.name!r} has no driver (it is a full backend)")
        if not isinstance(config, self.config):
            raise TypeError(
                f"backend {self.name!r} needs a {self.config.__name__}, got {type(config).__name__}"
            )
        return self.driver(
            config=config,
            context=context,
            cluster_config_class=self.cluster_config,
            name=self.name,
            **kwargs,
        )


@define(kw_only=True, frozen=True)
class AuthenticatorSpec:
    """An authenticator: ``authenticator`` is an `Authenticator` subclass; ``config``
    structures `[auth.<name>]`."""

    name: str
    authenticator: type[Authenticator]
    config: type[AuthConfig] = AuthConfig
    description: str = ""
    plugin: str = field(default="", eq=False)


@define(kw_only=True, frozen=True)
class ProxySpec:
    """A proxy: ``proxy`` is a `Proxy` subclass; ``config`` structures `[proxy]`."""

    name: str
    proxy: type[Proxy]
    config: type[ProxyConfig] = ProxyConfig
    description: str = ""
    plugin: str = field(default="", eq=False)


AnySpec = BackendSpec | AuthenticatorSpec | ProxySpec

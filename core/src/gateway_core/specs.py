"""The records registration hooks return: one attrs class per plugin kind.

Owns `BackendSpec`, `AuthenticatorSpec` and `ProxySpec`, which name an implementation class and
the attrs class its config section is structured into.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attrs import define, field

from .config import AuthConfig, BackendConfig, ClusterConfig, ProxyConfig

if TYPE_CHECKING:
    from .auth.base import Authenticator
    from .backends.base import Backend, ClusterDriver
    from .proxies import Proxy


@define(kw_only=True, frozen=True)
class BackendSpec:
    """A cluster backend: either ``driver``, a `ClusterDriver` subclass that core's
    `ProcessBackend` runs (the usual case), or ``backend``, a full `Backend` subclass.
    ``config`` structures `[backend.<name>]`; ``cluster_config`` structures `[cluster]` when
    this backend is selected."""

    name: str
    driver: type[ClusterDriver] | None = None
    backend: type[Backend] | None = None
    config: type[BackendConfig] = BackendConfig
    cluster_config: type[ClusterConfig] = ClusterConfig
    description: str = ""
    plugin: str = field(default="", eq=False)
    """Filled in by the registry: the plugin (entry-point name) that registered it."""

    def __attrs_post_init__(self) -> None:
        if (self.driver is None) == (self.backend is None):
            raise TypeError(f"BackendSpec {self.name!r}: give exactly one of driver= or backend=")


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
KIND_OF: dict[type[Any], str] = {
    BackendSpec: "backend",
    AuthenticatorSpec: "authenticator",
    ProxySpec: "proxy",
}

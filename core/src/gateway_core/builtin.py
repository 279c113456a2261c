"""Core's own plugin, registered as ``core`` through the same hooks third-party plugins use.

Owns the built-in registrations (the ``local`` and ``unsafe-local`` backends, the ``simple``
authenticator) and the fallback answer to
`gateway_cluster_options`: the form declared in the config's ``[options]`` tables.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .hookspecs import hookimpl
from .specs import AuthenticatorSpec, BackendSpec

if TYPE_CHECKING:
    from .config import Config
    from .models import User
    from .options import Options


@hookimpl
def gateway_register_backends() -> list[BackendSpec]:
    from .backends.local import GatewayUser, LocalBackendConfig, LocalDriver, RequestingUser

    # One driver, two owners of the processes.
    return [
        BackendSpec(
            name="local",
            driver=functools.partial(LocalDriver, owner=RequestingUser()),
            config=LocalBackendConfig,
            description="Dask processes on the gateway's host, run as the requesting user "
            "(needs root)",
        ),
        BackendSpec(
            name="unsafe-local",
            driver=functools.partial(LocalDriver, owner=GatewayUser()),
            config=LocalBackendConfig,
            description="Dask processes on the gateway's host, run as the gateway's user "
            "(no separation between users)",
        ),
    ]


@hookimpl
def gateway_register_authenticators() -> list[AuthenticatorSpec]:
    from .auth.simple import SimpleAuthConfig, SimpleAuthenticator

    return [
        AuthenticatorSpec(
            name="simple",
            authenticator=SimpleAuthenticator,
            config=SimpleAuthConfig,
            description="Any user name, with an optional shared password (testing, demos)",
        )
    ]


@hookimpl(trylast=True)
def gateway_cluster_options(user: User, config: Config) -> Options:
    """The same form for everyone: ``[options]`` of the config (empty when it declares none).

    ``trylast`` so that any site plugin answering for a user wins over the file.
    """
    from .options import Options

    return Options.from_config(config.options)

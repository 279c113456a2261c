"""The plugin's entry point: registers the ``jupyterhub`` authenticator.

Kept light on purpose: every gateway process imports it, so the authenticator (and aiohttp's
client) is imported inside the hook, only when asked for.
"""

from __future__ import annotations

from gateway_core import hookimpl
from gateway_core.specs import AuthenticatorSpec


@hookimpl
def gateway_register_authenticators() -> list[AuthenticatorSpec]:
    from .authenticator import JupyterHubAuthConfig, JupyterHubAuthenticator

    return [
        AuthenticatorSpec(
            name="jupyterhub",
            authenticator=JupyterHubAuthenticator,
            config=JupyterHubAuthConfig,
            description="users log in with a JupyterHub API token, checked with the hub",
        )
    ]

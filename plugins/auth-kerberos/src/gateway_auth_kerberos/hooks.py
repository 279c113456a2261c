"""The plugin's entry point: registers the ``kerberos`` authenticator.

Kept light on purpose: every gateway process imports it, so the authenticator module is imported
inside the hook, and `gssapi` only when a gateway uses it.
"""

from __future__ import annotations

from gateway_core import hookimpl
from gateway_core.specs import AuthenticatorSpec


@hookimpl
def gateway_register_authenticators() -> list[AuthenticatorSpec]:
    from .authenticator import KerberosAuthConfig, KerberosAuthenticator

    return [
        AuthenticatorSpec(
            name="kerberos",
            authenticator=KerberosAuthenticator,
            config=KerberosAuthConfig,
            description="Kerberos tickets over SPNEGO (Authorization: Negotiate), keytab keys",
        )
    ]

"""gateway-auth-kerberos: the Kerberos (SPNEGO) authenticator of the gateway.

Owns the package version; the hooks live in `hooks` (the entry point) and the authenticator and
its config in `authenticator`.
"""

__version__ = "0.1.0"

"""gateway-auth-jupyterhub: the JupyterHub authenticator of the gateway.

Owns the package version; the hooks live in `hooks` (the entry point), the authenticator in
`authenticator`.
"""

__version__ = "0.1.0"

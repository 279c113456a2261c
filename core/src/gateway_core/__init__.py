"""gateway-core: the plugin host of the gateway.

Owns the package version; everything else lives in the submodules named in docs/architecture.md.
"""

__version__ = "0.1.0"

from .hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]

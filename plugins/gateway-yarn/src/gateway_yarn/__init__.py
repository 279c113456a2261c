"""gateway-yarn: the YARN backend of the gateway, through skein.

Owns the package version; the hooks live in `hooks` (the entry point) and the driver in `backend`.
"""

__version__ = "0.1.0"

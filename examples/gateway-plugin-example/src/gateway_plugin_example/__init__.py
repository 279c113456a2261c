"""gateway-plugin-example: a backend plugin for the gateway, written to be copied.

Owns the package version; the hooks live in `hooks` (the entry point) and the driver in `backend`.
"""

__version__ = "0.1.0"

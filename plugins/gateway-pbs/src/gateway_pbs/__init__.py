"""gateway-pbs: the PBS (OpenPBS / PBS Professional) backend of the gateway.

Owns the package version; the hooks live in `hooks` (the entry point) and the driver in `backend`.
"""

__version__ = "0.1.0"

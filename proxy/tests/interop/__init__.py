"""Interop tests against the original dask-gateway-server and its Go proxy (PyPI).

Owns the package, so its conftest imports as ``interop.conftest`` and shadows no ``conftest``.
"""

"""Cluster backends: the interface the API calls, and the process engine drivers plug into.

See `gateway_core.backends.base` for the interfaces and `docs/writing-a-backend.md`.
"""

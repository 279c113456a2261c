"""Authenticators: who is calling the API.

See `gateway_core.auth.base` for the interface and `gateway_core.auth.simple` for the built-in.
"""

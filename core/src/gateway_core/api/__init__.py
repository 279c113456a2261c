"""The REST API of the gateway (PROTOCOL.md): an aiohttp application over the cluster manager.

See `gateway_core.api.app.make_api_app`; errors live in `gateway_core.api.errors`.
"""

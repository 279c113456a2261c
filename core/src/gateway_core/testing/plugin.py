"""The pytest plugin plugin authors get with gateway-core: fixtures for a running gateway.

Owns the fixtures; the machinery they use lives in `gateway_core.testing.harness`.
"""

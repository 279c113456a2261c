"""Tests that core parses ``host:port`` with the proxy's `gateway_proxy.addresses` (core
depends on gateway-proxy, so the tree has one parser) and turns its errors into config errors.
"""

from __future__ import annotations

import pytest

from gateway_core.app import Gateway
from gateway_core.config import ConfigError, load_config
from gateway_proxy.addresses import join_address, split_address

pytestmark = pytest.mark.unit


def test_split_and_join() -> None:
    assert split_address("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert split_address(":0") == ("", 0)
    assert split_address("[::1]:80") == ("::1", 80)
    assert join_address("::1", 80) == "[::1]:80"
    assert join_address("localhost", 1) == "localhost:1"
    for bad, why in (
        ("nowhere", "expected host:port"),
        ("h:x", "port must be a number"),
        ("h:-1", "port must be a number"),
        ("h:70000", "port must be at most 65535"),
    ):
        with pytest.raises(ValueError, match=f"address '{bad}': {why}"):
            split_address(bad)


async def test_a_bad_gateway_address_is_a_config_error() -> None:
    gateway = Gateway.create(load_config({"gateway": {"address": "nowhere"}}, environ={}))
    with pytest.raises(ConfigError, match="address 'nowhere': expected host:port"):
        await gateway.start()

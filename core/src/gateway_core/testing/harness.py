"""Machinery behind the public pytest fixtures: start gateways on free loopback ports, talk to
their REST API as a user, and clean everything up.

Owns `start_gateway`, `ApiClient` and `ApiResponse`; `gateway_core.testing.plugin` wraps them.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from attrs import define, field

from ..app import Gateway
from ..config import load_config

TEST_DEFAULTS: dict[str, Any] = {
    "gateway": {"address": "127.0.0.1:0", "backend": "inprocess"},
    "proxy": {"address": "127.0.0.1:0"},
}


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two config tables; ``extra`` wins."""
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


async def start_gateway(
    config: Mapping[str, Any] | None = None, *, plugins: Sequence[object] = ()
) -> Gateway:
    """Start a gateway on free loopback ports with ``config`` over test defaults.

    The in-process test backend (``backend = "inprocess"``) is registered, so it is the default;
    ``plugins`` are extra plugin objects (modules or instances with ``@hookimpl`` functions).
    """
    from . import hooks as testing_hooks

    data = merge(TEST_DEFAULTS, config or {})
    gateway = Gateway.create(load_config(data, environ={}), extra_plugins=[testing_hooks, *plugins])
    await gateway.start()
    return gateway


@define(kw_only=True, frozen=True)
class ApiResponse:
    status: int
    body: Any
    """Parsed JSON, or the raw text when the body is not JSON."""
    headers: Mapping[str, str]


@define(kw_only=True)
class ApiClient:
    """A user's view of a gateway's REST API, with basic auth and a cookie jar."""

    address: str
    """``http://host:port`` plus the prefix, without ``/api``."""
    username: str
    password: str | None = None
    session: aiohttp.ClientSession = field(
        factory=lambda: aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    )

    def auth_header(self) -> str:
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        auth: bool = True,
    ) -> ApiResponse:
        hdrs = {"Authorization": self.auth_header()} if auth else {}
        hdrs.update(headers or {})
        async with self.session.request(
            method, self.address + path, json=json, data=data, headers=hdrs
        ) as resp:
            text = await resp.text()
            try:
                import json as _json

                body: Any = _json.loads(text) if text else None
            except ValueError:
                body = text
            return ApiResponse(status=resp.status, body=body, headers=dict(resp.headers))

    async def get(self, path: str, **kw: Any) -> ApiResponse:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, json: Any = None, **kw: Any) -> ApiResponse:
        return await self.request("POST", path, json=json, **kw)

    async def delete(self, path: str, **kw: Any) -> ApiResponse:
        return await self.request("DELETE", path, **kw)

    async def close(self) -> None:
        await self.session.close()


def client_for(gateway: Gateway, username: str, password: str | None = None) -> ApiClient:
    return ApiClient(
        address=f"http://{gateway.public_address}{gateway.context.prefix}",
        username=username,
        password=password,
    )

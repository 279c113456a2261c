"""The HTTP session the client talks to the gateway's REST API with.

Owns cookies, authentication (preemptive or after a 401, retried once), the HTTP proxy setting
and turning error answers into the exceptions of `errors.py`.
"""

from __future__ import annotations

import base64
import json as jsonlib
import urllib.request
from typing import Any

import aiohttp
import yarl

from .auth import GatewayAuth, split_auth_result
from .errors import GatewayServerError, error_for_status

# The gateway holds GET ?wait requests for up to ~20 s; leave room for that.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=90)


def proxy_for(address: str, setting: bool | str | None) -> tuple[str | None, dict[str, str] | None]:
    """The HTTP proxy and the headers for it (its credentials) to reach ``address``.

    ``True``: from HTTP(S)_PROXY/NO_PROXY; ``False``/None: none; a URL: that proxy.
    """
    if setting is None or setting is False:
        return None, None
    if setting is True:
        url = yarl.URL(address)
        if url.host and urllib.request.proxy_bypass(url.host):
            return None, None
        found = urllib.request.getproxies().get(url.scheme)
        if not found:
            return None, None
        setting = found
    proxy = yarl.URL(str(setting))
    if proxy.user is None:
        return str(proxy), None
    pair = f"{proxy.user}:{proxy.password or ''}".encode()
    headers = {"Proxy-Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
    return str(proxy.with_user(None)), headers


class GatewayHTTP:
    """One logical connection to one gateway: a cookie-keeping session plus auth.

    Create it anywhere; the aiohttp session opens on the first request, in the running loop.
    """

    def __init__(self, *, address: str, auth: GatewayAuth, proxy: bool | str | None = True) -> None:
        self.address = address.rstrip("/")
        self.auth = auth
        self._proxy, proxy_headers = proxy_for(self.address, proxy)
        # aiohttp sends proxy_headers only on the CONNECT of an https tunnel; a plain-http
        # request through a proxy carries Proxy-Authorization itself.
        tunnelled = yarl.URL(self.address).scheme == "https"
        self._proxy_headers = proxy_headers if tunnelled else None
        self._request_headers = {} if tunnelled else dict(proxy_headers or {})
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # unsafe=True keeps cookies set by an IP-address host (a loopback or in-cluster
            # gateway); this session only ever talks to one gateway.
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=_TIMEOUT
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> str:
        return self.address + path

    async def _send(
        self, method: str, url: str, json: Any, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        session = self._get_session()
        try:
            resp = await session.request(
                method,
                url,
                json=json,
                headers={**self._request_headers, **headers},
                proxy=self._proxy,
                proxy_headers=self._proxy_headers,
            )
        except aiohttp.ServerTimeoutError as exc:
            raise TimeoutError(f"the gateway at {self.address} did not answer in time") from exc
        except aiohttp.ClientConnectionError as exc:
            raise ConnectionError(f"cannot reach the gateway at {self.address}: {exc}") from exc
        # Read the body now so the connection is released whatever the caller does next.
        await resp.read()
        return resp

    async def request(self, method: str, path: str, *, json: Any = None) -> Any:
        """Send one request to ``address + path``; the decoded JSON answer (None when empty).

        Error answers raise (see `errors.error_for_status`). On a 401 the auth's headers are
        fetched and the request is sent once more; a second 401 raises GatewayAuthError.
        """
        url = self.url(path)
        session = self._get_session()
        headers: dict[str, str] = {}
        if self.auth.preemptive and not session.cookie_jar.filter_cookies(yarl.URL(url)):
            headers, _ = split_auth_result(self.auth.pre_request(None))
        resp = await self._send(method, url, json, headers)
        if resp.status == 401:
            headers, context = split_auth_result(self.auth.pre_request(resp))
            resp = await self._send(method, url, json, headers)
            self.auth.post_response(resp, context)
        if resp.status >= 400:
            raise error_for_status(resp.status, await _error_message(resp), url=url)
        body = await resp.read()
        if not body:
            return None
        try:
            return jsonlib.loads(body)
        except ValueError as exc:
            raise GatewayServerError(
                f"the gateway answered {method} {path} with something other than JSON: {exc}"
            ) from None


async def _error_message(resp: aiohttp.ClientResponse) -> str:
    text = (await resp.read()).decode("utf-8", "replace")
    try:
        body = jsonlib.loads(text)
    except ValueError:
        return text.strip() or resp.reason or f"HTTP {resp.status}"
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return text.strip()

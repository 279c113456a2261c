"""The scheduler agent's calls to the gateway's REST API (heartbeat, self-stop).

Owns `GatewayAPI`, a small tornado HTTP client: tornado is already loaded by `distributed`, so
it costs the scheduler no import time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPRequest


@dataclass(frozen=True, kw_only=True)
class GatewayAnswer:
    """What the gateway said: the HTTP status (599 when there was no answer) and why."""

    status: int
    reason: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def cluster_unknown(self) -> bool:
        """The gateway no longer knows (or no longer runs) this cluster."""
        return self.status in (404, 409)


class GatewayAPI:
    """Calls the gateway at ``api_url`` (ending in ``/api``) on behalf of one cluster."""

    def __init__(
        self, *, api_url: str, api_token: str, cluster_name: str, timeout: float = 10.0
    ) -> None:
        base = api_url.rstrip("/")
        self.cluster_url = f"{base}/v1/clusters/{quote(cluster_name, safe='')}"
        self._token = api_token
        self._timeout = timeout
        self._http: AsyncHTTPClient | None = None

    def _client(self) -> AsyncHTTPClient:
        if self._http is None:
            # A private instance: closing it must not close anybody else's shared client.
            self._http = AsyncHTTPClient(force_instance=True)
        return self._http

    async def _call(self, method: str, url: str, body: dict[str, Any] | None) -> GatewayAnswer:
        headers = {"Authorization": f"token {self._token}"}
        data: bytes | None = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        request = HTTPRequest(
            url,
            method=method,
            headers=headers,
            body=data,
            connect_timeout=self._timeout,
            request_timeout=self._timeout,
        )
        try:
            response = await self._client().fetch(request, raise_error=False)
        except OSError as exc:  # DNS failure and the like, raised before any response
            return GatewayAnswer(status=599, reason=str(exc) or type(exc).__name__)
        if response.code == 599:
            error = response.error
            return GatewayAnswer(status=599, reason=str(error) if error else "no answer")
        reason = ""
        if response.code >= 400:
            reason = _error_text(response.body)
        return GatewayAnswer(status=response.code, reason=reason)

    async def heartbeat(self, msg: dict[str, Any]) -> GatewayAnswer:
        """``POST {api_url}/v1/clusters/{name}/heartbeat`` with ``msg``."""
        return await self._call("POST", f"{self.cluster_url}/heartbeat", msg)

    async def stop_cluster(self) -> GatewayAnswer:
        """``DELETE {api_url}/v1/clusters/{name}``: ask the gateway to stop this cluster."""
        return await self._call("DELETE", self.cluster_url, None)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


def _error_text(body: bytes | None) -> str:
    """The ``error`` of a JSON error body, else the start of the body."""
    if not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return data["error"]
    return body[:200].decode(errors="replace")

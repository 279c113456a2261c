"""The ORIGINAL Go proxy (from the dask-gateway-server wheel) in front of our `gateway serve`.

Owns the proof that our gateway's route feed drives the original proxy: the API, the Dask
TLS-SNI traffic and the dashboard of a real cluster, and route removal, all through the Go proxy.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from .conftest import LOOPBACK, Harness, UserFlow, http_get

pytestmark = pytest.mark.interop

TOKEN = secrets.token_hex(32)


def our_config(harness: Harness, *, api: int, http: int, tcp: int) -> Path:
    """A gateway.toml whose proxy runs elsewhere: the Go proxy, at the addresses advertised."""
    path = harness.folder / "gateway.toml"
    path.write_text(
        f"""
[gateway]
address = "{LOOPBACK}:{api}"
backend = "unsafe-local"
authenticator = "simple"

[proxy]
externally_managed = true
api_token = "{TOKEN}"
address = "{LOOPBACK}:{http}"
tcp_address = "{LOOPBACK}:{tcp}"

[backend.unsafe-local]
clusters_directory = "{harness.folder / "clusters"}"
cluster_start_timeout = 40.0
worker_start_timeout = 40.0

[cluster]
scheduler_memory = "512 MiB"
worker_memory = "512 MiB"
"""
    )
    return path


def test_the_go_proxy_serves_our_gateways_feed(
    harness: Harness, go_proxy: Path, user_flow: UserFlow
) -> None:
    api, http, tcp = harness.port(), harness.port(), harness.port()
    public = f"http://{LOOPBACK}:{http}"
    config = our_config(harness, api=api, http=http, tcp=tcp)

    harness.start("gateway serve", [harness.script("gateway"), "serve", "--config", str(config)])
    feed = harness.wait_http(
        f"http://{LOOPBACK}:{api}/api/v1/routes",
        headers={"Authorization": f"token {TOKEN}"},
        timeout=40,
    )
    table = feed.json()
    assert table["routes"] == [{"kind": "PATH", "path": "/", "target": f"http://{LOOPBACK}:{api}"}]
    assert isinstance(table["id"], int)

    # The flags the original server passes to its proxy when it manages it (proxy/core.py),
    # the token from the environment as there.
    argv = [str(go_proxy), "-address", f"{LOOPBACK}:{http}", "-tcp-address", f"{LOOPBACK}:{tcp}"]
    argv += ["-api-url", f"http://{LOOPBACK}:{api}/api/v1/routes", "-log-level", "info"]
    harness.start("dask-gateway-proxy (Go)", argv, env=harness.env(DASK_GATEWAY_PROXY_TOKEN=TOKEN))
    # Only the default route from our feed makes the Go proxy answer for the API.
    health = harness.wait_http(f"{public}/api/health", timeout=30)
    assert health.json()["status"] == "pass"
    version = http_get(f"{public}/api/version")
    assert version.status == 200, version

    user_flow(public=public, tcp=f"{LOOPBACK}:{tcp}")

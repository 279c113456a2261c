"""Our standalone proxy (`gateway proxy`) in front of the ORIGINAL dask-gateway-server (PyPI).

Owns the proof that our proxy follows the original's route feed: readiness, the API, the Dask
TLS-SNI traffic and the dashboard of a real cluster, route removal, and a refused token.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import LOOPBACK, Harness, UserFlow, http_get

pytestmark = pytest.mark.interop

TOKEN = secrets.token_hex(32)
READY = "/_gateway-proxy/ready"


def original_config(harness: Harness, *, api: int, http: int, tcp: int) -> Path:
    """A config file of the original server, its proxy run by someone else (us)."""
    dask = harness.script("dask")  # current distributed has no `dask-scheduler` script any more
    settings = {
        "c.DaskGateway.address": f"{LOOPBACK}:{api}",
        "c.DaskGateway.backend_class": "dask_gateway_server.backends.local.UnsafeLocalBackend",
        "c.DaskGateway.authenticator_class": "dask_gateway_server.auth.SimpleAuthenticator",
        "c.Proxy.externally_managed": True,
        "c.Proxy.api_token": TOKEN,
        "c.Proxy.address": f"{LOOPBACK}:{http}",
        "c.Proxy.tcp_address": f"{LOOPBACK}:{tcp}",
        "c.ClusterConfig.scheduler_cmd": [dask, "scheduler"],
        "c.ClusterConfig.worker_cmd": [dask, "worker"],
        "c.UnsafeLocalBackend.clusters_directory": str(harness.folder / "clusters"),
        "c.UnsafeLocalBackend.cluster_start_timeout": 40.0,
        "c.UnsafeLocalBackend.worker_start_timeout": 40.0,
    }
    path = harness.folder / "dask_gateway_config.py"
    path.write_text("".join(f"{key} = {value!r}\n" for key, value in settings.items()))
    return path


def our_proxy(harness: Harness, *, api: int, http: int, tcp: int, token: str | None) -> list[str]:
    argv = [harness.script("gateway"), "proxy"]
    argv += ["--address", f"{LOOPBACK}:{http}", "--tcp-address", f"{LOOPBACK}:{tcp}"]
    argv += ["--gateway-url", f"http://{LOOPBACK}:{api}", "--log-level", "info"]
    if token is not None:
        argv += ["--api-token", token]
    return argv


def test_our_proxy_serves_the_original_servers_feed(
    harness: Harness, original_server: ModuleType, user_flow: UserFlow
) -> None:
    assert original_server.__version__ == "2026.3.0"
    api, http, tcp = harness.port(), harness.port(), harness.port()
    public = f"http://{LOOPBACK}:{http}"
    config = original_config(harness, api=api, http=http, tcp=tcp)

    # Our proxy first, its token from the environment: not ready while there is no feed.
    harness.start(
        "gateway proxy",
        our_proxy(harness, api=api, http=http, tcp=tcp, token=None),
        env=harness.env(GATEWAY_PROXY_TOKEN=TOKEN),
    )
    harness.wait_port(http)
    before = http_get(public + READY)
    assert before.status == 503, before

    harness.start("dask-gateway-server", [harness.script("dask-gateway-server"), "-f", str(config)])
    ready = harness.wait_http(public + READY, timeout=40)
    assert ready.json() == {"status": "ready", "routes": 1}  # the default route: the API

    version = http_get(f"{public}/api/version")
    assert version.status == 200, version
    assert version.json() == {"version": original_server.__version__}

    def while_running(cluster: object) -> None:
        # The original's PUT events reached us: its PATH and SNI routes beside the default.
        assert http_get(public + READY).json() == {"status": "ready", "routes": 3}

    user_flow(public=public, tcp=f"{LOOPBACK}:{tcp}", while_running=while_running)
    # The original's DELETE events (a route without a target) were applied too.
    assert http_get(public + READY).json() == {"status": "ready", "routes": 1}

    # A proxy holding the wrong token (from --api-token) is refused by the original's feed and
    # never becomes ready.
    http2, tcp2 = harness.port(), harness.port()
    refused = harness.start(
        "gateway proxy (wrong token)",
        our_proxy(harness, api=api, http=http2, tcp=tcp2, token="not-" + TOKEN),
    )
    harness.wait_until(
        "the refusal in the log of the proxy with a wrong token",
        lambda: "HTTP 401" in refused.log_text(),
        timeout=20,
    )
    not_ready = http_get(f"http://{LOOPBACK}:{http2}{READY}")
    assert not_ready.status == 503, not_ready

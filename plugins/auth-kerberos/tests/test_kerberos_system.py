"""The ``kerberos`` authenticator against a real MIT Kerberos KDC (ci/start-kdc.sh): logins
through this project's client, refusals of bad, foreign and expired tokens, the KDC down, the
login cookie, and the keytab checks of ``gateway serve`` and ``gateway config check``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import gssapi
import pytest

from gateway_client import Gateway
from gateway_client.errors import GatewayAuthError
from gateway_client.kerberos import KerberosAuth
from gateway_core.app import Gateway as GatewayServer

pytestmark = pytest.mark.system

SPNEGO = gssapi.OID.from_int_seq("1.3.6.1.5.5.2")
KRB5 = gssapi.OID.from_int_seq("1.2.840.113554.1.2.2")
LOGGER = "gateway_auth_kerberos"


def negotiate_token(host: str, *, mech: gssapi.OID = SPNEGO, service: str = "HTTP") -> str:
    """A fresh ``Negotiate`` header value for ``service/host`` from the current ticket cache."""
    context = gssapi.SecurityContext(
        name=gssapi.Name(f"{service}@{host}", gssapi.NameType.hostbased_service),
        usage="initiate",
        mech=mech,
        flags=gssapi.RequirementFlag.mutual_authentication,
    )
    return "Negotiate " + base64.b64encode(context.step() or b"").decode("ascii")


async def get(
    server: GatewayServer, path: str = "/api/v1/clusters/", **headers: str
) -> tuple[int, dict[str, Any], Any]:
    """One request to the gateway's public address, no cookie jar: status, headers, JSON."""
    url = f"http://{server.public_address}{path}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        async with session.get(url, headers=headers) as resp:
            body = await resp.json(content_type=None)
            return resp.status, {**resp.headers, "_cookies": dict(resp.cookies)}, body


# -------------------------------------------------------------------------------------------
# Logins that work


@pytest.mark.parametrize("how", ["password", "keytab"])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_client_logs_in_and_creates_a_cluster_as_the_principal(
    realm: Any, ccache: Path, make_gateway: Callable[..., Any], kerberos_config: Any, how: str,
    host: str
) -> None:
    if how == "password":
        realm.kinit("alice", password="alice-password")
    else:
        realm.kinit("alice", keytab=realm.keytab("alice"))
    server = await make_gateway(kerberos_config())
    port = server.public_address.rpartition(":")[2]
    async with Gateway(
        f"http://{host}:{port}", auth=KerberosAuth(), asynchronous=True
    ) as gateway:
        name = await gateway.submit()
        assert [c.name for c in await gateway.list_clusters()] == [name]
        await gateway.stop_cluster(name)
    cluster = await server.backend.get_cluster(name)
    assert cluster is not None and cluster.username == "alice"

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
CHALLENGE = {"WWW-Authenticate": "Negotiate"}


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
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.get(url, headers=headers) as resp,
    ):
        body = await resp.json(content_type=None)
        return resp.status, {**resp.headers, "_cookies": dict(resp.cookies)}, body


# -------------------------------------------------------------------------------------------
# Logins that work


@pytest.mark.parametrize("how", ["password", "keytab"])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_client_logs_in_and_creates_a_cluster_as_the_principal(
    realm: Any,
    ccache: Path,
    make_gateway: Callable[..., Any],
    kerberos_config: Any,
    how: str,
    host: str,
) -> None:
    if how == "password":
        realm.kinit("alice", password="alice-password")
    else:
        realm.kinit("alice", keytab=realm.keytab("alice"))
    server = await make_gateway(kerberos_config())
    port = server.public_address.rpartition(":")[2]
    async with Gateway(f"http://{host}:{port}", auth=KerberosAuth(), asynchronous=True) as gateway:
        name = await gateway.submit()
        assert [c.name for c in await gateway.list_clusters()] == [name]
        await gateway.stop_cluster(name)
    cluster = await server.backend.get_cluster(name)
    assert cluster is not None and cluster.username == "alice"


def our_client_flow(address: str) -> tuple[str, int]:
    """Log in with our KerberosAuth and compute on a new cluster: its name and the result."""
    with Gateway(address, auth="kerberos") as gateway:
        cluster = gateway.new_cluster()
        try:
            cluster.scale(1)
            client = cluster.get_client(set_as_default=False)
            try:
                client.wait_for_workers(1, timeout=60)
                return cluster.name, int(client.submit(sum, range(10)).result(timeout=60))
            finally:
                client.close()
        finally:
            cluster.shutdown()


@pytest.mark.usefixtures("no_process_left_behind")
async def test_a_kerberos_user_computes_on_a_real_cluster(
    realm: Any,
    ccache: Path,
    make_gateway: Callable[..., Any],
    kerberos_config: Any,
    local_backend_config: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole flow as a Kerberos user, with real Dask processes (unsafe-local), the auth
    type chosen the way users choose it: DASK_GATEWAY__AUTH__TYPE=kerberos."""
    import dask

    realm.kinit("bob", password="bob-password")
    server = await make_gateway(local_backend_config(kerberos_config()))
    monkeypatch.setenv("DASK_GATEWAY__AUTH__TYPE", "kerberos")
    dask.config.refresh()
    try:
        # Our client's sync API runs its own loop: keep it off this one, which serves the gateway.
        name, result = await asyncio.to_thread(our_client_flow, f"http://{server.public_address}")
    finally:
        monkeypatch.undo()
        dask.config.refresh()
    assert result == 45
    cluster = await server.backend.get_cluster(name)
    assert cluster is not None and cluster.username == "bob"


async def test_a_bare_kerberos_token_is_accepted_too(
    realm: Any, ccache: Path, make_gateway: Callable[..., Any], kerberos_config: Any
) -> None:
    """Clients that send a Kerberos token without the SPNEGO wrapping (the original client's
    pykerberos does) log in as well, and get the mutual-authentication token back."""
    realm.kinit("bob", password="bob-password")
    server = await make_gateway(kerberos_config())
    status, headers, body = await get(server, Authorization=negotiate_token("127.0.0.1", mech=KRB5))
    assert status == 200, body
    assert headers["WWW-Authenticate"].startswith("Negotiate ")


async def test_the_mutual_authentication_token_completes_the_client_context(
    realm: Any, ccache: Path, make_gateway: Callable[..., Any], kerberos_config: Any
) -> None:
    realm.kinit()
    server = await make_gateway(kerberos_config())
    context = gssapi.SecurityContext(
        name=gssapi.Name("HTTP@localhost", gssapi.NameType.hostbased_service),
        usage="initiate",
        mech=SPNEGO,
        flags=gssapi.RequirementFlag.mutual_authentication,
    )
    header = "Negotiate " + base64.b64encode(context.step() or b"").decode()
    status, headers, _ = await get(server, Authorization=header)
    assert status == 200
    scheme, _, token = headers["WWW-Authenticate"].partition(" ")
    assert scheme == "Negotiate"
    context.step(base64.b64decode(token))
    assert context.complete
    assert str(context.target_name) == f"HTTP/localhost@{realm.name}"


async def test_principal_map_rules_name_the_user_and_refuse_the_unmatched(
    realm: Any, ccache: Path, make_gateway: Callable[..., Any], kerberos_config: Any
) -> None:
    rules = [{"pattern": rf"(alice)@{realm.name}".replace(".", r"\."), "user": r"\1-krb"}]
    server = await make_gateway(kerberos_config(principal_map=rules))
    realm.kinit("alice", password="alice-password")
    status, _, body = await get(server, Authorization=negotiate_token("localhost"))
    assert status == 200, body
    realm.kinit("bob", password="bob-password")
    async with Gateway(
        f"http://{server.public_address}", auth=KerberosAuth(), asynchronous=True
    ) as gateway:
        with pytest.raises(GatewayAuthError, match="matches no rule of principal_map"):
            await gateway.list_clusters()
    realm.kinit("alice", password="alice-password")
    async with Gateway(
        f"http://{server.public_address}", auth=KerberosAuth(), asynchronous=True
    ) as gateway:
        name = await gateway.submit()
    cluster = await server.backend.get_cluster(name)
    assert cluster is not None and cluster.username == "alice-krb"


# -------------------------------------------------------------------------------------------
# Refusals: each a 401 with a Negotiate challenge and a logged reason, never a 500


async def test_no_or_another_authorization_header_is_challenged(
    realm: Any, make_gateway: Callable[..., Any], kerberos_config: Any
) -> None:
    server = await make_gateway(kerberos_config())
    for headers in ({}, {"Authorization": "Basic YWxpY2U6"}, {"Authorization": "token abc"}):
        status, answer, body = await get(server, **headers)
        assert status == 401, (headers, body)
        assert answer["WWW-Authenticate"] == "Negotiate"
        assert "Kerberos authentication required" in body["error"]
        assert not answer["_cookies"]


@pytest.mark.parametrize(
    ("header", "logged"),
    [
        ("Negotiate", "empty or not base64"),
        ("Negotiate !!!not-base64!!!", "empty or not base64"),
        ("Negotiate " + base64.b64encode(b"garbage").decode(), "Invalid token"),
        # An SPNEGO header whose inner token is cut short.
        ("Negotiate YIIBBAYGKwYBBQUCoIH5MIH2oA0wCwYJKoZIhvcSAQICooHkBIHh", "malformed"),
    ],
)
async def test_a_garbage_token_is_a_401_with_the_reason_logged(
    realm: Any,
    make_gateway: Callable[..., Any],
    kerberos_config: Any,
    caplog: pytest.LogCaptureFixture,
    header: str,
    logged: str,
) -> None:
    server = await make_gateway(kerberos_config())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        status, answer, body = await get(server, Authorization=header)
    assert status == 401, body
    assert answer["WWW-Authenticate"] == "Negotiate"
    refusals = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(refusals) == 1 and logged in refusals[0], refusals


async def test_a_ticket_for_a_principal_not_in_the_keytab_is_refused(
    realm: Any,
    ccache: Path,
    make_gateway: Callable[..., Any],
    kerberos_config: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    realm.kinit()
    server = await make_gateway(kerberos_config())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        status, _, body = await get(server, Authorization=negotiate_token("elsewhere.test"))
    assert status == 401, body
    assert "HTTP/elsewhere.test" in body["error"] and "not found in keytab" in body["error"]
    assert any("not found in keytab" in r.getMessage() for r in caplog.records)


async def test_a_ticket_for_another_service_is_refused(
    realm: Any, ccache: Path, make_gateway: Callable[..., Any], kerberos_config: Any
) -> None:
    """A keytab with HTTP and host keys accepts only HTTP/<host> tickets (service_name)."""
    both = realm.path / "http-and-host.keytab"
    both.write_bytes(realm.http_keytab.read_bytes())
    realm.kadmin(f"ktadd -norandkey -k {both} host/localhost")
    realm.kinit()
    server = await make_gateway({**kerberos_config(), "auth": {"kerberos": {"keytab": str(both)}}})
    status, _, body = await get(server, Authorization=negotiate_token("localhost", service="host"))
    assert status == 401, body
    status, _, body = await get(server, Authorization=negotiate_token("localhost"))
    assert status == 200, body


async def test_a_ticket_under_an_old_key_version_is_refused(
    realm: Any,
    ccache: Path,
    make_gateway: Callable[..., Any],
    kerberos_config: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """stale.keytab holds HTTP/rotated.test at the key version before the KDC's current one."""
    realm.kinit()
    server = await make_gateway(kerberos_config(keytab=str(realm.keytab("stale"))))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        status, _, body = await get(server, Authorization=negotiate_token("rotated.test"))
    assert status == 401, body
    assert "kvno" in body["error"], body
    assert any("out of date" in r.getMessage() for r in caplog.records)


async def test_an_expired_ticket_is_refused(
    realm: Any,
    ccache: Path,
    make_gateway: Callable[..., Any],
    kerberos_config: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A token made while the ticket was valid and sent after it ended (plus the realm's 2 s
    clock skew) is a 401; MIT's acceptor says the ticket expired or, when it checks the
    authenticator's time first, that the clock skew is too great. The client itself refuses
    to use the expired ticket."""
    server = await make_gateway(kerberos_config())
    realm.kinit(lifetime="3s")
    got_ticket = time.monotonic()
    fresh = negotiate_token("localhost")
    late = negotiate_token("localhost")  # made now, sent once the ticket has ended
    status, _, body = await get(server, Authorization=fresh)
    assert status == 200, body
    # Past the ticket's 3 s, the realm's 2 s clock skew, and a margin.
    await asyncio.sleep(max(0.0, got_ticket + 6.5 - time.monotonic()))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        status, answer, body = await get(server, Authorization=late)
    assert status == 401, body
    assert answer["WWW-Authenticate"] == "Negotiate"
    reasons = ("Ticket expired", "Clock skew too great")
    assert any(reason in body["error"] for reason in reasons), body
    assert any(reason in r.getMessage() for r in caplog.records for reason in reasons)
    async with Gateway(
        f"http://{server.public_address}", auth=KerberosAuth(), asynchronous=True
    ) as gateway:
        with pytest.raises(GatewayAuthError, match=r"Ticket expired.*Run kinit"):
            await gateway.list_clusters()


async def test_without_a_ticket_the_client_says_to_kinit(
    realm: Any, ccache: Path, make_gateway: Callable[..., Any], kerberos_config: Any
) -> None:
    server = await make_gateway(kerberos_config())
    async with Gateway(
        f"http://{server.public_address}", auth=KerberosAuth(), asynchronous=True
    ) as gateway:
        with pytest.raises(GatewayAuthError, match="Run kinit"):
            await gateway.list_clusters()


async def test_the_client_refuses_a_gateway_that_asks_for_another_scheme(
    realm: Any, ccache: Path, make_gateway: Callable[..., Any]
) -> None:
    realm.kinit()
    server = await make_gateway({})  # the simple authenticator: Basic
    async with Gateway(
        f"http://{server.public_address}", auth=KerberosAuth(), asynchronous=True
    ) as gateway:
        with pytest.raises(GatewayAuthError, match=r"does not take Kerberos logins.*Basic"):
            await gateway.list_clusters()


async def test_kdc_down_fails_new_logins_in_the_client_not_the_gateway(
    realm: Any, ccache: Path, make_gateway: Callable[..., Any], kerberos_config: Any
) -> None:
    """The gateway never talks to the KDC (the keytab is all it needs): with the KDC down, a
    ticket got before still logs in, and a client that needs a new one gets a clear error."""
    realm.kinit()
    made_before = negotiate_token("localhost")
    server = await make_gateway(kerberos_config())
    realm.stop()
    try:
        status, _, body = await get(server, Authorization=made_before)
        assert status == 200, body
        async with Gateway(
            f"http://{server.public_address}", auth=KerberosAuth(), asynchronous=True
        ) as gateway:
            # 127.0.0.1:<port> needs a service ticket for HTTP/127.0.0.1, from the KDC.
            with pytest.raises(GatewayAuthError, match=r"(?i)cannot contact any KDC"):
                await gateway.list_clusters()
        status, _, body = await get(server)
        assert status == 401, body
    finally:
        realm.start()
    async with Gateway(
        f"http://{server.public_address}", auth=KerberosAuth(), asynchronous=True
    ) as gateway:
        assert await gateway.list_clusters() == []


# -------------------------------------------------------------------------------------------
# The login cookie


class CountingAuth(KerberosAuth):
    """A KerberosAuth that counts the tokens it makes."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = 0

    def pre_request(self, resp: Any) -> Any:
        self.tokens += 1
        return super().pre_request(resp)


async def test_the_login_cookie_skips_kerberos_until_cache_max_age(
    realm: Any, ccache: Path, make_gateway: Callable[..., Any], kerberos_config: Any
) -> None:
    realm.kinit()
    server = await make_gateway(kerberos_config(cache_max_age=3, cookie_name="krb-login"))
    auth = CountingAuth()
    async with Gateway(f"http://{server.public_address}", auth=auth, asynchronous=True) as gw:
        for _ in range(3):
            await gw.list_clusters()
        assert auth.tokens == 1
    # The cookie alone (no Authorization, no ticket) is a login, until it expires.
    status, headers, body = await get(server, Authorization=negotiate_token("localhost"))
    assert status == 200, body
    cookie = headers["_cookies"]["krb-login"].value
    started = time.monotonic()
    realm.stop()  # nobody can get a new ticket now
    try:
        status, _, body = await get(server, Cookie=f"krb-login={cookie}")
        assert status == 200, body
        assert time.monotonic() - started < 3, "the machine was too slow to test the cookie"
        await asyncio.sleep(max(0.0, started + 3.3 - time.monotonic()))
        status, headers, body = await get(server, Cookie=f"krb-login={cookie}")
        assert status == 401, body
        assert headers["WWW-Authenticate"] == "Negotiate"
    finally:
        realm.start()


# -------------------------------------------------------------------------------------------
# The keytab at start-up


def gateway_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway_core", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def write_config(folder: Path, keytab: str | Path) -> Path:
    path = folder / "gateway.toml"
    path.write_text(
        f'[gateway]\nauthenticator = "kerberos"\naddress = "127.0.0.1:0"\n'
        f'[proxy]\naddress = "127.0.0.1:0"\n[auth.kerberos]\nkeytab = "{keytab}"\n'
    )
    return path


def one_line(out: subprocess.CompletedProcess[str], stream: str) -> str:
    """The single line a failed command printed on ``stream``."""
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = [line for line in getattr(out, stream).splitlines() if line.strip()]
    assert len(lines) == 1, (out.stdout, out.stderr)
    return lines[0]


@pytest.mark.parametrize(
    ("keytab", "problem"),
    [
        ("missing.keytab", "cannot read the keytab '{dir}/missing.keytab': No such file"),
        ("not-a-keytab", "'{dir}/not-a-keytab' is not a keytab file"),
        (
            "{realm}/other.keytab",
            "the keytab '{realm}/other.keytab' holds no usable key for "
            "HTTP/<host>: No key table entry found",
        ),
    ],
)
def test_config_check_reports_a_bad_keytab_in_one_line(
    realm: Any, tmp_path: Path, keytab: str, problem: str
) -> None:
    (tmp_path / "not-a-keytab").write_text("hello\n")
    where = {"dir": tmp_path, "realm": realm.path}
    config = write_config(tmp_path, tmp_path / keytab.format(**where))
    out = gateway_cli("config", "check", "--config", str(config), cwd=tmp_path)
    line = one_line(out, "stdout")  # config check prints its findings on stdout
    assert line.startswith("auth.kerberos.keytab: " + problem.format(**where)), line


def test_a_missing_keytab_stops_serve_in_one_line(realm: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "missing.keytab")
    out = gateway_cli("serve", "--config", str(config), cwd=tmp_path)
    line = one_line(out, "stderr")
    assert line.startswith(
        f"error: auth.kerberos.keytab: cannot read the keytab '{tmp_path}/missing.keytab'"
    ), line


def test_config_check_accepts_a_good_keytab(realm: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, realm.http_keytab)
    out = gateway_cli("config", "check", "--config", str(config), cwd=tmp_path)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert out.stdout.startswith("config OK"), out.stdout


# -------------------------------------------------------------------------------------------
# Our client's checks of the gateway's answer (mutual authentication)


@pytest.mark.parametrize(
    ("final", "error"),
    [
        (None, "did not prove its identity"),
        ("Negotiate " + base64.b64encode(b"forged").decode(), "failed mutual authentication"),
        ("Negotiate %%%", "sent a Negotiate token that is not base64"),
    ],
)
async def test_the_client_refuses_a_gateway_that_does_not_prove_itself(
    realm: Any, ccache: Path, final: str | None, error: str
) -> None:
    """A server that accepts any token (an impostor without the gateway's key) answers 200
    without a valid final token: our client refuses the answer."""
    from aiohttp import web

    async def clusters(request: web.Request) -> web.Response:
        if not request.headers.get("Authorization", "").startswith("Negotiate "):
            return web.json_response({"error": "log in"}, status=401, headers=CHALLENGE)
        return web.json_response([], headers={"WWW-Authenticate": final} if final else {})

    app = web.Application()
    app.router.add_get("/api/v1/clusters/", clusters)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    realm.kinit()
    try:
        async with Gateway(
            f"http://localhost:{port}", auth=KerberosAuth(), asynchronous=True
        ) as gateway:
            with pytest.raises(GatewayAuthError, match=error):
                await gateway.list_clusters()
        if final is None:  # mutual_auth=False accepts a silent server
            async with Gateway(
                f"http://localhost:{port}",
                auth=KerberosAuth(mutual_auth=False),
                asynchronous=True,
            ) as gateway:
                assert await gateway.list_clusters() == []
    finally:
        await runner.cleanup()

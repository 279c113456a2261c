"""System tests: the ``jupyterhub`` authenticator against a real JupyterHub process.

Every login is checked by a real hub (started by the `hub` fixture of conftest.py): users,
groups and tokens are made through its REST API, tokens expire and are revoked there, and the
hub is stopped to see the gateway answer 503.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import SERVICE, Hub

from gateway_core import hookimpl
from gateway_core.models import User

pytestmark = pytest.mark.system


class SeenUsers:
    """A plugin recording the `User` the gateway built for each ``GET /api/v1/options``."""

    def __init__(self) -> None:
        self.users: list[User] = []

    @hookimpl
    def gateway_cluster_options(self, user: User, config: Any) -> None:
        self.users.append(user)


@pytest.fixture
async def call() -> AsyncIterator[Callable[..., Any]]:
    """``await call(gw, token=..., scheme="jupyterhub", cookie=None)``: GET /api/v1/options;
    (status, body, headers). ``cookie`` is sent as the ``Cookie`` header as it is."""
    import aiohttp

    sessions: list[aiohttp.ClientSession] = []

    async def request(
        gw: Any,
        *,
        token: str | None = None,
        scheme: str = "jupyterhub",
        session: aiohttp.ClientSession | None = None,
        cookie: str | None = None,
        path: str = "/api/v1/options",
    ) -> tuple[int, Any, Any]:
        if session is None:
            session = aiohttp.ClientSession()
            sessions.append(session)
        headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
        if cookie is not None:
            headers["Cookie"] = cookie
        async with session.get(f"http://{gw.public_address}{path}", headers=headers) as resp:
            body = await resp.json(content_type=None)
            return resp.status, body, resp.headers

    yield request
    for session in sessions:
        await session.close()


async def test_a_hub_token_logs_in_as_its_user_with_the_hubs_groups(
    hub: Hub, make_gateway: Any, call: Any
) -> None:
    seen = SeenUsers()
    gw = await make_gateway(hub.gateway_auth(), plugins=[seen])
    name = hub.create_user()
    hub.add_to_group("physics", name)
    hub.add_to_group("gpu-users", name)
    token, _ = hub.token(name)
    for scheme in ("jupyterhub", "token", "Bearer"):
        status, body, _ = await call(gw, token=token, scheme=scheme)
        assert status == 200, body
    assert [u.name for u in seen.users] == [name] * 3
    assert seen.users[0].groups == {"physics", "gpu-users"}
    assert not seen.users[0].admin


@pytest.mark.parametrize("admin_from_hub", [True, False])
async def test_the_hubs_admin_flag_makes_a_gateway_admin_unless_turned_off(
    hub: Hub, make_gateway: Any, call: Any, admin_from_hub: bool
) -> None:
    seen = SeenUsers()
    gw = await make_gateway(hub.gateway_auth(admin_from_hub=admin_from_hub), plugins=[seen])
    admin = hub.create_user("admin", admin=True)
    token, _ = hub.token(admin)
    status, body, _ = await call(gw, token=token)
    assert status == 200, body
    assert seen.users == [User(name=admin, admin=admin_from_hub)]
    assert gw.manager.is_admin(seen.users[0]) is admin_from_hub


async def test_no_header_or_another_scheme_is_a_401_with_the_jupyterhub_challenge(
    hub: Hub, make_gateway: Any, call: Any
) -> None:
    gw = await make_gateway(hub.gateway_auth())
    status, body, headers = await call(gw)
    assert status == 401
    assert "Authorization: jupyterhub" in body["error"]
    assert headers["WWW-Authenticate"].startswith("jupyterhub")
    status, body, headers = await call(gw, token="dXNlcjpwdw==", scheme="Basic")
    assert status == 401
    assert "unsupported authorization scheme 'Basic'" in body["error"]
    assert headers["WWW-Authenticate"].startswith("jupyterhub")


async def test_bad_expired_and_revoked_tokens_and_deleted_users_are_401s(
    hub: Hub, make_gateway: Any, call: Any
) -> None:
    gw = await make_gateway(hub.gateway_auth())
    name = hub.create_user()
    revoked, revoked_id = hub.token(name)
    kept, _ = hub.token(name)
    doomed_user = hub.create_user()
    doomed, _ = hub.token(doomed_user)
    for token in (revoked, kept, doomed):  # each works first
        status, body, _ = await call(gw, token=token)
        assert status == 200, body
    lifetime = 3
    expiring, _ = hub.token(name, expires_in=lifetime)
    created = time.monotonic()
    status, body, _ = await call(gw, token=expiring)
    assert status == 200, body
    assert time.monotonic() - created < lifetime, "too slow to see the token work first"

    hub.revoke(name, revoked_id)
    hub.delete_user(doomed_user)
    await asyncio.sleep(max(0.0, created + lifetime + 1.0 - time.monotonic()))

    for what, token in [
        ("garbage", "not-a-hub-token"),
        ("expired", expiring),
        ("revoked", revoked),
        ("of a deleted user", doomed),
    ]:
        status, body, headers = await call(gw, token=token)
        assert status == 401, (what, body)
        assert "JupyterHub did not accept this token" in body["error"], what
        assert headers["WWW-Authenticate"].startswith("jupyterhub"), what
    status, body, _ = await call(gw, token=kept)
    assert status == 200, body


async def test_a_token_without_access_to_the_named_service_is_a_403(
    hub: Hub, make_gateway: Any, call: Any
) -> None:
    name = hub.create_user()
    full, _ = hub.token(name)
    narrow, _ = hub.token(name, scopes=["read:users:name!user"])
    gw = await make_gateway(hub.gateway_auth(service_name=SERVICE))
    status, body, _ = await call(gw, token=full)
    assert status == 200, body
    status, body, _ = await call(gw, token=narrow)
    assert status == 403
    assert f"lacks the scope access:services!service={SERVICE}" in body["error"]
    assert name in body["error"]
    # Without service_name any valid token logs in, as with the original gateway.
    gw_any = await make_gateway(hub.gateway_auth())
    status, body, _ = await call(gw_any, token=narrow)
    assert status == 200, body
    # A service name the user's role does not grant.
    gw_other = await make_gateway(hub.gateway_auth(service_name="another-service"))
    status, body, _ = await call(gw_other, token=full)
    assert status == 403
    assert "access:services!service=another-service" in body["error"]


async def test_a_service_token_is_not_a_user_login(hub: Hub, make_gateway: Any, call: Any) -> None:
    gw = await make_gateway(hub.gateway_auth())
    status, body, _ = await call(gw, token=hub.service_token)
    assert status == 403
    assert f"belongs to the service {SERVICE!r}, not to a user" in body["error"]


async def test_the_login_cookie_skips_the_hub_until_cache_max_age(
    hub: Hub, make_gateway: Any, call: Any
) -> None:
    max_age = 6
    seen = SeenUsers()
    gw = await make_gateway(hub.gateway_auth(cache_max_age=max_age), plugins=[seen])
    name = hub.create_user()
    token, token_id = hub.token(name)
    status, body, headers = await call(gw, token=token)
    logged_in = time.monotonic()
    assert status == 200, body
    cookie = headers["Set-Cookie"].split(";")[0]
    assert cookie.startswith("gateway-jupyterhub=")
    # Revoked at the hub: only a request that skips the hub can still succeed.
    hub.revoke(name, token_id)
    status, body, _ = await call(gw, token=token, cookie=cookie)
    assert status == 200, body
    assert time.monotonic() - logged_in < max_age, "too slow to prove the cache"
    status, body, _ = await call(gw, token=token)  # no cookie: the hub is asked
    assert status == 401, body
    # Sent past cache_max_age (as a client ignoring the cookie's Max-Age would): the server
    # forgot the login and asks the hub, which refuses the revoked token.
    await asyncio.sleep(max_age - (time.monotonic() - logged_in) + 0.5)
    status, body, _ = await call(gw, token=token, cookie=cookie)
    assert status == 401, body
    assert [u.name for u in seen.users] == [name, name]


async def test_a_hub_that_is_down_is_a_503_naming_its_url(
    make_hub: Callable[..., Hub], make_gateway: Any, call: Any
) -> None:
    own = make_hub()
    gw = await make_gateway(own.gateway_auth())
    name = own.create_user()
    token, _ = own.token(name)
    status, body, _ = await call(gw, token=token)
    assert status == 200, body
    own.stop()
    status, body, _ = await call(gw, token=token)
    assert status == 503
    assert f"JupyterHub at {own.api_url} is unreachable" in body["error"]


async def test_a_wrong_api_url_is_a_503_naming_it(hub: Hub, make_gateway: Any, call: Any) -> None:
    wrong = f"{hub.hub_url}/not/the/api"
    gw = await make_gateway(hub.gateway_auth(jupyterhub_api_url=wrong))
    name = hub.create_user()
    token, _ = hub.token(name)
    status, body, _ = await call(gw, token=token)
    assert status == 503
    assert f"JupyterHub at {wrong} answered HTTP 404" in body["error"]


async def test_tls_options_reach_a_hub_that_wants_a_client_certificate(
    make_hub: Callable[..., Hub], make_gateway: Any, call: Any
) -> None:
    own = make_hub(tls=True)
    assert own.api_url.startswith("https://")
    name = own.create_user()
    token, _ = own.token(name)
    gw = await make_gateway(own.gateway_auth())  # tls_ca, tls_cert, tls_key
    status, body, _ = await call(gw, token=token)
    assert status == 200, body
    # Without the client certificate the hub ends the handshake: unreachable, named.
    without_cert = await make_gateway(own.gateway_auth(tls_cert="", tls_key=""))
    status, body, _ = await call(without_cert, token=token)
    assert status == 503
    assert f"JupyterHub at {own.api_url} is unreachable" in body["error"]
    # Under TLS 1.3 the client's handshake ends before the server has checked the client's
    # certificate; the server's "certificate required" alert then races the connection's close,
    # and a loaded machine sometimes sees the reset first. Either is the hub refusing us.
    refused = body["error"].lower()
    assert "certificate required" in refused or "connection reset" in refused, refused
    # Without the hub's CA its certificate is not trusted.
    without_ca = await make_gateway(own.gateway_auth(tls_ca=""))
    status, body, _ = await call(without_ca, token=token)
    assert status == 503
    assert f"JupyterHub at {own.api_url} is unreachable" in body["error"]
    assert "certificate verify failed" in body["error"].lower()

"""System tests: the browser login through the real hub's OAuth flow.

A browser is an aiohttp session with a cookie jar: it logs in to the hub with its login form,
opens the gateway's ``/api/v2/oauth/login``, follows the redirects through the hub's authorize
endpoint back to the gateway's callback, and then uses the API with the gateway's login cookie
alone.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from conftest import SERVICE, Hub, free_port

pytestmark = pytest.mark.system

CLIENT_ID = f"service-{SERVICE}"
"""The OAuth client id JupyterHub gives the service (``service-<name>``)."""


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def hub_login(browser: aiohttp.ClientSession, hub: Hub, user: str) -> None:
    """Log ``browser`` in to the hub through its login form (xsrf field included)."""
    async with browser.get(f"{hub.hub_url}/hub/login") as resp:
        page = await resp.text()
        assert resp.status == 200, page[:500]
    found = re.search(r'name="_xsrf"\s+value="([^"]+)"', page)
    assert found is not None, "no _xsrf field in the hub's login form"
    form = {"username": user, "password": hub.password, "_xsrf": found.group(1)}
    async with browser.post(f"{hub.hub_url}/hub/login", data=form, allow_redirects=False) as resp:
        assert resp.status == 302, (await resp.text())[:500]


async def oauth_gateway(
    make_hub: Callable[..., Hub], make_gateway: Any, **auth: Any
) -> tuple[Hub, Any]:
    """A hub whose gateway service is an OAuth client, and a gateway on a port fixed in advance
    (the hub must know the redirect URI before either starts)."""
    port = free_port()
    callback = f"http://127.0.0.1:{port}/api/v2/oauth/callback"
    hub = make_hub(services_extra=f'"oauth_redirect_uri": "{callback}", "oauth_no_confirm": True')
    config = hub.gateway_auth(oauth_client_id=CLIENT_ID, oauth_redirect_uri=callback, **auth)
    config["proxy"] = {"address": f"127.0.0.1:{port}"}
    gw = await make_gateway(config)
    return hub, gw


async def test_a_browser_logs_in_through_the_hubs_oauth_and_uses_the_api_with_the_cookie(
    make_hub: Callable[..., Hub], make_gateway: Any, browser: aiohttp.ClientSession
) -> None:
    hub, gw = await oauth_gateway(make_hub, make_gateway, service_name=SERVICE)
    gateway = f"http://{gw.public_address}"
    user = "oauth-alice"
    await hub_login(browser, hub, user)
    hub.add_to_group("physics", user)

    async with browser.get(f"{gateway}/api/v2/oauth/login?next=/api/v1/clusters/") as resp:
        body = await resp.text()
        # Followed: gateway login -> hub authorize -> gateway callback -> next.
        hops = [str(h.url) for h in resp.history]
        assert resp.status == 200, (hops, body[:500])
    assert hops[0].startswith(f"{gateway}/api/v2/oauth/login")
    assert hops[1].startswith(f"{hub.api_url}/oauth2/authorize?")
    authorize = parse_qs(urlsplit(hops[1]).query)
    assert authorize["client_id"] == [CLIENT_ID]
    assert authorize["code_challenge_method"] == ["S256"]
    assert hops[2].startswith(f"{gateway}/api/v2/oauth/callback?code=")
    assert str(resp.url) == f"{gateway}/api/v1/clusters/"
    assert await resp.json(content_type=None) == {}

    # The gateway's login cookie alone now identifies the user: a new cluster is theirs.
    async with browser.post(f"{gateway}/api/v1/clusters/", json={}) as resp:
        assert resp.status == 201, await resp.text()
        name = (await resp.json())["name"]
    cluster = await gw.backend.get_cluster(name)
    assert cluster is not None and cluster.username == user
    # Without the cookie: refused.
    async with (
        aiohttp.ClientSession() as stranger,
        stranger.get(f"{gateway}/api/v1/clusters/") as resp,
    ):
        assert resp.status == 401


async def test_a_callback_without_this_browsers_state_is_refused(
    make_hub: Callable[..., Hub], make_gateway: Any, browser: aiohttp.ClientSession
) -> None:
    hub, gw = await oauth_gateway(make_hub, make_gateway)
    gateway = f"http://{gw.public_address}"
    await hub_login(browser, hub, "oauth-bob")
    async with browser.get(f"{gateway}/api/v2/oauth/login", allow_redirects=False) as resp:
        assert resp.status == 302
        authorize = resp.headers["Location"]
    async with browser.get(authorize, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        callback = resp.headers["Location"]
    assert callback.startswith(f"{gateway}/api/v2/oauth/callback?")
    # Another browser (no state cookie) presenting the code, e.g. a forged link: refused.
    async with aiohttp.ClientSession() as other, other.get(callback) as resp:
        assert resp.status == 401
        assert "no OAuth login in progress" in (await resp.json())["error"]
    # A state that is not this browser's: refused.
    forged = re.sub(r"state=[^&]+", "state=forged", callback)
    async with browser.get(forged, allow_redirects=False) as resp:
        assert resp.status == 401
        assert "OAuth state does not match" in (await resp.json())["error"]
    # The real callback still works once, and a replayed code does not.
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        assert resp.headers["Location"] == "/"
    async with browser.get(f"{gateway}/api/v2/oauth/login", allow_redirects=False) as resp:
        fresh_state = parse_qs(urlsplit(resp.headers["Location"]).query)["state"][0]
    replay = re.sub(r"state=[^&]+", f"state={fresh_state}", callback)
    async with browser.get(replay, allow_redirects=False) as resp:
        assert resp.status == 401
        assert "JupyterHub refused the OAuth code" in (await resp.json())["error"]


async def test_without_an_oauth_client_id_there_is_no_browser_login(
    hub: Hub, make_gateway: Any
) -> None:
    gw = await make_gateway(hub.gateway_auth())
    url = f"http://{gw.public_address}/api/v2/oauth/login"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 404


async def test_next_is_kept_to_local_paths(
    make_hub: Callable[..., Hub], make_gateway: Any, browser: aiohttp.ClientSession
) -> None:
    hub, gw = await oauth_gateway(make_hub, make_gateway)
    await hub_login(browser, hub, "oauth-carol")
    url = f"http://{gw.public_address}/api/v2/oauth/login?next=//evil.example.org/x"
    async with browser.get(url) as resp:
        assert resp.history[-1].headers["Location"] == "/"


async def test_a_refused_authorization_and_a_hub_down_at_the_callback(
    make_hub: Callable[..., Hub], make_gateway: Any, browser: aiohttp.ClientSession
) -> None:
    hub, gw = await oauth_gateway(make_hub, make_gateway)
    gateway = f"http://{gw.public_address}"
    # The hub sends the browser back with an error (e.g. the user denied access): a 401.
    url = f"{gateway}/api/v2/oauth/callback?error=access_denied&error_description=denied"
    async with browser.get(url) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "JupyterHub refused the login: access_denied denied"
    # The hub goes down between authorize and callback: the code cannot be traded, a 503.
    await hub_login(browser, hub, "oauth-dave")
    async with browser.get(f"{gateway}/api/v2/oauth/login", allow_redirects=False) as resp:
        authorize = resp.headers["Location"]
    async with browser.get(authorize, allow_redirects=False) as resp:
        callback = resp.headers["Location"]
    hub.stop()
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 503
        assert f"JupyterHub at {hub.api_url} is unreachable" in (await resp.json())["error"]

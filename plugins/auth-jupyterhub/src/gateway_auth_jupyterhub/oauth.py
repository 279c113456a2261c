"""Browser logins through the hub's OAuth flow: the gateway is the hub service's OAuth client.

Owns `HubOAuth`, the two public routes it serves (``GET /api/v2/oauth/login`` redirects to the
hub's authorize URL; ``GET /api/v2/oauth/callback`` trades the code for a token, asks the hub
whose it is and sets the gateway's login cookie), and the state cookie that ties them together.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from gateway_core.auth.base import Unauthorized
from gateway_core.errors import BackendUnavailable
from gateway_core.models import User

if TYPE_CHECKING:
    from .authenticator import JupyterHubAuthConfig

log = logging.getLogger("gateway.auth.jupyterhub")

LOGIN_PATH = "/api/v2/oauth/login"
CALLBACK_PATH = "/api/v2/oauth/callback"
STATE_COOKIE = "gateway-oauth-state"
"""Holds the state, the PKCE verifier and where to go next, between login and callback."""
STATE_MAX_AGE = 600
"""Seconds a browser has to come back from the hub."""


def safe_next(value: str | None) -> str:
    """Where to send the browser after the login: a local path only (never another site)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def redirect(location: str) -> web.Response:
    """A 302 to ``location`` (a response to return, so that cookies can be set on it)."""
    return web.Response(status=302, headers={"Location": location})


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class HubOAuth:
    """The OAuth client half of the gateway, for the hub service ``oauth_client_id``.

    ``lookup(token)`` is the authenticator's way from a hub token to a `User` (the same checks
    as a token login); ``session()`` gives its open aiohttp session, ``ssl()`` its TLS setting.
    """

    def __init__(
        self,
        *,
        config: JupyterHubAuthConfig,
        lookup: Callable[[str], Any],
        session: Callable[[], aiohttp.ClientSession | None],
        ssl: Callable[[], Any],
        log_in: Callable[[web.Request, web.StreamResponse, User], None],
    ) -> None:
        self.config = config
        self.lookup = lookup
        self.session = session
        self.ssl = ssl
        self.log_in = log_in

    @property
    def authorize_url(self) -> str:
        return self.config.oauth_authorize_url or f"{self.config.api_url}/oauth2/authorize"

    @property
    def token_url(self) -> str:
        return f"{self.config.api_url}/oauth2/token"

    def routes(self) -> Sequence[web.RouteDef]:
        return [web.get(LOGIN_PATH, self.login), web.get(CALLBACK_PATH, self.callback)]

    async def login(self, request: web.Request) -> web.StreamResponse:
        """Send the browser to the hub's authorize URL, remembering state and PKCE verifier."""
        state = secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(48)
        challenge = _b64(hashlib.sha256(verifier.encode("ascii")).digest())
        query = urlencode(
            {
                "client_id": self.config.oauth_client_id,
                "redirect_uri": self.config.oauth_redirect_uri,
                "response_type": "code",
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        remembered = {
            "state": state,
            "verifier": verifier,
            "next": safe_next(request.query.get("next")),
        }
        response = redirect(f"{self.authorize_url}?{query}")
        response.set_cookie(
            STATE_COOKIE,
            _b64(json.dumps(remembered).encode()),
            max_age=STATE_MAX_AGE,
            httponly=True,
            samesite="Lax",
            path="/",
        )
        return response

    async def callback(self, request: web.Request) -> web.StreamResponse:
        """Finish the login: check the state, trade the code, log the hub's user in."""
        error = request.query.get("error")
        if error:
            detail = request.query.get("error_description", "")
            raise Unauthorized(f"JupyterHub refused the login: {error} {detail}".strip())
        remembered = self._remembered(request)
        given = request.query.get("state", "")
        if not hmac.compare_digest(given.encode(), str(remembered.get("state", "")).encode()):
            raise Unauthorized(
                f"the OAuth state does not match this browser's; start again at {LOGIN_PATH}"
            )
        code = request.query.get("code")
        if not code:
            raise Unauthorized("the hub sent no OAuth code")
        token = await self._token_for_code(code, str(remembered.get("verifier", "")))
        user = await self.lookup(token)
        response = redirect(safe_next(str(remembered.get("next", "/"))))
        response.del_cookie(STATE_COOKIE, path="/")
        self.log_in(request, response, user)
        log.info("%s logged in through JupyterHub OAuth", user.name)
        return response

    def _remembered(self, request: web.Request) -> dict[str, Any]:
        raw = request.cookies.get(STATE_COOKIE)
        if not raw:
            raise Unauthorized(
                f"no OAuth login in progress in this browser (its state cookie is missing or "
                f"older than {STATE_MAX_AGE} s); start again at {LOGIN_PATH}"
            )
        try:
            value = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        except ValueError:
            raise Unauthorized(
                f"malformed OAuth state cookie; start again at {LOGIN_PATH}"
            ) from None
        if not isinstance(value, dict):
            raise Unauthorized(f"malformed OAuth state cookie; start again at {LOGIN_PATH}")
        return value

    async def _token_for_code(self, code: str, verifier: str) -> str:
        session = self.session()
        if session is None:
            raise BackendUnavailable("the jupyterhub authenticator is not set up yet")
        form = {
            "client_id": self.config.oauth_client_id,
            "client_secret": self.config.jupyterhub_api_token,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.config.oauth_redirect_uri,
            "code_verifier": verifier,
        }
        from .authenticator import hub_request

        with hub_request(self.config.api_url, "the OAuth token request"):
            async with session.post(self.token_url, data=form, ssl=self.ssl()) as resp:
                if 400 <= resp.status < 500:
                    text = (await resp.text())[:300]
                    log.info("JupyterHub refused an OAuth code (HTTP %s): %s", resp.status, text)
                    raise Unauthorized(
                        f"JupyterHub refused the OAuth code (HTTP {resp.status}); start again "
                        f"at {LOGIN_PATH}"
                    )
                if resp.status != 200:
                    raise BackendUnavailable(
                        f"JupyterHub at {self.config.api_url} answered HTTP {resp.status} to "
                        "the OAuth token request"
                    )
                answer = await resp.json(content_type=None)
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise BackendUnavailable(
                f"JupyterHub at {self.config.api_url} answered the OAuth token request "
                "without an access_token"
            )
        return token

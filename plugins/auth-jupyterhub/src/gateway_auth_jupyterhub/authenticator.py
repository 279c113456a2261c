"""The ``jupyterhub`` authenticator: a user presents a JupyterHub API token, the hub says whose.

Owns `JupyterHubAuthConfig` (``[auth.jupyterhub]``), `JupyterHubAuthenticator`, and how the
hub's answers become the gateway's: a token the hub refuses is a 401, a hub that cannot answer is
a 503 naming its URL, a token without the service's ``access:services`` scope is a 403. The
browser login through the hub's OAuth lives in `gateway_auth_jupyterhub.oauth`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from attrs import define, field

from gateway_core.auth.base import Authenticator, Unauthorized
from gateway_core.config import AuthConfig
from gateway_core.errors import AccessDenied, BackendUnavailable
from gateway_core.models import User

if TYPE_CHECKING:
    from aiohttp import web

    from gateway_core.context import GatewayContext

log = logging.getLogger("gateway.auth.jupyterhub")

ENV_API_URL = "JUPYTERHUB_API_URL"
"""Where ``jupyterhub_api_url`` comes from when unset (JupyterHub sets it for its services)."""
ENV_API_TOKEN = "JUPYTERHUB_API_TOKEN"
"""Where ``jupyterhub_api_token`` comes from when unset (JupyterHub sets it for its services)."""

ENV_CLIENT_ID = "JUPYTERHUB_CLIENT_ID"
"""Where ``oauth_client_id`` comes from when unset (JupyterHub sets it for its services)."""
ENV_CALLBACK_URL = "JUPYTERHUB_OAUTH_CALLBACK_URL"
"""Where ``oauth_redirect_uri`` comes from when unset."""

SCHEMES = frozenset({"jupyterhub", "token", "bearer"})
"""``Authorization`` schemes that carry a hub token (``jupyterhub`` is what clients send)."""
CHALLENGE = {"WWW-Authenticate": 'jupyterhub realm="gateway"'}
"""Headers of every 401 this authenticator answers."""


def _from_env(name: str) -> Any:
    return lambda: os.environ.get(name, "")


@define(kw_only=True, frozen=True)
class JupyterHubAuthConfig(AuthConfig):
    """``[auth.jupyterhub]``: the original ``JupyterHubAuthenticator``'s options (seed 000) and
    what this one adds. Missing or unusable settings are refused when the config is loaded, so
    ``gateway config check`` and start-up say the same one line per problem."""

    jupyterhub_api_url: str = field(factory=_from_env(ENV_API_URL))
    """The hub's API URL, e.g. ``http://127.0.0.1:8081/hub/api``; default $JUPYTERHUB_API_URL."""
    jupyterhub_api_token: str = field(factory=_from_env(ENV_API_TOKEN), repr=False)
    """The gateway's own API token as a hub service; default $JUPYTERHUB_API_TOKEN."""
    tls_ca: str = ""
    """CA file to verify the hub's certificate (``https`` API URLs); empty: the system's CAs."""
    tls_cert: str = ""
    """Client certificate for the hub (with ``tls_key``), e.g. with the hub's ``internal_ssl``."""
    tls_key: str = ""
    """Key of ``tls_cert``."""
    admin_from_hub: bool = True
    """Hub admins are gateway admins (the original's behaviour); false ignores the hub's flag."""
    service_name: str = ""
    """When set, a token must carry ``access:services!service=<service_name>`` (or
    ``access:services``), as JupyterHub's own services require; empty: any valid token."""
    request_timeout: float = 10.0
    """Seconds one request to the hub may take before the hub counts as unreachable (503)."""
    oauth_client_id: str = field(factory=_from_env(ENV_CLIENT_ID))
    """The hub's OAuth client id of the gateway's service (``service-<name>`` unless the
    service sets ``oauth_client_id``); default $JUPYTERHUB_CLIENT_ID. Set, the gateway serves
    the browser login ``/api/v2/oauth/login``; empty, it does not."""
    oauth_redirect_uri: str = field(factory=_from_env(ENV_CALLBACK_URL))
    """The gateway's public ``.../api/v2/oauth/callback`` URL, exactly as registered as the
    service's ``oauth_redirect_uri`` at the hub; default $JUPYTERHUB_OAUTH_CALLBACK_URL."""
    oauth_authorize_url: str = ""
    """The hub's authorize URL as browsers reach it, e.g.
    ``https://hub.example.org/hub/api/oauth2/authorize``; empty: under ``jupyterhub_api_url``."""

    def check(self) -> list[str]:
        """Problems with the hub's address, the tokens, the TLS files and OAuth (see
        `CheckedConfig`)."""
        problems: list[str] = []
        url = self.jupyterhub_api_url
        if not url:
            problems.append(
                f"jupyterhub_api_url: required (or ${ENV_API_URL}): the hub's API URL, "
                "e.g. http://127.0.0.1:8081/hub/api"
            )
        elif not url.startswith(("http://", "https://")):
            problems.append(f"jupyterhub_api_url: {url!r} is not an http:// or https:// URL")
        if not self.jupyterhub_api_token:
            problems.append(
                f"jupyterhub_api_token: required (or ${ENV_API_TOKEN}): the gateway's API "
                "token as a JupyterHub service (c.JupyterHub.services)"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert: tls_cert and tls_key must be set together")
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, key)
            if path and not os.access(path, os.R_OK):
                what = "no such file" if not Path(path).exists() else "not readable"
                problems.append(f"{key}: {path}: {what}")
        if self.oauth_client_id and not self.oauth_redirect_uri:
            problems.append(
                f"oauth_redirect_uri: required with oauth_client_id (or ${ENV_CALLBACK_URL}): "
                "the gateway's public .../api/v2/oauth/callback URL registered at the hub"
            )
        if self.request_timeout <= 0:
            problems.append("request_timeout: must be positive")
        return problems

    @property
    def api_url(self) -> str:
        """``jupyterhub_api_url`` without a trailing slash."""
        return self.jupyterhub_api_url.rstrip("/")


def ssl_context(config: JupyterHubAuthConfig) -> ssl.SSLContext | None:
    """The TLS context for requests to the hub, or None for aiohttp's default (system CAs)."""
    if not (config.tls_ca or config.tls_cert):
        return None
    context = ssl.create_default_context(cafile=config.tls_ca or None)
    if config.tls_cert:
        context.load_cert_chain(config.tls_cert, config.tls_key or None)
    return context


def has_access_scope(scopes: Any, service_name: str) -> bool:
    """Whether the hub's expanded ``scopes`` of a token let it access service ``service_name``."""
    if not isinstance(scopes, list):
        return False
    return "access:services" in scopes or f"access:services!service={service_name}" in scopes


class JupyterHubAuthenticator(Authenticator):
    """Accepts ``Authorization: jupyterhub <token>`` (also ``token`` and ``Bearer``) and asks the
    hub ``GET {jupyterhub_api_url}/user`` with that token: the hub's ``name`` and ``groups``
    become the `User`, its ``admin`` flag too unless ``admin_from_hub = false``.

    Core caches the login in a cookie for ``cache_max_age`` seconds, so the hub is asked once
    per login, not once per request.
    """

    name = "jupyterhub"

    def __init__(self, *, config: AuthConfig, context: GatewayContext, **kwargs: Any) -> None:
        super().__init__(config=config, context=context, **kwargs)
        if not isinstance(config, JupyterHubAuthConfig):
            raise TypeError(
                f"the jupyterhub authenticator needs a JupyterHubAuthConfig, got {config!r}"
            )
        self.hub: JupyterHubAuthConfig = config
        self.session: aiohttp.ClientSession | None = None
        self.ssl: ssl.SSLContext | bool = True

    async def setup(self) -> None:
        context = ssl_context(self.hub)
        self.ssl = context if context is not None else True
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.hub.request_timeout)
        )

    async def cleanup(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def authenticate(self, request: web.Request) -> User:
        token = token_of(request.headers.get("Authorization", ""))
        return await self.user_for_token(token)

    async def user_for_token(self, token: str) -> User:
        """The `User` a hub token belongs to, with every check of a token login."""
        return self.user_of(await self.whoami(token))

    def web_routes(self) -> Sequence[web.RouteDef]:
        """The browser login through the hub's OAuth (`gateway_auth_jupyterhub.oauth`), when
        ``oauth_client_id`` is set."""
        if not self.hub.oauth_client_id:
            return ()
        from gateway_core.api.app import log_in

        from .oauth import HubOAuth

        oauth = HubOAuth(
            config=self.hub,
            lookup=self.user_for_token,
            session=lambda: self.session,
            ssl=lambda: self.ssl,
            log_in=log_in,
        )
        return oauth.routes()

    async def whoami(self, token: str) -> Mapping[str, Any]:
        """The hub's model of the owner of ``token`` (``GET /user`` with that token)."""
        if self.session is None:
            raise BackendUnavailable("the jupyterhub authenticator is not set up yet")
        url = f"{self.hub.api_url}/user"
        with hub_request(self.hub.api_url, "GET /user"):
            async with self.session.get(
                url, headers={"Authorization": f"token {token}"}, ssl=self.ssl
            ) as resp:
                if resp.status in (401, 403):
                    log.info("JupyterHub refused a token (HTTP %s)", resp.status)
                    raise Unauthorized(
                        "JupyterHub did not accept this token: it is invalid, expired or "
                        "revoked, or its user was deleted",
                        headers=CHALLENGE,
                    )
                if resp.status != 200:
                    raise BackendUnavailable(
                        f"JupyterHub at {self.hub.api_url} answered HTTP {resp.status} to "
                        "GET /user; check jupyterhub_api_url and the hub's log"
                    )
                model = await resp.json(content_type=None)
        if not isinstance(model, Mapping):
            raise BackendUnavailable(
                f"JupyterHub at {self.hub.api_url} answered GET /user with a "
                f"{type(model).__name__}, not a user model"
            )
        return model

    def user_of(self, model: Mapping[str, Any]) -> User:
        """The gateway `User` of the hub's model; refuse what is not a user allowed here."""
        kind = model.get("kind", "user")
        name = model.get("name")
        if kind != "user":
            raise AccessDenied(
                f"this JupyterHub token belongs to the {kind} {name!r}, not to a user"
            )
        if not isinstance(name, str) or not name:
            raise BackendUnavailable(
                f"JupyterHub at {self.hub.api_url} answered GET /user without a user name"
            )
        service = self.hub.service_name
        if service and not has_access_scope(model.get("scopes"), service):
            log.info("token of %r lacks access:services!service=%s", name, service)
            raise AccessDenied(
                f"the JupyterHub token of user {name!r} lacks the scope "
                f"access:services!service={service}: use a token with that scope (e.g. one "
                "the hub gives its single-user servers) or grant it to the user's role"
            )
        groups: frozenset[str] = frozenset(
            g for g in model.get("groups") or [] if isinstance(g, str)
        )
        admin = bool(model.get("admin")) if self.hub.admin_from_hub else False
        return User(name=name, groups=groups, admin=admin)


def token_of(header: str) -> str:
    """The hub token of an ``Authorization`` header, or `Unauthorized` saying what to send."""
    header = header.strip()
    if not header:
        raise Unauthorized(
            "authentication required: send `Authorization: jupyterhub <JupyterHub API token>`",
            headers=CHALLENGE,
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() not in SCHEMES:
        raise Unauthorized(
            f"unsupported authorization scheme {scheme[:32]!r}; send "
            "`Authorization: jupyterhub <JupyterHub API token>`",
            headers=CHALLENGE,
        )
    token = token.strip()
    if not token or any(c.isspace() or ord(c) < 32 for c in token):
        raise Unauthorized("malformed JupyterHub token", headers=CHALLENGE)
    return token


@contextlib.contextmanager
def hub_request(api_url: str, what: str) -> Iterator[None]:
    """Around one request to the hub: no answer (refused, timed out, TLS failure) or an answer
    that is not JSON becomes a 503 naming the hub's URL and ``what`` was asked."""
    try:
        yield
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise BackendUnavailable(
            f"JupyterHub at {api_url} is unreachable: {unreachable_reason(exc)}"
        ) from None
    except ValueError:
        raise BackendUnavailable(
            f"JupyterHub at {api_url} answered {what} with something not JSON; check "
            "jupyterhub_api_url"
        ) from None


def unreachable_reason(exc: BaseException) -> str:
    """Why a request to the hub got no answer, in a few words."""
    if isinstance(exc, TimeoutError):
        return "no answer within request_timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return str(exc.os_error.strerror or exc.os_error) if exc.os_error else str(exc)
    return str(exc) or type(exc).__name__

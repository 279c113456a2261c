"""The built-in `simple` authenticator: HTTP Basic auth with an optional shared password.

Owns `SimpleAuthConfig` (`[auth.simple]`) and `SimpleAuthenticator`. Meant for testing and
trusted networks only: without a password, anyone may claim any user name.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import TYPE_CHECKING, Any

from attrs import define

from ..config import AuthConfig
from ..models import User
from .base import Authenticator, Unauthorized

if TYPE_CHECKING:
    from aiohttp import web

    from ..context import GatewayContext

CHALLENGE = {"WWW-Authenticate": 'Basic realm="gateway"'}
"""Headers of every 401 this authenticator answers."""

MAX_USERNAME_LENGTH = 256


@define(kw_only=True, frozen=True)
class SimpleAuthConfig(AuthConfig):
    """`[auth.simple]`."""

    password: str | None = None
    """A password every user must give; unset (the default) means the password is ignored."""


def _decode(raw: bytes) -> str:
    """Header bytes as text: UTF-8, else Latin-1 (what the original client sends)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def username_problem(name: str) -> str | None:
    """Why ``name`` is not an acceptable user name, or None when it is."""
    if not name:
        return "the user name is empty"
    if len(name) > MAX_USERNAME_LENGTH:
        return f"the user name is longer than {MAX_USERNAME_LENGTH} characters"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return "the user name contains control characters"
    if name != name.strip():
        return "the user name starts or ends with whitespace"
    return None


class SimpleAuthenticator(Authenticator):
    """Accepts ``Authorization: Basic <user:password>``; the user name becomes the `User`.

    With ``password`` set, it must match (compared in constant time); otherwise any password is
    accepted. Missing or bad credentials answer 401 with ``WWW-Authenticate: Basic``.
    """

    name = "simple"

    def __init__(self, *, config: AuthConfig, context: GatewayContext, **kwargs: Any) -> None:
        super().__init__(config=config, context=context, **kwargs)
        self.password: str | None = getattr(config, "password", None)

    async def authenticate(self, request: web.Request) -> User:
        header = request.headers.get("Authorization", "").strip()
        if not header:
            raise Unauthorized("authentication required (HTTP Basic)", headers=CHALLENGE)
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "basic":
            raise Unauthorized(
                f"unsupported authorization scheme {scheme[:32]!r}; use HTTP Basic",
                headers=CHALLENGE,
            )
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise Unauthorized("malformed Basic credentials", headers=CHALLENGE) from None
        raw_user, sep, raw_password = decoded.partition(b":")
        if not sep:
            raise Unauthorized("malformed Basic credentials: no ':'", headers=CHALLENGE)
        return self.check_credentials(_decode(raw_user), _decode(raw_password))

    def check_credentials(self, username: str, password: str) -> User:
        """The user of a user name and password (Basic credentials, or the web UI's login
        form); `Unauthorized` when the name is invalid or the password wrong."""
        problem = username_problem(username)
        if problem is not None:
            raise Unauthorized(problem, headers=CHALLENGE)
        if self.password is not None:
            given = password.encode("utf-8")
            if not hmac.compare_digest(given, self.password.encode("utf-8")):
                raise Unauthorized("invalid user name or password", headers=CHALLENGE)
        return User(name=username)

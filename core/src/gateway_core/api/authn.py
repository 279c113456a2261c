"""Who is calling the API: users (through the authenticator and a login cookie), clusters and
the proxy (through their tokens).

Owns `LoginCache` (random cookie id → user, expiring after ``cache_max_age``), `Authn` (the
per-app authentication service) and the parsing of ``Authorization: token <...>`` headers.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable

from aiohttp import web

from ..auth.base import Authenticator
from ..errors import NotAuthenticated
from ..models import User

TOKEN_SCHEME = "token"
"""The ``Authorization`` scheme of cluster and proxy tokens."""


def token_from_header(request: web.Request) -> str | None:
    """The credentials of ``Authorization: token <value>``, or None for any other header."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != TOKEN_SCHEME:
        return None
    return value.strip()


def tokens_match(given: str | None, expected: str) -> bool:
    """Constant-time comparison; an empty expected token matches nothing."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


class LoginCache:
    """Logins remembered by a random cookie id for ``max_age`` seconds (server side only: the
    cookie holds no user data). ``clock`` is monotonic seconds, replaceable in tests."""

    def __init__(self, *, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self.clock = clock
        self._entries: dict[str, tuple[User, float]] = {}
        self._next_purge = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, cookie: str) -> User | None:
        """The user of ``cookie`` if it is known and not expired."""
        entry = self._entries.get(cookie)
        if entry is None:
            return None
        user, expires = entry
        if expires <= self.clock():
            del self._entries[cookie]
            return None
        return user

    def put(self, user: User) -> str:
        """Remember ``user``; return the new cookie value."""
        now = self.clock()
        if now >= self._next_purge:
            self.purge()
            self._next_purge = now + max(self.max_age, 1.0)
        cookie = secrets.token_urlsafe(32)
        self._entries[cookie] = (user, now + self.max_age)
        return cookie

    def forget(self, cookie: str) -> None:
        """Forget the login of ``cookie`` (a logout)."""
        self._entries.pop(cookie, None)

    def purge(self) -> None:
        """Forget every expired login."""
        now = self.clock()
        for cookie in [c for c, (_, expires) in self._entries.items() if expires <= now]:
            del self._entries[cookie]


class Authn:
    """Authentication of one API app: users via cookie or authenticator, and the proxy token."""

    def __init__(self, *, authenticator: Authenticator, proxy_token: str) -> None:
        self.authenticator = authenticator
        self.proxy_token = proxy_token
        config = authenticator.config
        self.max_age = config.cache_max_age
        self.cookie_name = config.cookie_name or f"gateway-{authenticator.name or 'auth'}"
        self.cache = LoginCache(max_age=self.max_age)

    async def authenticate_user(self, request: web.Request) -> tuple[User, bool]:
        """The user behind ``request``; the flag is True when the authenticator was asked
        (so the response should carry a fresh login cookie)."""
        cookie = request.cookies.get(self.cookie_name)
        if cookie:
            user = self.cache.get(cookie)
            if user is not None:
                return user, False
        user = await self.authenticator.authenticate(request)  # Unauthorized: 401 as it says
        if not isinstance(user, User):
            raise TypeError(
                f"authenticator {self.authenticator.name!r} returned "
                f"{type(user).__name__}, expected a User"
            )
        return user, True

    def finish_login(self, request: web.Request, response: web.StreamResponse, user: User) -> None:
        """After a full authentication: let the authenticator add headers, set the cookie."""
        self.authenticator.pre_response(request, response)
        if self.max_age > 0 and not response.prepared:
            response.set_cookie(
                self.cookie_name,
                self.cache.put(user),
                max_age=self.max_age,
                httponly=True,
                samesite="Lax",
                path="/",
            )

    def check_proxy(self, request: web.Request) -> None:
        """Refuse (401) unless the request carries ``Authorization: token <proxy token>``."""
        token = token_from_header(request)
        if token is None:
            raise NotAuthenticated(
                "the routes feed needs `Authorization: token <proxy token>`",
                challenge=TOKEN_SCHEME,
            )
        if not tokens_match(token, self.proxy_token):
            raise NotAuthenticated("invalid proxy token", challenge=TOKEN_SCHEME)

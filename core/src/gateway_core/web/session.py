"""Browser sessions of the web UI: who is logged in (the API's login cookie), CSRF tokens and
cookie flags.

Owns `WebSession`: the user behind a request's login cookie, the per-session CSRF token (an
HMAC of the cookie under a per-app secret) and its check, and the pre-login CSRF cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from aiohttp import web
from attrs import define, field

from ..api.authn import Authn
from ..models import User

PRELOGIN_COOKIE = "gateway-web-csrf"
"""Cookie holding the CSRF token of the login form (there is no session yet)."""


def is_tls(request: web.Request) -> bool:
    """Whether the browser reached the gateway over TLS (directly, or through the proxy,
    which says so in ``X-Forwarded-Proto``)."""
    if request.secure:
        return True
    proto = request.headers.get("X-Forwarded-Proto", "")
    return proto.split(",")[0].strip().lower() == "https"


@define(kw_only=True)
class WebSession:
    """The web UI's view of the API's login cookies."""

    authn: Authn
    secret: bytes = field(factory=lambda: secrets.token_bytes(32))

    def cookie(self, request: web.Request) -> str | None:
        return request.cookies.get(self.authn.cookie_name) or None

    def user(self, request: web.Request) -> User | None:
        """The logged-in user of ``request``, or None."""
        cookie = self.cookie(request)
        return self.authn.cache.get(cookie) if cookie else None

    def csrf_token(self, request: web.Request) -> str:
        """The CSRF token forms of this session carry: tied to the login cookie, or to the
        pre-login cookie before login ("" when there is neither)."""
        value = self.cookie(request) or request.cookies.get(PRELOGIN_COOKIE, "")
        return self.token_for(value) if value else ""

    def token_for(self, value: str) -> str:
        """The CSRF token tied to the cookie value ``value``."""
        return hmac.new(self.secret, value.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, request: web.Request, given: str | None) -> bool:
        expected = self.csrf_token(request)
        return bool(expected and given) and hmac.compare_digest(expected, str(given))

    def secure_cookies(self, request: web.Request, response: web.StreamResponse) -> None:
        """Mark every cookie ``response`` sets Secure when the browser came over TLS."""
        if is_tls(request):
            for morsel in response.cookies.values():
                morsel["secure"] = True

    def log_out(self, request: web.Request, response: web.StreamResponse) -> None:
        """Forget the session's login and clear its cookie."""
        cookie = self.cookie(request)
        if cookie:
            self.authn.cache.forget(cookie)
        response.del_cookie(self.authn.cookie_name, path="/")

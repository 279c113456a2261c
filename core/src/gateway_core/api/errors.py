"""How the API answers a failure: every exception becomes ``{"error": "<reason>"}`` and a status.

Owns `error_response` (the mapping of core's `gateway_core.errors` kinds, the authenticators'
`Unauthorized` and invalid options to HTTP statuses, PROTOCOL.md) and `Gone`, the one refusal
that exists only on the wire (the routes feed's 410).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web

from ..auth.base import Unauthorized
from ..errors import (
    AccessDenied,
    BackendUnavailable,
    ClusterConflict,
    ClusterNotFound,
    GatewayError,
    InvalidRequest,
    NotAuthenticated,
)
from ..options import OptionsError

log = logging.getLogger("gateway.api")

STATUS_OF: tuple[tuple[type[GatewayError], int], ...] = (
    (NotAuthenticated, 401),
    (AccessDenied, 403),
    (ClusterNotFound, 404),
    (ClusterConflict, 409),
    (InvalidRequest, 422),
    (BackendUnavailable, 503),
)
"""The HTTP status of each kind of `GatewayError`; any other kind is a 400."""


class Gone(Exception):
    """The routes-feed events a reader asked for were dropped (410); it must reload the table."""


def json_error(status: int, reason: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """The wire shape of an error."""
    return web.json_response({"error": reason}, status=status, headers=dict(headers or {}))


def error_response(exc: BaseException, *, max_body_size: int | None = None) -> web.Response:
    """Turn any exception into a JSON error response; unexpected ones become a logged 500."""
    if isinstance(exc, GatewayError):
        return json_error(status_of(exc), exc.reason, _challenge(exc))
    if isinstance(exc, Unauthorized):
        return json_error(401, exc.reason, exc.headers)
    if isinstance(exc, OptionsError):
        return json_error(422, f"invalid cluster options: {exc}")
    if isinstance(exc, Gone):
        return json_error(410, str(exc))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = f" of {max_body_size} bytes" if max_body_size is not None else ""
        return json_error(413, f"request body is larger than the limit{limit}")
    if isinstance(exc, web.HTTPException):
        headers = {
            k: v
            for k, v in exc.headers.items()
            if k.lower() not in ("content-type", "content-length")
        }
        reason = exc.reason
        if isinstance(exc, web.HTTPNotFound):
            reason = "no such API route"
        elif isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            reason = f"method {exc.method} is not allowed here; allowed: {allowed}"
        return json_error(exc.status, reason, headers)
    log.error("unexpected error handling an API request", exc_info=exc)
    return json_error(500, "internal server error; see the gateway's log")


def status_of(exc: GatewayError) -> int:
    """The HTTP status `error_response` answers ``exc`` with."""
    for kind, status in STATUS_OF:
        if isinstance(exc, kind):
            return status
    return 400


def _challenge(exc: GatewayError) -> dict[str, str]:
    if isinstance(exc, NotAuthenticated) and exc.challenge:
        return {"WWW-Authenticate": exc.challenge}
    return {}

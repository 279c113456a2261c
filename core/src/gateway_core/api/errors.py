"""Errors the API answers with, each carrying its HTTP status and a reason for the caller.

Owns the `ApiError` hierarchy the cluster manager and handlers raise, and `error_response`, which
turns any exception into the wire shape `{"error": "<reason>"}` (PROTOCOL.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web

from ..auth.base import Unauthorized
from ..backends.base import BackendUnavailable, ClusterConflict
from ..options import OptionsError

log = logging.getLogger("gateway.api")


class ApiError(Exception):
    """A request the API refuses: answered with ``status`` and ``{"error": reason}``."""

    status: int = 500

    def __init__(
        self, reason: str, *, status: int | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})


class BadRequest(ApiError):
    status = 400


class NotAuthenticated(ApiError):
    """No valid credentials (401); ``headers`` carry the challenge, e.g. WWW-Authenticate."""

    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    """The cluster cannot take the request in its current state (409)."""

    status = 409


class Gone(ApiError):
    status = 410


class PayloadTooLarge(ApiError):
    status = 413


class Unprocessable(ApiError):
    """Well-formed HTTP whose content is invalid (422; the client raises ValueError)."""

    status = 422


class ServiceUnavailable(ApiError):
    status = 503


def json_error(status: int, reason: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """The wire shape of an error."""
    return web.json_response({"error": reason}, status=status, headers=dict(headers or {}))


def error_response(exc: BaseException, *, max_body_size: int | None = None) -> web.Response:
    """Turn any exception into a JSON error response; unexpected ones become a logged 500."""
    if isinstance(exc, ApiError):
        return json_error(exc.status, exc.reason, exc.headers)
    if isinstance(exc, Unauthorized):
        return json_error(401, exc.reason, exc.headers)
    if isinstance(exc, OptionsError):
        return json_error(422, f"invalid cluster options: {exc}")
    if isinstance(exc, BackendUnavailable):
        return json_error(503, str(exc) or "the gateway is not ready; try again shortly")
    if isinstance(exc, ClusterConflict):
        return json_error(409, str(exc) or "the cluster cannot take this request now")
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

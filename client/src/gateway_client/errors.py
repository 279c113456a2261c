"""The exceptions and warnings the client raises for gateway answers.

Owns the mapping of wire errors to Python exceptions (PROTOCOL.md): 404/422 are ValueError,
409 GatewayClusterError, 500 GatewayServerError, a failed re-authentication GatewayAuthError.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of the errors this client raises for gateway answers."""


class GatewayClusterError(GatewayError):
    """A cluster cannot do what was asked: it failed to start, stopped, or refused (HTTP 409)."""


class GatewayServerError(GatewayError):
    """The gateway server failed internally (HTTP 5xx) or answered something unexpected."""


class GatewayAuthError(GatewayError, PermissionError):
    """The gateway refused our credentials even after re-authenticating (HTTP 401)."""


class GatewayWarning(UserWarning):
    """A request was carried out differently than asked, e.g. a scale request was clamped."""


def error_for_status(status: int, message: str, *, url: str) -> Exception:
    """The exception for an error answer ``status`` whose body said ``message``."""
    if status in (404, 422):
        return ValueError(message)
    if status == 409:
        return GatewayClusterError(message)
    if status == 401:
        return GatewayAuthError(
            f"the gateway refused our credentials ({url}): {message}. "
            "Check the auth you passed to Gateway() or the gateway.auth config."
        )
    if status == 403:
        return PermissionError(message)
    if status >= 500:
        return GatewayServerError(f"gateway server error {status}: {message}")
    return GatewayError(f"unexpected gateway answer {status} for {url}: {message}")

"""What went wrong with a request to act on clusters, in the gateway's own terms (no HTTP).

Owns `GatewayError` and its kinds, raised by the cluster manager, the backends and the API's
request parsing; `gateway_core.api.errors.error_response` gives each its HTTP status.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "BackendUnavailable",
    "ClusterConflict",
    "ClusterNotFound",
    "ComponentNotFound",
    "GatewayError",
    "InvalidRequest",
    "NotAuthenticated",
    "QuotaExceeded",
]


class GatewayError(Exception):
    """A request the gateway refuses; ``str(error)`` is the reason shown to the caller."""

    default_reason = "the gateway refused this request"

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)

    @property
    def reason(self) -> str:
        return str(self) or self.default_reason


class NotAuthenticated(GatewayError):
    """The caller presented no valid credentials (HTTP 401). ``challenge`` is the
    ``Authorization`` scheme it should present (``token`` for cluster and proxy tokens), sent
    back as ``WWW-Authenticate``; None sends none."""

    default_reason = "authentication required"

    def __init__(self, reason: str = "", *, challenge: str | None = None) -> None:
        super().__init__(reason)
        self.challenge = challenge


class AccessDenied(GatewayError):
    """The caller is known but may not do this, e.g. act on another user's cluster (HTTP 403)."""

    default_reason = "access denied"


class ClusterNotFound(GatewayError):
    """No cluster has this name, or the name is not a valid cluster name (HTTP 404)."""

    default_reason = "cluster not found"


class ComponentNotFound(ClusterNotFound):
    """The cluster exists but has no such part, e.g. a log component that is neither its
    scheduler nor one of its workers (HTTP 404)."""

    default_reason = "no such component of the cluster"


class ClusterConflict(GatewayError):
    """The cluster cannot take this request now, e.g. it is not running (HTTP 409). Backends
    raise it from ``on_cluster_heartbeat`` and ``forward_to_scheduler``: a scheduler answered
    409 shuts down."""

    default_reason = "the cluster cannot take this request now"


class QuotaExceeded(ClusterConflict):
    """Creating the cluster would exceed a `[quotas]` limit of the user or of a group pool
    (HTTP 409, like any conflict with the current state: stopping another cluster frees the
    quota, and the same request then succeeds). The reason names what is used, what is asked
    and the limit."""

    default_reason = "the request would exceed a quota"


class InvalidRequest(GatewayError):
    """The request is well formed but its content is invalid: bad options, counts, bodies or
    query values (HTTP 422; the original client raises ValueError)."""

    default_reason = "invalid request"


class BackendUnavailable(GatewayError):
    """The backend is starting or stopping and cannot answer yet (HTTP 503): a scheduler that
    gets this keeps its cluster and tries again, unlike a 409 that tells it to shut down."""

    default_reason = "the gateway is not ready; try again shortly"

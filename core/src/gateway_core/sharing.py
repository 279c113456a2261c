"""Sharing a cluster with other users and groups: who may see it, and the requests that change it.

Owns the sharing keys of the v2 API (`SHARE_KEYS`), their validation (`parse_sharing`), the
caller's relation to a cluster (`access_of`) and the v2 cluster JSON (`cluster_json_v2`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidRequest
from .models import DEFAULT_GROUP, Cluster, User

SHARE_USERS = "share_with_users"
SHARE_GROUPS = "share_with_groups"
SHARE_KEYS = (SHARE_USERS, SHARE_GROUPS)
"""The request and v2 cluster JSON keys holding whom a cluster is shared with."""

SHARE_MAX_NAMES = 100
"""The most names one sharing list may hold."""
SHARE_MAX_NAME_LENGTH = 255
"""The longest user or group name a sharing list may hold."""


class Access(enum.Enum):
    """What the caller is to a cluster (the v2 JSON's ``access``)."""

    OWNER = "owner"
    """Its owner: may do everything with it."""
    ADMIN = "admin"
    """An admin who does not own it: may do everything with it."""
    SHAREE = "sharee"
    """Someone it is shared with (by name or group): may see it, connect, read its logs."""


def is_sharee(user: User, cluster: Cluster) -> bool:
    """True when ``cluster`` is shared with ``user``, by name or through one of its groups."""
    return user.name in cluster.shared_users or not user.groups.isdisjoint(cluster.shared_groups)


def access_of(user: User, cluster: Cluster, *, admin: bool) -> Access | None:
    """What ``user`` (an admin when ``admin``) is to ``cluster``; None for a stranger."""
    if cluster.username == user.name:
        return Access.OWNER
    if admin:
        return Access.ADMIN
    if is_sharee(user, cluster):
        return Access.SHAREE
    return None


def _kind(value: Any) -> str:
    """A value's JSON type, for messages."""
    kinds = {dict: "object", list: "array", str: "string", bool: "bool", type(None): "null"}
    return kinds.get(type(value), "number" if isinstance(value, int | float) else "value")


def _names(key: str, value: Any) -> list[str]:
    """One sharing list checked: an array of at most `SHARE_MAX_NAMES` non-blank names, each
    at most `SHARE_MAX_NAME_LENGTH` characters; duplicates dropped, order kept; null is []."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"{key}: expected an array of names (or null), got {_kind(value)}")
    if len(value) > SHARE_MAX_NAMES:
        raise InvalidRequest(f"{key}: at most {SHARE_MAX_NAMES} names, got {len(value)}")
    names: list[str] = []
    for index, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            shown = repr(name) if isinstance(name, str) else _kind(name)
            raise InvalidRequest(f"{key}[{index}]: expected a non-empty name, got {shown}")
        if len(name) > SHARE_MAX_NAME_LENGTH:
            raise InvalidRequest(
                f"{key}[{index}]: names are at most {SHARE_MAX_NAME_LENGTH} characters, "
                f"got {len(name)}"
            )
        if name != name.strip():
            raise InvalidRequest(
                f"{key}[{index}]: {name!r} has leading or trailing whitespace; "
                "give the name exactly"
            )
        if name not in names:
            names.append(name)
    return names


def parse_sharing(body: Mapping[str, Any], *, required: bool) -> dict[str, list[str]]:
    """The sharing keys present in ``body``, validated: ``share_with_users`` →
    ``shared_users``, ``share_with_groups`` → ``shared_groups`` (the `Cluster` fields).

    With ``required`` (a PATCH) at least one key must be there. Raises InvalidRequest (422)
    naming the key and what is wrong; other keys of ``body`` are the caller's to check.
    """
    present = [k for k in SHARE_KEYS if k in body]
    if required and not present:
        raise InvalidRequest(
            f"request body names nothing to change; expected {SHARE_USERS} and/or {SHARE_GROUPS}"
        )
    fields = {SHARE_USERS: "shared_users", SHARE_GROUPS: "shared_groups"}
    return {fields[k]: _names(k, body[k]) for k in present}


def cluster_json_v2(
    cluster: Cluster,
    *,
    prefix: str,
    access: Access | None = None,
    group_names: Sequence[str] = (),
) -> dict[str, Any]:
    """The cluster as the v2 routes show it: the v1 `<cluster>` keys, plus ``owner``,
    ``access`` (`Access` value), the sharing lists (null for sharees: who else it is
    shared with is the owner's business) and ``groups``: per worker group (the default one,
    those of ``group_names``, and any other its workers belong to), the workers wanted
    (``count``) and the active ones by status (`Cluster.workers_per_group`)."""
    out = cluster.to_json(prefix=prefix)
    groups = cluster.workers_per_group()
    out["groups"] = {
        g: groups.get(g, {"count": 0, "pending": 0, "running": 0, "stopping": 0})
        for g in dict.fromkeys([DEFAULT_GROUP, *group_names, *groups])
    }
    out["owner"] = cluster.username
    out["access"] = None if access is None else access.value
    shows = access is not Access.SHAREE
    out[SHARE_USERS] = list(cluster.shared_users) if shows else None
    out[SHARE_GROUPS] = list(cluster.shared_groups) if shows else None
    return out

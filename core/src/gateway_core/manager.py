"""The single entry point the REST API calls to act on clusters.

Owns `ClusterManager` (user options → cluster config, ownership, sharing and admin checks, worker
limits, quotas, the ceiling of ``max_lifetime``, scale/adapt forwarding, heartbeat token checks,
health, reading logs with their bounds) and `ClusterToken`, the identity of a caller that
authenticated with a cluster's own token.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from attrs import define, field

from .backends.base import SCHEDULER_COMPONENT, Backend
from .config import ClusterConfig, ConfigError, structure
from .context import GatewayContext
from .errors import (
    AccessDenied,
    ClusterConflict,
    ClusterNotFound,
    ComponentNotFound,
    InvalidRequest,
    NotAuthenticated,
    QuotaExceeded,
)
from .events import ClusterEvent
from .models import DEFAULT_GROUP, Cluster, ClusterStatus, User
from .options import Options, OptionsError
from .quotas import Pool, QuotaBook, Room, Shape, counts, quota_json, refusal
from .sharing import Access, access_of, is_sharee
from .units import format_duration

log = logging.getLogger("gateway.manager")

TOKEN_SCHEME = "token"
"""The credentials a request that needed a cluster token should present (its 401 challenge)."""

ALL_COMPONENTS = "all"
"""The log component meaning the scheduler and the workers (`ClusterManager.cluster_logs`)."""
WORKERS_COMPONENT = "workers"
"""The log component meaning every worker of the cluster."""
LOG_TAIL_DEFAULT = 1000
"""Lines of each log the logs route answers unless ``tail`` says otherwise."""
LOG_TAIL_MAX = 10_000
"""The most lines of each log one request may ask for."""
LOG_MAX_WORKERS = 200
"""The most worker logs one request answers: ``all``/``workers`` take the running workers
first, then the most recently started finished ones."""
LOG_COMPONENT_BYTES = 1024 * 1024
"""The most bytes of one log an answer holds (its end)."""
LOG_TOTAL_BYTES = 8 * 1024 * 1024
"""The bytes of one answer are bounded by sharing this between its logs (each still gets at
least `LOG_MIN_COMPONENT_BYTES`)."""
LOG_MIN_COMPONENT_BYTES = 16 * 1024
NO_LOG = "(no log: this gateway's backend keeps none for it)"
"""The text of a component the backend said nothing about."""


@define(kw_only=True, frozen=True)
class ClusterToken:
    """A caller that presented ``Authorization: token <token>``, i.e. claims to be a cluster."""

    token: str = field(repr=False)


Caller = User | ClusterToken


def _tokens_match(given: str, expected: str) -> bool:
    """Constant-time comparison of two tokens."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _members(pools: Iterable[Pool]) -> set[str]:
    """Every user whose clusters count against one of ``pools``."""
    return {member for pool in pools for member in pool.members}


def _describe(value: Any) -> str:
    """A value as JSON names it, for messages: ``bool true``, ``string '3'``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {str(value).lower()}"
    kinds: dict[type, str] = {str: "string", dict: "object", list: "array"}
    kind = kinds.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 40 else text[:40] + '...'}"


class ClusterManager:
    """What the API does, independent of HTTP: every method raises `gateway_core.errors` kinds
    (the API maps them to statuses).

    ``cluster_defaults`` is the raw ``[cluster]`` table; it is structured once here (a bad table
    raises ConfigError naming ``cluster.<key>``) and is the base of every cluster's config.

    Creating a cluster resolves its config in layers, each overriding the one before:

    1. the ``[cluster]`` defaults;
    2. the user's form applied to the validated options (each field's value to its ``target``,
       or the form's ``handler``);
    3. the answers of ``gateway_apply_options`` in registration order: pluggy calls the
       last-registered (or ``tryfirst``) plugin first, and that plugin's answer is applied last,
       so it wins. This matches ``gateway_cluster_options``, where the first answer wins.

    A layer replaces the value of a key, except for the keys in the cluster config class's
    ``merged_keys`` (``environment`` in core): a mapping given there is merged into the one
    below it, its own keys winning, so ``[options.environment]`` adds variables to
    ``[cluster] environment`` instead of dropping them.

    The merged table is then structured as ``cluster_config_class``.
    """

    def __init__(
        self,
        *,
        backend: Backend,
        context: GatewayContext,
        cluster_config_class: type[ClusterConfig] = ClusterConfig,
        cluster_defaults: Mapping[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self.context = context
        self.cluster_config_class = cluster_config_class
        self.cluster_defaults: dict[str, Any] = dict(cluster_defaults or {})
        self.default_config = structure(self.cluster_defaults, cluster_config_class, path="cluster")
        self.quotas = QuotaBook(config=context.config.quotas)
        """`[quotas]` and what the manager learned about users' groups and grants."""
        self._quota_lock = asyncio.Lock()

    # ----------------------------------------------------------------------------------------
    # Who may do what
    # ----------------------------------------------------------------------------------------

    def is_admin(self, user: User) -> bool:
        return user.admin or user.name in self.context.config.gateway.admin_users

    def _check_access(self, user: User, cluster: Cluster, action: str) -> None:
        if cluster.username != user.name and not self.is_admin(user):
            if is_sharee(user, cluster):
                raise AccessDenied(
                    f"user {user.name!r} may not {action} cluster {cluster.name!r}: it is "
                    f"shared with them to use, and only its owner {cluster.username!r} and "
                    f"admins may {action} it"
                )
            raise AccessDenied(f"user {user.name!r} may not {action} cluster {cluster.name!r}")

    def access_of(self, user: User, cluster: Cluster) -> Access | None:
        """What ``user`` is to ``cluster``: owner, admin, sharee, or None (a stranger)."""
        return access_of(user, cluster, admin=self.is_admin(user))

    async def _visible_cluster(self, user: User, name: str, action: str) -> Cluster:
        """The cluster ``name`` if ``user`` owns it, is an admin or it is shared with them
        (what sharees may do: see it, wait for it, connect, read its logs)."""
        cluster = await self.backend.get_cluster(name)
        if cluster is None:
            raise ClusterNotFound(f"cluster {name!r} not found")
        if self.access_of(user, cluster) is None:
            raise AccessDenied(f"user {user.name!r} may not {action} cluster {cluster.name!r}")
        return cluster

    async def _owned_cluster(self, user: User, name: str, action: str) -> Cluster:
        cluster = await self.backend.get_cluster(name)
        if cluster is None:
            raise ClusterNotFound(f"cluster {name!r} not found")
        self._check_access(user, cluster, action)
        return cluster

    async def _running_cluster(self, user: User, name: str, action: str) -> Cluster:
        cluster = await self._owned_cluster(user, name, action)
        if cluster.status != ClusterStatus.RUNNING:
            raise ClusterConflict(
                f"cluster {name!r} is {cluster.status.name}, not RUNNING; it cannot {action} now"
            )
        return cluster

    # ----------------------------------------------------------------------------------------
    # Options and creation
    # ----------------------------------------------------------------------------------------

    async def options_for(self, user: User) -> Options:
        """The form ``user`` fills in: the first plugin's answer, or an empty form."""
        form = await self.context.hook.gateway_cluster_options(
            user=user, config=self.context.config
        )
        return Options() if form is None else form

    async def resolve_config(
        self, user: User, form: Options, normalized: Mapping[str, Any]
    ) -> ClusterConfig:
        """The cluster config for validated options (see the class docstring for the layers)."""
        merged = dict(self.cluster_defaults)
        merge_keys = self.cluster_config_class.merged_keys
        try:
            _apply_layer(merged, await form.overrides(normalized, user), merge_keys)
            answers = await self.context.hook.gateway_apply_options(
                user=user, options=normalized, config=self.default_config
            )
        except OptionsError as exc:
            raise InvalidRequest(f"invalid cluster options: {exc}") from None
        for answer in reversed(answers):  # in call order: the first-called plugin applies last
            _apply_layer(merged, answer, merge_keys)
        try:
            config = structure(merged, self.cluster_config_class)
        except ConfigError as exc:
            raise InvalidRequest(
                "cluster options give an invalid cluster configuration: " + "; ".join(exc.problems)
            ) from None
        self._check_lifetime(config)
        return config

    def _check_lifetime(self, config: ClusterConfig) -> None:
        """Refuse (422) a ``max_lifetime`` that options or plugins raised above ``[cluster]``'s:
        users may only lower it."""
        ceiling = self.default_config.max_lifetime
        asked = config.max_lifetime
        if ceiling is None or (asked is not None and asked <= ceiling):
            return
        shown = "none (no limit)" if asked is None else format_duration(asked)
        raise InvalidRequest(
            f"max_lifetime: {shown} is above the configured maximum of "
            f"{format_duration(ceiling)}; a cluster may live at most that long"
        )

    async def create_cluster(
        self,
        user: User,
        cluster_options: Any,
        *,
        sharing: Mapping[str, Sequence[str]] | None = None,
    ) -> str:
        """Validate ``cluster_options``, resolve the config, start the cluster; return its name.

        ``sharing`` (validated by `gateway_core.sharing.parse_sharing`: ``shared_users`` and/or
        ``shared_groups``) is set on the new cluster before its name is returned.
        """
        form = await self.options_for(user)
        try:
            normalized = form.validate(cluster_options)
        except OptionsError as exc:
            raise InvalidRequest(f"invalid cluster options: {exc}") from None
        config = await self.resolve_config(user, form, normalized)
        async with self._quota_lock:  # two creates must not both take the last room
            await self._check_create_quota(user, config)
            name, durable = await self.backend.begin_cluster(
                user=user, options=normalized, config=config
            )
        # Counted by the quotas from here on; made durable outside the lock, so that the
        # creates waiting meanwhile share one commit instead of taking turns.
        await durable()
        if sharing:
            await self.backend.set_sharing(
                name,
                shared_users=sharing.get("shared_users"),
                shared_groups=sharing.get("shared_groups"),
            )
        log.info("user %s created cluster %s", user.name, name)
        self.context.emit(
            ClusterEvent(
                kind="created",
                cluster_name=name,
                username=user.name,
                detail={"options": dict(normalized)},
            )
        )
        return name

    # ----------------------------------------------------------------------------------------
    # Quotas
    # ----------------------------------------------------------------------------------------

    def typed_config(self, cluster: Cluster) -> ClusterConfig:
        """The cluster's config, typed: its ``typed_config``, else its stored config structured,
        else (a stored config that no longer fits, logged) the ``[cluster]`` defaults."""
        if cluster.typed_config is not None:
            return cluster.typed_config
        try:
            return structure(cluster.config, self.cluster_config_class)
        except ConfigError as exc:
            log.warning(
                "stored config of cluster %s does not structure (%s); quotas use the defaults",
                cluster.name,
                "; ".join(exc.problems),
            )
            return self.default_config

    async def _quota_clusters(
        self, usernames: Iterable[str]
    ) -> tuple[list[Cluster], dict[str, Shape]]:
        """The clusters of ``usernames`` that count against quotas, with their shapes; forgets
        the grants of those users' clusters that no longer count.

        Only those users' clusters are listed (the backend's per-user listing): the quotas
        a request is checked against cover its pools' members, never anyone else, so the
        cost does not grow with what other users hold.
        """
        clusters: list[Cluster] = []
        for username in sorted(set(usernames)):
            for cluster in await self.backend.list_clusters(username=username):
                if counts(cluster):
                    clusters.append(cluster)
                elif cluster.name in self.quotas.claims:
                    self.quotas.forget(cluster.name)
        return clusters, {c.name: Shape.of(self.typed_config(c)) for c in clusters}

    async def _check_create_quota(self, user: User, config: ClusterConfig) -> None:
        """Refuse (409) a new cluster beyond ``max_clusters``, or whose scheduler alone does
        not fit in ``max_cores`` or ``max_memory``, of the user or of a group pool."""
        self.quotas.note(user)
        pools = self.quotas.pools(user.name)
        if not pools:
            return
        clusters, shapes = await self._quota_clusters(_members(pools))
        new = Shape.of(config).usage(0)
        for pool in pools:
            used = self.quotas.usage(clusters, pool.members, shapes)
            for key, what in (
                ("max_clusters", "the new cluster"),
                ("max_cores", "the new cluster's scheduler"),
                ("max_memory", "the new cluster's scheduler"),
            ):
                why = refusal(pool, key, used.get(key), new.get(key), what)
                if why is not None:
                    raise QuotaExceeded(f"cannot create the cluster: {why}")

    async def _quota_room(self, cluster: Cluster, group: str = DEFAULT_GROUP) -> Room | None:
        """The most workers of ``group`` the quotas leave ``cluster`` (its other groups'
        workers counted at their own size); None when none limits it."""
        pools = self.quotas.pools(cluster.username)
        if not pools:
            return None
        clusters, shapes = await self._quota_clusters(_members(pools))
        if cluster.name not in shapes:
            shapes[cluster.name] = Shape.of(self.typed_config(cluster))
        return self.quotas.room(cluster, clusters, shapes, group)

    async def quota(self, user: User, username: str | None = None) -> dict[str, Any]:
        """Usage and limits of ``username`` (the caller when None; another user's only for
        admins): its own quota and each group pool it belongs to."""
        self.quotas.note(user)
        name = user.name if username is None else username
        if name != user.name and not self.is_admin(user):
            raise AccessDenied(f"user {user.name!r} may not see the quota of user {name!r}")
        covering = self.quotas.pools(name)
        clusters, shapes = await self._quota_clusters(_members(covering) | {name})
        pools = {}
        for pool in covering:
            if pool.kind == "group":
                pools[pool.name] = {
                    "quota": quota_json(pool.quota),
                    "usage": self.quotas.usage(clusters, pool.members, shapes).to_json(),
                }
        return {
            "user": name,
            "groups": sorted(self.quotas.groups_of.get(name, frozenset())),
            "quota": quota_json(self.quotas.config.for_user(name)),
            "usage": self.quotas.usage(clusters, frozenset({name}), shapes).to_json(),
            "group_pools": pools,
        }

    # ----------------------------------------------------------------------------------------
    # Reading and stopping
    # ----------------------------------------------------------------------------------------

    async def list_clusters(
        self, user: User, statuses: Collection[ClusterStatus] | None = None
    ) -> list[Cluster]:
        """The caller's own clusters with a status in ``statuses``.

        Without ``statuses``, the clusters that are still wanted, as the original gateway lists
        them: active ones whose ``target`` is RUNNING. A cluster asked to stop leaves this list
        at once, while it is still STOPPING; ``statuses=[STOPPING]`` still finds it.
        """
        self.quotas.note(user)
        if statuses is not None:
            return await self.backend.list_clusters(username=user.name, statuses=list(statuses))
        active = [s for s in ClusterStatus if s.is_active]
        clusters = await self.backend.list_clusters(username=user.name, statuses=active)
        return [c for c in clusters if c.target <= ClusterStatus.RUNNING]

    async def get_cluster(self, user: User, name: str, *, wait: bool = False) -> Cluster:
        """The cluster ``name``; with ``wait``, block (backend's limit) while it is PENDING."""
        self.quotas.note(user)
        cluster = await self._visible_cluster(user, name, "view")
        if wait and cluster.status == ClusterStatus.PENDING:
            waited = await self.backend.get_cluster(name, wait=True)
            if waited is None:
                raise ClusterNotFound(f"cluster {name!r} not found")
            cluster = waited
        return cluster

    async def list_visible_clusters(
        self,
        user: User,
        statuses: Collection[ClusterStatus] | None = None,
        *,
        shared: bool = True,
    ) -> list[Cluster]:
        """`list_clusters`, plus (with ``shared``) the other users' clusters shared with
        ``user``, picked by ``statuses`` the same way; the caller's own first."""
        own = await self.list_clusters(user, statuses)
        if not shared:
            return own
        wanted = (
            list(statuses) if statuses is not None else [s for s in ClusterStatus if s.is_active]
        )
        others = await self.backend.list_shared_clusters(user, statuses=wanted)
        if statuses is None:
            others = [c for c in others if c.target <= ClusterStatus.RUNNING]
        return own + others

    async def share_cluster(
        self, user: User, name: str, sharing: Mapping[str, Sequence[str]]
    ) -> Cluster:
        """Replace whom cluster ``name`` is shared with: ``sharing`` holds ``shared_users``
        and/or ``shared_groups`` (validated by `gateway_core.sharing.parse_sharing`); a list
        left out stays. Only the owner and admins may (403 for sharees and strangers)."""
        cluster = await self._owned_cluster(user, name, "change the sharing of")
        await self.backend.set_sharing(
            name,
            shared_users=sharing.get("shared_users"),
            shared_groups=sharing.get("shared_groups"),
        )
        changed = await self.backend.get_cluster(name) or cluster
        log.info(
            "user %s shared cluster %s with users %s and groups %s",
            user.name,
            name,
            changed.shared_users,
            changed.shared_groups,
        )
        self.context.emit(
            ClusterEvent(
                kind="shared",
                cluster_name=name,
                username=cluster.username,
                detail={
                    "shared_users": list(changed.shared_users),
                    "shared_groups": list(changed.shared_groups),
                    "by": user.name,
                },
            )
        )
        return changed

    async def stop_cluster(self, caller: Caller, name: str) -> None:
        """Stop ``name``; idempotent (an unknown or finished cluster is a no-op).

        A `ClusterToken` caller may stop only the cluster whose token it holds (a wrong token is
        401); a user may stop their own clusters, admins any.
        """
        cluster = await self.backend.get_cluster(name)
        if cluster is None:
            return
        if isinstance(caller, ClusterToken):
            if not _tokens_match(caller.token, cluster.token):
                raise NotAuthenticated(
                    f"the token is not the token of cluster {name!r}", challenge=TOKEN_SCHEME
                )
            who = f"cluster {name}"
        else:
            self._check_access(caller, cluster, "stop")
            who = f"user {caller.name}"
        if cluster.status.is_active:
            log.info("%s asked to stop cluster %s", who, name)
            await self.backend.stop_cluster(name)
            self.quotas.forget(name)

    async def cluster_logs(
        self, user: User, name: str, *, components: Sequence[str], tail: int
    ) -> dict[str, str]:
        """The last ``tail`` lines of the logs of ``components`` of cluster ``name``, component
        → text (the scheduler first, then workers in the order they started).

        Each component is ``scheduler``, ``workers`` (every worker), ``all`` (both) or the name
        of one of the cluster's workers (another is `ComponentNotFound`, 404, naming it). The
        owner, admins and the users it is shared with may read them. The answer is bounded:
        `LOG_MAX_WORKERS` worker logs, and `LOG_TOTAL_BYTES` shared between the logs, at most
        `LOG_COMPONENT_BYTES` each; a text longer than its share keeps its end.
        """
        if not _is_count(tail) or tail > LOG_TAIL_MAX:
            raise InvalidRequest(
                f"tail: expected an integer from 0 to {LOG_TAIL_MAX}, got {_describe(tail)}"
            )
        cluster = await self._visible_cluster(user, name, "read the logs of")
        wanted = _log_components(cluster, components)
        share = LOG_TOTAL_BYTES // max(1, len(wanted))
        max_bytes = max(LOG_MIN_COMPONENT_BYTES, min(LOG_COMPONENT_BYTES, share))
        answer = await self.backend.cluster_logs(
            cluster, components=wanted, tail=tail, max_bytes=max_bytes
        )
        return {c: _clip(answer.get(c, NO_LOG), max_bytes) for c in wanted}

    # ----------------------------------------------------------------------------------------
    # Scaling
    # ----------------------------------------------------------------------------------------

    def max_workers(self, cluster: Cluster) -> int | None:
        """The cluster's effective worker limit from its stored config; None means none."""
        if cluster.typed_config is not None:
            return cluster.typed_config.max_workers
        try:
            return structure(cluster.config, self.cluster_config_class).max_workers
        except ConfigError as exc:
            log.warning(
                "stored config of cluster %s does not structure (%s); using cluster_max_workers",
                cluster.name,
                "; ".join(exc.problems),
            )
            raw = cluster.config.get("cluster_max_workers")
            return raw if _is_count(raw) else None

    def check_group(self, cluster: Cluster, group: Any) -> str:
        """The worker group a scale or adapt request names (None: the default group); 422
        naming the group and the groups the cluster has when it is not one of them."""
        if group is None or group == DEFAULT_GROUP:
            return DEFAULT_GROUP
        names = self.typed_config(cluster).group_names()
        if not isinstance(group, str):
            raise InvalidRequest(
                f"group: expected a worker group name (one of {', '.join(names)}), "
                f"got {_describe(group)}"
            )
        if group not in names:
            shown = group if len(group) <= 40 else group[:40] + "..."
            raise InvalidRequest(
                f"group: cluster {cluster.name} has no worker group {shown!r}; "
                f"its groups are {', '.join(names)}"
            )
        return group

    def _group_limit(self, cluster: Cluster, group: str) -> int | None:
        """The most workers of ``group`` the cluster may have (None: no limit)."""
        if group == DEFAULT_GROUP:
            return self.max_workers(cluster)
        return self.typed_config(cluster).group_max_workers(group)

    @staticmethod
    def _others(cluster: Cluster, group: str) -> int:
        """Workers the cluster wants in groups other than ``group``."""
        total = cluster.count + sum(cluster.group_counts.values())
        return total - cluster.count_of(group)

    async def scale(self, user: User, name: str, count: Any, group: Any = None) -> dict[str, Any]:
        """Ask the scheduler for ``count`` workers of worker group ``group`` (None: the
        default group, the only one the original client knows), clamped to the limit.

        Returns the wire answer ``{"ok": bool, "msg": str | None}``; ``ok`` is false and ``msg``
        explains when the count was lowered.
        """
        if not _is_count(count):
            raise InvalidRequest(f"count: expected a non-negative integer, got {_describe(count)}")
        cluster = await self._running_cluster(user, name, "scale")
        group = self.check_group(cluster, group)
        self.quotas.note(user)
        async with self._quota_lock:  # grant, then record the grant, before the next request
            limit = self._group_limit(cluster, group)
            room = await self._quota_room(cluster, group)
            others = self._others(cluster, group)
            msg = None
            requested = count
            by_quota = room is not None and (limit is None or room.workers < limit)
            if room is not None and by_quota and count > room.workers:
                msg = (
                    f"Asked for {count} workers but {room.explain(count)}; "
                    f"scaling to {room.workers} workers instead."
                )
                count = room.workers
            elif limit is not None and count > limit:
                msg = (
                    f"Asked for {count} workers but cluster {name} may have at most {limit}"
                    f"{_in_group(group)}; scaling to {limit} workers instead."
                )
                count = limit
            previous = self._claim(name, count + others)
        op: dict[str, Any] = {"op": "scale", "count": count}
        detail: dict[str, Any] = {"count": count, "requested": requested, "by": user.name}
        if group != DEFAULT_GROUP:
            op["group"] = detail["group"] = group
        try:
            await self.backend.forward_to_scheduler(cluster, op)
        except BaseException:
            self._unclaim(name, previous)
            raise
        self.context.emit(
            ClusterEvent(kind="scaled", cluster_name=name, username=cluster.username, detail=detail)
        )
        return {"ok": msg is None, "msg": msg}

    async def adapt(
        self,
        user: User,
        name: str,
        minimum: Any = None,
        maximum: Any = None,
        active: Any = True,
        group: Any = None,
    ) -> dict[str, Any]:
        """Configure adaptive scaling of worker group ``group`` (None: the default group)
        between ``minimum`` and ``maximum`` (None: 0 / no limit), both clamped to the limit
        the same way as `scale`."""
        problems = []
        for key, value in (("minimum", minimum), ("maximum", maximum)):
            if value is not None and not _is_count(value):
                problems.append(
                    f"{key}: expected a non-negative integer or null, got {_describe(value)}"
                )
        if not isinstance(active, bool):
            problems.append(f"active: expected a bool, got {_describe(active)}")
        if not problems and minimum is not None and maximum is not None and minimum > maximum:
            problems.append(f"minimum: {minimum} is greater than maximum {maximum}")
        if problems:
            raise InvalidRequest("; ".join(problems))
        cluster = await self._running_cluster(user, name, "adapt")
        group = self.check_group(cluster, group)
        self.quotas.note(user)
        async with self._quota_lock:
            limit = self._group_limit(cluster, group)
            room = await self._quota_room(cluster, group)
            others = self._others(cluster, group)
            if room is not None and (limit is None or room.workers < limit):
                limit = room.workers
            else:
                room = None  # the cluster's own limit binds (or nothing does)
            msg = None
            if limit is not None:
                lo = 0 if minimum is None else minimum
                hi = limit if maximum is None else maximum
                if lo > limit or hi > limit:
                    why = (
                        f"the limit of {limit} workers of cluster {name}{_in_group(group)}"
                        if room is None
                        else f"what fits: {room.explain(max(lo, hi))}"
                    )
                    msg = (
                        f"Adaptive range minimum={lo}, maximum={hi} exceeds {why}; using "
                        f"minimum={min(lo, limit)}, maximum={min(hi, limit)} instead."
                    )
                minimum, maximum = min(lo, limit), min(hi, limit)
            previous = self._claim(name, None if maximum is None else maximum + others)
        op = {"op": "adapt", "minimum": minimum, "maximum": maximum, "active": active}
        detail = {"minimum": minimum, "maximum": maximum, "active": active, "by": user.name}
        if group != DEFAULT_GROUP:
            op["group"] = detail["group"] = group
        try:
            await self.backend.forward_to_scheduler(cluster, op)
        except BaseException:
            self._unclaim(name, previous)
            raise
        self.context.emit(
            ClusterEvent(
                kind="adapted", cluster_name=name, username=cluster.username, detail=detail
            )
        )
        return {"ok": msg is None, "msg": msg}

    def _claim(self, name: str, workers: int | None) -> int | None:
        """Record the worker count granted to cluster ``name`` (when quotas apply); return the
        one it replaces, for `_unclaim`."""
        previous = self.quotas.claims.get(name)
        if workers is not None and self.quotas.enabled:
            self.quotas.claims[name] = workers
        return previous

    def _unclaim(self, name: str, previous: int | None) -> None:
        """Undo `_claim` after the scheduler refused the request."""
        if previous is None:
            self.quotas.claims.pop(name, None)
        else:
            self.quotas.claims[name] = previous

    # ----------------------------------------------------------------------------------------
    # Heartbeats and health
    # ----------------------------------------------------------------------------------------

    async def check_cluster_token(self, name: str, token: str | None) -> Cluster:
        """The cluster ``name`` if ``token`` is its token (compared in constant time).

        A missing token and a wrong token are both 401 (with ``WWW-Authenticate: token``): the
        caller lacks valid credentials either way. Checked in this order: missing token (401),
        unknown cluster (404, so the scheduler of a forgotten cluster learns to exit), wrong
        token (401).
        """
        if not token:
            raise NotAuthenticated(
                "this route needs `Authorization: token <cluster token>`", challenge=TOKEN_SCHEME
            )
        cluster = await self.backend.get_cluster(name)
        if cluster is None:
            raise ClusterNotFound(f"cluster {name!r} not found")
        if not _tokens_match(token, cluster.token):
            raise NotAuthenticated(
                f"the token is not the token of cluster {name!r}", challenge=TOKEN_SCHEME
            )
        return cluster

    async def heartbeat(self, name: str, token: str | None, msg: dict[str, Any]) -> None:
        """Take a heartbeat from the scheduler of ``name`` after `check_cluster_token`; the
        backend may refuse it with ClusterConflict (409)."""
        await self.check_cluster_token(name, token)
        await self.backend.on_cluster_heartbeat(name, msg)

    async def health(self) -> dict[str, Any]:
        """``{"status": "pass"}`` or ``{"status": "fail", ...}``, from the backend's optional
        ``health()`` (sync or async; returning a bool or a mapping with ``status``)."""
        check = getattr(self.backend, "health", None)
        if check is None:
            return {"status": "pass"}
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:  # noqa: BLE001 - a failing check is a failed health
            log.warning("backend health check failed: %s", exc)
            return {"status": "fail", "reason": f"backend health check failed: {exc}"}
        if isinstance(result, bool):
            return {"status": "pass"} if result else {"status": "fail", "reason": "backend"}
        if isinstance(result, Mapping):
            out = dict(result)
            out["status"] = "pass" if out.get("status") == "pass" else "fail"
            return out
        return {"status": "pass"}


def _in_group(group: str) -> str:
    """`` in worker group gpu`` for a named group, nothing for the default one (messages)."""
    return "" if group == DEFAULT_GROUP else f" in worker group {group}"


def _log_components(cluster: Cluster, components: Sequence[str]) -> list[str]:
    """The components the request names, in answer order, "all"/"workers" expanded; 404
    naming the first that is not the cluster's."""
    known = cluster.workers
    if not components:
        components = [ALL_COMPONENTS]
    scheduler = False
    named: set[str] = set()
    for component in components:
        if component in (ALL_COMPONENTS, SCHEDULER_COMPONENT):
            scheduler = True
        if component in (ALL_COMPONENTS, WORKERS_COMPONENT):
            # Running workers first, then the most recently started finished ones.
            ranked = sorted(known.values(), key=lambda w: (not w.status.is_active, -w.start_time))
            named.update(w.name for w in ranked[:LOG_MAX_WORKERS])
        elif component != SCHEDULER_COMPONENT:
            if component not in known:
                shown = component if len(component) <= 70 else component[:70] + "..."
                raise ComponentNotFound(
                    f"cluster {cluster.name!r} has no log component {shown!r}; expected "
                    f"{SCHEDULER_COMPONENT}, {WORKERS_COMPONENT}, {ALL_COMPONENTS} or the name "
                    "of one of its workers"
                )
            named.add(component)
    if len(named) > LOG_MAX_WORKERS:
        raise InvalidRequest(
            f"component: at most {LOG_MAX_WORKERS} worker logs per request, {len(named)} were named"
        )
    workers = sorted(named, key=lambda n: (known[n].start_time, n))
    return [SCHEDULER_COMPONENT, *workers] if scheduler else workers


def _clip(text: Any, max_bytes: int) -> str:
    """``text`` (a string) cut to its last ``max_bytes`` bytes, from a line's start."""
    text = text if isinstance(text, str) else str(text)
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return text
    end = data[-max_bytes:].decode("utf-8", "ignore")
    newline = end.find("\n")
    return end[newline + 1 :] if newline >= 0 else end


def _apply_layer(
    merged: dict[str, Any], layer: Mapping[str, Any], merge_keys: Collection[str]
) -> None:
    """Put one layer of overrides on ``merged``: a key's value is replaced, except a mapping
    given for a key of ``merge_keys``, which is merged into the mapping below (its keys win)."""
    for key, value in layer.items():
        below = merged.get(key)
        if key in merge_keys and isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = {**below, **value}
        else:
            merged[key] = value

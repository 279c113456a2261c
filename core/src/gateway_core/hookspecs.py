"""Every hook a gateway plugin may implement, typed and documented.

Owns the pluggy project name (`gateway`), the `hookimpl` marker plugins decorate their
functions with, and the hook specifications. Core's own built-ins implement these same hooks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from .config import ClusterConfig, Config
    from .events import ClusterEvent
    from .models import User
    from .options import Options
    from .specs import AuthenticatorSpec, BackendSpec, ProxySpec

PROJECT_NAME = "gateway"
"""The pluggy project name and the entry-point group plugins are found under."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Decorate a plugin's hook functions with this: ``@hookimpl``."""


@hookspec
def gateway_register_backends() -> list[BackendSpec]:
    """Register cluster backends this plugin provides.

    Called once when the plugin registry is built. Every plugin is asked; the results are
    gathered and each name must be unique across plugins (a duplicate is an error naming both
    distributions). The selected one is ``[gateway] backend``.

    :return: a list of :class:`~gateway_core.specs.BackendSpec`, possibly empty.

    Example::

        from gateway_core import hookimpl
        from gateway_core.specs import BackendSpec

        @hookimpl
        def gateway_register_backends():
            from .backend import SlurmBackend, SlurmConfig   # import heavy code lazily
            return [BackendSpec(name="slurm", backend=SlurmBackend, config=SlurmConfig)]
    """


@hookspec
def gateway_register_authenticators() -> list[AuthenticatorSpec]:
    """Register authenticators this plugin provides.

    Called once when the registry is built; names are unique across plugins. The selected one
    is ``[gateway] authenticator`` and its config comes from ``[auth.<name>]``.

    :return: a list of :class:`~gateway_core.specs.AuthenticatorSpec`, possibly empty.

    Example::

        @hookimpl
        def gateway_register_authenticators():
            from .auth import KerberosAuthenticator, KerberosConfig
            return [AuthenticatorSpec(name="kerberos", authenticator=KerberosAuthenticator,
                                      config=KerberosConfig)]
    """


@hookspec
def gateway_register_proxies() -> list[ProxySpec]:
    """Register proxies this plugin provides.

    Called once when the registry is built; names are unique across plugins. The selected one
    is ``[gateway] proxy`` and its config comes from ``[proxy]``.

    :return: a list of :class:`~gateway_core.specs.ProxySpec`, possibly empty.

    Example::

        @hookimpl
        def gateway_register_proxies():
            from .server import BuiltinProxy
            return [ProxySpec(name="builtin", proxy=BuiltinProxy)]
    """


@hookspec(firstresult=True)
def gateway_cluster_options(
    user: User, config: Config
) -> Options | Awaitable[Options | None] | None:
    """Return the options ``user`` may set when creating a cluster.

    ``firstresult``: plugins are asked in hook order (last registered first) and the first
    non-None answer wins; an implementation may be a coroutine, and it is its awaited answer
    that counts (a coroutine returning None defers to the next plugin too). Core's built-in
    implementation runs last and returns the options declared in ``[options]`` of ``config``,
    so a site plugin can give each user or group its own form and fall back to the file by
    returning None.

    :param user: the authenticated user asking (for ``GET /api/v1/options`` or a new cluster).
    :param config: the gateway's loaded configuration.
    :return: an :class:`~gateway_core.options.Options`, or None to let the next plugin decide
        (or an awaitable of either).

    Example::

        @hookimpl
        def gateway_cluster_options(user, config):
            if "gpu" in user.groups:
                return Options(fields=[Integer(field="worker_gpus", default=1, min=0, max=4)])
            return None
    """


@hookspec
def gateway_apply_options(
    user: User, options: Mapping[str, Any], config: ClusterConfig
) -> Mapping[str, Any] | Awaitable[Mapping[str, Any] | None] | None:
    """Turn a user's validated options into overrides of the cluster configuration.

    Called for every new cluster after the options were validated against the user's form. Core
    first applies the form itself (each field's value to its ``target``, or the form's
    ``handler``) on top of the ``[cluster]`` defaults; then every plugin is asked and the returned
    mappings are merged on top in registration order: a plugin registered later (which pluggy
    calls earlier) overrides one registered earlier for the same key, ``tryfirst``
    implementations override all others and ``trylast`` ones are overridden by all, just as the
    plugin that answers ``gateway_cluster_options`` first wins there. A mapping given for
    ``environment`` (or another key of the config class's ``merged_keys``) is merged into the
    one below instead of replacing it. The result is validated as
    the backend's cluster config class, so a bad override is refused with a 422 naming the key;
    a plugin may also raise `gateway_core.options.OptionsError` to refuse the options (422).

    :param user: the user creating the cluster.
    :param options: the normalized options (field name → value), read-only.
    :param config: the cluster config built from ``[cluster]`` alone, for reference.
    :return: a mapping of cluster-config field → value, an awaitable of one, or None.

    Example::

        @hookimpl
        def gateway_apply_options(user, options, config):
            if "worker_memory_gb" in options:
                return {"worker_memory": int(options["worker_memory_gb"] * 2**30)}
            return None
    """


@hookspec
def gateway_cluster_event(event: ClusterEvent) -> Awaitable[None] | None:
    """Observe what happens to clusters: created, running, scaled, stopping, stopped, failed,
    worker changes, the warning before a cluster's maximum lifetime (lifetime_warning), and
    changes of whom it is shared with (shared).

    Called for every event, by every plugin, after the change was stored. Each observer is
    isolated: one that raises (or whose awaitable raises) is logged with its plugin's name and
    the other observers still get the event. A returned awaitable is awaited in the
    background, so a slow observer never delays the API.

    :param event: a :class:`~gateway_core.events.ClusterEvent`.
    :return: None, or an awaitable.

    Example::

        @hookimpl
        def gateway_cluster_event(event):
            audit_log.info("%s %s %s", event.username, event.kind, event.cluster_name)
    """


@hookspec
def gateway_register_commands(cli: click.Group) -> None:
    """Add click commands to the ``gateway`` command line.

    Called once when the CLI is built, with the top-level group.

    :param cli: the ``gateway`` click group; call ``cli.add_command(...)``.
    :return: None.

    Example::

        @hookimpl
        def gateway_register_commands(cli):
            @cli.command("slurm-check")
            def slurm_check():
                click.echo("sinfo ok")
    """

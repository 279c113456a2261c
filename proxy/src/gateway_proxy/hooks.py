"""The gateway-core plugin glue: registers the built-in proxy and the ``gateway proxy`` command.

Owns the hook implementations core loads from the ``gateway`` entry point ``proxy``; gateway-core
itself is imported only inside them, so gateway-proxy stays importable without core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

hookimpl = pluggy.HookimplMarker("gateway")
"""The same marker as ``gateway_core.hookimpl`` (pluggy matches markers by project name)."""


@hookimpl
def gateway_register_proxies() -> list[Any]:
    from gateway_core.specs import ProxySpec

    from .embedded import BuiltinProxy, BuiltinProxyConfig

    return [
        ProxySpec(
            name="builtin",
            proxy=BuiltinProxy,
            config=BuiltinProxyConfig,
            description="HTTP path routes and TLS-SNI passthrough, in the gateway process",
        )
    ]


@hookimpl
def gateway_register_commands(cli: click.Group) -> None:
    from .cli import proxy_command

    cli.add_command(proxy_command, "proxy")

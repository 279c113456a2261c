"""The plugin's entry point: the hooks the gateway calls on this plugin.

Owns the registration of the ``command-template`` backend and of the ``gateway
command-template`` command, which prints the command lines the backend would run. Kept light
on purpose: every gateway process imports it, so the driver and anything heavy are imported
inside the hooks, only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway_core import hookimpl
from gateway_core.specs import BackendSpec

if TYPE_CHECKING:
    import click

BACKEND_NAME = "command-template"


@hookimpl
def gateway_register_backends() -> list[BackendSpec]:
    from .backend import CommandTemplateConfig, CommandTemplateDriver

    return [
        BackendSpec(
            name=BACKEND_NAME,
            driver=CommandTemplateDriver,
            config=CommandTemplateConfig,
            description="Schedulers and workers as local processes, through command templates",
        )
    ]


@hookimpl
def gateway_register_commands(cli: click.Group) -> None:
    import click

    @cli.command(BACKEND_NAME)
    @click.option("--config", "config_path", default=None, help="Config file to read.")
    def show_commands(config_path: str | None) -> None:
        """Print the command lines the command-template backend would run."""
        from gateway_core.config import ConfigError

        from .backend import preview

        try:
            lines = preview(config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                click.echo(f"error: {problem}", err=True)
            raise SystemExit(1) from None
        for line in lines:
            click.echo(line)

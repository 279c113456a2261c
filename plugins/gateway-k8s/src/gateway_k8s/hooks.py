"""Entry point of gateway-k8s (``[project.entry-points.gateway] k8s``): the ``kubernetes``
backend and the ``gateway k8s controller`` command.

Every ``gateway`` command loads this module, so it imports only core's hook marker and spec;
the `kubernetes` client is imported when the backend or the command is used.
"""

from __future__ import annotations

from typing import Any

import click

from gateway_core import hookimpl
from gateway_core.specs import BackendSpec


@hookimpl
def gateway_register_backends() -> list[BackendSpec]:
    from .backend import KubeBackend
    from .config import KubeBackendConfig, KubeClusterConfig

    return [
        BackendSpec(
            name="kubernetes",
            backend=KubeBackend,
            config=KubeBackendConfig,
            cluster_config=KubeClusterConfig,
            description="Dask clusters as DaskCluster resources on Kubernetes",
        )
    ]


@hookimpl
def gateway_register_commands(cli: click.Group) -> None:
    @cli.group("k8s")
    def k8s() -> None:
        """The Kubernetes backend's commands."""

    @k8s.command("controller")
    @click.option("--server", default="", help="API server URL used without credentials.")
    @click.option("--kubeconfig", default="", help="kubeconfig file (default: in-cluster).")
    @click.option("--context", "kube_context", default="", help="kubeconfig context.")
    @click.option("--namespace", default="default", show_default=True)
    @click.option(
        "--parallelism", default=4, show_default=True, help="Clusters reconciled at once."
    )
    @click.option("--identity", default="", help="Name in the Lease (default: host-pid).")
    @click.option("--lease-name", default="dask-gateway-controller", show_default=True)
    @click.option("--lease-duration", default=15.0, show_default=True)
    @click.option("--renew-period", default=5.0, show_default=True)
    @click.option("--no-leader-election", is_flag=True, help="Act without holding the Lease.")
    @click.option(
        "--address-mode",
        type=click.Choice(["service", "pod"]),
        default="service",
        show_default=True,
        help="Schedulers reached through their Service's DNS name, or their pod IP.",
    )
    @click.option("--api-qps", default=50.0, show_default=True)
    @click.option("--log-level", default="INFO", show_default=True)
    def controller(**options: Any) -> None:
        """Reconcile DaskCluster resources into scheduler and worker pods."""
        import asyncio
        import logging

        from gateway_core.config import ConfigError

        from .config import KubeControllerConfig
        from .runner import run_controller

        logging.basicConfig(
            level=options.pop("log_level").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        try:
            config = KubeControllerConfig(
                server=options["server"],
                kubeconfig=options["kubeconfig"],
                context=options["kube_context"],
                namespace=options["namespace"],
                parallelism=options["parallelism"],
                identity=options["identity"],
                lease_name=options["lease_name"],
                lease_duration=options["lease_duration"],
                renew_period=options["renew_period"],
                leader_election=not options["no_leader_election"],
                address_mode=options["address_mode"],
                api_qps=options["api_qps"],
            )
        except ConfigError as exc:
            raise click.UsageError("; ".join(exc.problems)) from None
        asyncio.run(run_controller(config))

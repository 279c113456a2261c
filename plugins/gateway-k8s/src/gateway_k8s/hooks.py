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
    @click.option(
        "--config",
        "config_file",
        envvar="GATEWAY_CONFIG",
        default="",
        help="The gateway's TOML: [backend.kubernetes] server, kubeconfig, context, namespace "
        "and api_* are the defaults of the options below, and its namespaces (more namespaces "
        "clusters may run in; then all namespaces are watched) is read too (env "
        "GATEWAY_CONFIG).",
    )
    @click.option("--server", default=None, help="API server URL used without credentials.")
    @click.option("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster).")
    @click.option("--context", "kube_context", default=None, help="kubeconfig context.")
    @click.option("--namespace", default=None, help="Namespace of the DaskClusters [default].")
    @click.option(
        "--parallelism", default=4, show_default=True, help="Clusters reconciled at once."
    )
    @click.option(
        "--identity",
        envvar="POD_NAME",
        default="",
        help="Name in the Lease (env POD_NAME; default: host-pid).",
    )
    @click.option("--lease-name", default="dask-gateway-controller", show_default=True)
    @click.option(
        "--lease-namespace",
        envvar="POD_NAMESPACE",
        default="",
        help="Namespace of the Lease (env POD_NAMESPACE; default: --namespace).",
    )
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
    @click.option("--api-qps", default=None, type=float, help="API requests a second [50].")
    @click.option(
        "--queue-backoff-base",
        default=0.05,
        show_default=True,
        type=float,
        help="Seconds before a cluster whose reconcile failed is tried again (doubled at each "
        "failure in a row).",
    )
    @click.option(
        "--queue-backoff-max",
        default=30.0,
        show_default=True,
        type=float,
        help="Longest wait between tries of a failing reconcile.",
    )
    @click.option(
        "--api-backoff-base",
        default=0.2,
        show_default=True,
        type=float,
        help="Seconds before a failed list or watch is tried again (doubled at each failure).",
    )
    @click.option(
        "--api-backoff-max",
        default=10.0,
        show_default=True,
        type=float,
        help="Longest wait between tries of a failing list or watch.",
    )
    @click.option(
        "--health-address",
        envvar="GATEWAY_K8S_HEALTH_ADDRESS",
        default="",
        help="host:port of /healthz and /readyz (':8081': every address; env "
        "GATEWAY_K8S_HEALTH_ADDRESS); readiness names what the API server refuses. "
        "Default: none.",
    )
    @click.option("--log-level", default="INFO", show_default=True)
    def controller(**options: Any) -> None:
        """Reconcile DaskCluster resources into scheduler and worker pods."""
        import asyncio
        import logging
        import tomllib

        from gateway_core.config import ConfigError

        from .config import KubeControllerConfig
        from .runner import run_controller

        logging.basicConfig(
            level=options.pop("log_level").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        base: dict[str, Any] = {}
        if options["config_file"]:
            try:
                with open(options["config_file"], "rb") as f:
                    base = tomllib.load(f).get("backend", {}).get("kubernetes", {})
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise click.UsageError(f"--config {options['config_file']}: {exc}") from None
        shared = (
            "server",
            "kubeconfig",
            "context",
            "namespace",
            "namespaces",
            "api_qps",
            "api_burst",
            "api_threads",
        )
        settings: dict[str, Any] = {k: base[k] for k in shared if k in base}
        for option, key in (
            ("server", "server"),
            ("kubeconfig", "kubeconfig"),
            ("kube_context", "context"),
            ("namespace", "namespace"),
            ("api_qps", "api_qps"),
        ):
            if options[option] is not None:
                settings[key] = options[option]
        try:
            config = KubeControllerConfig(
                **settings,
                parallelism=options["parallelism"],
                identity=options["identity"],
                lease_name=options["lease_name"],
                lease_namespace=options["lease_namespace"],
                lease_duration=options["lease_duration"],
                renew_period=options["renew_period"],
                leader_election=not options["no_leader_election"],
                address_mode=options["address_mode"],
                health_address=options["health_address"],
                queue_backoff_base=options["queue_backoff_base"],
                queue_backoff_max=options["queue_backoff_max"],
                api_backoff_base=options["api_backoff_base"],
                api_backoff_max=options["api_backoff_max"],
            )
        except ConfigError as exc:
            raise click.UsageError("; ".join(exc.problems)) from None
        except TypeError as exc:
            raise click.UsageError(f"[backend.kubernetes]: {exc}") from None
        asyncio.run(run_controller(config))

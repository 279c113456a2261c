"""An example site's cluster options: worker size, environment variables, conda or pixi.
Owns the form users fill in and how their answers become a Slurm cluster's config.

Listed in ``gateway.toml`` as ``plugins = ["site_policy"]``; the gateway imports it from the
config file's folder. What users type::

    cluster = gateway.new_cluster(
        worker_cores=2, worker_memory=4, env={"MY_VAR": "1"}, conda_env="analysis"
    )

Site knobs an admin edits are the module constants below (`CONDA_PROFILE`, `PIXI_COMMAND`).
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Mapping
from typing import Any

from gateway_core import hookimpl
from gateway_core.config import ClusterConfig
from gateway_core.models import User
from gateway_core.options import Float, Integer, Options, OptionsError, String
from gateway_core.options import Mapping as MappingField

log = logging.getLogger("gateway.site_policy")

GIB = 2**30
"""Bytes in the "GB" users type (``worker_memory=4`` is 4 GiB, as Slurm's ``--mem=4G``)."""

CONDA_PROFILE = "${CONDA_ROOT:-/opt/conda}/etc/profile.d/conda.sh"
"""conda's shell profile script, sourced (when present) before ``conda activate``. A ``sh``
word: ``$CONDA_ROOT`` is one of the variables jobs inherit from the gateway by default."""

PIXI_COMMAND = "pixi"
"""The pixi program on the compute nodes (a name on ``PATH`` or an absolute path)."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""What ``sh`` can export: variables with other names are dropped from ``env``."""

_PATH_LIKE = re.compile(r"[A-Za-z0-9_./+@:,=-]+")
"""Characters allowed in conda environment names/paths and pixi project paths: no spaces, no
shell metacharacters (quotes, ``$``, backticks, ``;``, ``|``, ``&``, globs, ``~``)."""

_ENV_LABEL = re.compile(r"[A-Za-z0-9_-]+")
"""What a pixi environment name may be (pixi itself allows lowercase letters, digits, ``-``)."""

_GATEWAY_PREFIXES = ("DASK_GATEWAY_", "DASK_DISTRIBUTED__COMM__TLS__")
"""Variables the gateway sets in every job itself; a user's value would be overridden anyway,
so they are dropped from ``env`` rather than passed on."""


def _form(options: Mapping[str, Any], user: User) -> dict[str, Any]:
    """The form's handler: no field maps straight onto a ``[cluster]`` key (``worker_memory``
    is in GB, ``env`` merges, the environments become setup scripts), so the overrides all come
    from `gateway_apply_options`."""
    return {}


def site_options() -> Options:
    """The form every user of this site sees on ``GET /api/v1/options``."""
    return Options(
        fields=[
            Integer(field="worker_cores", label="Cores per worker", default=1, min=1, max=8),
            Float(
                field="worker_memory",
                label="Memory per worker (GB)",
                default=4.0,
                min=1.0,
                max=32.0,
            ),
            MappingField(field="env", label="Environment variables (scheduler and workers)"),
            String(field="conda_env", label="Conda environment (name or path)"),
            String(field="pixi_project", label="Pixi project (directory with pixi.toml)"),
            String(field="pixi_env", label="Pixi environment (empty: default)"),
        ],
        handler=_form,
    )


@hookimpl
def gateway_cluster_options(user: User, config: Any) -> Options:
    return site_options()


# --------------------------------------------------------------------------------------------
# Options → cluster config
# --------------------------------------------------------------------------------------------


def check_environment_choice(options: Mapping[str, Any]) -> list[str]:
    """Problems with ``conda_env``/``pixi_project``/``pixi_env``, one line each (empty: fine)."""
    conda = options.get("conda_env", "")
    project = options.get("pixi_project", "")
    pixi_env = options.get("pixi_env", "")
    problems: list[str] = []
    if conda and project:
        problems.append(
            "conda_env and pixi_project are mutually exclusive: give one environment, "
            f"either conda_env ({conda!r}) or pixi_project ({project!r}), not both"
        )
    if pixi_env and not project:
        problems.append("pixi_env needs pixi_project: name the pixi project the environment is in")
    for name, value in (("conda_env", conda), ("pixi_project", project)):
        if value and (not _PATH_LIKE.fullmatch(value) or value.startswith("-")):
            problems.append(
                f"{name}: {value!r} is not allowed: use letters, digits and . _ - + / @ : , = "
                "only (no spaces, quotes, ~, $ or other shell characters), not starting with -"
            )
    if pixi_env and not _ENV_LABEL.fullmatch(pixi_env):
        problems.append(f"pixi_env: {pixi_env!r} is not allowed: use letters, digits, - and _ only")
    return problems


def user_environment(env: Mapping[str, Any]) -> dict[str, str]:
    """The ``env`` variables jobs get: values must be strings; names ``sh`` cannot export
    (``BASH_FUNC_module%%`` from ``dict(os.environ)``) and the gateway's own are dropped."""
    bad = sorted(k for k, v in env.items() if not isinstance(v, str))
    if bad:
        raise OptionsError(
            [f"env: values must be strings; {', '.join(repr(k) for k in bad)} are not"]
        )
    kept = {
        k: v
        for k, v in env.items()
        if _ENV_NAME.fullmatch(k) and not k.startswith(_GATEWAY_PREFIXES)
    }
    dropped = sorted(set(env) - set(kept))
    if dropped:
        log.info("env: dropped variables jobs cannot or may not set: %s", ", ".join(dropped))
    return kept


def activation_script(options: Mapping[str, Any]) -> str:
    """The ``sh`` lines activating the chosen environment (empty when none is chosen).

    Every user-given word is quoted with `shlex.quote`, on top of the checks in
    `check_environment_choice`. A failed activation ends the job with a message in its output,
    instead of starting Dask from the wrong environment.
    """
    conda = options.get("conda_env", "")
    project = options.get("pixi_project", "")
    if conda:
        env = shlex.quote(conda)
        return "\n".join(
            [
                f'_site_conda_sh="{CONDA_PROFILE}"',
                'if [ -f "$_site_conda_sh" ]; then . "$_site_conda_sh"; fi',
                f"conda activate {env} || "
                f'{{ echo "site_policy: cannot activate conda environment "{env} >&2; exit 1; }}',
            ]
        )
    if project:
        manifest = shlex.quote(project)
        hook = f"{PIXI_COMMAND} shell-hook --shell bash --manifest-path {manifest}"
        pixi_env = options.get("pixi_env", "")
        if pixi_env:
            hook += f" -e {shlex.quote(pixi_env)}"
        return "\n".join(
            [
                f'_site_pixi_hook="$({hook})" || '
                f'{{ echo "site_policy: pixi shell-hook failed for "{manifest} >&2; exit 1; }}',
                'eval "$_site_pixi_hook"',
            ]
        )
    return ""


def _with_setup(existing: str, activation: str) -> str:
    """The site's own ``[cluster]`` setup script first (module loads), then the activation."""
    if not existing.strip():
        return activation + "\n"
    return existing.rstrip("\n") + "\n" + activation + "\n"


@hookimpl
def gateway_apply_options(
    user: User, options: Mapping[str, Any], config: ClusterConfig
) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    problems = check_environment_choice(options)
    if problems:
        raise OptionsError(problems)
    if "worker_cores" in options:
        overrides["worker_cores"] = options["worker_cores"]
    if "worker_memory" in options:
        overrides["worker_memory"] = int(options["worker_memory"] * GIB)
    if options.get("env"):
        overrides["environment"] = {**config.environment, **user_environment(options["env"])}
    activation = activation_script(options)
    if activation:
        scheduler_setup = getattr(config, "scheduler_setup", None)
        worker_setup = getattr(config, "worker_setup", None)
        if scheduler_setup is None or worker_setup is None:
            raise OptionsError(
                [
                    "conda_env/pixi_project: this gateway's backend runs no setup scripts, "
                    "so it cannot activate an environment"
                ]
            )
        overrides["scheduler_setup"] = _with_setup(scheduler_setup, activation)
        overrides["worker_setup"] = _with_setup(worker_setup, activation)
    return overrides

"""The client's Dask configuration: the shipped defaults and template expansion.

Owns loading `gateway.yaml` into dask's defaults (once, on import) and `format_template`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask
import dask.config
import yaml

DEFAULTS_FILE = Path(__file__).with_name("gateway.yaml")


def _register_defaults() -> None:
    with DEFAULTS_FILE.open() as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)


def format_template(value: Any) -> Any:
    """Fill ``{NAME}`` fields of a string from the environment; other values pass through.

    A field naming an unset variable is an error that names it, so a typo in a config file is
    not sent to the server as a literal ``{...}``.
    """
    if not isinstance(value, str):
        return value
    try:
        return value.format(**os.environ)
    except KeyError as exc:
        raise ValueError(
            f"config value {value!r} names environment variable {exc.args[0]!r}, which is not set"
        ) from None


def config_value(key: str) -> Any:
    """The dask config value at ``key`` (e.g. ``gateway.address``) with templates filled."""
    return format_template(dask.config.get(key, None))


_register_defaults()

"""Tests of the plugin as installed: its entry point registers the ``yarn`` backend, ``gateway
plugins`` lists ``backend:yarn``, and ``gateway config check`` checks its section.

These need the distribution installed (``pip install -e plugins/gateway-yarn``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gateway_core.cli import make_cli
from gateway_core.plugins import ENV_DISABLE_PLUGINS, Registry, make_plugin_manager
from gateway_yarn import __version__
from gateway_yarn.backend import YarnClusterConfig, YarnConfig, YarnDriver

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in (ENV_DISABLE_PLUGINS, "GATEWAY_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    yield


def gateway(*args: str) -> Result:
    return CliRunner().invoke(make_cli(), list(args))


def test_the_entry_point_registers_the_backend() -> None:
    spec = Registry.from_plugin_manager(make_plugin_manager()).backend("yarn")
    assert spec.plugin == "yarn"
    assert (spec.driver, spec.config, spec.cluster_config) == (
        YarnDriver,
        YarnConfig,
        YarnClusterConfig,
    )


def test_gateway_plugins_lists_backend_yarn() -> None:
    result = gateway("plugins", "--json")
    assert result.exit_code == 0, result.output
    [record] = [r for r in json.loads(result.stdout) if r["name"] == "yarn"]
    assert record["status"] == "ok"
    assert record["distribution"] == "gateway-yarn"
    assert record["version"] == __version__
    assert "backend:yarn" in record["kinds"]
    table = gateway("plugins")
    assert "backend:yarn" in table.output


def test_config_check_names_a_bad_yarn_setting(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[gateway]\nbackend = "yarn"\n[backend.yarn]\nkeytab = "/etc/gw.keytab"\n'
        '[cluster]\nqueue = ""\n'
    )
    result = gateway("config", "check", "--config", str(config))
    assert result.exit_code != 0
    assert "backend.yarn.principal, keytab: give both" in result.output
    assert "cluster.queue: must not be empty" in result.output

"""Tests of the plugin as installed: found through its entry point, shown by ``gateway plugins``,
its config section checked by ``gateway config check``, its own command added to the CLI.

These need the distribution installed (``pip install -e examples/gateway-plugin-example``).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gateway_core.cli import make_cli
from gateway_core.plugins import ENV_DISABLE_PLUGINS, Registry, make_plugin_manager
from gateway_plugin_example import __version__
from gateway_plugin_example.backend import CommandTemplateConfig, CommandTemplateDriver

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
    pm = make_plugin_manager()
    assert pm.has_plugin("plugin-example")
    spec = Registry.from_plugin_manager(pm).backend("command-template")
    assert spec.plugin == "plugin-example"
    assert spec.driver is CommandTemplateDriver
    assert spec.config is CommandTemplateConfig


def test_gateway_plugins_json_lists_it() -> None:
    result = gateway("plugins", "--json")
    assert result.exit_code == 0, result.output
    [record] = [r for r in json.loads(result.stdout) if r["name"] == "plugin-example"]
    assert record == {
        "name": "plugin-example",
        "kinds": ["backend:command-template"],
        "hooks": ["gateway_register_backends", "gateway_register_commands"],
        "distribution": "gateway-plugin-example",
        "version": __version__,
        "source": "entry point",
        "status": "ok",
        "error": "",
    }


def test_gateway_plugins_table_lists_it() -> None:
    result = gateway("plugins")
    assert result.exit_code == 0, result.output
    [row] = [line.split() for line in result.stdout.splitlines() if "plugin-example" in line]
    assert row == [
        "plugin-example",
        "ok",
        "gateway-plugin-example",
        __version__,
        "backend:command-template",
    ]


def test_it_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DISABLE_PLUGINS, "plugin-example")
    result = gateway("plugins", "--json")
    [record] = [r for r in json.loads(result.stdout) if r["name"] == "plugin-example"]
    assert record["status"] == "blocked"
    assert "command-template" not in gateway("--help").stdout


CONFIG = """
[gateway]
backend = "command-template"

[backend.command-template]
scheduler_template = ["nice", "-n", "5", "{cmd}"]
worker_template = "nice -n 10 {cmd} --name {worker_name} --nthreads {threads}"
stop_signal = "SIGINT"

[cluster]
worker_cores = 2
"""


def test_config_check_accepts_its_section(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text(CONFIG)
    result = gateway("config", "check")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("config OK")


def test_config_check_reports_each_bad_key_of_its_section(tmp_path: Path) -> None:
    broken = CONFIG.replace('"SIGINT"', '"SIGSTOPP"').replace("{threads}", "{thread}")
    (tmp_path / "gateway.toml").write_text(broken + "clusters_directory = 7\n")
    result = gateway("config", "check")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert "cluster.clusters_directory: unknown key" in lines
    # [cluster] is checked separately from the backend section, which has two problems:
    (tmp_path / "gateway.toml").write_text(broken)
    lines = gateway("config", "check").stdout.splitlines()
    assert lines[0].startswith("backend.command-template.stop_signal: unknown signal 'SIGSTOPP'")
    assert lines[1].startswith(
        "backend.command-template.worker_template[7]: unknown placeholder {thread}"
    )
    assert len(lines) == 2


def test_config_show_includes_its_defaults(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text(CONFIG)
    result = gateway("config", "show")
    assert result.exit_code == 0, result.output
    section = tomllib.loads(result.stdout)["backend"]["command-template"]
    assert section["scheduler_template"] == ["nice", "-n", "5", "{cmd}"]
    assert section["stop_signal"] == "SIGINT"
    assert section["stop_timeout"] == 5.0
    assert section["cluster_heartbeat_period"] == 15


def test_its_command_prints_the_command_lines(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text(CONFIG)
    result = gateway("command-template")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "scheduler: nice -n 5 dask scheduler",
        "worker:    nice -n 10 dask worker --name '<worker>' --nthreads 2",
    ]


def test_its_command_reports_config_problems(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text(CONFIG.replace('"SIGINT"', "15"))
    result = gateway("command-template")
    assert result.exit_code == 1
    assert result.stderr == "error: backend.command-template.stop_signal: expected str, got int\n"

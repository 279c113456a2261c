"""Tests of the ``gateway`` command line through click's CliRunner.

Plugins come from fake installed distributions (see fakedists.py) and plugin objects handed to
`make_cli`'s plugin-manager factory.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from fakedists import BACKEND_PLUGIN, FakeDists

from gateway_core import __version__, hookimpl
from gateway_core.cli import main, make_cli, render_toml
from gateway_core.config import ENV_ENCRYPT_KEYS, ENV_PROXY_TOKEN
from gateway_core.plugins import ENV_DISABLE_PLUGINS, make_plugin_manager


@pytest.fixture
def dists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDists]:
    root = tmp_path / "site-packages"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    for name in (ENV_DISABLE_PLUGINS, ENV_PROXY_TOKEN, ENV_ENCRYPT_KEYS, "GATEWAY_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./gateway.toml unless a test writes one
    fake = FakeDists(root=root)
    fake.add(
        "gateway-queue",
        version="1.2.3",
        entry_points={"queue": "gw_cli_queue"},
        modules={"gw_cli_queue": BACKEND_PLUGIN.format(name="queue")},
    )
    yield fake
    fake.forget()


def run(*args: str, plugins: list[object] | None = None) -> Result:
    factory = functools.partial(make_plugin_manager, extra_plugins=plugins or [])
    return CliRunner().invoke(make_cli(plugin_manager_factory=factory), list(args))


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return str(path)


GOOD_CONFIG = """
[gateway]
backend = "queue"
authenticator = "simple"

[backend.queue]
partition = "gpu"
cluster_start_timeout = 30

[auth.simple]
password = "hunter2"

[proxy]
api_token = "proxy-secret-token"

[cluster]
worker_cores = 2
worker_memory = "4 GiB"
environment = { OMP_NUM_THREADS = "1" }

[options.worker_cores]
type = "int"
default = 1
min = 1
max = 4
"""


@pytest.mark.unit
def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"gateway, version {__version__}\n"


@pytest.mark.unit
def test_plugins_table_shows_each_plugin_and_failures(dists: FakeDists) -> None:
    dists.add(
        "gateway-brokenq",
        version="0.4",
        entry_points={"brokenq": "gw_cli_broken"},
        modules={"gw_cli_broken": "import gw_cli_missing_dependency\n"},
    )
    result = run("plugins")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "DISTRIBUTION", "VERSION", "PROVIDES"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.split()}
    assert rows["queue"] == ["queue", "ok", "gateway-queue", "1.2.3", "backend:queue"]
    assert rows["core"][:4] == ["core", "ok", "gateway-core", __version__]
    assert rows["brokenq"][:4] == ["brokenq", "failed", "gateway-brokenq", "0.4"]
    assert (
        "brokenq: ModuleNotFoundError: No module named 'gw_cli_missing_dependency'" in result.stdout
    )


@pytest.mark.unit
def test_plugins_json(dists: FakeDists, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DISABLE_PLUGINS, "queue")
    result = run("plugins", "--json")
    assert result.exit_code == 0, result.output
    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert records["queue"]["status"] == "blocked"
    assert records["queue"]["distribution"] == "gateway-queue"
    assert records["core"]["status"] == "ok"
    assert records["core"]["source"] == "built-in"
    assert "authenticator:simple" in records["core"]["kinds"]


@pytest.mark.unit
def test_plugins_lists_local_modules_of_the_config(dists: FakeDists, tmp_path: Path) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "gw_cli_site.py").write_text(
        "from gateway_core import hookimpl\n\n"
        "@hookimpl\ndef gateway_cluster_event(event):\n    pass\n"
    )
    dists.modules.append("gw_cli_site")
    (conf_dir / "gateway.toml").write_text('plugins = ["gw_cli_site"]\n')
    result = run("plugins", "--json", "--config", str(conf_dir / "gateway.toml"))
    assert result.exit_code == 0, result.output
    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert records["gw_cli_site"]["source"] == "local"
    assert records["gw_cli_site"]["hooks"] == ["gateway_cluster_event"]


@pytest.mark.unit
def test_config_check_ok(dists: FakeDists, tmp_path: Path) -> None:
    result = run("config", "check", "--config", write_config(tmp_path, GOOD_CONFIG))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("config OK")


@pytest.mark.unit
def test_config_check_finds_gateway_toml_in_the_working_directory(
    dists: FakeDists, tmp_path: Path
) -> None:
    write_config(tmp_path, GOOD_CONFIG.replace('partition = "gpu"', "partition = 5"))
    result = run("config", "check")
    assert result.exit_code == 1
    assert result.stdout == "backend.queue.partition: expected str, got int\n"


@pytest.mark.unit
def test_config_check_prints_one_line_per_bad_key(dists: FakeDists, tmp_path: Path) -> None:
    broken = """
[gateway]
backend = "queue"
admin_users = "alice"

[backend.queue]
partition = 3
queue_depth = 10

[auth.simple]
cache_max_age = "long"

[proxy]
prefix = 1

[cluster]
worker_cores = "2"
worker_memory = "lots"

[options.worker_threads]
type = "int"
default = 100
max = 4
"""
    # Every problem at once: the core sections' and, with their bad keys left out, the plugins'.
    result = run("config", "check", "--config", write_config(tmp_path, broken))
    assert result.exit_code == 1
    problems = result.stdout.splitlines()
    assert problems[0] == "gateway.admin_users: expected array, got str"
    assert "backend.queue.partition: expected str, got int" in problems
    assert "backend.queue.queue_depth: unknown key" in problems
    assert "auth.simple.cache_max_age: expected int, got str" in problems
    assert "proxy.prefix: expected str, got int" in problems
    assert "cluster.worker_cores: expected int, got str" in problems
    assert any(p.startswith("cluster.worker_memory:") for p in problems)
    assert any(p.startswith("options.worker_threads.default:") for p in problems)
    assert "config OK" not in result.stdout


@pytest.mark.unit
def test_config_check_names_an_unknown_backend_and_the_available_ones(
    dists: FakeDists, tmp_path: Path
) -> None:
    path = write_config(tmp_path, '[gateway]\nbackend = "slurmm"\n')
    result = run("config", "check", "--config", path)
    assert result.exit_code == 1
    [line] = result.stdout.splitlines()
    assert line.startswith("gateway.backend: no backend named 'slurmm' is installed (available: ")
    assert "queue" in line.split("available: ", 1)[1]


@pytest.mark.unit
def test_config_check_refuses_sections_no_plugin_owns(dists: FakeDists, tmp_path: Path) -> None:
    path = write_config(tmp_path, '[gateway]\nbackend = "queue"\n[backend.queu]\nx = 1\n')
    result = run("config", "check", "--config", path)
    assert result.exit_code == 1
    [line] = result.stdout.splitlines()
    assert line.startswith("backend.queu: no plugin provides backend 'queu' (installed: ")
    assert "queue" in line.split("installed: ", 1)[1]


@pytest.mark.unit
def test_config_check_refuses_option_targets_that_are_not_cluster_settings(
    dists: FakeDists, tmp_path: Path
) -> None:
    text = (
        '[gateway]\nbackend = "queue"\n'
        '[options.gpus]\ntype = "int"\n'
        '[options.env]\ntype = "string"\ntarget = "conda_env"\n'
    )
    result = run("config", "check", "--config", write_config(tmp_path, text))
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "options.gpus: 'gpus' is not a [cluster] setting of ClusterConfig; set `target` to one",
        "options.env.target: 'conda_env' is not a [cluster] setting of ClusterConfig",
    ]


@pytest.mark.unit
def test_a_broken_proxy_distribution_is_reported_for_the_default_proxy(
    dists: FakeDists, tmp_path: Path
) -> None:
    dists.add(
        "gateway-proxy",
        version="9.9",
        entry_points={"proxy": "gw_cli_broken_proxy"},
        modules={"gw_cli_broken_proxy": "raise ImportError('libssl is too old')\n"},
    )
    path = write_config(tmp_path, '[gateway]\nbackend = "queue"\n')
    result = run("config", "check", "--config", path)
    assert result.exit_code == 1
    [line] = result.stdout.splitlines()
    assert line.startswith("gateway.proxy: no proxy named 'builtin' is installed")
    assert "'proxy' (ImportError: libssl is too old)" in line


@pytest.mark.unit
def test_config_check_refuses_a_removed_key_with_advice(dists: FakeDists, tmp_path: Path) -> None:
    path = write_config(tmp_path, "[proxy]\nproxy_status_period = 30.0\nprefix = 3\n")
    result = run("config", "check", "--config", path)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "proxy.proxy_status_period: no longer a setting (it never had an effect; delete the line)",
        "proxy.prefix: expected str, got int",
    ]


@pytest.mark.unit
def test_config_check_reports_a_missing_file(dists: FakeDists, tmp_path: Path) -> None:
    result = run("config", "check", "--config", str(tmp_path / "nope.toml"))
    assert result.exit_code == 1
    assert result.stdout == f"{tmp_path / 'nope.toml'}: no such config file\n"


@pytest.mark.unit
def test_config_check_names_a_local_plugin_that_cannot_be_imported(
    dists: FakeDists, tmp_path: Path
) -> None:
    path = write_config(tmp_path, 'plugins = ["gw_cli_no_such_site_module"]\n')
    result = run("config", "check", "--config", path)
    assert result.exit_code == 1
    [line] = result.stdout.splitlines()
    assert line.startswith("plugin module 'gw_cli_no_such_site_module' listed in `plugins` cannot")
    assert "No module named 'gw_cli_no_such_site_module'" in line


@pytest.mark.unit
def test_serve_reports_a_broken_config_and_exits_1(dists: FakeDists, tmp_path: Path) -> None:
    path = write_config(tmp_path, '[gateway]\nbackend = "slurmm"\n')
    result = run("serve", "--config", path)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: gateway.backend: no backend named 'slurmm'")
    assert "Traceback" not in result.output


@pytest.mark.unit
def test_config_check_wants_a_key_for_a_persistent_database(
    dists: FakeDists, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "gw.sqlite"
    path = write_config(tmp_path, f'[gateway]\ndb_url = "sqlite:///{db}"\n')
    result = run("config", "check", "--config", path)
    assert result.exit_code == 1
    [line] = result.stdout.splitlines()
    assert line.startswith(
        f"gateway.db_encrypt_keys: required, since the database sqlite:///{db} is persistent"
    )
    assert "GATEWAY_ENCRYPT_KEYS" in line and "openssl rand -base64 32" in line
    # A key from the environment satisfies it; a key that is not one is named by position.
    monkeypatch.setenv(ENV_ENCRYPT_KEYS, base64.b64encode(os.urandom(32)).decode())
    assert run("config", "check", "--config", path).stdout.startswith("config OK")
    monkeypatch.setenv(ENV_ENCRYPT_KEYS, base64.b64encode(os.urandom(32)).decode() + ";c2hvcnQ=")
    result = run("config", "check", "--config", path)
    assert result.exit_code == 1
    assert result.stdout.startswith("gateway.db_encrypt_keys[1]: decodes to 5 bytes, expected 32")
    assert not db.exists()  # checking opened no database


@pytest.mark.unit
def test_config_show_fills_in_defaults_and_redacts_secrets(
    dists: FakeDists, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_one, key_two = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    monkeypatch.setenv(ENV_ENCRYPT_KEYS, f"{key_one};{key_two}")
    result = run("config", "show", "--config", write_config(tmp_path, GOOD_CONFIG))
    assert result.exit_code == 0, result.output
    for secret in ("hunter2", "proxy-secret-token", key_one, key_two):
        assert secret not in result.stdout
    shown = tomllib.loads(result.stdout)
    assert shown["auth"]["simple"]["password"] == "<redacted>"
    assert shown["proxy"]["api_token"] == "<redacted>"
    assert shown["gateway"]["db_encrypt_keys"] == ["<redacted>", "<redacted>"]
    # What the file set, and the defaults of the selected plugins' classes.
    assert shown["backend"]["queue"]["partition"] == "gpu"
    assert shown["backend"]["queue"]["cluster_start_timeout"] == 30.0
    assert shown["backend"]["queue"]["worker_start_failure_limit"] == 3
    assert shown["cluster"]["worker_memory"] == 4 * 2**30
    assert shown["cluster"]["scheduler_cmd"] == ["dask", "scheduler"]
    assert shown["cluster"]["environment"] == {"OMP_NUM_THREADS": "1"}
    assert shown["gateway"]["backend"] == "queue"
    assert shown["options"]["worker_cores"]["max"] == 4
    assert "# cluster_max_workers = (unset)" in result.stdout


@pytest.mark.unit
def test_config_check_and_show_the_metrics_section(dists: FakeDists, tmp_path: Path) -> None:
    path = write_config(tmp_path, '[metrics]\ntoken = "scrape-me"\npublic = true\n')
    result = run("config", "check", "--config", path)
    assert result.exit_code == 1
    assert result.stdout.startswith("metrics.public: true serves /metrics to anyone")
    path = write_config(tmp_path, '[metrics]\ntoken = "scrape-me"\n')
    assert run("config", "check", "--config", path).stdout.startswith("config OK")
    shown = run("config", "show", "--config", path)
    assert "scrape-me" not in shown.stdout
    assert tomllib.loads(shown.stdout)["metrics"] == {"token": "<redacted>", "public": False}


@pytest.mark.unit
def test_config_show_of_a_broken_config_prints_problems_to_stderr(
    dists: FakeDists, tmp_path: Path
) -> None:
    path = write_config(tmp_path, "[cluster]\nworker_cores = 0\n")
    result = run("config", "show", "--config", path)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "error: cluster.worker_cores: must be at least 1, got 0" in result.stderr


@pytest.mark.unit
def test_render_toml_round_trips_awkward_values() -> None:
    data: dict[str, Any] = {
        "plugins": ["a"],
        "gateway": {"quote": 'say "hi"\n\ttab \x7f', "inf": float("inf"), "unset": None},
        "backend": {"my backend": {"n": 1, "nested": {"k": [1, 2]}}},
        "empty": {},
    }
    parsed = tomllib.loads(render_toml(data))
    assert parsed == {
        "plugins": ["a"],
        "gateway": {"quote": 'say "hi"\n\ttab \x7f', "inf": float("inf")},
        "backend": {"my backend": {"n": 1, "nested": {"k": [1, 2]}}},
        "empty": {},
    }


class HelloCommand:
    __name__ = "hello-plugin"

    @hookimpl
    def gateway_register_commands(self, cli: click.Group) -> None:
        @cli.command("hello")
        @click.argument("who")
        def hello(who: str) -> None:
            """Say hello (added by a plugin)."""
            click.echo(f"hello {who}")


@pytest.mark.unit
def test_plugins_add_commands(dists: FakeDists) -> None:
    help_text = run("--help", plugins=[HelloCommand()]).stdout
    assert "hello" in help_text
    assert "Say hello (added by a plugin)." in help_text
    result = run("hello", "world", plugins=[HelloCommand()])
    assert result.exit_code == 0
    assert result.stdout == "hello world\n"


@pytest.mark.unit
def test_main_reports_plugin_errors_without_a_traceback(
    dists: FakeDists, capsys: pytest.CaptureFixture[str]
) -> None:
    dists.add(
        "gateway-typo",
        entry_points={"typo": "gw_cli_typo"},
        modules={
            "gw_cli_typo": "from gateway_core import hookimpl\n\n"
            "@hookimpl\ndef gateway_register_command(cli):\n    pass\n"
        },
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["plugins"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: plugin 'typo' (gateway-typo 1.0) implements unknown hook" in err
    assert "Traceback" not in err


@pytest.mark.unit
def test_main_runs_commands(dists: FakeDists, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plugins", "--json"])
    assert exit_info.value.code == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)]
    assert "queue" in names and "core" in names


# --------------------------------------------------------------------------------------------
# `gateway serve` failing to start, as a user runs it
# --------------------------------------------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_process(tmp_path: Path, config: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``gateway serve`` on ``config`` in its own process group until it exits; a gateway
    that starts serving instead is killed, with its children, and fails the test."""
    path = write_config(tmp_path, config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    command = [sys.executable, "-m", "gateway_core", "serve", "--config", path, *args]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"gateway serve did not exit:\n{err}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
LOOPBACK_PROXY = '[proxy]\naddress = "127.0.0.1:0"\n'
START_FAILURES = {
    # name: (config, the start of the one line on stderr)
    "missing key": (
        '[gateway]\ndb_url = "sqlite:///{tmp}/gw.sqlite"\n' + LOOPBACK_PROXY,
        "error: gateway.db_encrypt_keys: required, since the database sqlite:///{tmp}/gw.sqlite "
        "is persistent (cluster secrets are encrypted at rest); set",
    ),
    "database down": (
        '[gateway]\ndb_url = "postgresql+psycopg://u@127.0.0.1:{closed}/db"\n'
        f'db_encrypt_keys = ["{KEY}"]\n' + LOOPBACK_PROXY,
        "error: cannot open the database postgresql+psycopg://u@127.0.0.1:{closed}/db: "
        'connection failed: connection to server at "127.0.0.1", port {closed} failed: '
        "Connection refused",
    ),
    "API port taken": (
        '[gateway]\naddress = "127.0.0.1:{taken}"\n' + LOOPBACK_PROXY,
        "error: gateway.address: cannot listen on 127.0.0.1:{taken}: Address already in use",
    ),
    "proxy port taken": (
        '[proxy]\naddress = "127.0.0.1:{taken}"\n',
        "error: the proxy cannot start: Address already in use",
    ),
    "bad config": (
        "[gateway]\nbackend = 3\n" + LOOPBACK_PROXY,
        "error: gateway.backend: expected str, got int",
    ),
    "not TOML": ("[gateway\n", "error: {tmp}/gateway.toml: invalid TOML: Expected ']'"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", START_FAILURES)
def test_serve_names_why_it_cannot_start_in_one_line(
    case: str, tmp_path: Path, taken_port: int, closed_port: int
) -> None:
    config, expected = (
        text.format(tmp=tmp_path, taken=taken_port, closed=closed_port)
        for text in START_FAILURES[case]
    )
    result = serve_process(tmp_path, config)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(expected)


@pytest.mark.integration
@pytest.mark.parametrize("case", ["missing key", "database down", "proxy port taken"])
def test_serve_debug_shows_the_traceback(
    case: str, tmp_path: Path, taken_port: int, closed_port: int
) -> None:
    config, expected = (
        text.format(tmp=tmp_path, taken=taken_port, closed=closed_port)
        for text in START_FAILURES[case]
    )
    result = serve_process(tmp_path, config, "--debug")
    assert result.returncode == 1
    assert "Traceback (most recent call last):" in result.stderr
    # The traceback ends with the exception carrying the same message.
    assert expected.removeprefix("error: ") in result.stderr.splitlines()[-1]


@pytest.mark.unit
def test_redact_hides_plugin_keys_named_like_secrets() -> None:
    from gateway_core.cli import redact

    shown = redact(
        {
            "auth": {
                "jupyterhub": {
                    "jupyterhub_api_token": "t0ken",
                    "oauth_client_secret": "s3cret",
                    "jupyterhub_api_url": "http://hub/hub/api",
                    "service_token_file": "/etc/token",
                }
            }
        }
    )
    section = shown["auth"]["jupyterhub"]
    assert section["jupyterhub_api_token"] == "<redacted>"
    assert section["oauth_client_secret"] == "<redacted>"
    assert section["jupyterhub_api_url"] == "http://hub/hub/api"
    assert section["service_token_file"] == "/etc/token"


# --------------------------------------------------------------------------------------------
# gateway db current / upgrade


@pytest.mark.unit
def test_db_upgrade_brings_a_database_from_before_migrations_to_the_newest(
    dists: FakeDists, tmp_path: Path
) -> None:
    import sqlalchemy as sa
    from test_migrations import make_legacy_database

    from gateway_core.migrations import BASELINE, head_revision

    db = tmp_path / "gw.sqlite"
    engine = sa.create_engine(f"sqlite:///{db}")
    make_legacy_database(engine, KEY)
    engine.dispose()
    path = write_config(tmp_path, f'[gateway]\ndb_url = "sqlite:///{db}"\n')

    current = run("db", "current", "--config", path)
    assert current.exit_code == 0, current.output
    assert current.stdout.startswith(f"sqlite:///{db}: at revision {BASELINE} (Baseline")
    assert "made before migrations and not stamped yet" in current.stdout
    assert "run `gateway db upgrade`" in current.stdout
    assert run("db", "current", "--check", "--config", path).exit_code == 1

    upgraded = run("db", "upgrade", "--config", path)
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.stdout == (
        f"sqlite:///{db}: upgraded from revision {BASELINE} to revision {head_revision()}\n"
    )
    checked = run("db", "current", "--check", "--config", path)
    assert checked.exit_code == 0 and "the newest: up to date" in checked.stdout
    again = run("db", "upgrade", "--db-url", f"sqlite:///{db}")
    assert again.stdout == f"sqlite:///{db}: already at revision {head_revision()}, the newest\n"


@pytest.mark.system
def test_db_upgrade_creates_an_empty_postgres_database(dists: FakeDists, postgres_url: str) -> None:
    import sqlalchemy as sa

    from gateway_core.migrations import head_revision

    shown = sa.make_url(postgres_url).render_as_string(hide_password=True)
    current = run("db", "current", "--check", "--db-url", postgres_url)
    assert current.exit_code == 1
    assert current.stdout.startswith(f"{shown}: empty (no gateway tables)")
    upgraded = run("db", "upgrade", "--db-url", postgres_url)
    assert upgraded.stdout == f"{shown}: upgraded from empty to revision {head_revision()}\n"
    assert ":gateway@" not in upgraded.stdout  # the password is never printed
    assert run("db", "current", "--check", "--db-url", postgres_url).exit_code == 0


@pytest.mark.unit
def test_db_commands_say_why_they_cannot_work_in_one_line(
    dists: FakeDists, tmp_path: Path, closed_port: int
) -> None:
    in_memory = run("db", "upgrade", "--config", write_config(tmp_path, "[gateway]\n"))
    assert in_memory.exit_code == 1
    assert in_memory.stderr.startswith(
        "error: db_url sqlite:///:memory: keeps the database in memory"
    )
    down = run("db", "current", "--db-url", f"postgresql+psycopg://u:pw@127.0.0.1:{closed_port}/db")
    assert down.exit_code == 1
    [line] = down.stderr.splitlines()
    assert line.startswith(
        f"error: cannot open the database postgresql+psycopg://u:***@127.0.0.1:{closed_port}/db: "
    )
    assert "Connection refused" in line

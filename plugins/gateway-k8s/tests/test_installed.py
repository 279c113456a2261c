"""The installed plugin through the `gateway` command line: listed by `gateway plugins`, and the
`gateway k8s controller` command with its option checks.

Unit tests: the CLI in a subprocess, no cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
GATEWAY = os.path.join(os.path.dirname(sys.executable), "gateway")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GATEWAY, *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )


def test_gateway_plugins_lists_the_kubernetes_backend() -> None:
    result = run("plugins", "--json")
    assert result.returncode == 0, result.stderr
    [k8s] = [p for p in json.loads(result.stdout) if p["name"] == "k8s"]
    assert k8s["status"] == "ok"
    assert k8s["distribution"] == "gateway-k8s"
    assert k8s["kinds"] == ["backend:kubernetes"]
    assert "gateway_register_commands" in k8s["hooks"]


def test_the_controller_command_refuses_bad_settings_by_name(tmp_path: Path) -> None:
    """Its defaults come from the gateway's TOML (GATEWAY_CONFIG, as the chart sets it)."""
    toml = tmp_path / "gateway.toml"
    toml.write_text('[backend.kubernetes]\nnamespace = "Bad_NS"\n')
    result = run(
        "k8s",
        "controller",
        "--lease-duration",
        "4",
        "--renew-period",
        "3",
        env={**os.environ, "GATEWAY_CONFIG": str(toml)},
    )
    assert result.returncode == 2
    assert "namespace: 'Bad_NS' is not a namespace name" in result.stderr
    assert "renew_period: must be at most half of lease_duration" in result.stderr


def test_the_controller_command_refuses_bad_backoff_by_name() -> None:
    result = run(
        "k8s",
        "controller",
        "--queue-backoff-base",
        "1",
        "--queue-backoff-max",
        "0.5",
        "--api-backoff-base",
        "-1",
    )
    assert result.returncode == 2, result.stderr
    assert "queue_backoff_max: must be at least queue_backoff_base (1 s), got 0.5" in result.stderr
    assert "api_backoff_base: must be more than 0 seconds, got -1" in result.stderr
    result = run("k8s", "controller", "--api-backoff-max", "soon")
    assert result.returncode == 2
    assert "--api-backoff-max" in result.stderr and "soon" in result.stderr


def test_config_classes_name_every_bad_setting() -> None:
    from gateway_core.config import ConfigError
    from gateway_k8s.config import KubeClusterConfig, KubeControllerConfig

    with pytest.raises(ConfigError) as info:
        KubeControllerConfig(namespace="Not_A_Namespace", parallelism=0, health_address="8081")
    assert info.value.problems == [
        "namespace: 'Not_A_Namespace' is not a namespace name (lower-case letters, digits, '-')",
        "parallelism: must be at least 1",
        "health_address: '8081' is not host:port (':8081' for every address)",
    ]
    from gateway_k8s.config import KubeBackendConfig

    with pytest.raises(ConfigError) as info:
        KubeBackendConfig(controller_timeout=0)
    assert info.value.problems == ["controller_timeout: must be more than 0 seconds, got 0"]
    with pytest.raises(ConfigError) as info:
        KubeClusterConfig(
            image_pull_policy="Sometimes",
            image_pull_secrets=[{"secret": "x"}],
            tolerations=[{"key": "k", "operator": "Maybe"}],
        )
    assert info.value.problems == [
        "image_pull_policy: 'Sometimes' is not one of Always, IfNotPresent, Never",
        'image_pull_secrets[0]: must be {"name": "<secret>"}',
        "tolerations[0].operator: must be Equal or Exists",
    ]

"""Tests of the DaskCluster CRD: the committed YAML is the rendering of gateway_k8s.crd, and the
schema is the one the fake API server enforces (names, subresources, printer columns).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway_k8s import crd

pytestmark = pytest.mark.unit
CHART_CRD = Path(__file__).resolve().parents[1] / "chart" / "crds" / "daskcluster.yaml"


def test_committed_yaml_is_the_generated_one() -> None:
    generated = crd.render()
    assert CHART_CRD.read_text() == generated, (
        f"{CHART_CRD} is stale: regenerate it with "
        "`python -m gateway_k8s.crd > plugins/gateway-k8s/chart/crds/daskcluster.yaml`"
    )
    assert yaml.safe_load(generated) == crd.crd()


@pytest.mark.integration
def test_the_command_prints_the_rendering() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "gateway_k8s.crd"], capture_output=True, text=True, check=True
    ).stdout
    assert printed == crd.render()


def test_names_subresources_and_columns() -> None:
    spec = crd.crd()["spec"]
    assert spec["group"] == "daskgateway.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["dgc"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.worker.replicas"
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["User", "Phase", "Workers", "Age"]
    schema = version["schema"]["openAPIV3Schema"]
    # A real schema, not the original's preserve-unknown-fields everywhere.
    assert "x-kubernetes-preserve-unknown-fields" not in schema
    assert schema["properties"]["spec"]["required"] == ["user"]
    groups = schema["properties"]["spec"]["properties"]["workerGroups"]
    assert groups["additionalProperties"]["properties"]["replicas"]["minimum"] == 0

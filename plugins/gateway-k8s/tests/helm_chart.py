"""Rendering the Helm chart in chart/ for the tests: finding helm, `helm template`, picking
objects out of the rendering, and the chart's Roles as rules for the fake API server.

helm comes from plugins/gateway-k8s/ci/install-helm.sh; without it, fail under CI, else skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

PLUGIN = Path(__file__).resolve().parents[1]
CHART = PLUGIN / "chart"
INSTALL_SCRIPT = "plugins/gateway-k8s/ci/install-helm.sh"
NS = "dask"
RELEASE = "rel"
FULLNAME = "rel-gateway-k8s"

Obj = dict[str, Any]

# The chart's Roles, by the component suffix of their names.
ROLE_SUFFIXES = ("gateway", "controller", "controller-leader-election")


def find_helm() -> str:
    """The helm binary ($HELM, else helm on PATH); without one, fail under CI, else skip."""
    helm = os.environ.get("HELM") or shutil.which("helm")
    if helm and Path(helm).is_file():
        return helm
    message = (
        f"helm is not installed: run `{INSTALL_SCRIPT}` (puts helm 3 in /usr/local/bin, "
        "or in the directory given) or set $HELM"
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def helm_run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


def render(helm: str, *args: str) -> list[Obj]:
    """`helm template` of the chart (CRDs included, release namespace NS) as objects."""
    done = helm_run(
        helm, "template", RELEASE, str(CHART), "--namespace", NS, "--include-crds", *args
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(objects: list[Obj], kind: str, name: str, namespace: str | None = None) -> Obj:
    found = [
        o
        for o in objects
        if o["kind"] == kind
        and o["metadata"]["name"] == name
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]
    assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
    return found[0]


def roles(objects: list[Obj]) -> dict[str, Obj]:
    """The rendered Roles in NS by component: gateway, controller, controller-leader-election."""
    return {suffix: one(objects, "Role", f"{FULLNAME}-{suffix}", NS) for suffix in ROLE_SUFFIXES}

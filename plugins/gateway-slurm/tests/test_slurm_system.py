"""System tests: the scenario suite of `gateway_core.testing.scenarios` on a real Slurm, through
the gateway, its proxy and the user-facing client, for throwaway users.

Needs root (accounts are created, the gateway switches to them) and Slurm (started by
ci/start-slurm.sh when ``sinfo`` does not answer). The backend's setup is the
``gateway_backend_setup`` fixture in conftest.py; every scenario applies to Slurm.
"""

from __future__ import annotations

import pytest

from gateway_core.testing.scenarios import BackendScenarios

pytestmark = pytest.mark.system


class TestSlurmScenarios(BackendScenarios):
    """Every scenario, on Slurm."""

"""Integration tests: the scenario suite of `gateway_core.testing.scenarios` as PBS jobs of
throwaway users on the PBS simulator (tests/pbs_sim), through the gateway, its proxy and the
user-facing client.

Needs root (accounts are created, the gateway switches to them). The backend's setup is the
``gateway_backend_setup`` fixture in conftest.py; every scenario applies to PBS.
"""

from __future__ import annotations

import pytest

from gateway_core.testing.scenarios import BackendScenarios

pytestmark = pytest.mark.integration


class TestPBSScenarios(BackendScenarios):
    """Every scenario, on the PBS simulator."""

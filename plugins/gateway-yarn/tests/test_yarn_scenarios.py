"""Integration tests: the scenario suite of `gateway_core.testing.scenarios` as YARN
applications of throwaway users on the YARN simulator (tests/yarn_sim), through the gateway,
its proxy and the user-facing client.

Needs root (accounts are created, the simulator runs containers as them). The backend's
setup is the ``gateway_backend_setup`` fixture in conftest.py.
"""

from __future__ import annotations

import pytest

from gateway_core.testing.scenarios import BackendScenarios

pytestmark = pytest.mark.integration


class TestYarnScenarios(BackendScenarios):
    """Every scenario, on the YARN simulator."""

"""The backend scenario suite of `gateway_core.testing.scenarios`, for the ``command-template``
backend running real Dask processes (the setup is ``gateway_backend_setup`` in conftest.py,
with the scenarios that do not apply to this backend and why). No process may outlive a
scenario.
"""

from __future__ import annotations

import pytest

from gateway_core.testing.scenarios import BackendScenarios

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_process_left_behind")]


class TestCommandTemplateScenarios(BackendScenarios):
    """Every scenario that applies to processes on the gateway's host."""

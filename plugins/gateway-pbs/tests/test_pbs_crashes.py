"""Integration tests: a gateway killed between a PBS job's submit and the write of its job id
(the crash points ``submitted:scheduler`` and ``submitted:worker``), restarted: the job is
adopted or cancelled, found by its name with ``qselect``, never doubled nor left behind.

Real `gateway serve` processes and Dask clusters on the PBS simulator (tests/pbs_sim), as
throwaway users (needs root). The scenarios are `gateway_core.testing.crashes`'.
"""

from __future__ import annotations

import pytest

from gateway_core.testing.crashes import JobQueueCrashScenarios

pytestmark = pytest.mark.integration


class TestPBSCrashes(JobQueueCrashScenarios):
    """Every crash scenario, on the PBS simulator."""

"""System tests: a gateway killed between a Slurm job's submit and the write of its job id
(the crash points ``submitted:scheduler`` and ``submitted:worker``), restarted: the job is
adopted or cancelled, found by its name with ``squeue``, never doubled nor left behind.

Real `gateway serve` processes and Dask clusters on the real one-node Slurm (ci/start-slurm.sh),
as throwaway users (needs root). The scenarios are `gateway_core.testing.crashes`'.
"""

from __future__ import annotations

import pytest

from gateway_core.testing.crashes import JobQueueCrashScenarios

pytestmark = pytest.mark.system


class TestSlurmCrashes(JobQueueCrashScenarios):
    """Every crash scenario, on Slurm."""

"""Deliberate crashes at named points of the gateway, for the tests of its crash safety.

Owns `crash_point`: a no-op unless ``GATEWAY_TEST_CRASH_AT`` names the point, when it kills the
gateway process with SIGKILL there (no cleanup, no flush: what a real crash leaves behind).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("gateway.crashpoints")

CRASH_VARIABLE = "GATEWAY_TEST_CRASH_AT"
"""The environment variable naming the point to crash at (read at each point, so a test may set
it in the gateway's environment only)."""

POINTS = ("launched:scheduler", "launched:worker", "submitted:scheduler", "submitted:worker")
"""The points there are: ``launched:<role>`` is in the local backends, right after a scheduler
or worker process was started and before its pid was stored; ``submitted:<role>`` is in the
job-queue driver (Slurm, PBS), right after a scheduler's or worker's job was submitted and
before its job id was stored."""


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL when ``GATEWAY_TEST_CRASH_AT`` is ``name``; otherwise
    nothing (one dictionary look-up)."""
    if os.environ.get(CRASH_VARIABLE) != name:
        return
    log.warning("Crashing at %s (%s is set)", name, CRASH_VARIABLE)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)

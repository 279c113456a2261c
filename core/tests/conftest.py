"""Suite-wide fixtures of core's tests: no process may outlive the test session.

Owns the session check; per-module process checks live in the modules that start processes.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside the tests

from procs import descendants, set_subreaper


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite() -> Iterator[None]:
    """Every process the suite started, orphans included, is gone at the end."""
    set_subreaper(True)
    before = set(descendants())
    yield
    deadline = time.monotonic() + 15
    left = {p: c for p, c in descendants().items() if p not in before}
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {p: c for p, c in descendants().items() if p not in before}
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind by the test suite: {left}"

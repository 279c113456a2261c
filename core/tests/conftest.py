"""Suite-wide fixtures of core's tests: no process may outlive the test session.

Owns the session check; modules that start processes also use the per-test
``no_process_left_behind`` fixture of gateway_core.testing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside the tests

from gateway_core.testing.processes import check_no_process_left, descendants, set_subreaper


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite() -> Iterator[None]:
    """Every process the suite started, orphans included, is gone at the end."""
    set_subreaper(True)
    before = set(descendants(reap=True))
    yield
    check_no_process_left(before, grace=15)

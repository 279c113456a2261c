"""What happens when a script ends without closing its cluster: a real interpreter process
creates a cluster through the fake gateway and exits.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from fakes import FakeGateway

pytestmark = pytest.mark.integration

SCRIPT = """
import sys
from gateway_client import BasicAuth, Gateway

gateway = Gateway(sys.argv[1], proxy_address=1, auth=BasicAuth(username="alice", password="secret"))
kept = gateway.new_cluster(shutdown_on_close=False)
stopped = gateway.new_cluster()
print(kept.name, stopped.name, flush=True)
"""


def test_exiting_without_close_stops_only_shutdown_on_close_clusters(fake: FakeGateway) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), fake.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    kept, stopped = done.stdout.split()
    assert fake.clusters[kept].status == "RUNNING"
    assert fake.clusters[stopped].status == "STOPPED"
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr

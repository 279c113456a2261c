"""Fixtures of the YARN tests: the YARN simulator (tests/yarn_sim) serving skein's gRPC
services on loopback, and a real ``skein.Client`` connected to it.

There is no Hadoop here: every test that talks to "YARN" talks to the simulator, through the
real skein client over mutual TLS.
"""

from __future__ import annotations

import os

# Before grpc is imported: the simulator forks container processes from a process serving
# gRPC on threads; grpc's fork handlers in such a child can crash it (SIGSEGV).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import shutil
from collections.abc import Iterator

import pytest
import skein
from yarn_sim.server import YarnSimulator

from gateway_core.testing.jobqueue import shared_tempdir

QUEUES = ("default", "science")


@pytest.fixture
def yarn_sim() -> Iterator[YarnSimulator]:
    """A fresh simulated YARN (queues ``default`` and ``science``), stopped at teardown."""
    base = shared_tempdir("gw-yarn-sim-")
    sim = YarnSimulator(root=base, queues=QUEUES).start()
    yield sim
    sim.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def skein_client(yarn_sim: YarnSimulator) -> Iterator[skein.Client]:
    """The real skein client, connected to the simulator's driver."""
    client = skein.Client(address=yarn_sim.address, security=yarn_sim.security)
    yield client
    client.close()

"""Installs the simulator: a state directory and the ``qsub``/``qstat``/``qselect``/``qdel``/
``qrls`` scripts that use it, all readable by every user.

Owns `install` and `SimulatedPBS` (where things are, for the tests).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .commands import COMMANDS
from .server import Server

PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True, kw_only=True)
class SimulatedPBS:
    """A simulated PBS server: its scripts in ``bin``, its state in ``state``."""

    bin: Path
    state: Path
    name: str

    def program(self, command: str) -> str:
        return str(self.bin / command)


def install(
    base: Path,
    *,
    name: str = "pbs-sim",
    queues: tuple[str, ...] = ("workq",),
    python: str = "/usr/bin/python3",
    start_delay: float = 0.0,
) -> SimulatedPBS:
    """Copy the simulator to ``base/lib`` and write ``base/bin/<command>`` scripts run by
    ``python`` (one every user can run); the server's state goes in ``base/state``."""
    lib = base / "lib"
    shutil.copytree(
        PACKAGE, lib / "pbs_sim", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
    )
    state = base / "state"
    Server.create(str(state), name=name, queues=list(queues), start_delay=start_delay)
    bin_dir = base / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for command in COMMANDS:
        script = bin_dir / command
        script.write_text(
            f"#!{python}\n"
            "import sys\n"
            f"sys.path.insert(0, {str(lib)!r})\n"
            "from pbs_sim.commands import COMMANDS\n"
            f"sys.exit(COMMANDS[{command!r}]({str(state)!r}, sys.argv[1:]))\n"
        )
        script.chmod(0o755)
    for path in [base, lib, *lib.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return SimulatedPBS(bin=bin_dir, state=state, name=name)

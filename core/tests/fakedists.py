"""Installed-looking plugin distributions for tests of plugin loading.

Owns `FakeDists`: it writes plugin modules and ``*.dist-info`` folders with ``gateway`` entry
points into a folder on ``sys.path``, so `importlib.metadata` finds them as it finds real ones.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

from attrs import define, field


@define(kw_only=True)
class FakeDists:
    """Fake distributions under ``root`` (which the caller puts on ``sys.path``)."""

    root: Path
    modules: list[str] = field(factory=list)

    def add(
        self,
        dist: str,
        *,
        version: str = "1.0",
        entry_points: Mapping[str, str],
        modules: Mapping[str, str],
    ) -> None:
        """Install ``dist`` with ``gateway`` entry points (name → module) and module sources."""
        for module, source in modules.items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))
            self.modules.append(module)
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
        (info / "entry_points.txt").write_text("[gateway]\n" + lines)
        importlib.invalidate_caches()

    def write_module(self, module: str, source: str) -> None:
        """A plain module (no distribution), e.g. a site's local plugin."""
        (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        self.modules.append(module)
        importlib.invalidate_caches()

    def forget(self) -> None:
        """Drop the written modules from ``sys.modules``."""
        for module in self.modules:
            sys.modules.pop(module, None)


BACKEND_PLUGIN = """
from attrs import define

from gateway_core import hookimpl
from gateway_core.backends.base import ClusterDriver
from gateway_core.config import ProcessBackendConfig
from gateway_core.specs import BackendSpec


@define(kw_only=True, frozen=True)
class QueueConfig(ProcessBackendConfig):
    partition: str = "batch"


@hookimpl
def gateway_register_backends():
    return [BackendSpec(name={name!r}, driver=ClusterDriver, config=QueueConfig)]
"""
"""Source of a plugin registering one backend; format with ``name=``."""

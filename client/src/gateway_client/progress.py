"""Start-up progress shown while a new cluster starts.

Owns the displays (one updating status line on a terminal, one updating HTML output in a
notebook, nothing elsewhere), the choice between them, and `StartTracker`, which refreshes the
elapsed time every second while the client waits for the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

import dask

__all__ = ["NotebookProgress", "NullProgress", "StartTracker", "TerminalProgress", "make_progress"]


class ProgressDisplay(Protocol):
    def update(self, *, status: str, elapsed: float) -> None: ...

    def finish(self, *, status: str, elapsed: float) -> None: ...


class NullProgress:
    """Shows nothing (scripts whose stderr is not a terminal, or progress switched off)."""

    def update(self, *, status: str, elapsed: float) -> None:
        pass

    def finish(self, *, status: str, elapsed: float) -> None:
        pass


class TerminalProgress:
    """One status line rewritten in place, ended with a newline when the wait is over."""

    def __init__(self, *, name: str, stream: IO[str]) -> None:
        self.name = name
        self.stream = stream
        self._width = 0

    def _write(self, text: str, *, end: str = "") -> None:
        padding = " " * max(0, self._width - len(text))
        self.stream.write("\r" + text + padding + end)
        self.stream.flush()
        self._width = 0 if end else len(text)

    def update(self, *, status: str, elapsed: float) -> None:
        self._write(f"Cluster {self.name}: {status} ({elapsed:.0f} s)")

    def finish(self, *, status: str, elapsed: float) -> None:
        self._write(f"Cluster {self.name}: {status} after {elapsed:.1f} s", end="\n")


class NotebookProgress:
    """An HTML output updated in place through an IPython display handle."""

    def __init__(self, *, name: str, display: Callable[..., Any] | None = None) -> None:
        if display is None:
            from IPython.display import display as ipython_display

            display = ipython_display
        self.name = name
        self._display: Callable[..., Any] = display
        self._handle: Any = None

    def _html(self, text: str) -> Any:
        from IPython.display import HTML

        return HTML(
            "<div style='font-family: monospace'><b>GatewayCluster</b> "
            f"{html.escape(self.name)}: {html.escape(text)}</div>"
        )

    def _show(self, text: str) -> None:
        if self._handle is None:
            self._handle = self._display(self._html(text), display_id=True)
        else:
            self._handle.update(self._html(text))

    def update(self, *, status: str, elapsed: float) -> None:
        self._show(f"{status} ({elapsed:.0f} s)")

    def finish(self, *, status: str, elapsed: float) -> None:
        self._show(f"{status} after {elapsed:.1f} s")


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def make_progress(name: str) -> ProgressDisplay:
    """The display for a start-up, per ``gateway.cluster.progress`` and where we run."""
    if not dask.config.get("gateway.cluster.progress", True):
        return NullProgress()
    if _in_notebook():
        return NotebookProgress(name=name)
    stream = sys.stderr
    if stream is not None and stream.isatty():
        return TerminalProgress(name=name, stream=stream)
    return NullProgress()


class StartTracker:
    """Keeps a display current while a cluster starts; set ``status`` as reports come in."""

    def __init__(self, *, display: ProgressDisplay, period: float = 1.0) -> None:
        self.display = display
        self.period = period
        self.status = "PENDING"
        self._start = time.monotonic()
        self._ticker: asyncio.Task[None] | None = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def _refresh(self) -> None:
        try:
            self.display.update(status=self.status, elapsed=self.elapsed)
        except Exception:  # noqa: BLE001 - a broken display must never break the start
            self.display = NullProgress()

    async def _tick(self) -> None:
        while True:
            self._refresh()
            await asyncio.sleep(self.period)

    async def __aenter__(self) -> StartTracker:
        self._ticker = asyncio.ensure_future(self._tick())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        with contextlib.suppress(Exception):
            self.display.finish(status=self.status, elapsed=self.elapsed)

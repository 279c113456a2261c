"""Start-up progress: the terminal line, the notebook output, the choice between them, and
the once-a-second refresh.
"""

from __future__ import annotations

import asyncio
import io
import sys
from typing import Any

import dask
import pytest

from gateway_client import progress
from gateway_client.progress import (
    NotebookProgress,
    NullProgress,
    StartTracker,
    TerminalProgress,
    make_progress,
)

pytestmark = pytest.mark.unit


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_line_is_rewritten_in_place_and_ended() -> None:
    out = TTY()
    line = TerminalProgress(name="abc", stream=out)
    line.update(status="PENDING", elapsed=12.4)
    line.update(status="PENDING", elapsed=3)
    line.finish(status="RUNNING", elapsed=14.25)
    assert out.getvalue() == (
        "\rCluster abc: PENDING (12 s)"
        "\rCluster abc: PENDING (3 s) "  # padded over the longer line before it
        "\rCluster abc: RUNNING after 14.2 s\n"
    )


def test_notebook_output_is_one_updating_display() -> None:
    shown: list[Any] = []

    class Handle:
        def update(self, obj: Any) -> None:
            shown.append(("update", obj.data))

    def display(obj: Any, display_id: bool = False) -> Handle:
        assert display_id is True
        shown.append(("display", obj.data))
        return Handle()

    nb = NotebookProgress(name="abc", display=display)
    nb.update(status="PENDING", elapsed=1)
    nb.update(status="PENDING", elapsed=2)
    nb.finish(status="FAILED", elapsed=2.5)
    assert [kind for kind, _ in shown] == ["display", "update", "update"]
    assert "abc: PENDING (1 s)" in shown[0][1]
    assert "abc: FAILED after 2.5 s" in shown[2][1]


def test_the_display_fits_where_we_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(make_progress("abc"), NullProgress)
    monkeypatch.setattr(sys, "stderr", TTY())
    assert isinstance(make_progress("abc"), TerminalProgress)
    with dask.config.set({"gateway.cluster.progress": False}):
        assert isinstance(make_progress("abc"), NullProgress)
    monkeypatch.setattr(progress, "_in_notebook", lambda: True)
    assert isinstance(make_progress("abc"), NotebookProgress)


async def test_tracker_refreshes_the_elapsed_time_until_done() -> None:
    calls: list[tuple[str, str, float]] = []

    class Recorder:
        def update(self, *, status: str, elapsed: float) -> None:
            calls.append(("update", status, elapsed))

        def finish(self, *, status: str, elapsed: float) -> None:
            calls.append(("finish", status, elapsed))

    async with StartTracker(display=Recorder(), period=0.01) as tracker:
        await asyncio.sleep(0.05)
        tracker.status = "RUNNING"
        await asyncio.sleep(0.03)
    updates = [c for c in calls if c[0] == "update"]
    assert len(updates) >= 3
    assert [c[2] for c in updates] == sorted(c[2] for c in updates)
    assert updates[0][1] == "PENDING" and updates[-1][1] == "RUNNING"
    assert calls[-1][:2] == ("finish", "RUNNING")
    count = len(calls)
    await asyncio.sleep(0.03)
    assert len(calls) == count  # the ticker stopped


async def test_a_broken_display_does_not_break_the_start() -> None:
    class Broken:
        def update(self, *, status: str, elapsed: float) -> None:
            raise RuntimeError("no terminal")

        def finish(self, *, status: str, elapsed: float) -> None:
            raise RuntimeError("no terminal")

    async with StartTracker(display=Broken(), period=0.01) as tracker:
        await asyncio.sleep(0.03)
    assert isinstance(tracker.display, NullProgress)

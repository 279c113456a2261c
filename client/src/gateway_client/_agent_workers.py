"""The scheduler agent's record of workers by the names the gateway gave them.

Owns `WorkerBook` (active, closing and closed names, and which closed names the gateway has
acknowledged), `choose_retirees`, the order in which workers are retired on scale down, and
`group_of_worker`, the worker group a gateway-made name belongs to.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed.scheduler import WorkerState


@dataclass(frozen=True, kw_only=True)
class WorkerReport:
    """The three worker lists of one heartbeat."""

    active: list[str]
    closing: list[str]
    closed: list[str]


@dataclass(kw_only=True)
class WorkerBook:
    """Which workers are connected, which the agent is retiring, and which have gone.

    A name is in exactly one of: active (connected, not being retired), closing (connected,
    being retired) or closed (left, and not yet acknowledged by the gateway). A worker that
    joins again under a closed name is active again.
    """

    _names: dict[str, str] = field(default_factory=dict)  # address -> name
    _joined: dict[str, int] = field(default_factory=dict)  # name -> join sequence number
    _closing: set[str] = field(default_factory=set)
    _closed: set[str] = field(default_factory=set)
    _sequence: itertools.count[int] = field(default_factory=itertools.count)

    def joined(self, *, address: str, name: str) -> None:
        """Record that the worker ``name`` connected from ``address``."""
        self._names[address] = name
        self._joined[name] = next(self._sequence)
        self._closing.discard(name)
        self._closed.discard(name)

    def left(self, *, address: str) -> str | None:
        """Record that the worker at ``address`` left; its name, or None if never seen."""
        name = self._names.pop(address, None)
        if name is None:
            return None
        if name in self._names.values():  # another worker took the name meanwhile
            return name
        self._joined.pop(name, None)
        self._closing.discard(name)
        self._closed.add(name)
        return name

    def mark_closing(self, names: Iterable[str]) -> None:
        """Record that the agent is retiring the (connected) workers ``names``."""
        connected = set(self._names.values())
        self._closing.update(n for n in names if n in connected)

    def unmark_closing(self, names: Iterable[str]) -> None:
        """Undo `mark_closing` for workers that are still connected after all."""
        self._closing.difference_update(names)

    def name_of(self, address: str) -> str | None:
        return self._names.get(address)

    def join_order(self, name: str) -> int:
        """Larger for workers that joined later."""
        return self._joined.get(name, -1)

    def is_closing(self, name: str) -> bool:
        return name in self._closing

    @property
    def active_count(self) -> int:
        return len(self._names) - len(self._closing)

    def active_names(self) -> list[str]:
        """Names of the connected workers that are not being retired."""
        return [n for n in self._names.values() if n not in self._closing]

    def report(self) -> WorkerReport:
        """The worker lists for the next heartbeat, each sorted."""
        connected = set(self._names.values())
        return WorkerReport(
            active=sorted(connected - self._closing),
            closing=sorted(self._closing),
            closed=sorted(self._closed),
        )

    def acknowledge(self, closed: Iterable[str]) -> None:
        """The gateway accepted a heartbeat listing ``closed``: stop reporting those names."""
        self._closed.difference_update(closed)


def group_of_worker(cluster_name: str, name: str, default: str = "default") -> str:
    """The worker group of a worker the gateway named: ``<cluster>-<hex>`` is in the default
    group, ``<cluster>-<group>-<hex>`` in ``group``; any other name in the default group."""
    rest = name.removeprefix(f"{cluster_name}-")
    if rest == name:
        return default
    group, sep, _ = rest.rpartition("-")
    return group if sep and group else default


def choose_retirees(
    workers: Iterable[WorkerState], *, count: int, book: WorkerBook
) -> list[WorkerState]:
    """The ``count`` workers cheapest to lose, among ``workers``.

    Idle workers go first (nothing processing), then those holding the fewest bytes and keys;
    among equals the most recently joined goes first, so long-lived workers (with warm caches)
    stay. Workers already being retired are never chosen again.
    """
    if count <= 0:
        return []
    candidates = [ws for ws in workers if not book.is_closing(str(ws.name))]

    def cost(ws: WorkerState) -> tuple[int, int, int, int]:
        return (
            len(ws.processing),
            ws.nbytes,
            len(ws.has_what),
            -book.join_order(str(ws.name)),
        )

    return sorted(candidates, key=cost)[:count]

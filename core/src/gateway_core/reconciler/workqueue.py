"""The reconciler's keyed work queue, with per-key exponential backoff.

Owns `WorkQueue`, `backoff_delay` and `Key` (a cluster's or a worker's place in the queue).
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

Key = tuple[str, str]
"""A work item: ``(cluster name, "")`` for a cluster, ``(cluster name, worker name)``."""

_MAX_EXPONENT = 62


def backoff_delay(failures: int, *, base: float, max_delay: float) -> float:
    """Seconds to wait before retry number ``failures + 1``:
    ``min(max_delay, base * 2 ** failures)``."""
    return min(max_delay, base * 2.0 ** min(max(failures, 0), _MAX_EXPONENT))


class WorkQueue(Generic[K]):
    """A de-duplicating queue of keys with delayed puts and per-key backoff.

    A key is queued at most once; a key put while it is being processed is processed again once
    its handler calls `done`. After `retry`, the key is held back for its backoff delay (every
    put in between is merged into that one later run) until `forget` records a success.
    """

    def __init__(self, *, base_delay: float, max_delay: float) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._hold: dict[K, float] = {}
        self._failures: dict[K, int] = {}
        self._ready_since: dict[K, float] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._queued) + len(self._timers)

    def lag(self) -> float:
        """Seconds the oldest ready key has waited to be taken (0 when none is ready)."""
        if not self._ready_since:
            return 0.0
        return max(0.0, asyncio.get_running_loop().time() - min(self._ready_since.values()))

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def put(self, key: K, delay: float = 0.0) -> None:
        """Queue ``key`` to run after ``delay`` seconds (and not before its backoff ends)."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        when = max(now + delay, self._hold.get(key, 0.0))
        if when <= now:
            timer = self._timers.pop(key, None)
            if timer is not None:
                timer.cancel()
            self._add(key)
            return
        if key in self._queued:
            return
        timer = self._timers.get(key)
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def retry(self, key: K) -> float:
        """Record a failure of ``key`` and queue it after its backoff; return the delay."""
        failures = self._failures.get(key, 0)
        delay = backoff_delay(failures, base=self.base_delay, max_delay=self.max_delay)
        self._failures[key] = failures + 1
        self._hold[key] = asyncio.get_running_loop().time() + delay
        self._dirty.discard(key)
        self.put(key)
        return delay

    def forget(self, key: K) -> None:
        """Record a success of ``key``: its next failure starts the backoff afresh."""
        self._failures.pop(key, None)
        self._hold.pop(key, None)

    async def get(self) -> K:
        """The next ready key; it counts as being processed until `done`."""
        key = await self._ready.get()
        self._queued.discard(key)
        self._ready_since.pop(key, None)
        self._processing.add(key)
        return key

    def processing(self) -> frozenset[K]:
        """The keys taken by `get` and not yet `done` (their handlers are running)."""
        return frozenset(self._processing)

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.put(key)

    def close(self) -> None:
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _add(self, key: K) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready_since[key] = asyncio.get_running_loop().time()
            self._ready.put_nowait(key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        if self._hold.get(key, 0.0) <= asyncio.get_running_loop().time():
            self._hold.pop(key, None)
        self._add(key)


def describe_key(key: Key) -> str:
    """``cluster c`` or ``worker w of cluster c``, for log lines."""
    cluster, worker = key
    return f"worker {worker} of cluster {cluster}" if worker else f"cluster {cluster}"

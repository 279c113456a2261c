"""Retrying a call to a platform with exponential backoff between attempts.

Owns `attempts`, the loop header a driver uses for a status listing or any call it may repeat.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ...reconciler.workqueue import backoff_delay


async def attempts(count: int, *, base: float, max_delay: float) -> AsyncIterator[int]:
    """Yield attempt numbers ``0 .. count - 1``, sleeping the reconciler's backoff before each
    one after the first (``min(max_delay, base * 2 ** (attempt - 1))``). Break out of the loop
    on success; the loop ending means every attempt failed.

    Example::

        async for attempt in attempts(1 + retries, base=0.5, max_delay=10):
            try:
                return await list_jobs()
            except OSError as exc:
                problem = str(exc)
        raise RuntimeError(f"listing jobs failed: {problem}")
    """
    for attempt in range(max(count, 1)):
        if attempt:
            await asyncio.sleep(backoff_delay(attempt - 1, base=base, max_delay=max_delay))
        yield attempt

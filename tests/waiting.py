"""The one way tests wait for a condition that has no event to await from outside.

``await eventually(lambda: agent.statistics().updates_sent == 1)`` re-checks the predicate every
``interval`` seconds and fails the test with ``what`` if it is not true within ``within`` seconds.
The bound is a hang guard, not a timing assertion: set it generously (timing lives in bench/).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(
    predicate: Callable[[], bool],
    within: float = 30.0,
    *,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Return as soon as ``predicate()`` is true; ``AssertionError`` after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {within:g} s")
        await asyncio.sleep(interval)

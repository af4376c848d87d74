"""SIGTERM and SIGINT for the tree's processes (``python -m edgefl.sharding.service root|shard``):
a clean stop within the project's budget (about a second, exit status 0), as ``edgefl
aggregator`` stops (docs/AGGREGATOR.md, "Signals and the service lifecycle").

The first signal asks for a **graceful stop** (the ``stop`` event given to the process's main
coroutine is set: it finishes the message in hand, says ``offline`` and disconnects) when
``graceful()`` says there is a broker to say it to, and otherwise cancels the main coroutine at
once (a start-up, a broker away: nothing to finish). A second signal, or ``grace_s`` after the
first, cancels it as well. A cancellation by a signal is a clean stop too: the tree's processes
commit what they keep before they acknowledge it, so a cancelled stop loses nothing (what is not
acknowledged is redelivered to the next run or owner); it only skips the goodbye.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("edgefl.sharding")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_GRACE_S = 1.0
"""Longest graceful stop after a signal before the main coroutine is cancelled (the rest of the
2 s budget is for closing the connections and the interpreter's exit on a loaded machine)."""

Main = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
"""A process's main coroutine, given the event that asks it to stop gracefully."""


async def run_until_signalled(
    main: Main, graceful: Callable[[], bool], grace_s: float = STOP_GRACE_S
) -> signal.Signals | None:
    """Run ``main(stop)`` with the signal handling of the module docstring; returns the first
    stop signal (None: ``main`` ended by itself). Its exceptions propagate, and so does a
    cancellation that no signal caused."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = loop.create_task(main(stop))
    signals: list[signal.Signals] = []
    deadline: asyncio.TimerHandle | None = None
    cancelled = False  # by a signal or the grace period

    def cancel() -> None:
        nonlocal cancelled
        cancelled = True
        task.cancel()

    def on_signal(sig: signal.Signals) -> None:
        nonlocal deadline
        signals.append(sig)
        log.info("%s: stopping", sig.name)
        stop.set()
        if len(signals) > 1 or not graceful():
            cancel()
        elif deadline is None:
            deadline = loop.call_later(grace_s, cancel)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not cancelled or (current is not None and current.cancelling()):
            raise  # cancelled from outside, not (only) by a signal
        log.info("stopped without the graceful stop (what is kept is committed)")
    finally:
        if deadline is not None:
            deadline.cancel()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    return signals[0] if signals else None

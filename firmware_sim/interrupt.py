"""SIGINT/SIGTERM as a clean stop for ``edgefl sim`` and ``edgefl demo``.

:class:`SignalStop` (a context manager; effective in the main thread only) installs one handler
for both signals and restores the previous handlers on exit. What a signal does depends on the
phase the command is in:

* **synchronous phases** (building the scenario, a virtual run, writing the report): the first
  signal raises :class:`StopRequested` in the main thread, at the next bytecode; the command
  catches it, prints what it did and exits 0. Later signals are only recorded.
* **asynchronous phases** (a live run): :meth:`SignalStop.route` hands every signal to a hook
  instead (the live run sets an ``asyncio.Event`` through ``loop.call_soon_threadsafe``), so
  the event loop winds down with bounded timeouts and returns a partial result.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

__all__ = ["STOP_SIGNALS", "SignalStop", "StopRequested", "signal_name"]

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, etc."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequested(Exception):
    """Raised in the main thread by the first SIGINT/SIGTERM of a synchronous phase."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


class SignalStop:
    """Turns SIGINT and SIGTERM into a clean stop (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._hook: Callable[[], None] | None = None
        self._raised = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal_name(self.signum) if self.signum is not None else ""

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def route(self, hook: Callable[[], None] | None) -> None:
        """Send signals to ``hook`` (None: back to raising :class:`StopRequested`). A signal that
        arrived before is passed on at once."""
        self._hook = hook
        if hook is not None and self.signum is not None:
            hook()

    def check(self) -> None:
        """Raise :class:`StopRequested` if a signal arrived and nobody was told yet."""
        if self.signum is not None and not self._raised:
            self._raised = True
            raise StopRequested(self.signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        hook = self._hook
        if hook is not None:
            hook()
            return
        if not self._raised:
            self._raised = True
            raise StopRequested(signum)

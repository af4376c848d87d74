"""SIGINT/SIGTERM as a clean stop for ``edgefl sim`` and ``edgefl demo``.

:class:`SignalStop` (a context manager; effective in the main thread only) installs one handler
for both signals and restores the previous handlers on exit. What a signal does depends on the
phase the command is in:

* **synchronous phases** (building the scenario, a virtual run, writing the report): the first
  signal raises :class:`StopRequested` in the main thread, at the next bytecode; the command
  catches it, prints what it did and exits 0. Later signals are only recorded.
* **after the stop**: a command that stopped for a signal and released what it owns (the live
  run's broker, processes and temporary directory) ends with :func:`exit_now`: exit code 0
  without the interpreter's module teardown, which alone takes 0.5-1.5 s once torch,
  scikit-learn and matplotlib are loaded (measured on the 2-core reference machine under load)
  and would break the 2 s contract.
* **asynchronous phases** (a live run): :meth:`SignalStop.route` hands every signal to a hook
  instead (the live run sets an ``asyncio.Event`` through ``loop.call_soon_threadsafe``), so
  the event loop winds down with bounded timeouts and returns a partial result.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

__all__ = ["STOP_SIGNALS", "SignalStop", "StopRequested", "exit_now", "signal_name"]

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, etc."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequested(BaseException):
    """Raised in the main thread by the first SIGINT/SIGTERM of a synchronous phase.

    A ``BaseException`` (like ``KeyboardInterrupt``), so library code's ``except Exception``
    (a dataset cache falling back to regenerating, say) cannot swallow it."""

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


def exit_now(code: int = 0) -> None:
    """Flush stdout and stderr and end the process with ``code`` at once (``os._exit``: no
    atexit handlers, no module teardown). Only for a command that already cleaned up."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)

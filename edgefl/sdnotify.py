"""systemd service notifications (sd_notify(3)) without a dependency.

Under a ``Type=notify`` unit systemd sets ``$NOTIFY_SOCKET`` (a filesystem path, or an abstract
socket name written with a leading ``@``); the service sends newline-separated ``KEY=VALUE``
datagrams to it: ``READY=1`` once started, ``WATCHDOG=1`` at least every ``WatchdogSec`` (systemd
passes it as ``$WATCHDOG_USEC``; ping about every half interval, from the event loop so that a
wedged loop gets the unit restarted), ``STATUS=...`` for ``systemctl status``, ``STOPPING=1``.

Outside systemd (no ``$NOTIFY_SOCKET``) every method is a no-op returning False. Sending never
raises and never blocks (the socket is non-blocking, so a receiver that does not drain its queue
cannot stall the caller's event loop): a notification that cannot be delivered is logged at debug
level and reported as False.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Self

__all__ = ["SystemdNotifier", "keepalive", "watchdog_period"]

_log = logging.getLogger("edgefl.sdnotify")


class SystemdNotifier:
    """Send sd_notify messages. ``env`` defaults to ``os.environ`` (read once, at construction)."""

    def __init__(self, env: Mapping[str, str] | None = None, *, pid: int | None = None) -> None:
        environ = os.environ if env is None else env
        self._env = dict(environ)
        self._pid = os.getpid() if pid is None else pid
        self._address = self._parse_address(environ.get("NOTIFY_SOCKET", ""))
        self._socket: socket.socket | None = None

    @staticmethod
    def _parse_address(raw: str) -> str | bytes | None:
        if raw.startswith("@"):
            return b"\0" + raw[1:].encode()  # Linux abstract namespace
        if raw.startswith("/"):
            return raw
        if raw:
            _log.debug("unsupported NOTIFY_SOCKET %r; notifications disabled", raw)
        return None

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram. True if it was sent."""
        if self._address is None or not assignments:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._socket.sendto(message, self._address)
        except OSError as exc:
            _log.debug("sd_notify %r failed: %s", assignments, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup finished (``READY=1``), optionally with a status line."""
        return self.notify("READY=1", *self._status(status))

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *self._status(status))

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self.notify(*self._status(text))

    def watchdog(self) -> bool:
        """Keep-alive ping (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (``EXTEND_TIMEOUT_USEC``), e.g. while loading."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """``WatchdogSec`` in seconds, or None when the watchdog is off or meant for another
        process (``$WATCHDOG_PID`` set to a different pid)."""
        raw_pid = self._env.get("WATCHDOG_PID")
        if raw_pid:
            try:
                if int(raw_pid) != self._pid:
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return usec / 1_000_000 if usec > 0 else None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        return ("STATUS=" + " ".join(text.splitlines()),)


def watchdog_period(notifier: SystemdNotifier) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC`` (None: no watchdog)."""
    interval = notifier.watchdog_interval()
    return None if interval is None else interval / 2


async def keepalive(
    notifier: SystemdNotifier,
    period: float,
    status: Callable[[], str] | None = None,
    *,
    watchdog: bool = True,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Forever: ``WATCHDOG=1`` (when ``watchdog``) and, with ``status``, ``STATUS=`` when it
    changed, then sleep ``period``. Run it on the service's own event loop (as a task, cancelled
    at shutdown), so the pings stop when the loop is stuck and systemd restarts the unit."""
    last: str | None = None
    while True:
        if watchdog:
            notifier.watchdog()
        if status is not None:
            text = status()
            if text != last:
                notifier.status(text)
                last = text
        await sleep(period)

"""The aggregator's sd_notify: watchdog pings from the event loop, over a real AF_UNIX socket."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
from notify_socket import notify_socket

from edgefl.sdnotify import SystemdNotifier, keepalive, watchdog_period

WATCHDOG_USEC = 2_000_000  # WatchdogSec=2


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    with notify_socket(0.0) as bound:  # non-blocking
        yield bound


def drain(sock: socket.socket) -> list[str]:
    out: list[str] = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_period_is_half_the_watchdog_interval() -> None:
    # Arrange
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": str(WATCHDOG_USEC)})

    # Act
    period = watchdog_period(notifier)

    # Assert
    assert period == 1.0
    assert watchdog_period(SystemdNotifier({"NOTIFY_SOCKET": "/x"})) is None


def test_one_ping_per_tick_each_below_half_the_watchdog(
    listener: tuple[socket.socket, str],
) -> None:
    # Arrange: the loop's sleeps are recorded and yield once (one loop tick each)
    sock, path = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    period = watchdog_period(notifier)
    assert period is not None
    sleeps: list[float] = []
    messages: list[str] = []
    statuses = iter(["restoring state", "connecting to the broker"] + ["running"] * 100)

    async def run(ticks: int) -> None:
        done = asyncio.Event()

        async def tick(seconds: float) -> None:
            sleeps.append(seconds)
            messages.extend(drain(sock))  # the socket's queue is short (max_dgram_qlen)
            if len(sleeps) == ticks:
                done.set()
            await asyncio.sleep(0)

        task = asyncio.create_task(keepalive(notifier, period, lambda: next(statuses), sleep=tick))
        await done.wait()
        task.cancel()

    # Act
    asyncio.run(run(50))
    notifier.close()

    # Assert
    pings = messages.count("WATCHDOG=1")
    assert pings == len(sleeps)  # one ping per tick, before each sleep
    assert all(s <= WATCHDOG_USEC / 1e6 / 2 for s in sleeps)
    status = [m for m in messages if m.startswith("STATUS=")]
    assert status == [
        "STATUS=restoring state",
        "STATUS=connecting to the broker",
        "STATUS=running",
    ]  # only changes are sent


def test_a_blocked_loop_sends_no_pings(listener: tuple[socket.socket, str]) -> None:
    # Arrange
    sock, path = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    period = watchdog_period(notifier)
    assert period is not None

    async def run() -> tuple[int, int]:
        task = asyncio.create_task(keepalive(notifier, period, lambda: "running"))
        await asyncio.sleep(0)  # first ping
        before = drain(sock).count("WATCHDOG=1")
        time.sleep(0.2)  # noqa: ASYNC251  (the loop is stuck for twenty ping periods)
        during = drain(sock).count("WATCHDOG=1")
        task.cancel()
        return before, during

    # Act
    result = asyncio.run(run())
    notifier.close()

    # Assert: one ping before the stall, none while the loop was blocked
    assert result == (1, 0)

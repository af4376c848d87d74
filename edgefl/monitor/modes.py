"""The monitor's non-interactive modes (asyncio, no terminal UI): one snapshot, a JSON-lines
stream, and clearing retained topics. :mod:`edgefl.monitor.cli` maps flags onto these."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

from edgefl.transport.config import MqttConfig

from .clear import check_target, select_topics
from .client import FleetMonitor
from .model import FleetModelConfig
from .snapshot import FleetSnapshot
from .summary import TopicLogEntry

__all__ = [
    "MonitorOptions",
    "clear_retained",
    "dump_json",
    "snapshot_once",
    "stream_json",
    "until_signal",
]

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class MonitorOptions:
    """What every mode shares: where, which fleet, and how to fold."""

    config: MqttConfig
    fleet: str
    include_sys: bool = True
    include_updates: bool = True
    model: FleetModelConfig = field(default_factory=FleetModelConfig)
    topic_filters: tuple[str, ...] = ()
    settle_quiet: float = 0.5
    """``--once`` / clearing: the retained burst is over after this long without one."""
    settle_timeout: float = 5.0
    """... or after this long in total (``--wait``)."""
    notice: Callable[[str], None] | None = None
    """Told once (one line) when the first connection attempt failed and the monitor keeps
    trying until ``config.start_timeout`` (when that is at least ``NOTICE_MIN_WAIT_S``): the
    command line writes it to stderr."""

    def monitor(self) -> FleetMonitor:
        return FleetMonitor(
            self.config,
            self.fleet,
            include_sys=self.include_sys,
            include_updates=self.include_updates,
            model_config=self.model,
            topic_filters=self.topic_filters,
        )


NOTICE_POLL_S = 0.2
NOTICE_MIN_WAIT_S = 3.0
"""A shorter ``--connect-timeout`` ends in its error line soon enough: no notice before it."""


@contextlib.asynccontextmanager
async def _opened(options: MonitorOptions) -> AsyncIterator[FleetMonitor]:
    """``async with options.monitor()``, telling ``options.notice`` once while the broker
    cannot be reached yet (instead of waiting silently up to ``--connect-timeout``)."""
    monitor = options.monitor()
    watcher: asyncio.Task[None] | None = None
    limit = options.config.timing.start_timeout
    if options.notice is not None and (limit is None or limit >= NOTICE_MIN_WAIT_S):
        watcher = asyncio.create_task(_watch_first_failure(monitor, options))
    try:
        async with monitor:
            if watcher is not None:
                watcher.cancel()
            yield monitor
    finally:
        if watcher is not None:
            watcher.cancel()


async def _watch_first_failure(monitor: FleetMonitor, options: MonitorOptions) -> None:
    assert options.notice is not None
    while True:
        view = monitor.connection_view()
        if view.connected:
            return
        if view.last_error:
            limit = options.config.timing.start_timeout
            within = f"for up to {limit:g} s (--connect-timeout)" if limit else "until stopped"
            options.notice(f"{view.last_error}; retrying {within}")
            return
        await asyncio.sleep(NOTICE_POLL_S)


def dump_json(value: Any) -> str:
    """One line of JSON (UTF-8 text, no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


async def snapshot_once(options: MonitorOptions) -> FleetSnapshot:
    """Connect, wait for the retained messages (bounded), return one snapshot, disconnect."""
    async with _opened(options) as monitor:
        await monitor.settle(quiet=options.settle_quiet, timeout=options.settle_timeout)
        return monitor.snapshot()


async def stream_json(
    options: MonitorOptions,
    out: TextIO,
    *,
    interval: float = 0.0,
    count: int | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Write JSON lines to ``out`` until ``count`` lines were written or ``stop`` is set.

    ``interval == 0``: one line per received message that passes the topic filters,
    ``{"type": "message", ...TopicLogEntry}``. ``interval > 0``: one snapshot every ``interval``
    seconds, ``{"type": "snapshot", ...FleetSnapshot}`` (the first after the retained burst).
    Returns the number of lines written.
    """
    stop = stop or asyncio.Event()
    written = 0

    def emit(value: dict[str, Any]) -> None:
        nonlocal written
        if count is not None and written >= count:
            return
        out.write(dump_json(value) + "\n")
        out.flush()
        written += 1
        if count is not None and written >= count:
            stop.set()

    async with _opened(options) as monitor:
        if interval > 0:
            await monitor.settle(quiet=options.settle_quiet, timeout=options.settle_timeout)
            while not stop.is_set():
                emit({"type": "snapshot", **monitor.snapshot().to_json()})
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await stop.wait()
        else:

            def on_entry(entry: TopicLogEntry) -> None:
                emit({"type": "message", **entry.to_json()})

            for entry in list(monitor.log):  # anything that arrived while subscribing
                on_entry(entry)
            monitor.add_listener(on_entry)
            await stop.wait()
    return written


async def clear_retained(
    options: MonitorOptions, target: str, *, dry_run: bool
) -> tuple[list[str], FleetSnapshot]:
    """Delete the retained topics selected by ``target`` (see :mod:`edgefl.monitor.clear`)
    after the retained burst arrived; with ``dry_run`` only select them. Returns the topics and
    the snapshot they were chosen from."""
    target = check_target(target, options.fleet)
    async with _opened(options) as monitor:
        await monitor.settle(quiet=options.settle_quiet, timeout=options.settle_timeout)
        snapshot = monitor.snapshot()
        topics = select_topics(target, snapshot, monitor.retained_topics)
        if not dry_run:
            await monitor.clear_retained(topics)
    return topics, snapshot


async def until_signal(awaitable: Awaitable[T]) -> T | None:
    """Run ``awaitable`` until it is done, or until SIGINT/SIGTERM: then cancel it (in any phase:
    connecting, waiting for the retained burst, streaming; the monitor's ``async with`` closes
    the connection on the way out) and return ``None``. The handlers are removed afterwards."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stopped.set)
            installed.append(sig)
    work = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return None
    finally:
        waiter.cancel()
        if not work.done():
            work.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)


def topics_filter(values: Sequence[str]) -> tuple[str, ...]:
    """Validate ``--topic`` filters (``ValueError`` for a malformed one)."""
    from edgefl.transport.base import validate_filter

    for value in values:
        validate_filter(value)
    return tuple(values)

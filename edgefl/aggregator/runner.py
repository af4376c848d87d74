"""Blocking entry point: run the aggregator until SIGTERM/SIGINT, then shut down cleanly.

Start-up order: the signal handlers are installed first, then the service restores its state and
connects. A signal therefore stops the aggregator in every phase, within :data:`STOP_GRACE_S`:

* before it is serving (restoring, connecting), or while the broker is away: the run task is
  cancelled at once (the state store is crash-safe, nothing half-written survives a cancel, and
  what was not acknowledged is redelivered and deduplicated);
* while serving: :meth:`Aggregator.stop` finishes the batch in flight (commit, then ack),
  publishes the newest version and ``offline``, and disconnects; if that takes longer than
  :data:`STOP_GRACE_S` (a broker that went away, a slow disk) the run task is cancelled;
* a second signal cancels at once.

A signal-initiated stop returns exit code 0. When the broker cannot be reached within
``connect_timeout_s`` the run raises :class:`edgefl.clierror.BrokerUnavailable` (exit 69).

Under systemd (``Type=notify``) the event loop sends ``READY=1`` once serving, ``STATUS=`` lines,
``STOPPING=1`` on a signal, and ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` from a task on the
same loop as the service: a wedged loop stops the pings and systemd restarts the unit.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from edgefl.aggregator.config import AggregatorConfig
from edgefl.aggregator.memory import tune_process
from edgefl.aggregator.service import Aggregator, Phase
from edgefl.clierror import BrokerUnavailable, ConfigError
from edgefl.privacy import dp_to_text
from edgefl.sdnotify import SystemdNotifier, keepalive, watchdog_period
from edgefl.transport import TransportError

__all__ = ["STOP_GRACE_S", "keepalive", "run_aggregator", "status_line", "watchdog_period"]

log = logging.getLogger("edgefl.aggregator")

STOP_GRACE_S = 1.0
"""Longest graceful shutdown after a signal before the run task is cancelled (the rest of the
2 s budget is for closing the store and the interpreter's exit on a loaded machine)."""
STATUS_PERIOD_S = 5.0
"""Period of ``STATUS=`` updates when systemd runs no watchdog."""


def status_line(aggregator: Aggregator) -> str:
    """One line for ``systemctl status``: the phase, or the serving figures."""
    if aggregator.phase is not Phase.RUNNING:
        return str(aggregator.phase)
    s = aggregator.statistics()
    link = "connected" if s.link.connected else "disconnected, reconnecting"
    p = s.participation
    leases = "" if p is None else f", leases {p.in_flight}/{p.concurrency}"
    dp = s.privacy
    spent = "" if dp is None else f", dp epsilon {dp.epsilon:.2f} (delta {dp.delta:g})"
    return (
        f"serving fleet {aggregator.config.fleet}: version {s.version}, applied {s.applied}, "
        f"buffer {min(s.buffer_fill, s.buffer_size)}/{s.buffer_size}{leases}{spent}, {link}"
    )


def run_aggregator(
    config: AggregatorConfig,
    *,
    ready_message: bool = True,
    notifier: SystemdNotifier | None = None,
) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code (0 after a signal).

    Raises :class:`BrokerUnavailable` when the first connection does not come up within
    ``config.connect_timeout_s``. See the module docstring for the shutdown contract.
    """
    tune_process()
    with notifier or SystemdNotifier() as notify:
        return asyncio.run(_main(config, ready_message, notify))


class _SignalStop:
    """SIGTERM / SIGINT: ask the service to stop gracefully while it is serving (cancelled after
    ``STOP_GRACE_S``); cancel it at once before it serves, without a broker, or on a second
    signal. The state store is crash-safe, so a cancel loses nothing."""

    def __init__(
        self, aggregator: Aggregator, run_task: asyncio.Task[None], ready: asyncio.Event,
        notifier: SystemdNotifier,
    ) -> None:  # fmt: skip
        self.aggregator, self.run_task, self.ready, self.notifier = (
            aggregator, run_task, ready, notifier,
        )  # fmt: skip
        self.count = 0
        self._deadline: asyncio.TimerHandle | None = None

    def __call__(self, signum: signal.Signals) -> None:
        self.count += 1
        log.info("%s: stopping (%s)", signum.name, self.aggregator.phase)
        self.notifier.stopping(f"stopping ({signum.name})")
        self.aggregator.stop()
        serving = self.ready.is_set() and self.aggregator.statistics().link.connected
        if self.count > 1 or not serving:
            self.run_task.cancel()  # nothing to finish gracefully without a broker
        elif self._deadline is None:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(STOP_GRACE_S, self.run_task.cancel)

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()


async def _announce(
    aggregator: Aggregator, ready: asyncio.Event, notifier: SystemdNotifier, ready_message: bool
) -> None:
    """READY=1 to systemd and the ready line on stdout once the service serves."""
    await ready.wait()
    notifier.ready(status_line(aggregator))
    if ready_message:
        config, s = aggregator.config, aggregator.statistics()
        port = aggregator.metrics_port
        extra = f", metrics on :{port}" if port is not None else ""
        part = config.participation
        if part is not None:
            extra += f", leases: C = {part.concurrency}"
        if config.aggregation.privacy is not None:
            extra += f", dp: {dp_to_text(config.aggregation.privacy)}"
        print(
            f"edgefl aggregator ready: fleet {config.fleet}, model {config.model}, "
            f"version {s.version}, applied {s.applied}{extra}",
            flush=True,
        )


def _start_helpers(
    aggregator: Aggregator, ready: asyncio.Event, notifier: SystemdNotifier, ready_message: bool
) -> list[asyncio.Task[None]]:
    """The announcement and, under systemd, the keepalive (watchdog pings and status lines)."""
    helpers = [
        asyncio.create_task(
            _announce(aggregator, ready, notifier, ready_message),
            name="edgefl-aggregator-announce",
        )
    ]
    if notifier.enabled:
        period = watchdog_period(notifier)
        helpers.append(
            asyncio.create_task(
                keepalive(
                    notifier,
                    period if period is not None else STATUS_PERIOD_S,
                    lambda: status_line(aggregator),
                    watchdog=period is not None,
                ),
                name="edgefl-aggregator-keepalive",
            )
        )
    return helpers


async def _main(config: AggregatorConfig, ready_message: bool, notifier: SystemdNotifier) -> int:
    loop = asyncio.get_running_loop()
    aggregator = Aggregator(config)
    ready = asyncio.Event()
    run_task = asyncio.create_task(aggregator.run(ready), name="edgefl-aggregator")
    stop = _SignalStop(aggregator, run_task, ready, notifier)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    helpers = _start_helpers(aggregator, ready, notifier, ready_message)
    try:
        await _run_outcome(run_task, stop, ready, aggregator)
    finally:
        stop.close()
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if stop.count:
        notifier.stopping("stopped")
    return 0


async def _run_outcome(
    run_task: asyncio.Task[None], stop: _SignalStop, ready: asyncio.Event, aggregator: Aggregator
) -> None:
    """Await the service; a signal's cancel is a clean stop, a broker that never came up is
    :class:`BrokerUnavailable`, an unusable state directory at start a :class:`ConfigError`."""
    try:
        await run_task
    except asyncio.CancelledError:
        if stop.count == 0:
            raise  # cancelled from outside, not by a signal
        log.info("stopped before the graceful shutdown completed (state is crash-safe)")
    except TransportError as exc:
        if stop.count:
            return
        if not ready.is_set():
            raise BrokerUnavailable(f"cannot reach the broker: {exc}") from None
        raise
    except OSError as exc:
        if aggregator.phase in (Phase.STARTING, Phase.RESTORING):
            state_dir = str(aggregator.config.state_dir)
            raise ConfigError(f"state_dir: cannot use {state_dir!r}: {exc}") from None
        raise

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
import contextlib
import logging
import signal

from edgefl.aggregator.config import AggregatorConfig
from edgefl.aggregator.memory import tune_process
from edgefl.aggregator.service import Aggregator, Phase
from edgefl.clierror import BrokerUnavailable, ConfigError
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
    link = "connected" if s.connected else "disconnected, reconnecting"
    return (
        f"serving fleet {aggregator.config.fleet}: version {s.version}, applied {s.applied}, "
        f"buffer {min(s.buffer_fill, s.buffer_size)}/{s.buffer_size}, {link}"
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


async def _main(config: AggregatorConfig, ready_message: bool, notifier: SystemdNotifier) -> int:
    loop = asyncio.get_running_loop()
    aggregator = Aggregator(config)
    ready = asyncio.Event()
    run_task = asyncio.create_task(aggregator.run(ready), name="edgefl-aggregator")
    signals = 0
    deadline: asyncio.TimerHandle | None = None

    def on_signal(signum: signal.Signals) -> None:
        nonlocal signals, deadline
        signals += 1
        log.info("%s: stopping (%s)", signum.name, aggregator.phase)
        notifier.stopping(f"stopping ({signum.name})")
        aggregator.stop()
        if signals > 1 or not ready.is_set() or not aggregator.statistics().connected:
            run_task.cancel()  # nothing to finish gracefully without a broker
        elif deadline is None:
            deadline = loop.call_later(STOP_GRACE_S, run_task.cancel)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    async def announce() -> None:
        await ready.wait()
        notifier.ready(status_line(aggregator))
        if ready_message:
            s = aggregator.statistics()
            port = aggregator.metrics_port
            extra = f", metrics on :{port}" if port is not None else ""
            print(
                f"edgefl aggregator ready: fleet {config.fleet}, model {config.model}, "
                f"version {s.version}, applied {s.applied}{extra}",
                flush=True,
            )

    helpers = [asyncio.create_task(announce(), name="edgefl-aggregator-announce")]
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
    try:
        await run_task
    except asyncio.CancelledError:
        if signals == 0:
            raise  # cancelled from outside, not by a signal
        log.info("stopped before the graceful shutdown completed (state is crash-safe)")
    except TransportError as exc:
        if signals:
            return 0
        if not ready.is_set():
            raise BrokerUnavailable(f"cannot reach the broker: {exc}") from None
        raise
    except OSError as exc:
        if aggregator.phase in (Phase.STARTING, Phase.RESTORING):
            raise ConfigError(f"state_dir: cannot use {str(config.state_dir)!r}: {exc}") from None
        raise
    finally:
        if deadline is not None:
            deadline.cancel()
        for helper in helpers:
            helper.cancel()
        for helper in helpers:
            with contextlib.suppress(asyncio.CancelledError):
                await helper
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if signals:
        notifier.stopping("stopped")
    return 0

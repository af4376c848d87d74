"""Blocking entry point: run the aggregator until SIGTERM/SIGINT, then shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal

from edgefl.aggregator.config import AggregatorConfig
from edgefl.aggregator.memory import tune_process
from edgefl.aggregator.service import Aggregator

__all__ = ["run_aggregator"]

log = logging.getLogger("edgefl.aggregator")


def run_aggregator(config: AggregatorConfig, *, ready_message: bool = True) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code (0 after a clean shutdown).

    Shutdown finishes the batch in flight (commit, then acknowledge), publishes the newest
    committed version if it was not yet, publishes server state ``offline`` and disconnects
    gracefully (so the broker discards the ``lost`` Last Will).
    """
    tune_process()
    return asyncio.run(_main(config, ready_message))


async def _main(config: AggregatorConfig, ready_message: bool) -> int:
    aggregator = Aggregator(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, aggregator.stop)
    ready = asyncio.Event()

    async def announce() -> None:
        await ready.wait()
        if ready_message:
            s = aggregator.statistics()
            port = aggregator.metrics_port
            extra = f", metrics on :{port}" if port is not None else ""
            print(
                f"edgefl aggregator ready: fleet {config.fleet}, model {config.model}, "
                f"version {s.version}, applied {s.applied}{extra}",
                flush=True,
            )

    task = asyncio.create_task(announce())
    try:
        await aggregator.run(ready)
    except Exception:
        log.exception("aggregator failed")
        return 1
    finally:
        task.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0

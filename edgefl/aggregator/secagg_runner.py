"""Blocking entry point of ``edgefl aggregator --role leader|helper``: run the role until
SIGTERM/SIGINT. A signal stops the message loop (the message in hand is finished: written, then
acknowledged), the leader publishes ``offline``; a second signal cancels at once (both stores
are crash-safe: whatever was not acknowledged is redelivered). Prints ``edgefl aggregator
ready: ...`` on stdout once serving (what scripts and tests wait for)."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from edgefl.aggregator.config import AggregatorConfig
from edgefl.aggregator.secagg_config import Role, SecAggSettings, check_outputs
from edgefl.aggregator.secagg_helper import HelperService, load_helper_keys
from edgefl.aggregator.secagg_leader import LeaderService, load_helper_public
from edgefl.clierror import BrokerUnavailable
from edgefl.transport import TransportError

__all__ = ["make_role", "run_role"]


def make_role(
    role: Role, config: AggregatorConfig, settings: SecAggSettings
) -> LeaderService | HelperService:
    """The service of ``role``; ``ValueError`` (one line) for an unusable key or option."""
    check_outputs(role, config)
    if role is Role.LEADER:
        return LeaderService(config, settings, load_helper_public(settings.helper_key))
    if role is Role.HELPER:
        return HelperService(config, settings, load_helper_keys(settings.helper_key))
    raise ValueError(f"not a secure-aggregation role: {role}")


def run_role(role: Role, config: AggregatorConfig, settings: SecAggSettings) -> int:
    """Run until a signal; returns the exit code (0 after a signal)."""
    service = make_role(role, config, settings)
    return asyncio.run(_main(role, service))


async def _main(role: Role, service: LeaderService | HelperService) -> int:
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    task = asyncio.create_task(service.run(ready))
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        service.stop()
        if signals > 1 or not ready.is_set():
            task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)

    async def announce() -> None:
        await ready.wait()
        cfg = service.config
        print(
            f"edgefl aggregator ready: secagg {role.value}, fleet {cfg.fleet}, model {cfg.model}",
            flush=True,
        )

    announcing = asyncio.create_task(announce())
    try:
        await task
    except asyncio.CancelledError:
        pass
    except TransportError as exc:
        if not ready.is_set():
            raise BrokerUnavailable(str(exc)) from None
        raise
    finally:
        announcing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await announcing
    return 0

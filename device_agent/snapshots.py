"""Where the agent's eligibility snapshots come from.

:class:`SnapshotSource` is the seam: ``await source.snapshot()`` returns one
:class:`~device_agent.eligibility.DeviceSnapshot`. The real agent uses :class:`ProbeSnapshotSource`
(the probes of ``device_agent.eligibility`` under ``probes.root``, run in a worker thread because
they read files and may run ``vcgencmd``/``nmcli``); the fleet simulator supplies its own source
with simulated conditions; tests use :class:`ProbeSnapshotSource` over a fake sysfs tree.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from device_agent.config import ProbeConfig
from device_agent.eligibility import DeviceSnapshot, Probe, collect_snapshot, default_probes

__all__ = ["ProbeSnapshotSource", "SnapshotSource"]


class SnapshotSource(Protocol):
    async def snapshot(self) -> DeviceSnapshot:
        """Read the device's current conditions. Should not raise (failed probes are recorded
        in ``DeviceSnapshot.errors``); if it does, the agent treats the device as ineligible."""
        ...


class ProbeSnapshotSource:
    """The configured probes (``[probes]``), collected in a worker thread."""

    def __init__(self, config: ProbeConfig, *, probes: list[Probe] | None = None) -> None:
        self._probes = (
            probes
            if probes is not None
            else default_probes(
                config.root,
                metered=config.metered,
                nmcli_device=config.nmcli_device,
                throttle=config.throttle,
                command_timeout=config.command_timeout_s,
            )
        )

    async def snapshot(self) -> DeviceSnapshot:
        return await asyncio.to_thread(collect_snapshot, self._probes)

"""The live simulator's eligibility is event-driven: ``SimSnapshotSource`` wakes the agent
(``on_change``) when the device's availability next flips, so agents can probe rarely."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from firmware_sim.live import LiveOptions
from firmware_sim.live_devices import DeviceGroup, SimSnapshotSource
from firmware_sim.scenario import SimConfig, build_scenario


def _source(
    profile: str, time_scale: float, tmp_path: Path
) -> tuple[SimSnapshotSource, dict[int, float]]:
    """Device 0's snapshot source, and the group's absences (device -> monotonic end)."""
    cfg = SimConfig.build(
        devices=4, dataset="digits", num_samples=200, min_examples=16, profile=profile
    )
    options = LiveOptions(time_scale=time_scale)
    group = DeviceGroup(build_scenario(cfg), options, "mqtt://127.0.0.1:1", [0], tmp_path, 0.0)
    group.shared.t0 = time.monotonic()
    return SimSnapshotSource(group.shared, 0), group.shared.away_until


async def _woken(source: SimSnapshotSource) -> tuple[bool, bool]:
    """Availability at a snapshot, and at the snapshot taken when ``on_change`` fired."""
    woke = asyncio.Event()
    source.on_change = woke.set
    before = (await source.snapshot()).on_mains
    await asyncio.wait_for(woke.wait(), timeout=10.0)
    return before, (await source.snapshot()).on_mains


def test_an_availability_flip_wakes_the_agent(tmp_path: Path) -> None:
    # vehicle: bursty availability, on ~30 min / off ~60 min (simulated); at 1e-5 wall seconds
    # per simulated second a flip is a few tens of milliseconds away
    source, _ = _source("vehicle", 1e-5, tmp_path)

    before, after = asyncio.run(_woken(source))

    assert after is not before  # woken when the answer changed, and it had changed


def test_the_end_of_an_absence_wakes_the_agent(tmp_path: Path) -> None:
    source, away_until = _source("lab", 0.05, tmp_path)  # always available
    away_until[0] = time.monotonic() + 0.2  # a dropout's absence, as SimTrainer marks it

    before, after = asyncio.run(_woken(source))

    assert (before, after) == (False, True)

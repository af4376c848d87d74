"""``edgefl monitor --once --json`` against a fleet under central DP: the real aggregator
(``privacy``: cap 2 flushes per device, K = 3) and three real device agents on a real
Mosquitto. Once every device has spent its budget, the monitor's snapshot (taken by the CLI in a
separate process, from the retained server state) shows the aggregator's own ε, δ, z, C, cap,
most participations and participation histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fleet_parts
import pytest
from test_monitor_fleet import DEVICES, FLEET, MODEL, agent, monitor_once
from waiting import eventually

from broker.launcher import MosquittoBroker
from edgefl.privacy import CentralDP
from firmware_sim.fake_sysfs import write_fake_sysfs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(150)]

K, CAP = 3, 2
DP = CentralDP(clip_norm=1.0, noise_multiplier=1.0, target_epsilon=None, max_participations=CAP)


async def test_once_json_shows_the_aggregators_privacy_figures(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange: three devices, K = 3 and one update per device per buffer: every flush holds
    # one update of each device, so after 2 flushes all three are at the cap
    write_fake_sysfs(tmp_path / "fs", mains=True)
    aggregator = fleet_parts.aggregator(
        tmp_path,
        mosquitto.url,
        fleet=FLEET,
        model=MODEL,
        buffer_size=K,
        metrics_interval_s=0.5,
        privacy=DP,
        normalisation="sum",
        example_weighting="equal",
        norm_bound="off",
    )
    agents = [agent(tmp_path, mosquitto.url, d, i) for i, d in enumerate(DEVICES)]

    def spent() -> bool:
        p = aggregator.statistics().privacy
        return p is not None and p.devices == len(DEVICES) and min(p.participation_histogram) == CAP

    # Act
    async with fleet_parts.running_fleet(aggregator, agents):
        await eventually(spent, 90, what="every device at the cap")
        snapshot: dict[str, Any] = {}
        for _ in range(20):  # the retained state is republished with the metrics (0.5 s)
            snapshot = await monitor_once(mosquitto.url)
            seen = snapshot["aggregator"]["privacy"]
            if seen is not None and seen["participation_histogram"] == {str(CAP): len(DEVICES)}:
                break
        stats = aggregator.statistics().privacy

    # Assert
    assert stats is not None
    dp = snapshot["aggregator"]["privacy"]
    assert dp is not None
    assert dp["epsilon"] == pytest.approx(stats.epsilon)
    assert dp["epsilon"] == pytest.approx(DP.epsilon(CAP))
    assert (dp["delta"], dp["noise_multiplier"], dp["clip_norm"]) == (1e-5, 1.0, 1.0)
    assert (dp["participation_cap"], dp["participation_max"]) == (CAP, CAP)
    assert (dp["devices"], dp["at_cap"], dp["p50"], dp["p90"]) == (3, 3, CAP, CAP)
    assert dp["participation_histogram"] == {str(CAP): 3}
    assert dp["budget_used"] == 1.0

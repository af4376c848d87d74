"""``edgefl sim --mode live --dp``: the live aggregator runs central DP. Each device takes part
in at most ``cap`` flushes; the lease desk grants no lease past it, so the run applies exactly
``devices * cap`` updates however long it goes on."""

from __future__ import annotations

import pytest

from broker.launcher import MosquittoBroker
from edgefl.aggregation import Normalisation
from edgefl.privacy import CentralDP, parse_dp
from firmware_sim.live import LiveOptions, run_live
from firmware_sim.scenario import SimConfig

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_a_live_run_stops_at_every_devices_participation_cap(mosquitto: MosquittoBroker) -> None:
    dp = parse_dp("central:z=1.0,C=1.0,cap=2,seed=1")
    assert isinstance(dp, CentralDP)
    cfg = SimConfig(
        devices=10,
        dataset="digits",
        profile="lab",
        concurrency=6,
        buffer_size=3,
        normalisation=Normalisation.SUM,
        norm_bound="off",
        target=1.0,
        max_wall_s=25.0,
        privacy=dp,
    )

    result = run_live(cfg, LiveOptions(broker_url=mosquitto.url, fleet="livedp", time_scale=0.02))

    s = result.record.summary(cfg.target)
    assert s["updates_applied"] == 10 * 2, s  # every device used its cap, and no more
    assert s["model_versions"] >= 20 // 3  # one flush per K = 3 updates

"""``edgefl sim --mode live --dp``: the live aggregator runs central DP. Each device takes part
in at most ``cap`` flushes; the lease desk grants no lease past it, so the run applies exactly
``devices * cap`` updates however long it goes on. Under ``--dp local:...`` every agent noises
its updates and keeps its ledger; a budget that fits 2 updates stops each device after 2."""

from __future__ import annotations

import pytest

from broker.launcher import MosquittoBroker
from edgefl.aggregation import Normalisation
from edgefl.privacy import CentralDP, LocalDP, parse_dp
from firmware_sim.live import LiveOptions, run_live
from firmware_sim.local_dp import epsilon_after
from firmware_sim.scenario import SimConfig

pytestmark = [pytest.mark.integration, pytest.mark.heavy]


@pytest.mark.slow
def test_a_live_run_stops_at_every_devices_participation_cap(mosquitto: MosquittoBroker) -> None:
    dp = parse_dp("central:z=1.0,C=1.0,cap=2,seed=1")
    assert isinstance(dp, CentralDP)
    cfg = SimConfig.build(
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

    s = result.record.summary(cfg.stop.target)
    assert s["updates_applied"] == 10 * 2, s  # every device used its cap, and no more
    assert s["model_versions"] >= 20 // 3  # one flush per K = 3 updates
    # the ε series comes from the aggregator's privacy statistics, one point per new version
    series = result.record.privacy()
    assert len(series.t) >= 1
    assert list(series.version) == sorted(set(series.version))
    assert s["privacy"]["participation_max"] == 2
    assert s["privacy"]["epsilon"] == pytest.approx(dp.epsilon(2))
    assert series.epsilon[-1] == pytest.approx(dp.epsilon(2))


@pytest.mark.slow
def test_live_devices_noise_their_updates_and_stop_at_their_budget(
    mosquitto: MosquittoBroker,
) -> None:
    dp = parse_dp("local:gaussian,eps=2,C=1,budget=3")  # 2 updates fit (ε 2.95), not 3 (3.72)
    assert isinstance(dp, LocalDP)
    assert epsilon_after(dp, 2) <= 3.0 < epsilon_after(dp, 3)
    cfg = SimConfig.build(
        devices=6,
        dataset="digits",
        profile="lab",
        concurrency=4,
        buffer_size=2,
        target=1.0,
        max_wall_s=25.0,
        local_dp=dp,
    )

    result = run_live(cfg, LiveOptions(broker_url=mosquitto.url, fleet="localdp", time_scale=0.02))

    s = result.record.summary(cfg.stop.target)
    local = s["local_privacy"]
    # every agent's ledger: 2 noised updates, the ε of their composition, budget spent
    assert local["updates"] == 6 * 2, local
    assert local["exhausted"] == 6
    assert local["epsilon_max"] == pytest.approx(epsilon_after(dp, 2))
    assert local["epsilon_mean"] == pytest.approx(epsilon_after(dp, 2))
    assert local["noise_scale"] == pytest.approx(dp.noise_scale)
    # the budget stopped training: nothing more reached the aggregator in the time left
    assert s["updates_applied"] + sum(s["updates_rejected"].values()) == 6 * 2, s
    assert result.agent_totals["updates_sent"] == 6 * 2

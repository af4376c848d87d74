"""Central DP reaches the virtual simulator's core through SimConfig, and a small run reports it."""

from __future__ import annotations

import json

import pytest
from sim_samples import private_sim_config

from edgefl.aggregation import AggregationSettings, Algorithm, FedBuffCore, Normalisation
from edgefl.privacy import CentralDP
from firmware_sim.scenario import SimConfig, build_scenario
from firmware_sim.virtual import VirtualSimulator

DP = CentralDP(
    clip_norm=0.5, noise_multiplier=2.0, target_epsilon=None, max_participations=2, seed=1
)


def test_simconfig_passes_privacy_to_the_fedbuff_config() -> None:
    cfg = SimConfig.build(privacy=DP, normalisation=Normalisation.SUM, norm_bound="off")

    core_config = cfg.aggregation_settings().core_config()

    assert core_config.privacy is DP  # type: ignore[union-attr]
    assert json.dumps(cfg.to_dict())  # the run record stays JSON


def test_dp_with_fedavg_is_refused() -> None:
    with pytest.raises(ValueError, match="fedbuff only"):
        AggregationSettings(algorithm=Algorithm.FEDAVG, privacy=DP)


def test_a_virtual_run_enforces_the_cap_and_reports_epsilon() -> None:
    cfg = private_sim_config(DP)
    sim = VirtualSimulator(build_scenario(cfg))

    sim.run()

    assert isinstance(sim.core, FedBuffCore)
    stats = sim.core.statistics().privacy
    assert stats is not None
    assert stats.participation_max == 2  # 40 updates from 8 devices: everyone hit the cap of 2
    assert stats.epsilon == pytest.approx(DP.epsilon(2))
    counts = sim.record.outcome_counts()
    # the lease draw skips devices central DP would refuse, as the aggregator's lease desk does:
    # no training is wasted on a capped device, the run ends once every device is capped
    assert "rejected:dp_budget_exhausted" not in counts, counts
    assert "rejected:dp_one_per_buffer" not in counts, counts
    assert counts["applied"] == 8 * 2
    assert sum(stats.participation_histogram.values()) == stats.devices

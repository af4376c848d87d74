"""The default ``edgefl sim`` comparison carries the claim, and the lab fleet keeps its 4x
(issue 17's done-when, seed 7)."""

from __future__ import annotations

import pytest

from firmware_sim.record import Algorithm
from firmware_sim.scenario import SimConfig, build_scenario
from firmware_sim.slots import starved
from firmware_sim.virtual import run_virtual


def _compare(cfg: SimConfig) -> tuple[dict[str, object], dict[str, object]]:
    scenario = build_scenario(cfg)
    runs = []
    for algo in (Algorithm.FEDBUFF, Algorithm.FEDAVG):
        record = run_virtual(cfg.replace(algorithm=algo), scenario=scenario).record
        assert record.utilisation is not None
        assert not starved(record.utilisation)
        runs.append(record.summary(cfg.stop.target))
    return runs[0], runs[1]


def _speedup_and_update_ratio(cfg: SimConfig) -> tuple[float, float]:
    fedbuff, fedavg = _compare(cfg)
    buff_t, avg_t = fedbuff["time_to_target_s"], fedavg["time_to_target_s"]
    assert isinstance(buff_t, float)
    assert isinstance(avg_t, float)
    buff_n, avg_n = fedbuff["updates_to_target"], fedavg["updates_to_target"]
    assert isinstance(buff_n, int)
    assert isinstance(avg_n, int)
    return avg_t / buff_t, buff_n / avg_n


@pytest.mark.slow
@pytest.mark.heavy
def test_the_default_fleet_shows_fedbuff_twice_as_fast_within_the_update_budget() -> None:
    speedup, updates = _speedup_and_update_ratio(SimConfig.build(seed=7))
    assert speedup >= 2.0
    assert updates <= 1.2


@pytest.mark.slow
@pytest.mark.heavy
def test_the_lab_fleet_keeps_fedbuff_four_times_as_fast() -> None:
    # `edgefl sim --compare fedbuff,fedavg --seed 7 --profile lab`: 4.73x with K = 3
    speedup, updates = _speedup_and_update_ratio(SimConfig.build(seed=7, profile="lab"))
    assert speedup >= 4.0
    assert updates <= 1.2

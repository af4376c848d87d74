"""The default ``edgefl sim`` comparison carries the claim (issue 17's done-when, seed 7)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from firmware_sim.record import Algorithm
from firmware_sim.scenario import SimConfig, build_scenario
from firmware_sim.slots import starved
from firmware_sim.virtual import run_virtual


def _compare(cfg: SimConfig) -> tuple[dict[str, object], dict[str, object]]:
    scenario = build_scenario(cfg)
    runs = []
    for algo in (Algorithm.FEDBUFF, Algorithm.FEDAVG):
        record = run_virtual(replace(cfg, algorithm=algo), scenario=scenario).record
        assert record.utilisation is not None
        assert not starved(record.utilisation)
        runs.append(record.summary(cfg.target))
    return runs[0], runs[1]


@pytest.mark.slow
def test_the_default_fleet_shows_fedbuff_twice_as_fast_within_the_update_budget() -> None:
    fedbuff, fedavg = _compare(SimConfig(seed=7))

    buff_t, avg_t = fedbuff["time_to_target_s"], fedavg["time_to_target_s"]
    assert isinstance(buff_t, float)
    assert isinstance(avg_t, float)
    assert avg_t / buff_t >= 2.0
    buff_n, avg_n = fedbuff["updates_to_target"], fedavg["updates_to_target"]
    assert isinstance(buff_n, int)
    assert isinstance(avg_n, int)
    assert buff_n <= 1.2 * avg_n

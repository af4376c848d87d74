"""Local DP in the virtual simulator (firmware_sim/local_dp.py): the product's mechanism on each
simulated device's update, its per-device ledger and the budget that retires a device."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from sim_samples import private_sim_config

from edgefl.privacy import LocalDP, LocalSpend
from firmware_sim.local_dp import (
    FleetLocalDP,
    epsilon_after,
    from_totals,
    histogram_totals,
    summarize,
)
from firmware_sim.scenario import SimConfig, build_scenario
from firmware_sim.virtual import VirtualSimulator

GAUSS = LocalDP(clip_norm=0.5, epsilon=2.0, delta=1e-5, budget_epsilon=7.0)


def _config(dp: LocalDP | None, **fields: Any) -> SimConfig:
    """The central DP sample run's fleet and data, with local DP instead."""
    values: dict[str, Any] = {"max_updates": 60, "eval_every_updates": 20, "seed": 3}
    values.update(fields, local_dp=dp)
    return private_sim_config(None, **values)


def test_epsilon_after_is_the_ledgers_composition() -> None:
    spend = LocalSpend()
    for n in range(1, 5):
        spend = spend.add(GAUSS.privatize(np.ones(10, np.float32), np.random.default_rng(n)))
        assert epsilon_after(GAUSS, n) == pytest.approx(spend.epsilon(GAUSS.delta))
    laplace = LocalDP(mechanism="laplace", clip_norm=1.0, epsilon=0.5)  # type: ignore[arg-type]
    assert epsilon_after(laplace, 3) == pytest.approx(1.5)
    assert epsilon_after(GAUSS, 0) == 0.0


def test_fleet_release_clips_noises_charges_and_retires() -> None:
    fleet = FleetLocalDP(GAUSS, seed=1)
    delta = np.full(400, 10.0, np.float32)  # norm 200, clipped to 0.5
    out = fleet.release(3, delta)
    noise = out - delta * (GAUSS.clip_norm / float(np.linalg.norm(delta)))
    assert float(np.std(noise)) == pytest.approx(GAUSS.noise_scale, rel=0.15)
    again = FleetLocalDP(GAUSS, seed=1).release(3, delta)
    assert np.array_equal(out, again)  # deterministic per (seed, device, update number)
    assert not np.array_equal(out, FleetLocalDP(GAUSS, seed=2).release(3, delta))
    n = 1
    while 3 not in fleet.exhausted:
        fleet.release(3, delta)
        n += 1
    assert fleet.epsilon(3) == pytest.approx(epsilon_after(GAUSS, n))
    assert fleet.epsilon(3) <= 7.0 < epsilon_after(GAUSS, n + 1)  # the next one would pass it


def test_live_totals_summed_over_processes_give_the_same_summary() -> None:
    one = histogram_totals([2], 1)
    other = histogram_totals([2], 0)
    third = histogram_totals([5], 3)
    totals: dict[str, int] = {}
    for part in (one, other, third):
        for k, v in part.items():
            totals[k] = totals.get(k, 0) + v
    s = from_totals(GAUSS, totals, devices=4)
    assert s == summarize(GAUSS, {2: 2, 5: 1}, 4, 4)
    assert s.updates == 9
    assert s.epsilon_max == pytest.approx(epsilon_after(GAUSS, 5))
    assert s.epsilon_mean == pytest.approx(
        (2 * epsilon_after(GAUSS, 2) + epsilon_after(GAUSS, 5)) / 4
    )
    assert s.exhausted == (0 if epsilon_after(GAUSS, 6) <= 7.0 else 1)
    assert s.refused == 4


def test_a_virtual_run_noises_every_update_and_stops_devices_at_their_budget() -> None:
    cfg = _config(GAUSS, max_updates=500)  # ends when every budget is spent
    sim = VirtualSimulator(build_scenario(cfg))
    sim.run()

    assert sim.local_dp is not None
    spent = sim.local_dp.spent
    applied = sim.record.outcome_counts().get("applied", 0)
    assert sum(s.updates for s in spent.values()) == sim.record.updates().outcome.size
    assert applied > 0
    per_device_cap = max(n for n in range(1, 50) if epsilon_after(GAUSS, n) <= 7.0)
    assert max(s.updates for s in spent.values()) == per_device_cap
    assert sim.local_dp.exhausted == {d for d, s in spent.items() if s.updates == per_device_cap}
    for d, s in spent.items():
        assert sim.local_dp.epsilon(d) == pytest.approx(epsilon_after(GAUSS, s.updates))
    summary = sim.record.summary(cfg.stop.target)["local_privacy"]
    assert summary["exhausted"] == len(sim.local_dp.exhausted) == cfg.devices  # all spent
    assert summary["epsilon_max"] <= 7.0
    assert json.dumps(summary)


def test_a_virtual_run_is_deterministic_per_seed() -> None:
    dp = LocalDP(clip_norm=0.5, epsilon=4.0)
    runs = [VirtualSimulator(build_scenario(_config(dp, max_updates=16))) for _ in range(2)]
    for sim in runs:
        sim.run()
    assert np.array_equal(runs[0].weights, runs[1].weights)
    other = VirtualSimulator(build_scenario(_config(dp, max_updates=16, seed=4)))
    other.run()
    assert not np.array_equal(runs[0].weights, other.weights)


def test_local_noise_reaches_the_model() -> None:
    """Same run with and without local DP: the noised one ends with another model."""
    plain = VirtualSimulator(build_scenario(_config(None, max_updates=8)))
    noised = VirtualSimulator(build_scenario(_config(GAUSS, max_updates=8)))
    plain.run()
    noised.run()
    assert "local_privacy" not in plain.record.summary(0.9)
    assert not np.allclose(plain.weights, noised.weights, atol=1e-3)

"""SimConfig's sections: flat options go to the right record and come back unchanged."""

from __future__ import annotations

import pytest

from edgefl.aggregation import Algorithm
from firmware_sim.scenario import SimConfig


def test_flat_options_round_trip() -> None:
    config = SimConfig.build(
        40, profile="lab", dropout=0.2, algorithm="fedavg", concurrency=8, norm_bound="off",
        target=0.7, max_updates=50, seed=3, codec="int4",
    )  # fmt: skip

    options = config.options()

    assert SimConfig.build(**options) == config
    assert (config.fleet.profile, config.fleet.dropout) == ("lab", 0.2)
    assert config.algorithm is Algorithm.FEDAVG
    assert (config.aggregation.concurrency, config.stop.target) == (8, 0.7)
    assert list(options)[:3] == ["devices", "algorithm", "profile"]  # summary.json's order


def test_replace_changes_one_option_and_keeps_the_rest() -> None:
    config = SimConfig.build(devices=10, buffer_size=5, max_updates=9)

    changed = config.replace(buffer_size=2, seed=7)

    assert (changed.aggregation.buffer_size, changed.seed) == (2, 7)
    assert (changed.devices, changed.stop.max_updates) == (10, 9)


def test_bad_options_are_refused() -> None:
    with pytest.raises(TypeError):
        SimConfig.build(buffer_sise=3)
    with pytest.raises(ValueError, match="target accuracy"):
        SimConfig.build(target=0.0)
    with pytest.raises(ValueError, match="devices"):
        SimConfig.build(devices=0)

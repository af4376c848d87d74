"""The FedBuff buffer normalisation is selectable from the aggregator and the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.aggregation import ExampleWeighting, Normalisation
from edgefl.aggregator import AggregatorConfig
from firmware_sim.scenario import SimConfig


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_aggregator_passes_normalisation_to_fedbuff(tmp_path: Path, mode: str) -> None:
    config = AggregatorConfig.build(
        broker_url="mqtt://127.0.0.1:1883",
        fleet="f",
        model="digits-mlp",
        state_dir=tmp_path,
        normalisation=Normalisation(mode),
    )

    assert config.fedbuff_config().normalisation is Normalisation(mode)


def test_simulator_sum_normalisation_uses_equal_example_weights() -> None:
    mean = SimConfig.build().aggregation_settings().core_config()
    summed = SimConfig.build(normalisation=Normalisation.SUM).aggregation_settings().core_config()

    assert mean.normalisation is Normalisation.MEAN  # type: ignore[union-attr]
    assert mean.example_weighting is ExampleWeighting.EXAMPLES  # type: ignore[union-attr]
    assert summed.normalisation is Normalisation.SUM  # type: ignore[union-attr]
    assert summed.example_weighting is ExampleWeighting.EQUAL  # type: ignore[union-attr]

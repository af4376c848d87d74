"""``FedBuff.snapshot(buffer=False)``: the model part only, no accumulator copied."""

from __future__ import annotations

import dataclasses

import numpy as np

from edgefl.aggregation import FedBuff, FedBuffConfig


def test_snapshot_without_buffer_copies_no_accumulator() -> None:
    # Arrange: one update buffered (K = 2), not yet applied
    fb = FedBuff(FedBuffConfig(buffer_size=2), np.zeros(3, np.float32))
    fb.add(np.ones(3, np.float32), base_version=0, num_examples=1)

    # Act
    full, model_only = fb.snapshot(), fb.snapshot(buffer=False)

    # Assert
    assert full.count == 1
    assert full.accumulator is not None
    assert (model_only.count, model_only.weight_sum, model_only.accumulator) == (0, 0.0, None)
    np.testing.assert_array_equal(model_only.weights, full.weights)
    assert dataclasses.replace(model_only, weights=full.weights).version == full.version

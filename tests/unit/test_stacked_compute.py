"""The live simulator's stacked trainings (firmware_sim/stacked_compute.py): trainings that
wait together run in one stack, each with the bits it gets alone; stopped ones resolve to None;
a bad one fails alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgefl.data.datasets import load_dataset
from edgefl.models.spec import get_model_spec
from edgefl.models.torch_models import init_weights
from edgefl.training import LocalTrainConfig, train_local
from firmware_sim.stacked_compute import StackedCompute, TrainingRequest

SPEC = get_model_spec("digits-mlp")


class Gate:
    """A first request's ``should_stop``: says when the compute thread asks, then holds it
    until opened (so the others queue behind it)."""

    def __init__(self) -> None:
        self.asked, self.opened = threading.Event(), threading.Event()

    def __call__(self) -> bool:
        self.asked.set()
        return not self.opened.wait(10)


def requests(n: int, gate: Gate | None = None) -> list[TrainingRequest]:
    """``n`` devices of 20-40 digits each, other seeds and bases; the first one's
    ``should_stop`` is ``gate`` when given."""
    ds = load_dataset("digits", seed=0)
    out = []
    for i in range(n):
        rows = slice(40 * i, 40 * i + 20 + 5 * i)
        out.append(
            TrainingRequest(
                SPEC,
                init_weights(SPEC, i),
                ds.x_train[rows],
                ds.y_train[rows],
                LocalTrainConfig(epochs=2, batch_size=8, lr=0.1, seed=10 + i),
                gate if gate is not None and i == 0 else (lambda: False),
            )
        )
    return out


def alone(r: TrainingRequest) -> np.ndarray:
    return train_local(r.spec, r.base, r.x, r.y, r.config, threads=1).delta


def test_trainings_that_wait_together_share_one_stack_with_the_bits_of_each_alone() -> None:
    # Arrange: the compute thread holds on the first request while four more queue
    gate = Gate()
    reqs = requests(5, gate)
    compute = StackedCompute()
    try:
        # Act
        outcomes = [compute.submit(reqs[0])]
        assert gate.asked.wait(10)
        outcomes += [compute.submit(r) for r in reqs[1:]]
        gate.opened.set()
        results = [o.result(timeout=60) for o in outcomes]
        stats = compute.statistics()
    finally:
        compute.shutdown()

    # Assert
    assert (stats.stacks, stats.trainings, stats.largest, stats.skipped) == (2, 5, 4, 0)
    for r, res in zip(reqs, results, strict=True):
        assert res is not None
        assert np.array_equal(res.delta, alone(r))


def test_a_stopped_training_resolves_to_none_and_the_others_train() -> None:
    reqs = requests(3)
    stopped = TrainingRequest(
        reqs[1].spec, reqs[1].base, reqs[1].x, reqs[1].y, reqs[1].config, lambda: True
    )
    compute = StackedCompute()
    try:
        results = [compute.submit(r).result(timeout=60) for r in (reqs[0], stopped, reqs[2])]
    finally:
        compute.shutdown()

    assert results[1] is None
    assert results[0] is not None
    assert np.array_equal(results[0].delta, alone(reqs[0]))
    assert results[2] is not None
    assert np.array_equal(results[2].delta, alone(reqs[2]))
    assert compute.statistics().skipped == 1


def test_a_bad_request_fails_alone() -> None:
    gate = Gate()
    first_req, good, other = requests(3, gate)
    bad = TrainingRequest(SPEC, good.base, good.x[:, :10], good.y, good.config, lambda: False)
    compute = StackedCompute()
    try:
        compute.submit(first_req)
        assert gate.asked.wait(10)
        outcomes = [compute.submit(r) for r in (good, bad, other)]  # one stack
        gate.opened.set()
        with pytest.raises(ValueError, match="wants"):
            outcomes[1].result(timeout=60)
        first, third = outcomes[0].result(timeout=60), outcomes[2].result(timeout=60)
    finally:
        compute.shutdown()

    assert first is not None
    assert np.array_equal(first.delta, alone(good))
    assert third is not None
    assert np.array_equal(third.delta, alone(other))


def test_after_shutdown_nothing_is_taken() -> None:
    compute = StackedCompute()
    compute.shutdown()

    with pytest.raises(RuntimeError, match="shut down"):
        compute.submit(requests(1)[0])

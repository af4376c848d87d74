"""FedBuff: hand-checked steps, FedAvg equivalence, rejections, buffer bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from edgefl.aggregation import (
    AddableUpdate,
    ConstantStaleness,
    DenseUpdate,
    FedBuff,
    FedBuffConfig,
    Normalisation,
    NormBound,
    PolynomialStaleness,
    ServerOptimizerConfig,
)
from edgefl.errors import RejectReason, UpdateRejected


class CountingUpdate:
    """An AddableUpdate that is not a DenseUpdate and counts how it is used."""

    def __init__(self, delta: list[float]) -> None:
        self._delta = np.array(delta, dtype=np.float32)
        self.add_calls = 0
        self.dense_calls = 0

    @property
    def num_params(self) -> int:
        return int(self._delta.size)

    def squared_norm(self) -> float:
        return float(np.dot(self._delta.astype(np.float64), self._delta.astype(np.float64)))

    def add_to(self, out: NDArray[np.float32], weight: float) -> None:
        self.add_calls += 1
        out += np.float32(weight) * self._delta

    def to_dense(self) -> NDArray[np.float32]:
        self.dense_calls += 1
        return self._delta.copy()


def config(**overrides: object) -> FedBuffConfig:
    base: dict[str, object] = {
        "buffer_size": 2,
        "staleness": PolynomialStaleness(0.5),
        "max_staleness": 10,
        "norm_bound": NormBound.off(),
    }
    base.update(overrides)
    return FedBuffConfig(**base)  # type: ignore[arg-type]


def upd(*values: float) -> DenseUpdate:
    return DenseUpdate(np.array(values, dtype=np.float32))


def test_counting_update_satisfies_protocol() -> None:
    update: AddableUpdate = CountingUpdate([1.0])
    assert update.num_params == 1


# --------------------------------------------------------------------------- hand-checked steps
def test_k2_mean_with_staleness_hand_checked() -> None:
    # A: delta [2, 4], tau 0, n 10          -> w = 10 * 1   = 10
    # B: delta [8, -4], tau 3 (base 0), n 20 -> w = 20 * 0.5 = 10
    # a = (10 [2, 4] + 10 [8, -4]) / 20 = [5, 0];  w = [1, 1] + [5, 0] = [6, 1]
    fb = FedBuff(config(), [1.0, 1.0], version=3)

    first = fb.add(upd(2.0, 4.0), base_version=3, num_examples=10)
    second = fb.add(upd(8.0, -4.0), base_version=0, num_examples=20)
    result = fb.step()

    assert (first.staleness, first.weight, first.ready) == (0, 10.0, False)
    assert (second.staleness, second.staleness_weight, second.weight) == (3, 0.5, 10.0)
    assert (second.buffer_fill, second.ready) == (2, True)
    np.testing.assert_allclose(fb.weights, [6.0, 1.0], rtol=1e-7)
    assert (result.previous_version, result.version, fb.version) == (3, 4, 4)
    assert (result.num_updates, result.weight_sum) == (2, 20.0)
    assert (result.mean_staleness, result.max_staleness) == (1.5, 3)
    assert result.aggregate_norm == pytest.approx(5.0)


def test_k2_sum_normalisation_divides_by_k() -> None:
    # a = (10 [2, 4] + 10 [8, -4]) / K=2 = [50, 0]; lr 0.1 -> w = [1, 1] + [5, 0]
    cfg = config(normalisation=Normalisation.SUM, server_optimizer=ServerOptimizerConfig.sgd(0.1))
    fb = FedBuff(cfg, [1.0, 1.0], version=3)

    fb.add(upd(2.0, 4.0), base_version=3, num_examples=10)
    fb.add(upd(8.0, -4.0), base_version=0, num_examples=20)
    fb.step()

    np.testing.assert_allclose(fb.weights, [6.0, 1.0], rtol=1e-6)


def test_mean_ignores_uniform_staleness_sum_does_not() -> None:
    mean = FedBuff(config(example_weighting="equal"), [0.0], version=3)
    summed = FedBuff(config(example_weighting="equal", normalisation="sum"), [0.0], version=3)
    for fb in (mean, summed):
        fb.add(upd(2.0), base_version=0, num_examples=1)  # tau 3, s = 0.5
        fb.add(upd(2.0), base_version=0, num_examples=1)
        fb.step()
    np.testing.assert_allclose(mean.weights, [2.0])
    np.testing.assert_allclose(summed.weights, [1.0])


def test_example_cap_applies() -> None:
    fb = FedBuff(config(example_cap=100, staleness=ConstantStaleness()), [0.0])
    outcome = fb.add(upd(1.0), base_version=0, num_examples=5000)
    fb.add(upd(0.0), base_version=0, num_examples=100)
    fb.step()
    assert outcome.weight == 100.0
    np.testing.assert_allclose(fb.weights, [0.5])


# --------------------------------------------------------------------------- FedAvg equivalence
@st.composite
def cohorts(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = draw(st.integers(min_value=1, max_value=6))
    p = draw(st.integers(min_value=1, max_value=8))
    elems = st.floats(min_value=-10, max_value=10, width=32)
    w0 = np.array(draw(st.lists(elems, min_size=p, max_size=p)), dtype=np.float32)
    deltas = np.array(
        draw(st.lists(st.lists(elems, min_size=p, max_size=p), min_size=k, max_size=k)),
        dtype=np.float32,
    )
    counts = np.array(draw(st.lists(st.integers(1, 1000), min_size=k, max_size=k)))
    return w0, deltas, counts


@settings(max_examples=60, deadline=None)
@given(cohorts())
def test_k_equals_cohort_is_weighted_fedavg(
    case: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    w0, deltas, counts = case
    cfg = FedBuffConfig(buffer_size=len(counts), norm_bound=NormBound.off())  # defaults otherwise
    fb = FedBuff(cfg, w0, version=7)

    for delta, n in zip(deltas, counts, strict=True):
        fb.add(DenseUpdate(delta), base_version=7, num_examples=int(n))
    assert fb.ready
    fb.step()

    expected = (
        w0.astype(np.float64)
        + (counts[:, None] * deltas.astype(np.float64)).sum(axis=0) / counts.sum()
    )
    np.testing.assert_allclose(fb.weights, expected, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- rejections
def rejected_reason(fb: FedBuff, update: AddableUpdate, base: int, n: int = 1) -> RejectReason:
    with pytest.raises(UpdateRejected) as info:
        fb.add(update, base_version=base, num_examples=n)
    return info.value.reason


def test_rejections_by_reason_leave_the_buffer_untouched() -> None:
    fb = FedBuff(config(max_staleness=2), [0.0, 0.0], version=5)

    assert rejected_reason(fb, upd(1.0, 1.0), base=2) is RejectReason.STALE  # tau 3 > 2
    assert rejected_reason(fb, upd(1.0, 1.0), base=6) is RejectReason.FUTURE_VERSION
    assert rejected_reason(fb, upd(1.0, 1.0, 1.0), base=5) is RejectReason.SHAPE_MISMATCH
    assert rejected_reason(fb, upd(1.0, 1.0), base=5, n=0) is RejectReason.BAD_EXAMPLES
    assert rejected_reason(fb, upd(np.nan, 1.0), base=5) is RejectReason.NON_FINITE
    assert rejected_reason(fb, upd(np.inf, 1.0), base=5) is RejectReason.NON_FINITE
    assert rejected_reason(fb, upd(1.0, 1.0), base=-1) is RejectReason.BAD_HEADER

    stats = fb.statistics()
    assert (fb.buffer_fill, stats.buffer_weight_sum, stats.accepted_total) == (0, 0.0, 0)
    assert sum(stats.rejected.values()) == 7
    assert stats.rejected[RejectReason.NON_FINITE] == 2
    assert fb.add(upd(1.0, 1.0), base_version=3, num_examples=1).staleness == 2  # at the limit


def test_overflowing_contribution_rejected() -> None:
    fb = FedBuff(config(example_cap=None), [0.0])
    assert rejected_reason(fb, upd(3e29), base=0, n=10) is RejectReason.NON_FINITE


def test_unbounded_staleness_when_max_is_none() -> None:
    fb = FedBuff(config(max_staleness=None), [0.0], version=10**6)
    assert fb.add(upd(1.0), base_version=0, num_examples=1).staleness == 10**6


# --------------------------------------------------------------------------- buffer bookkeeping
def test_version_increments_and_buffer_clears() -> None:
    fb = FedBuff(config(staleness=ConstantStaleness(), example_weighting="equal"), [0.0])
    for expected_version in (1, 2, 3):
        fb.add(upd(1.0), base_version=fb.version, num_examples=1)
        fb.add(upd(3.0), base_version=fb.version, num_examples=1)
        assert fb.step().version == expected_version
        assert (fb.buffer_fill, fb.ready, fb.statistics().buffer_weight_sum) == (0, False, 0.0)
    np.testing.assert_allclose(fb.weights, [6.0])  # three steps of mean 2
    assert fb.statistics().steps_total == 3


def test_overfull_buffer_steps_with_everything() -> None:
    fb = FedBuff(config(staleness=ConstantStaleness(), example_weighting="equal"), [0.0])
    for value in (1.0, 2.0, 6.0):
        outcome = fb.add(upd(value), base_version=0, num_examples=1)
    assert (outcome.buffer_fill, outcome.ready) == (3, True)
    assert fb.step().num_updates == 3
    np.testing.assert_allclose(fb.weights, [3.0])


def test_partial_flush_and_empty_step() -> None:
    fb = FedBuff(config(buffer_size=5), [0.0])
    with pytest.raises(RuntimeError, match="empty"):
        fb.step()
    fb.add(upd(4.0), base_version=0, num_examples=3)
    assert fb.step().num_updates == 1
    np.testing.assert_allclose(fb.weights, [4.0])


def test_default_mode_streams_and_never_densifies() -> None:
    fb = FedBuff(config(buffer_size=3), [0.0, 0.0])
    updates = [CountingUpdate([1.0, 2.0]) for _ in range(3)]
    for u in updates:
        fb.add(u, base_version=0, num_examples=1)
    fb.step()
    assert [(u.add_calls, u.dense_calls) for u in updates] == [(1, 0)] * 3
    assert fb._kept == []  # nothing retained


def test_weights_view_is_read_only() -> None:
    fb = FedBuff(config(), [1.0, 2.0])
    with pytest.raises(ValueError, match="read-only"):
        fb.weights[0] = 5.0


def test_initial_weights_are_copied() -> None:
    w0 = np.array([1.0, 2.0], dtype=np.float32)
    fb = FedBuff(config(), w0)
    w0[0] = 99.0
    assert fb.weights[0] == 1.0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"buffer_size": 0}, "buffer_size"),
        ({"max_staleness": -1}, "max_staleness"),
        ({"example_cap": 0}, "example cap"),
        ({"trim_beta": 0.5}, "trim beta"),
        ({"normalisation": "median"}, "median"),
    ],
)
def test_config_validation(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config(**overrides)


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], [], [np.nan]])
def test_bad_initial_weights(bad: list[float] | list[list[float]]) -> None:
    with pytest.raises(ValueError, match="weights"):
        FedBuff(config(), bad)


def test_dense_numpy_delta_is_accepted_directly() -> None:
    fb = FedBuff(config(buffer_size=1), [0.0, 0.0])
    fb.add(np.array([1.0, -1.0]), base_version=0, num_examples=1)
    fb.step()
    np.testing.assert_allclose(fb.weights, [1.0, -1.0])
    assert rejected_reason(fb, np.ones((1, 2)), base=1) is RejectReason.SHAPE_MISMATCH  # type: ignore[arg-type]


def test_non_integer_base_version_rejected() -> None:
    fb = FedBuff(config(), [0.0])
    assert rejected_reason(fb, upd(1.0), base=0.5) is RejectReason.BAD_HEADER  # type: ignore[arg-type]
    assert fb.add(upd(1.0), base_version=np.int64(0), num_examples=1).staleness == 0  # type: ignore[arg-type]

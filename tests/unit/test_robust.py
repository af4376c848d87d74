"""Norm bound (reject / clip / adaptive) and robust aggregators against a x100 attacker."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.typing import NDArray

from edgefl.aggregation import (
    ConstantStaleness,
    DenseUpdate,
    FedBuff,
    FedBuffConfig,
    robust,
)
from edgefl.errors import RejectReason, UpdateRejected

HONEST = np.array(
    [[1.0, 2.0, -1.0], [1.2, 1.8, -0.8], [0.8, 2.2, -1.2], [1.1, 1.9, -1.0]], dtype=np.float32
)
HONEST_MEAN = HONEST.astype(np.float64).mean(axis=0)  # [1.025, 1.975, -1.0]
MALICIOUS = -100.0 * HONEST[0]  # a honest-looking update scaled by -100


def fedbuff(k: int, num_params: int = 3, **overrides: object) -> FedBuff:
    base: dict[str, object] = {
        "buffer_size": k,
        "staleness": ConstantStaleness(),
        "example_weighting": "equal",
        "norm_bound": robust.NormBound.off(),
    }
    base.update(overrides)
    cfg = FedBuffConfig(**base)  # type: ignore[arg-type]
    return FedBuff(cfg, np.zeros(num_params, np.float32))


def run(fb: FedBuff, deltas: NDArray[np.float32]) -> NDArray[np.float64]:
    """Add every delta (skipping rejected ones), step, return the weight change."""
    for delta in deltas:
        with contextlib.suppress(UpdateRejected):
            fb.add(DenseUpdate(delta), base_version=0, num_examples=1)
    fb.step()
    return fb.weights.astype(np.float64)


def with_attacker() -> NDArray[np.float32]:
    return np.vstack([HONEST[:2], MALICIOUS[None, :], HONEST[2:]]).astype(np.float32)


# --------------------------------------------------------------------------- robust statistics
def test_trimmed_mean_and_median_by_hand() -> None:
    stack = np.array([[0.8], [1.0], [1.1], [1.2], [100.0]], dtype=np.float32)
    assert robust.trim_count(5, 0.2) == 1
    np.testing.assert_allclose(
        robust.trimmed_mean(stack, 0.2), [1.1], rtol=1e-6
    )  # mean(1.0, 1.1, 1.2)
    np.testing.assert_allclose(robust.trimmed_mean(stack, 0.0), [20.82], rtol=1e-6)
    np.testing.assert_allclose(robust.coordinate_median(stack), [1.1], rtol=1e-6)
    np.testing.assert_allclose(robust.coordinate_median(stack[:4]), [1.05], rtol=1e-6)  # even n


def test_trim_count_floor_and_validation() -> None:
    assert [robust.trim_count(n, 0.2) for n in (1, 4, 5, 9, 10)] == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="trim beta"):
        robust.trim_count(5, 0.5)


@pytest.mark.parametrize("mode", [robust.RobustMode.TRIMMED_MEAN, robust.RobustMode.MEDIAN])
def test_robust_modes_resist_one_of_five(mode: robust.RobustMode) -> None:
    resisted = run(fedbuff(5, robust=mode, trim_beta=0.2), with_attacker())
    plain = run(fedbuff(5), with_attacker())

    assert np.linalg.norm(resisted - HONEST_MEAN) < 0.2
    assert np.linalg.norm(plain - HONEST_MEAN) > 10.0


def test_trimmed_mean_exact_values() -> None:
    # attacker = [-100, -200, 100]; per coordinate drop the lowest and the highest of five:
    # [0.8, 1.0, 1.1] -> 0.9667; [1.8, 1.9, 2.0] -> 1.9; [-1.0, -1.0, -0.8] -> -0.9333
    result = run(fedbuff(5, robust=robust.RobustMode.TRIMMED_MEAN), with_attacker())
    np.testing.assert_allclose(result, [2.9 / 3, 1.9, -2.8 / 3], rtol=1e-6)


def test_robust_mode_keeps_updates_and_densifies_only_at_step() -> None:
    fb = fedbuff(2, robust=robust.RobustMode.MEDIAN)
    dense_calls = []

    class Spy(DenseUpdate):
        def to_dense(self) -> NDArray[np.float32]:
            dense_calls.append(1)
            return super().to_dense()

    fb.add(Spy(HONEST[0]), base_version=0, num_examples=1)
    fb.add(Spy(HONEST[1]), base_version=0, num_examples=1)
    assert dense_calls == []
    fb.step()
    assert len(dense_calls) == 2


def test_robust_sum_normalisation_scales_by_mean_weight() -> None:
    # identical deltas: robust centre = delta; scale = W / K = (1 + 0.5) / 2
    fb = FedBuff(
        FedBuffConfig(
            buffer_size=2,
            example_weighting="equal",  # type: ignore[arg-type]
            normalisation="sum",  # type: ignore[arg-type]
            robust=robust.RobustMode.MEDIAN,
            norm_bound=robust.NormBound.off(),
        ),
        np.zeros(1, np.float32),
        version=3,
    )
    fb.add(DenseUpdate([2.0]), base_version=3, num_examples=1)  # s(0) = 1
    fb.add(DenseUpdate([2.0]), base_version=0, num_examples=1)  # s(3) = 0.5
    fb.step()
    np.testing.assert_allclose(fb.weights, [1.5])


# --------------------------------------------------------------------------- norm bound
def test_reject_mode_drops_the_attacker_and_keeps_the_honest_mean() -> None:
    fb = fedbuff(4, norm_bound=robust.NormBound.static(5.0, robust.NormBoundMode.REJECT))

    result = run(fb, with_attacker())

    np.testing.assert_allclose(result, HONEST_MEAN, rtol=1e-6)
    assert fb.statistics().rejected == {RejectReason.NORM_BOUND: 1}


def test_clip_mode_bounds_the_attackers_influence() -> None:
    bound = 5.0
    fb = fedbuff(5, norm_bound=robust.NormBound.static(bound))
    clipped = []
    for delta in with_attacker():
        clipped.append(fb.add(DenseUpdate(delta), base_version=0, num_examples=1).clipped)
    fb.step()
    result = fb.weights.astype(np.float64)
    unclipped = run(fedbuff(5), with_attacker())

    assert clipped == [False, False, True, False, False]
    # the attacker enters as a delta of norm 5, so a = (4 h + 5 u) / 5
    distance = np.linalg.norm(result - HONEST_MEAN)
    assert distance <= (bound + np.linalg.norm(HONEST_MEAN)) / 5 + 1e-6
    assert distance < 0.05 * np.linalg.norm(unclipped - HONEST_MEAN)
    assert fb.statistics().clipped_total == 1


def test_clip_keeps_full_weight_in_the_denominator() -> None:
    # [10] clipped to [2]; W = 2 (not 1 + 0.2): a = (2 + 0) / 2 = 1
    fb = fedbuff(2, num_params=1, norm_bound=robust.NormBound.static(2.0))
    outcome = fb.add(DenseUpdate([10.0]), base_version=0, num_examples=1)
    fb.add(DenseUpdate([0.0]), base_version=0, num_examples=1)
    fb.step()
    assert outcome.clip_factor == pytest.approx(0.2)
    np.testing.assert_allclose(fb.weights, [1.0], rtol=1e-6)


def test_adaptive_bound_after_warmup() -> None:
    nb = robust.NormBound(adaptive_multiplier=2.0, adaptive_warmup=3, adaptive_window=10)
    fb = fedbuff(10, norm_bound=nb)
    outcomes = [
        fb.add(DenseUpdate([v, 0.0, 0.0]), base_version=0, num_examples=1)
        for v in (1.0, 2.0, 3.0, 40.0)
    ]

    assert [o.norm_bound for o in outcomes] == [None, None, None, 4.0]  # 2 * median(1, 2, 3)
    assert outcomes[3].clip_factor == pytest.approx(0.1)
    stats = fb.statistics()
    assert stats.norm_median == pytest.approx(2.5)  # window [1, 2, 3, 4]: clipped norm recorded
    assert stats.norm_bound == pytest.approx(5.0)


def test_adaptive_and_static_take_the_smaller() -> None:
    tracker = robust.NormTracker(
        robust.NormBound(max_norm=3.0, adaptive_multiplier=10.0, adaptive_warmup=1)
    )
    assert tracker.bound() == 3.0
    tracker.record(tracker.decide(0.1))
    assert tracker.bound() == pytest.approx(1.0)


def test_zero_median_does_not_bound() -> None:
    tracker = robust.NormTracker(robust.NormBound(adaptive_warmup=1))
    tracker.record(tracker.decide(0.0))
    assert tracker.bound() is None


def test_default_norm_bound_is_on_and_adaptive() -> None:
    nb = FedBuffConfig().norm_bound
    assert nb.enabled
    assert (nb.mode, nb.adaptive_multiplier, nb.max_norm) == (robust.NormBoundMode.CLIP, 5.0, None)
    assert not robust.NormBound.off().enabled


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_norm": 0.0}, "max_norm"),
        ({"adaptive_multiplier": -1.0}, "adaptive_multiplier"),
        ({"adaptive_warmup": 0}, "adaptive_warmup"),
        ({"adaptive_window": 5, "adaptive_warmup": 10}, "adaptive_window"),
        ({"mode": "drop"}, "drop"),
    ],
)
def test_norm_bound_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        robust.NormBound(**kwargs)  # type: ignore[arg-type]


@given(
    st.lists(
        st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=60,
    )
)
def test_norm_tracker_median_equals_numpy_median(norms: list[float]) -> None:
    tracker = robust.NormTracker(robust.NormBound(), history=norms)

    assert tracker.median() == float(np.median(np.asarray(norms, dtype=np.float64)))


@given(
    st.lists(
        st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=80,
    ),
    st.integers(min_value=1, max_value=12),
)
def test_norm_tracker_median_slides_with_the_window(norms: list[float], window: int) -> None:
    # Arrange: a window smaller than the stream, so old norms are evicted as new ones arrive
    tracker = robust.NormTracker(
        robust.NormBound(adaptive_window=window, adaptive_warmup=1, max_norm=None)
    )

    for i, norm in enumerate(norms):
        # Act: record an unbounded decision (the norm enters the window as is)
        tracker.record(robust.NormDecision(norm=norm, bound=None, clip_factor=1.0, reject=False))

        # Assert: the median of exactly the last `window` norms, and the window in order
        recent = norms[max(0, i + 1 - window) : i + 1]
        assert tracker.median() == float(np.median(np.asarray(recent, dtype=np.float64)))
        assert tracker.history().tolist() == recent

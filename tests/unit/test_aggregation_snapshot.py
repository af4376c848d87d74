"""snapshot()/restore(): resuming mid-buffer is bit-identical to never stopping."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.aggregation import (
    AddOutcome,
    DenseUpdate,
    FedBuff,
    FedBuffConfig,
    Normalisation,
    NormBound,
    RobustMode,
    ServerOptimizerConfig,
    StepResult,
)
from edgefl.errors import RejectReason, UpdateRejected

NUM_PARAMS = 6
EVENTS = 23


def events(seed: int = 11) -> list[tuple[np.ndarray, int, int]]:
    """(delta, lag behind the current version, num_examples); every 7th is a x100 outlier."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(EVENTS):
        delta = rng.normal(size=NUM_PARAMS).astype(np.float32)
        if i % 7 == 6:
            delta *= 100
        out.append((delta, int(rng.integers(0, 4)), int(rng.integers(1, 300))))
    return out


Trace = list[AddOutcome | StepResult | RejectReason]


def drive(
    fb: FedBuff, evts: list[tuple[np.ndarray, int, int]], trace: Trace | None = None
) -> FedBuff:
    """Feed ``evts``; every add outcome, rejection and step result goes into ``trace``."""
    out: Trace = [] if trace is None else trace
    for delta, lag, n in evts:
        try:
            out.append(
                fb.add(DenseUpdate(delta), base_version=max(0, fb.version - lag), num_examples=n)
            )
        except UpdateRejected as exc:
            out.append(exc.reason)
        if fb.ready:
            out.append(fb.step())
    return fb


CONFIGS = {
    "default-momentum": FedBuffConfig(
        buffer_size=3,
        norm_bound=NormBound(adaptive_warmup=3),
        server_optimizer=ServerOptimizerConfig.sgd(lr=0.8, momentum=0.9),
    ),
    "adam-reject": FedBuffConfig(
        buffer_size=4,
        max_staleness=2,
        norm_bound=NormBound(adaptive_warmup=3, mode="reject"),  # type: ignore[arg-type]
        server_optimizer=ServerOptimizerConfig.adam(lr=0.05, bias_correction=True),
    ),
    "trimmed-sum": FedBuffConfig(
        buffer_size=5,
        robust=RobustMode.TRIMMED_MEAN,
        normalisation=Normalisation.SUM,
        norm_bound=NormBound(adaptive_warmup=2),
    ),
    "median": FedBuffConfig(buffer_size=3, robust=RobustMode.MEDIAN),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("cut", [4, 10, 17])
def test_restore_mid_buffer_matches_uninterrupted_run(name: str, cut: int) -> None:
    # Arrange: one run straight through, and one cut at `cut` and resumed from a snapshot
    cfg = CONFIGS[name]
    evts = events()
    w0 = np.linspace(-1, 1, NUM_PARAMS, dtype=np.float32)
    straight_trace: Trace = []
    straight = drive(FedBuff(cfg, w0), evts, straight_trace)
    first_trace: Trace = []
    first = drive(FedBuff(cfg, w0), evts[:cut], first_trace)
    state = first.snapshot()
    assert state.count == first.buffer_fill
    resumed_trace = list(first_trace)
    prefix = len(first_trace)

    # Act
    drive(first, evts[cut:], first_trace)  # the original keeps going: the snapshot must not change
    resumed = drive(FedBuff.restore(cfg, state), evts[cut:], resumed_trace)

    # Assert: every outcome and step result (weights, staleness mean and max, clipping) equal,
    # and the resumed part holds steps that aggregate updates buffered before the cut
    assert any(isinstance(r, StepResult) for r in straight_trace[prefix:])
    assert resumed_trace == straight_trace
    assert first_trace == straight_trace
    np.testing.assert_array_equal(resumed.weights, straight.weights)
    assert resumed.statistics() == straight.statistics()
    np.testing.assert_array_equal(first.weights, straight.weights)


def test_restored_buffer_keeps_its_staleness_statistics() -> None:
    # Arrange: two buffered updates with staleness 2 and 0 (mean 1, max 2), then a snapshot
    fb = FedBuff(FedBuffConfig(buffer_size=3), np.zeros(2, np.float32), version=2)
    fb.add(DenseUpdate([1.0, 0.0]), base_version=0, num_examples=1)
    fb.add(DenseUpdate([0.0, 1.0]), base_version=2, num_examples=1)
    restored = FedBuff.restore(fb.config, fb.snapshot())

    # Act: the third update (staleness 0) completes the buffer
    restored.add(DenseUpdate([1.0, 1.0]), base_version=2, num_examples=1)
    step = restored.step()

    # Assert: (2 + 0 + 0) / 3 and max 2, as if never restored
    assert (step.mean_staleness, step.max_staleness) == (2 / 3, 2)


def test_some_snapshots_are_taken_mid_buffer() -> None:
    fills = [
        drive(FedBuff(cfg, np.zeros(NUM_PARAMS, np.float32)), events()[:cut]).buffer_fill
        for cfg in CONFIGS.values()
        for cut in (4, 10, 17)
    ]
    assert any(fill > 0 for fill in fills)


def test_restore_counts_and_reasons() -> None:
    fb = FedBuff(FedBuffConfig(buffer_size=3), np.zeros(2, np.float32), version=4)
    fb.add(DenseUpdate([1.0, 2.0]), base_version=4, num_examples=5)
    with pytest.raises(UpdateRejected):
        fb.add(DenseUpdate([1.0, 2.0]), base_version=9, num_examples=5)

    restored = FedBuff.restore(fb.config, fb.snapshot())

    assert (restored.version, restored.buffer_fill) == (4, 1)
    assert restored.statistics().rejected == {RejectReason.FUTURE_VERSION: 1}


def test_restore_rejects_incompatible_config() -> None:
    sgd = FedBuff(FedBuffConfig(), np.zeros(2, np.float32))
    sgd.add(DenseUpdate([1.0, 2.0]), base_version=0, num_examples=5)
    state = sgd.snapshot()
    with pytest.raises(ValueError, match="optimizer"):
        FedBuff.restore(FedBuffConfig(server_optimizer=ServerOptimizerConfig.adam()), state)
    with pytest.raises(ValueError, match="robust"):
        FedBuff.restore(FedBuffConfig(robust=RobustMode.MEDIAN), state)


def test_restore_may_change_lr_and_k() -> None:
    fb = FedBuff(FedBuffConfig(buffer_size=3), np.zeros(1, np.float32))
    fb.add(DenseUpdate([2.0]), base_version=0, num_examples=1)
    cfg = FedBuffConfig(buffer_size=1, server_optimizer=ServerOptimizerConfig.sgd(lr=0.5))
    restored = FedBuff.restore(cfg, fb.snapshot())
    assert restored.ready
    restored.step()
    np.testing.assert_allclose(restored.weights, [1.0])

"""snapshot()/restore(): resuming mid-buffer is bit-identical to never stopping."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from edgefl.aggregation import (
    DenseUpdate,
    FedBuff,
    FedBuffConfig,
    Normalisation,
    NormBound,
    RobustMode,
    ServerOptimizerConfig,
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


def drive(fb: FedBuff, evts: list[tuple[np.ndarray, int, int]]) -> FedBuff:
    for delta, lag, n in evts:
        with contextlib.suppress(UpdateRejected):
            fb.add(DenseUpdate(delta), base_version=max(0, fb.version - lag), num_examples=n)
        if fb.ready:
            fb.step()
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
    cfg = CONFIGS[name]
    evts = events()
    w0 = np.linspace(-1, 1, NUM_PARAMS, dtype=np.float32)
    straight = drive(FedBuff(cfg, w0), evts)

    first = drive(FedBuff(cfg, w0), evts[:cut])
    state = first.snapshot()
    assert state.count == first.buffer_fill
    drive(first, evts[cut:])  # the original keeps going: the snapshot must not change
    resumed = drive(FedBuff.restore(cfg, state), evts[cut:])

    np.testing.assert_array_equal(resumed.weights, straight.weights)
    assert resumed.statistics() == straight.statistics()
    np.testing.assert_array_equal(first.weights, straight.weights)


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

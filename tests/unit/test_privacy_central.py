"""Central DP inside FedBuff: the noise, the clip after decoding, one update per device per
buffer, the participation cap across snapshots and replays, and privacy off is unchanged."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from edgefl.aggregation import (
    ConstantStaleness,
    DenseUpdate,
    ExampleWeighting,
    FedBuff,
    FedBuffConfig,
    Normalisation,
    NormBound,
    PolynomialStaleness,
    RobustMode,
)
from edgefl.codec import CodecConfig, CodecDescriptor, Quantization, encode_update, open_update
from edgefl.errors import RejectReason, UpdateRejected
from edgefl.privacy import CentralDP, PrivacyState


def dp(**overrides: object) -> CentralDP:
    base: dict[str, object] = {
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "delta": 1e-5,
        "target_epsilon": None,
        "max_participations": 100,
        "seed": 7,
    }
    base.update(overrides)
    return CentralDP(**base)  # type: ignore[arg-type]


def config(privacy: CentralDP | None, **overrides: object) -> FedBuffConfig:
    base: dict[str, object] = {
        "buffer_size": 2,
        "staleness": ConstantStaleness(),
        "example_weighting": ExampleWeighting.EQUAL,
        "normalisation": Normalisation.SUM,
        "norm_bound": NormBound.off(),
        "privacy": privacy,
    }
    base.update(overrides)
    return FedBuffConfig(**base)  # type: ignore[arg-type]


def zeros(p: int) -> DenseUpdate:
    return DenseUpdate(np.zeros(p, np.float32))


# ----------------------------------------------------------------------------- noise
def test_flush_noise_has_std_z_times_c_on_the_sum() -> None:
    p, k = 20_000, 4
    fb = FedBuff(config(dp(noise_multiplier=2.0, clip_norm=0.5), buffer_size=k), np.zeros(p))
    for i in range(k):
        fb.add(zeros(p), base_version=0, num_examples=1, device_id=f"d{i}")

    step = fb.step()

    noise_on_sum = fb.weights.astype(np.float64) * k  # w = 0 + (0 + noise) / K, server lr 1
    # the sample std of 20,000 normals has a relative standard error of 1/sqrt(2P) = 0.5%
    assert noise_on_sum.std() == pytest.approx(2.0 * 0.5, rel=0.03)
    assert abs(noise_on_sum.mean()) < 5 * 1.0 / math.sqrt(p)
    assert step.noise_std == pytest.approx(1.0)


def test_each_flush_draws_new_noise_and_a_fixed_seed_repeats_it() -> None:
    def two_flushes(seed: int | None) -> tuple[np.ndarray, np.ndarray]:
        fb = FedBuff(config(dp(seed=seed), buffer_size=1), np.zeros(1000))
        fb.add(zeros(1000), base_version=0, num_examples=1, device_id="a")
        fb.step()
        first = fb.weights.copy()
        fb.add(zeros(1000), base_version=1, num_examples=1, device_id="a")
        fb.step()
        return first, fb.weights - first

    a1, a2 = two_flushes(seed=3)
    b1, _ = two_flushes(seed=3)
    c1, _ = two_flushes(seed=None)
    d1, _ = two_flushes(seed=None)

    assert not np.array_equal(a1, a2)
    np.testing.assert_array_equal(a1, b1)
    assert not np.array_equal(c1, d1)  # OS entropy: two aggregators never share noise


# ----------------------------------------------------------------------------- clip
def test_no_update_enters_the_sum_above_c_after_int8_stochastic_rounding() -> None:
    p, c = 1000, 1.0
    fb = FedBuff(config(dp(clip_norm=c), buffer_size=100), np.zeros(p))
    codec = CodecConfig(quantization=Quantization.INT8, clip_norm=c)
    rng = np.random.default_rng(0)
    decoded_norms, entered = [], []
    for i in range(30):
        delta = rng.normal(size=p).astype(np.float32)
        encoded, _ = encode_update(delta, codec, rng=rng)  # the device clips, then rounds
        update = open_update(
            CodecDescriptor.from_dict(encoded.descriptor.to_dict()),
            encoded.body,
            num_params=p,
            max_decompressed=1 << 20,
        )
        before = fb.snapshot().accumulator
        assert before is not None

        fb.add(update, base_version=0, num_examples=1, device_id=f"d{i}")

        after = fb.snapshot().accumulator
        assert after is not None
        decoded_norms.append(math.sqrt(update.squared_norm()))
        diff = after.astype(np.float64) - before.astype(np.float64)
        entered.append(float(np.linalg.norm(diff)))
    assert max(decoded_norms) > c  # the rounding did make some decoded updates longer
    assert max(entered) <= c


def test_weights_above_one_are_bounded_so_one_device_moves_the_sum_by_at_most_c() -> None:
    cfg = config(
        dp(clip_norm=2.0),
        example_weighting=ExampleWeighting.EXAMPLES,
        example_cap=1000,
        staleness=PolynomialStaleness(0.5),
        max_staleness=None,
    )
    fb = FedBuff(cfg, np.zeros(2))

    out = fb.add(np.array([3.0, 4.0], np.float32), base_version=0, num_examples=500, device_id="a")

    acc = fb.snapshot().accumulator
    assert acc is not None
    assert out.weight == 1.0  # 500 examples x staleness 1, bounded to 1
    assert float(np.linalg.norm(acc)) == pytest.approx(2.0, rel=1e-5)
    assert float(np.linalg.norm(acc)) <= 2.0


# ----------------------------------------------------------------------------- one per buffer
def test_a_second_update_of_a_device_in_one_buffer_is_rejected_and_counted() -> None:
    fb = FedBuff(config(dp(), buffer_size=3), np.zeros(2))
    fb.add(np.ones(2, np.float32), base_version=0, num_examples=1, device_id="a")

    with pytest.raises(UpdateRejected) as caught:
        fb.add(np.ones(2, np.float32), base_version=0, num_examples=1, device_id="a")

    assert caught.value.reason is RejectReason.DP_ONE_PER_BUFFER
    assert not fb.privacy_admits("a")
    assert fb.statistics().rejected == {RejectReason.DP_ONE_PER_BUFFER: 1}
    assert fb.buffer_fill == 1
    fb.add(np.ones(2, np.float32), base_version=0, num_examples=1, device_id="b")
    fb.step()
    fb.add(np.ones(2, np.float32), base_version=1, num_examples=1, device_id="a")  # a new buffer


def test_dp_needs_the_device_id() -> None:
    fb = FedBuff(config(dp()), np.zeros(2))
    with pytest.raises(ValueError, match="device_id"):
        fb.add(np.ones(2, np.float32), base_version=0, num_examples=1)


# ----------------------------------------------------------------------------- cap
def _flush_one(fb: FedBuff, device: str) -> None:
    fb.add(np.ones(3, np.float32), base_version=fb.version, num_examples=1, device_id=device)
    fb.step()


def test_the_cap_holds_across_snapshot_restore_and_a_replayed_update() -> None:
    cfg = config(dp(max_participations=2), buffer_size=1)
    fb = FedBuff(cfg, np.zeros(3))
    _flush_one(fb, "a")
    restored = FedBuff.restore(cfg, fb.snapshot(buffer=False))  # a restart after one flush
    _flush_one(restored, "a")
    replay = np.ones(3, np.float32)  # the same update, sent again

    with pytest.raises(UpdateRejected) as caught:
        restored.add(replay, base_version=restored.version, num_examples=1, device_id="a")

    assert caught.value.reason is RejectReason.DP_BUDGET_EXHAUSTED
    assert not restored.privacy_admits("a")
    assert restored.privacy_admits("b")
    stats = restored.statistics()
    assert stats.rejected == {RejectReason.DP_BUDGET_EXHAUSTED: 1}
    assert stats.privacy is not None
    assert stats.privacy.participation_max == 2
    assert stats.privacy.participation_histogram == {2: 1}
    assert stats.privacy.epsilon == pytest.approx(cfg.privacy.epsilon(2))  # type: ignore[union-attr]
    _flush_one(restored, "b")  # other devices go on


def test_a_checkpoint_keeps_the_open_buffers_devices() -> None:
    cfg = config(dp(), buffer_size=3)
    fb = FedBuff(cfg, np.zeros(3))
    fb.add(np.ones(3, np.float32), base_version=0, num_examples=1, device_id="a")

    restored = FedBuff.restore(cfg, fb.snapshot())

    with pytest.raises(UpdateRejected) as caught:
        restored.add(np.ones(3, np.float32), base_version=0, num_examples=1, device_id="a")
    assert caught.value.reason is RejectReason.DP_ONE_PER_BUFFER


def test_a_snapshot_buffer_without_its_devices_is_refused() -> None:
    fb = FedBuff(config(None, buffer_size=3), np.zeros(3))
    fb.add(np.ones(3, np.float32), base_version=0, num_examples=1)

    with pytest.raises(ValueError, match="no privacy state"):
        FedBuff.restore(config(dp(), buffer_size=3), fb.snapshot())


def test_clearing_the_buffer_without_a_step_costs_nothing() -> None:
    fb = FedBuff(config(dp(max_participations=1), buffer_size=2), np.zeros(3))
    fb.add(np.ones(3, np.float32), base_version=0, num_examples=1, device_id="a")

    fb.clear_buffer()
    _flush_one(fb, "a")

    stats = fb.statistics().privacy
    assert stats is not None
    assert stats.participation_max == 1


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"normalisation": Normalisation.MEAN}, "normalisation 'sum'"),
        ({"robust": RobustMode.MEDIAN}, "robust 'none'"),
        ({"norm_bound": NormBound()}, "adaptive"),
    ],
)
def test_settings_that_break_the_sensitivity_are_refused(
    overrides: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        config(dp(), **overrides)


def test_a_static_norm_bound_may_stay() -> None:
    fb = FedBuff(config(dp(clip_norm=5.0), norm_bound=NormBound.static(1.0)), np.zeros(2))

    out = fb.add(np.array([3.0, 4.0], np.float32), base_version=0, num_examples=1, device_id="a")

    assert out.clip_factor == pytest.approx(0.2)  # the smaller of the two bounds


# ----------------------------------------------------------------------------- privacy off
def test_privacy_off_is_the_documented_fedbuff_bit_for_bit() -> None:
    """Without privacy nothing of DP applies (two updates of one device in one buffer, weights
    above 1, no clip, no noise, mean normalisation) and the step is exactly w + A / W."""
    cfg = FedBuffConfig(buffer_size=3, norm_bound=NormBound.off())
    rng = np.random.default_rng(5)
    w0 = rng.normal(size=50).astype(np.float32)
    deltas = [rng.normal(size=50).astype(np.float32) * 10 for _ in range(3)]
    ns = [40, 300, 2000]
    fb = FedBuff(cfg, w0)

    for delta, n in zip(deltas, ns, strict=True):
        fb.add(delta, base_version=0, num_examples=n, device_id="same-device")
    step = fb.step()

    acc = np.zeros(50, np.float32)
    weights = [float(min(n, 1000)) for n in ns]
    for delta, w in zip(deltas, weights, strict=True):
        acc += np.float32(w) * delta
    expected = w0 + acc / np.float32(sum(weights))
    np.testing.assert_array_equal(fb.weights, expected)
    assert step.noise_std is None
    assert fb.privacy_admits("same-device")
    assert fb.statistics().privacy is None
    assert fb.snapshot().privacy is None


def test_the_privacy_state_survives_its_json_form() -> None:
    """What a store does: persist ``PrivacyState.to_json()`` beside the model, restore from it."""
    cfg = config(dp(max_participations=1), buffer_size=1)
    fb = FedBuff(cfg, np.zeros(3))
    _flush_one(fb, "a")
    state = fb.snapshot(buffer=False)
    assert state.privacy is not None
    stored = json.dumps(state.privacy.to_json())

    loaded = replace(state, privacy=PrivacyState.from_json(json.loads(stored)))
    restored = FedBuff.restore(cfg, loaded)

    with pytest.raises(UpdateRejected) as caught:
        _flush_one(restored, "a")
    assert caught.value.reason is RejectReason.DP_BUDGET_EXHAUSTED

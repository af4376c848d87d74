"""Fixed point on Z_(2^b): bit-exact weighted sums, the headroom bound, overflow detection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.secagg import RingSpec, SecAggError, SecAggReason, decode_sum, encode
from edgefl.secagg.ring import decode_signed, fixed_point_weight, weighted_add


def _ring_sum(encoded: list[np.ndarray], weights: list[int], spec: RingSpec) -> np.ndarray:
    acc = np.zeros(encoded[0].size, dtype=spec.dtype)
    scratch = np.empty_like(acc)
    for e, w in zip(encoded, weights, strict=True):
        weighted_add(acc, e, w, scratch)
    return acc


def test_encode_embeds_small_values_in_twos_complement() -> None:
    spec = RingSpec(bits=32, scale=4, clip_norm=10.0)
    # 0.25 * 4 = 1 and -0.5 * 4 = -2 are integers: stochastic rounding keeps them exactly
    encoded = encode(np.array([0.25, -0.5, 0.0], np.float32), spec, np.random.default_rng(0))
    assert encoded.tolist() == [1, 2**32 - 2, 0]


def test_encode_clips_to_the_l2_norm_first() -> None:
    spec = RingSpec(bits=32, scale=2**10, clip_norm=1.0)
    encoded = encode(np.array([3.0, 4.0], np.float32), spec, np.random.default_rng(0))
    # clipped to (0.6, 0.8), i.e. codes near (614.4, 819.2)
    assert encoded.view(np.int32).tolist() in ([614, 819], [615, 819], [614, 820], [615, 820])


def test_encode_is_deterministic_for_a_seed() -> None:
    spec = RingSpec()
    x = np.random.default_rng(1).standard_normal(500).astype(np.float32) * 0.01
    first = encode(x, spec, np.random.default_rng(7))
    again = encode(x, spec, np.random.default_rng(7))
    other = encode(x, spec, np.random.default_rng(8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_stochastic_rounding_is_unbiased() -> None:
    spec = RingSpec(bits=32, scale=1, clip_norm=1e6)
    x = np.full(20_000, 0.3, np.float32)
    codes = encode(x, spec, np.random.default_rng(3)).view(np.int32)
    assert set(codes.tolist()) == {0, 1}
    assert abs(codes.mean() - 0.3) < 0.02  # 6 standard deviations of the mean


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([32, 64]),
    n=st.integers(1, 6),
    p=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    w_max=st.integers(1, 1000),
    magnitude=st.sampled_from([1e-4, 0.1, 10.0]),
)
def test_decoded_sum_equals_the_plaintext_weighted_sum_bit_exact(
    bits: int, n: int, p: int, seed: int, w_max: int, magnitude: float
) -> None:
    spec = RingSpec.fit(bits=bits, clip_norm=1.0, buffer_size=n, w_max=w_max)
    rng = np.random.default_rng(seed)
    xs = [(rng.standard_normal(p) * magnitude).astype(np.float32) for _ in range(n)]
    weights = [int(w) for w in rng.integers(1, w_max + 1, size=n)]
    encoded = [encode(x, spec, rng) for x in xs]

    total = _ring_sum(encoded, weights, spec)
    signed = decode_signed(total, spec, weights)
    decoded = decode_sum(total, spec, weights)

    plain = sum(
        (w * e.view(spec.signed).astype(object) for e, w in zip(encoded, weights, strict=True)),
        start=np.zeros(p, dtype=object),
    )  # Python integers: no wrap, no rounding
    assert signed.tolist() == [int(v) for v in plain]
    if bits == 32:  # |v| < 2^31: the float64 decoding is exact too
        assert np.array_equal(decoded * spec.scale, signed.astype(np.float64))
    clipped = sum(
        w * _clipped(x) for x, w in zip(xs, weights, strict=True)
    )  # the float sum of the clipped inputs: within one rounding step per unit of weight
    assert np.all(np.abs(decoded - clipped) <= sum(weights) / spec.scale * 1.001 + 1e-12)


def _clipped(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    norm = float(np.linalg.norm(x64))
    return x64 if norm <= 1.0 else (x64 / norm).astype(np.float32).astype(np.float64)


def test_fit_meets_the_headroom_bound_and_is_the_largest() -> None:
    spec = RingSpec.fit(bits=32, clip_norm=1.0, buffer_size=10, w_max=256)
    assert spec.scale == 2**19
    assert 10 * 256 * spec.max_code <= 2**31 - 1
    bigger = RingSpec(bits=32, scale=2**20, clip_norm=1.0)
    assert 10 * 256 * bigger.max_code > 2**31 - 1


def test_a_wrapped_sum_is_detected_as_overflow() -> None:
    spec = RingSpec(bits=32, scale=2**20, clip_norm=1.0)
    big = RingSpec(bits=32, scale=2**30, clip_norm=1.0)  # a device that ignores the fleet scale
    x = np.array([0.9, -0.4], np.float32)
    encoded = [encode(x, big, np.random.default_rng(i)) for i in range(3)]
    with pytest.raises(SecAggError) as info:
        decode_sum(_ring_sum(encoded, [1, 1, 1], spec), spec, [1, 1, 1])
    assert info.value.reason is SecAggReason.OVERFLOW


def test_an_in_range_cheat_of_large_norm_is_detected() -> None:
    spec = RingSpec(bits=32, scale=2**10, clip_norm=1.0)
    # every coordinate at the per-coordinate bound: in range, but the norm is sqrt(P) * Q
    total = np.full(100, spec.max_code, dtype=np.int32).view(spec.dtype)
    with pytest.raises(SecAggError) as info:
        decode_sum(total, spec, [1])
    assert info.value.reason is SecAggReason.OVERFLOW


def test_an_honest_sum_at_the_bound_passes() -> None:
    spec = RingSpec(bits=32, scale=2**10, clip_norm=1.0)
    x = np.array([1.0, 0.0, 0.0], np.float32)  # norm exactly C, code up to Q on one coordinate
    encoded = [encode(x, spec, np.random.default_rng(i)) for i in range(4)]
    decoded = decode_sum(_ring_sum(encoded, [2, 2, 2, 2], spec), spec, [2, 2, 2, 2])
    assert decoded[0] == pytest.approx(8.0, abs=8 / spec.scale)


def test_weights_beyond_the_headroom_are_refused() -> None:
    spec = RingSpec(bits=32, scale=2**20, clip_norm=1.0)
    total = np.zeros(3, dtype=spec.dtype)
    with pytest.raises(SecAggError) as info:
        decode_sum(total, spec, [2**11])
    assert info.value.reason is SecAggReason.HEADROOM


def test_fixed_point_weight_rounds_and_keeps_at_least_one() -> None:
    assert fixed_point_weight(0.5, 256) == 128
    assert fixed_point_weight(1e-9, 256) == 1
    assert fixed_point_weight(3.0, 1) == 3
    with pytest.raises(ValueError, match="finite"):
        fixed_point_weight(float("nan"), 256)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"bits": 16}, "bits"), ({"scale": 3}, "power of two"), ({"clip_norm": 0.0}, "clip_norm")],
)
def test_ring_spec_refuses_bad_settings(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RingSpec(**kwargs)  # type: ignore[arg-type]


def test_one_coordinate_beyond_the_range_is_overflow_even_with_a_small_norm() -> None:
    spec = RingSpec(bits=32, scale=2**10, clip_norm=1.0)
    total = np.zeros(100, dtype=np.int64)
    total[7] = -(spec.sum_bound([3]) + 1)  # the L2 norm is far below the norm bound
    with pytest.raises(SecAggError) as info:
        decode_sum(total.astype(np.int32).view(spec.dtype), spec, [3])
    assert info.value.reason is SecAggReason.OVERFLOW

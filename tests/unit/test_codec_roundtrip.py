"""Round trips of every codec: exactness, error bounds, unbiasedness, packing, norms."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

from edgefl.codec import (
    CodecConfig,
    CodecDescriptor,
    EncodedUpdate,
    Quantization,
    decode_update,
    encode_update,
    open_update,
)
from edgefl.codec.layout import body_layout
from edgefl.codec.quantize import CHUNK

LIMIT = 1 << 26
INT_CODECS = [Quantization.INT8, Quantization.INT4, Quantization.INT2]
QMAX = {Quantization.INT8: 127, Quantization.INT4: 7, Quantization.INT2: 1}


def _roundtrip(
    x: NDArray[np.float32], config: CodecConfig, seed: int = 0
) -> tuple[EncodedUpdate, NDArray[np.float32]]:
    encoded, _ = encode_update(x, config, rng=np.random.default_rng(seed))
    descriptor = CodecDescriptor.from_dict(encoded.descriptor.to_dict())
    decoded = decode_update(descriptor, encoded.body, num_params=x.size, max_decompressed=LIMIT)
    return encoded, decoded


def _block_bound(x: NDArray[np.float32], block_size: int, qmax: int) -> NDArray[np.float64]:
    """Per-element error bound: the block's scale, max|x_b| / qmax (+ the 2**-12 margin), which
    the encoder raises to float32's smallest normal number for blocks of tiny values."""
    amax = np.abs(x.astype(np.float64))
    pad = (-x.size) % block_size
    amax = np.pad(amax, (0, pad)).reshape(-1, block_size).max(axis=1)
    scale = amax / qmax * (1 + 2**-12) * (1 + 1e-6)
    tiny = float(np.finfo(np.float32).tiny)
    scale = np.where(amax > 0, np.maximum(scale, tiny), scale)
    return np.repeat(scale, block_size)[: x.size]


vectors = st.integers(1, 300).flatmap(
    lambda n: hnp.arrays(
        np.float32, n, elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
    )
)
block_sizes = st.sampled_from([4, 8, 16, 64, 4096])


# ---------------------------------------------------------------------------------------------
# exactness and bounds (hypothesis)


@settings(max_examples=40, deadline=None)
@given(vectors, block_sizes)
def test_fp32_round_trip_is_exact(x: NDArray[np.float32], block_size: int) -> None:
    _, decoded = _roundtrip(x, CodecConfig(Quantization.FP32, block_size=block_size))

    np.testing.assert_array_equal(decoded, x)


@settings(max_examples=40, deadline=None)
@given(vectors)
def test_fp16_round_trip_within_half_ulp(x: NDArray[np.float32]) -> None:
    _, decoded = _roundtrip(x, CodecConfig(Quantization.FP16))

    # round to nearest: half an fp16 ulp relative (2**-11), 2**-25 absolute for subnormals
    bound = np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)
    assert np.all(np.abs(decoded - x) <= bound)


@pytest.mark.parametrize("quantization", INT_CODECS)
@settings(max_examples=40, deadline=None)
@given(x=vectors, block_size=block_sizes, seed=st.integers(0, 2**32))
def test_int_round_trip_within_block_scale(
    quantization: Quantization, x: NDArray[np.float32], block_size: int, seed: int
) -> None:
    config = CodecConfig(quantization, block_size=block_size)

    _, decoded = _roundtrip(x, config, seed)

    bound = _block_bound(x, block_size, QMAX[quantization])
    assert np.all(np.abs(decoded.astype(np.float64) - x) <= bound)


@pytest.mark.parametrize("quantization", list(Quantization))
@settings(max_examples=25, deadline=None)
@given(x=vectors, fraction=st.floats(0.001, 1.0), block_size=block_sizes)
def test_topk_round_trip_keeps_the_largest(
    quantization: Quantization, x: NDArray[np.float32], fraction: float, block_size: int
) -> None:
    config = CodecConfig(quantization, topk_fraction=fraction, block_size=block_size)
    k = config.topk_count(x.size)
    assert k is not None

    encoded, decoded = _roundtrip(x, config)

    assert encoded.descriptor.topk == k
    update = open_update(
        encoded.descriptor, encoded.body, num_params=x.size, max_decompressed=LIMIT
    )
    assert update.is_sparse
    assert update.nnz == k
    assert update.indices is not None
    kept = update.indices
    assert np.all(np.diff(kept) > 0)
    dropped = np.setdiff1d(np.arange(x.size), kept)
    assert np.all(decoded[dropped] == 0)
    if dropped.size:
        assert np.abs(x[kept]).min() >= np.abs(x[dropped]).max()
    if quantization is Quantization.FP32:
        np.testing.assert_array_equal(decoded[kept], x[kept])
    elif quantization in QMAX:
        bound = _block_bound(x[kept], block_size, QMAX[quantization])
        assert np.all(np.abs(decoded[kept].astype(np.float64) - x[kept]) <= bound)


# ---------------------------------------------------------------------------------------------
# small hand-checkable cases


def _raw_body(encoded: EncodedUpdate) -> bytes:
    return zstandard.ZstdDecompressor().decompress(encoded.body)


def test_int4_packs_odd_length_low_nibble_first() -> None:
    # block 0 = [1, 0, 0, 0] (scale 1/7), block 1 = [0] (scale 0)
    x = np.array([1.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)

    encoded, _ = encode_update(
        x, CodecConfig(Quantization.INT4, block_size=4), rng=np.random.default_rng(1)
    )

    raw = _raw_body(encoded)
    assert len(raw) == encoded.descriptor.raw_size == 16
    scales = np.frombuffer(raw[:8], dtype="<f4")
    assert scales[0] == pytest.approx(1 / 7, rel=1e-3)
    assert scales[1] == 0.0
    codes = raw[8:11]
    # x0/s ~ 6.998 -> q in {6, 7} -> code q + 8 in {14, 15}; zeros are code 8; padding is 8
    assert codes[0] in (0x8E, 0x8F)
    assert codes[1] == 0x88
    assert codes[2] == 0x88
    assert raw[11:] == bytes(5)


def test_int2_packs_four_per_byte() -> None:
    x = np.array([1.0, 0.0, 0.0, 0.0, 0.0, -1.0], dtype=np.float32)

    encoded, _ = encode_update(
        x, CodecConfig(Quantization.INT2, block_size=4), rng=np.random.default_rng(2)
    )

    raw = _raw_body(encoded)
    codes = raw[8:10]
    # q0 in {0, 1} -> code {2, 3}; zeros code 2 (0b10); x5 = -1 -> q in {-1, 0} -> code {1, 2}
    assert codes[0] in (0b10_10_10_10, 0b10_10_10_11)
    assert codes[1] & 0b11 == 0b10  # x4 = 0
    assert (codes[1] >> 2) & 0b11 in (1, 2)  # x5
    assert codes[1] >> 4 == 0b1010  # two padding slots carry the code of 0


def test_int8_hand_example() -> None:
    x = np.array([0.5, -0.25, 0.0, 0.125], dtype=np.float32)

    encoded, decoded = _roundtrip(x, CodecConfig(Quantization.INT8, block_size=4))

    raw = _raw_body(encoded)
    scale = float(np.frombuffer(raw[:4], dtype="<f4")[0])
    assert scale == pytest.approx(0.5 / 127, rel=1e-3)
    codes = np.frombuffer(raw[8:12], dtype=np.int8)
    assert codes[0] in (126, 127)
    assert codes[1] in (-64, -63)
    assert codes[2] == 0
    assert codes[3] in (31, 32)
    np.testing.assert_array_equal(decoded, codes.astype(np.float32) * np.float32(scale))


def test_zero_vector_encodes_to_zero_scales() -> None:
    x = np.zeros(10, dtype=np.float32)
    for quantization in Quantization:
        _, decoded = _roundtrip(x, CodecConfig(quantization, block_size=4))
        assert not decoded.any()


def test_subnormal_block_stays_within_bound() -> None:
    x = np.array([1e-40, -3e-41, 0.0, 2e-45], dtype=np.float32)

    _, decoded = _roundtrip(x, CodecConfig(Quantization.INT8, block_size=4))

    assert np.all(np.isfinite(decoded))
    assert np.all(np.abs(decoded.astype(np.float64) - x) <= 1.2e-38)


# ---------------------------------------------------------------------------------------------
# unbiasedness of stochastic rounding


def _mean_decoded(
    x: NDArray[np.float32], quantization: Quantization, reps: int
) -> NDArray[np.float64]:
    rng = np.random.default_rng(1234 + reps)
    config = CodecConfig(quantization, block_size=64)
    total = np.zeros(x.size, dtype=np.float64)
    for _ in range(reps):
        encoded, _ = encode_update(x, config, rng=rng)
        total += decode_update(
            encoded.descriptor, encoded.body, num_params=x.size, max_decompressed=LIMIT
        )
    return total / reps


@pytest.mark.parametrize("quantization", INT_CODECS)
def test_stochastic_rounding_is_unbiased_and_error_shrinks_like_sqrt_r(
    quantization: Quantization,
) -> None:
    # 64 values in one block, scale = 1/qmax: values sit at all fractional positions
    x = np.linspace(-1.0, 1.0, 64, dtype=np.float32)
    scale = 1.0 / QMAX[quantization]

    err_16 = np.abs(_mean_decoded(x, quantization, 16) - x).mean()
    err_1024 = np.abs(_mean_decoded(x, quantization, 1024) - x).mean()

    # one decoded value has standard deviation <= scale / 2; its mean over R reps <= scale/2/sqrt(R)
    assert err_1024 < 0.5 * scale / np.sqrt(1024) * 1.5
    # 1/sqrt(R) would give a factor 8; allow noise
    assert err_16 / err_1024 > 4.0


# ---------------------------------------------------------------------------------------------
# sizes, slicing, norms


@pytest.mark.parametrize("block_size", [4, 256, CHUNK, 2 * CHUNK])
@pytest.mark.parametrize("quantization", INT_CODECS)
def test_large_vectors_cross_slice_and_block_boundaries(
    quantization: Quantization, block_size: int
) -> None:
    rng = np.random.default_rng(3)
    n = 2 * CHUNK + 4 * CHUNK // 3 + 7  # several slices, odd tail
    x = rng.standard_normal(n).astype(np.float32)
    x[CHUNK + 5] = 40.0  # an outlier in one block only

    _, decoded = _roundtrip(x, CodecConfig(quantization, block_size=block_size))

    bound = _block_bound(x, block_size, QMAX[quantization])
    assert np.all(np.abs(decoded.astype(np.float64) - x) <= bound)


@pytest.mark.parametrize("quantization", list(Quantization))
@pytest.mark.parametrize("topk", [None, 0.05])
def test_squared_norm_matches_dense(quantization: Quantization, topk: float | None) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal(CHUNK + 1001).astype(np.float32)
    encoded, _ = encode_update(
        x, CodecConfig(quantization, topk_fraction=topk, block_size=512), rng=rng
    )

    update = open_update(
        encoded.descriptor, encoded.body, num_params=x.size, max_decompressed=LIMIT
    )
    dense = update.to_dense().astype(np.float64)

    assert update.squared_norm() == pytest.approx(float(np.dot(dense, dense)), rel=1e-6)


def test_compression_targets_on_gaussian() -> None:
    x = np.random.default_rng(5).standard_normal(1 << 16).astype(np.float32) * 0.01
    ratios = {}
    for name, config in {
        "int8": CodecConfig(Quantization.INT8),
        "int4": CodecConfig(Quantization.INT4),
        "topk1_int8": CodecConfig(Quantization.INT8, topk_fraction=0.01),
    }.items():
        encoded, _ = encode_update(x, config, rng=np.random.default_rng(0))
        ratios[name] = encoded.compression_ratio

    assert ratios["int8"] >= 4.0
    assert ratios["int4"] >= 7.0
    assert ratios["topk1_int8"] >= 50.0


def test_descriptor_raw_size_matches_layout() -> None:
    x = np.ones(1000, dtype=np.float32)

    encoded, _ = encode_update(
        x, CodecConfig(Quantization.INT4, block_size=64), rng=np.random.default_rng(0)
    )

    d = encoded.descriptor
    layout = body_layout(d.quantization, num_values=1000, block_size=64, index_dtype=None)
    assert d.raw_size == layout.raw_size == len(_raw_body(encoded))
    assert encoded.encoded_size == encoded.body_size + encoded.descriptor_size
    assert encoded.dense_size == 4000


@pytest.mark.parametrize("quantization", INT_CODECS)
def test_tiny_values_keep_a_normal_scale_and_the_error_bound(quantization: Quantization) -> None:
    # found by hypothesis in CI: max|x| / qmax is subnormal here; the encoder uses float32's
    # smallest normal scale instead, so every error stays below that scale
    x = np.array([3.329405e-38], dtype=np.float32)
    tiny = float(np.finfo(np.float32).tiny)

    for seed in range(20):
        _, decoded = _roundtrip(x, CodecConfig(quantization, block_size=4), seed)

        assert abs(float(decoded[0]) - float(x[0])) < tiny

"""Top-k with error feedback, clipping, and the Residual object."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from edgefl.codec import (
    CodecConfig,
    Quantization,
    Residual,
    decode_update,
    encode_update,
)
from edgefl.codec.sparsify import decode_gaps, encode_gaps, select_topk
from edgefl.errors import CodecError, RejectReason

LIMIT = 1 << 24


def _sent(
    encoded_delta: NDArray[np.float32],
    config: CodecConfig,
    rng: np.random.Generator,
    residual: Residual | None,
) -> tuple[NDArray[np.float32], Residual | None]:
    encoded, new_residual = encode_update(encoded_delta, config, rng=rng, residual=residual)
    sent = decode_update(
        encoded.descriptor, encoded.body, num_params=encoded_delta.size, max_decompressed=LIMIT
    )
    return sent, new_residual


@pytest.mark.parametrize("quantization", list(Quantization))
def test_error_feedback_loses_nothing_over_rounds(quantization: Quantization) -> None:
    rng = np.random.default_rng(11)
    n, rounds = 2000, 6
    config = CodecConfig(quantization, topk_fraction=0.02, block_size=16)
    deltas = [rng.standard_normal(n).astype(np.float32) for _ in range(rounds)]

    residual: Residual | None = None
    total_sent = np.zeros(n, dtype=np.float64)
    for delta in deltas:
        sent, residual = _sent(delta, config, rng, residual)
        total_sent += sent
    assert residual is not None

    total_true = np.sum(np.array(deltas, dtype=np.float64), axis=0)
    np.testing.assert_allclose(total_sent + residual.values, total_true, atol=1e-4)


def test_residual_is_what_the_receiver_did_not_get() -> None:
    x = np.array([5.0, -0.1, 0.2, -4.0, 0.05, 0.0], dtype=np.float32)
    config = CodecConfig(Quantization.INT8, topk_fraction=2 / 6, block_size=4)

    sent, residual = _sent(x, config, np.random.default_rng(0), None)

    assert residual is not None
    assert np.flatnonzero(sent).tolist() == [0, 3]
    np.testing.assert_array_equal(residual.values[[1, 2, 4, 5]], x[[1, 2, 4, 5]])
    # the kept entries' residual is just their quantization error
    assert np.all(np.abs(residual.values[[0, 3]]) <= 5.0 / 127 * 1.001)
    np.testing.assert_array_equal(sent + residual.values, x)


def test_residual_is_added_before_selection() -> None:
    config = CodecConfig(Quantization.FP32, topk_fraction=1 / 4)
    residual = Residual(np.array([0.0, 0.0, 10.0, 0.0], dtype=np.float32))
    x = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)

    sent, new = _sent(x, config, np.random.default_rng(0), residual)

    np.testing.assert_array_equal(sent, [0, 0, 10, 0])
    assert new is not None
    np.testing.assert_array_equal(new.values, [1, 0, 0, 0])


def test_dense_codec_returns_no_residual_but_delivers_a_given_one() -> None:
    residual = Residual(np.array([0.5, -0.5], dtype=np.float32))

    sent, new = _sent(
        np.array([1.0, 1.0], dtype=np.float32),
        CodecConfig(Quantization.FP32),
        np.random.default_rng(0),
        residual,
    )

    assert new is None
    np.testing.assert_array_equal(sent, [1.5, 0.5])


def test_residual_of_wrong_length_is_rejected() -> None:
    with pytest.raises(CodecError) as info:
        encode_update(
            np.ones(4, dtype=np.float32),
            CodecConfig(topk_fraction=0.5),
            rng=np.random.default_rng(0),
            residual=Residual.zeros(5),
        )

    assert info.value.reason is RejectReason.SHAPE_MISMATCH


def test_residual_is_a_private_read_only_copy() -> None:
    values = np.array([1.0, 2.0], dtype=np.float32)
    residual = Residual(values)

    values[0] = 99.0

    assert residual.values[0] == 1.0
    assert not residual.values.flags.writeable
    assert residual.num_params == 2
    assert residual.squared_norm() == 5.0


def test_clip_norm_bounds_the_sent_update() -> None:
    x = np.full(100, 1.0, dtype=np.float32)  # norm 10

    sent, _ = _sent(
        x, CodecConfig(Quantization.FP32, clip_norm=2.0), np.random.default_rng(0), None
    )

    assert float(np.linalg.norm(sent)) == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_allclose(sent, 0.2, rtol=1e-6)


def test_clip_norm_leaves_small_updates_alone() -> None:
    x = np.array([0.3, -0.4], dtype=np.float32)  # norm 0.5

    sent, _ = _sent(
        x, CodecConfig(Quantization.FP32, clip_norm=1.0), np.random.default_rng(0), None
    )

    np.testing.assert_array_equal(sent, x)


def test_select_topk_and_gap_coding_by_hand() -> None:
    x = np.array([0.1, -3.0, 0.0, 2.0, 0.5, -2.5], dtype=np.float32)

    idx = select_topk(x, 3)
    gaps, dtype = encode_gaps(idx)

    assert idx.tolist() == [1, 3, 5]
    assert gaps.tolist() == [1, 2, 2]
    assert dtype.value == "uint8"
    assert decode_gaps(gaps, 6).tolist() == [1, 3, 5]


def test_gap_dtype_grows_with_the_largest_gap() -> None:
    idx = np.array([0, 300, 70_000], dtype=np.intp)

    gaps, dtype = encode_gaps(idx)

    assert dtype.value == "uint32"
    assert decode_gaps(gaps, 70_001).tolist() == idx.tolist()

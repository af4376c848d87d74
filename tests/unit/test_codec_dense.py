"""The codec's fast-path decoding: ``write_dense`` and ``inflate_body`` + ``open_inflated`` give
what the plain ``open_update`` path gives."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.codec import (
    CodecConfig,
    Quantization,
    encode_update,
    inflate_body,
    open_inflated,
    open_update,
)
from edgefl.errors import CodecError

QUANTIZATIONS = list(Quantization)


@settings(max_examples=60, deadline=None)
@given(
    quantization=st.sampled_from(QUANTIZATIONS),
    n=st.integers(min_value=1, max_value=5000),
    block=st.sampled_from([64, 256, 4096]),
    topk=st.sampled_from([None, 0.1]),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_write_dense_equals_zero_then_add(
    quantization: Quantization, n: int, block: int, topk: float | None, seed: int
) -> None:
    # Arrange
    rng = np.random.default_rng(seed)
    delta = (rng.standard_normal(n) * 0.01).astype(np.float32)
    config = CodecConfig(quantization=quantization, block_size=block, topk_fraction=topk)
    encoded, _ = encode_update(delta, config, rng=rng)
    decoded = open_update(
        encoded.descriptor, encoded.body, num_params=n, max_decompressed=10 * n + 65536
    )
    reference = np.zeros(n, np.float32)
    decoded.add_to(reference, 1.0)
    out = np.full(n, 7.0, np.float32)  # garbage: write_dense overwrites every element

    # Act
    decoded.write_dense(out)

    # Assert (== treats -0.0 and 0.0 alike, as documented)
    assert np.array_equal(out, reference)


@settings(max_examples=30, deadline=None)
@given(
    quantization=st.sampled_from(QUANTIZATIONS),
    n=st.integers(min_value=1, max_value=3000),
    topk=st.sampled_from([None, 0.2]),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_inflate_then_open_is_open_update(
    quantization: Quantization, n: int, topk: float | None, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    delta = (rng.standard_normal(n) * 0.01).astype(np.float32)
    encoded, _ = encode_update(
        delta, CodecConfig(quantization=quantization, topk_fraction=topk), rng=rng
    )
    limit = 10 * n + 65536

    raw = inflate_body(encoded.descriptor, encoded.body, num_params=n, max_decompressed=limit)
    split = open_inflated(encoded.descriptor, raw, num_params=n).to_dense()
    whole = open_update(
        encoded.descriptor, encoded.body, num_params=n, max_decompressed=limit
    ).to_dense()

    assert np.array_equal(split, whole)
    with pytest.raises(CodecError, match="does not fit"):
        open_inflated(encoded.descriptor, raw[:-1], num_params=n)

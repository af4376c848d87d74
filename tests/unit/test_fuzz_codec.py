"""Fuzz: codec descriptors and bodies (random, mutated, bombs, NaN/Inf) fail only with CodecError.

``open_update`` must either return an update whose values are finite and whose ``add_to`` works,
or raise ``CodecError`` with a reason; decompression bombs must be refused without inflating them.
Long run: ``HYPOTHESIS_PROFILE=fuzz-long`` (docs/SECURITY.md, "Fuzzing").
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import zstandard
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from edgefl.codec import (
    CodecConfig,
    CodecDescriptor,
    DecodedUpdate,
    Quantization,
    encode_update,
    open_update,
)
from edgefl.errors import EdgeflError, RejectReason

FUZZ = fuzz_settings(150)
N = 300
LIMIT = 1 << 20


def _encoded() -> list[tuple[CodecDescriptor, bytes]]:
    rng = np.random.default_rng(0)
    delta = rng.normal(size=N).astype(np.float32)
    out = []
    for quant in Quantization:
        for topk in (None, 0.1):
            config = CodecConfig(quantization=quant, topk_fraction=topk, block_size=64)
            enc, _ = encode_update(delta, config, rng=rng)
            out.append((enc.descriptor, enc.body))
    return out


VALID = _encoded()


def _rejection(call: Callable[[], object]) -> RejectReason | None:
    """The reason ``call`` raised an EdgeflError with, None if it returned; anything else
    propagates (and fails the test)."""
    try:
        call()
    except EdgeflError as exc:
        return exc.reason
    return None


def _open(descriptor: CodecDescriptor, body: bytes) -> None:
    opened: list[DecodedUpdate] = []
    reason = _rejection(
        lambda: opened.append(open_update(descriptor, body, num_params=N, max_decompressed=LIMIT))
    )
    if reason is not None:
        assert isinstance(reason, RejectReason)
        return
    (update,) = opened
    dense = update.to_dense()
    assert dense.shape == (N,)
    assert np.isfinite(dense).all()
    assert np.isfinite(update.squared_norm())
    acc = np.zeros(N, dtype=np.float32)
    update.add_to(acc, 0.5)
    np.testing.assert_allclose(acc, 0.5 * dense, rtol=1e-5, atol=1e-6)


descriptor_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**64),
    st.sampled_from([0, 1, 2, 3, 4, 64, 4096, 2**24, 2**25, N, N + 1, 2**62]),
    st.floats(allow_nan=True),
    st.text(max_size=10),
    st.sampled_from(["fp32", "fp16", "int8", "int4", "int2", "zstd", "uint8", "uint16"]),
)


@FUZZ
@given(
    base=st.sampled_from(VALID),
    edits=st.dictionaries(
        st.sampled_from(
            [
                "format",
                "quantization",
                "num_params",
                "block_size",
                "topk",
                "index_dtype",
                "compression",
                "raw_size",
                "extra",
            ]
        ),
        descriptor_values,
        max_size=3,
    ),
    drop=st.sets(st.sampled_from(["format", "raw_size", "topk"]), max_size=1),
)
def test_descriptor_from_hostile_json(
    base: tuple[CodecDescriptor, bytes], edits: dict[str, Any], drop: set[str]
) -> None:
    data = base[0].to_dict() | edits
    for key in drop:
        data.pop(key, None)
    parsed: list[CodecDescriptor] = []
    reason = _rejection(lambda: parsed.append(CodecDescriptor.from_dict(data)))
    if reason is not None:
        assert reason is RejectReason.BAD_CODEC
        return
    _open(parsed[0], base[1])


@FUZZ
@given(base=st.sampled_from(VALID), body=st.binary(max_size=2000))
def test_random_bodies(base: tuple[CodecDescriptor, bytes], body: bytes) -> None:
    _open(base[0], body)


@FUZZ
@given(
    base=st.sampled_from(VALID),
    compressed=st.booleans(),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    special=st.lists(
        st.tuples(
            st.integers(0, 10**6),
            st.sampled_from([np.nan, np.inf, -np.inf, 3.0e38, 1e-45, -0.0, 65504.0]),
        ),
        max_size=3,
    ),
)
def test_mutated_bodies_and_non_finite_values(
    base: tuple[CodecDescriptor, bytes],
    compressed: bool,
    edits: list[tuple[int, int]],
    special: list[tuple[int, float]],
) -> None:
    descriptor, body = base
    if compressed:  # edit the zstd frame itself
        data = bytearray(body)
    else:  # edit the decompressed body, then recompress: reaches the body validation
        data = bytearray(zstandard.ZstdDecompressor().decompress(body))
        for position, value in special:  # plant NaN/Inf/huge in the float section
            at = (position % max(1, len(data) // 4)) * 4
            data[at : at + 4] = np.float32(value).tobytes()
    for position, value in edits:
        if data:
            data[position % len(data)] = value
    payload = bytes(data) if compressed else zstandard.ZstdCompressor().compress(bytes(data))
    _open(descriptor, payload)


def _bomb_frames() -> list[tuple[str, bytes]]:
    zeros = bytes(64 * 1024 * 1024)  # 64 MiB of zeros: a few KB compressed
    with_size = zstandard.ZstdCompressor(level=1).compress(zeros)
    without = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(zeros)
    chunked = zstandard.ZstdCompressor(level=1, write_content_size=False)
    streamed = chunked.compressobj()
    stream = streamed.compress(zeros) + streamed.flush()
    return [("declared", with_size), ("undeclared", without), ("streamed", stream)]


BOMBS = _bomb_frames()


def test_decompression_bombs_are_refused_without_inflating() -> None:
    for quant in (Quantization.FP32, Quantization.INT8):
        descriptor = next(d for d, _ in VALID if d.quantization is quant and d.topk is None)
        for name, frame in BOMBS:
            assert len(frame) < 64 * 1024, name
            tracemalloc.start()
            try:
                reason = _rejection(
                    partial(open_update, descriptor, frame, num_params=N, max_decompressed=LIMIT)
                )
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert reason in (RejectReason.DECOMPRESSION_BOMB, RejectReason.BAD_COMPRESSION), name
            assert peak < 4 * 1024 * 1024, (name, peak)  # far below the 64 MiB it would inflate to


def test_declared_raw_size_beyond_the_limit_is_a_bomb_before_decompression() -> None:
    descriptor = CodecDescriptor(Quantization.FP32, num_params=N, block_size=64, raw_size=4 * N)
    reason = _rejection(
        partial(open_update, descriptor, BOMBS[0][1], num_params=N, max_decompressed=4 * N - 1)
    )
    assert reason is RejectReason.DECOMPRESSION_BOMB


@FUZZ
@given(
    num_params=st.integers(1, 5000),
    quant=st.sampled_from(list(Quantization)),
    body=st.binary(max_size=64),
)
def test_wrong_model_size_is_shape_mismatch(
    num_params: int, quant: Quantization, body: bytes
) -> None:
    descriptor = next(d for d, _ in VALID if d.quantization is quant and d.topk is None)
    reason = _rejection(
        partial(open_update, descriptor, body, num_params=num_params, max_decompressed=LIMIT)
    )
    if num_params != N:
        assert reason is RejectReason.SHAPE_MISMATCH
    else:
        assert reason is not RejectReason.SHAPE_MISMATCH

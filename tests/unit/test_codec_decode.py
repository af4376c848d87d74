"""open_update rejects hostile bodies; DecodedUpdate.add_to accumulates in place."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from edgefl.codec import (
    CodecConfig,
    CodecDescriptor,
    EncodedUpdate,
    IndexDtype,
    Quantization,
    Residual,
    encode_update,
    open_update,
)
from edgefl.codec.layout import body_layout
from edgefl.errors import CodecError, RejectReason

LIMIT = 1 << 24


def _encode(x: NDArray[np.float32], quantization: Quantization, **kwargs: object) -> EncodedUpdate:
    config = CodecConfig(quantization, **kwargs)  # type: ignore[arg-type]
    encoded, _ = encode_update(x, config, rng=np.random.default_rng(0))
    return encoded


def _raw(encoded: EncodedUpdate) -> bytearray:
    return bytearray(zstandard.ZstdDecompressor().decompress(encoded.body))


def _zstd(raw: bytes | bytearray, *, with_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=with_size).compress(bytes(raw))


def _reason(
    descriptor: CodecDescriptor, body: bytes, num_params: int, limit: int = LIMIT
) -> RejectReason:
    with pytest.raises(CodecError) as info:
        open_update(descriptor, body, num_params=num_params, max_decompressed=limit)
    return info.value.reason


X = np.array([0.5, -1.0, 0.25, 2.0, 0.0, -0.75, 1.5, 3.0, -2.0, 0.125], dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# decompression bombs


def _int8_descriptor(num_params: int) -> CodecDescriptor:
    layout = body_layout(
        Quantization.INT8, num_values=num_params, block_size=4096, index_dtype=None
    )
    return CodecDescriptor(Quantization.INT8, num_params, 4096, layout.raw_size)


def _bomb(size: int, *, with_size: bool) -> bytes:
    """``size`` zero bytes as one zstd frame, built without holding them in memory."""
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=with_size)
    chunk = bytes(1 << 20)
    obj = compressor.compressobj(size=size if with_size else -1)
    parts = [obj.compress(chunk) for _ in range(size // len(chunk))]
    parts.append(obj.flush())
    return b"".join(parts)


@pytest.mark.parametrize("with_size", [True, False])
def test_zstd_bomb_is_rejected(with_size: bool) -> None:
    descriptor = _int8_descriptor(1000)  # claims 1,008 raw bytes
    body = _bomb(100 << 20, with_size=with_size)  # inflates to 100 MiB
    assert len(body) < 50_000

    assert _reason(descriptor, body, 1000) is RejectReason.DECOMPRESSION_BOMB


def test_zstd_bomb_is_rejected_without_allocating_it() -> None:
    # run in a fresh interpreter so that the peak RSS is a clean measurement
    script = textwrap.dedent(
        """
        import resource, sys
        import zstandard
        from edgefl.codec import CodecDescriptor, Quantization, open_update
        from edgefl.codec.layout import body_layout
        from edgefl.errors import CodecError

        def bomb(size, with_size):
            c = zstandard.ZstdCompressor(level=1, write_content_size=with_size)
            obj = c.compressobj(size=size if with_size else -1)
            chunk = bytes(1 << 20)
            return b"".join([obj.compress(chunk) for _ in range(size >> 20)] + [obj.flush()])

        bodies = [bomb(200 << 20, True), bomb(200 << 20, False)]
        layout = body_layout(Quantization.INT8, num_values=1000, block_size=4096, index_dtype=None)
        d = CodecDescriptor(Quantization.INT8, 1000, 4096, layout.raw_size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for body in bodies:
            try:
                open_update(d, body, num_params=1000, max_decompressed=1 << 30)
            except CodecError as exc:
                print(exc.reason.value)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )

    lines = result.stdout.split()
    assert lines[:2] == ["decompression_bomb", "decompression_bomb"], result.stderr
    assert int(lines[2]) < 20  # MiB of peak growth; inflating would cost 200


def test_declared_size_over_the_limit_is_rejected_before_decompressing() -> None:
    encoded = _encode(X, Quantization.INT8)

    reason = _reason(
        encoded.descriptor, encoded.body, X.size, limit=encoded.descriptor.raw_size - 1
    )

    assert reason is RejectReason.DECOMPRESSION_BOMB


def test_descriptor_claiming_a_huge_model_is_rejected_by_the_limit() -> None:
    descriptor = _int8_descriptor(50_000_000)

    assert _reason(descriptor, b"not even zstd", 50_000_000) is RejectReason.DECOMPRESSION_BOMB


def test_frame_declaring_fewer_bytes_is_rejected() -> None:
    encoded = _encode(X, Quantization.INT8)
    short = _zstd(_raw(encoded)[:-8])

    assert _reason(encoded.descriptor, short, X.size) is RejectReason.BAD_COMPRESSION


# ---------------------------------------------------------------------------------------------
# layout mismatches and corrupt bodies


def test_wrong_num_params_is_shape_mismatch() -> None:
    encoded = _encode(X, Quantization.INT8)

    assert _reason(encoded.descriptor, encoded.body, X.size + 1) is RejectReason.SHAPE_MISMATCH


@pytest.mark.parametrize("quantization", list(Quantization))
def test_truncated_body_is_rejected(quantization: Quantization) -> None:
    encoded = _encode(X, quantization)

    for cut in (1, len(encoded.body) // 2, len(encoded.body) - 1):
        reason = _reason(encoded.descriptor, encoded.body[:cut], X.size)
        assert reason is RejectReason.BAD_COMPRESSION


def test_random_bytes_are_rejected() -> None:
    encoded = _encode(X, Quantization.INT8)
    rng = np.random.default_rng(7)

    for size in (0, 3, 16, 100, 1000):
        junk = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert _reason(encoded.descriptor, junk, X.size) is RejectReason.BAD_COMPRESSION


def test_trailing_bytes_after_the_frame_are_rejected() -> None:
    encoded = _encode(X, Quantization.INT8)

    reason = _reason(encoded.descriptor, encoded.body + b"\x00", X.size)

    assert reason is RejectReason.BAD_COMPRESSION


def test_body_without_declared_size_is_accepted_when_honest() -> None:
    encoded = _encode(X, Quantization.FP32)
    body = _zstd(_raw(encoded), with_size=False)

    update = open_update(encoded.descriptor, body, num_params=X.size, max_decompressed=LIMIT)

    np.testing.assert_array_equal(update.to_dense(), X)


def test_nonzero_padding_is_rejected() -> None:
    encoded = _encode(X, Quantization.INT8, block_size=4)  # 3 scales = 12 bytes, then 4 pad
    raw = _raw(encoded)
    raw[13] = 1

    assert _reason(encoded.descriptor, _zstd(raw), X.size) is RejectReason.BAD_CODEC


# ---------------------------------------------------------------------------------------------
# NaN / Inf


def test_nan_in_fp32_body_is_rejected() -> None:
    encoded = _encode(X, Quantization.FP32)
    raw = _raw(encoded)
    raw[8:12] = np.array([np.nan], dtype="<f4").tobytes()

    assert _reason(encoded.descriptor, _zstd(raw), X.size) is RejectReason.NON_FINITE


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_fp16_body_is_rejected(bad: float) -> None:
    encoded = _encode(X, Quantization.FP16)
    raw = _raw(encoded)
    raw[18:20] = np.array([bad], dtype="<f2").tobytes()  # the last value

    assert _reason(encoded.descriptor, _zstd(raw), X.size) is RejectReason.NON_FINITE


@pytest.mark.parametrize("quantization", [Quantization.INT8, Quantization.INT4, Quantization.INT2])
@pytest.mark.parametrize(
    ("scale", "reason"),
    [
        (np.nan, RejectReason.NON_FINITE),
        (np.inf, RejectReason.NON_FINITE),
        (3e38, RejectReason.NON_FINITE),  # times the largest code overflows float32
        (-0.5, RejectReason.BAD_CODEC),
    ],
)
def test_bad_scale_is_rejected(
    quantization: Quantization, scale: float, reason: RejectReason
) -> None:
    encoded = _encode(X, quantization, block_size=4)
    raw = _raw(encoded)
    raw[4:8] = np.array([scale], dtype="<f4").tobytes()  # scale of block 1

    assert _reason(encoded.descriptor, _zstd(raw), X.size) is reason


def test_nan_in_sparse_fp32_values_is_rejected() -> None:
    encoded = _encode(X, Quantization.FP32, topk_fraction=0.3)
    raw = _raw(encoded)
    raw[0:4] = np.array([np.nan], dtype="<f4").tobytes()

    assert _reason(encoded.descriptor, _zstd(raw), X.size) is RejectReason.NON_FINITE


# ---------------------------------------------------------------------------------------------
# top-k indices


def _sparse_body(
    gaps: list[int], values: list[float], num_params: int
) -> tuple[CodecDescriptor, bytes]:
    k = len(gaps)
    layout = body_layout(
        Quantization.FP32, num_values=k, block_size=4096, index_dtype=IndexDtype.UINT16
    )
    raw = bytearray(layout.raw_size)
    raw[0 : 4 * k] = np.array(values, dtype="<f4").tobytes()
    assert layout.indices is not None
    raw[layout.indices.offset : layout.indices.end] = np.array(gaps, dtype="<u2").tobytes()
    descriptor = CodecDescriptor(
        Quantization.FP32, num_params, 4096, layout.raw_size, topk=k, index_dtype=IndexDtype.UINT16
    )
    return descriptor, _zstd(raw)


def test_hand_built_sparse_body_decodes() -> None:
    descriptor, body = _sparse_body([2, 3, 1], [1.0, -2.0, 4.0], num_params=8)

    update = open_update(descriptor, body, num_params=8, max_decompressed=LIMIT)

    np.testing.assert_array_equal(update.to_dense(), [0, 0, 1, 0, 0, -2, 4, 0])
    assert update.squared_norm() == 21.0


@pytest.mark.parametrize(
    "gaps",
    [
        [2, 0, 1],  # repeated index
        [2, 3, 3],  # last index 8 == num_params
        [9, 1, 1],  # first index out of range
        [1, 65535, 65535],  # sum far beyond range
    ],
)
def test_bad_indices_are_rejected(gaps: list[int]) -> None:
    descriptor, body = _sparse_body(gaps, [1.0, 2.0, 3.0], num_params=8)

    assert _reason(descriptor, body, 8) is RejectReason.BAD_CODEC


# ---------------------------------------------------------------------------------------------
# add_to


@pytest.mark.parametrize("quantization", list(Quantization))
@pytest.mark.parametrize("topk", [None, 0.3])
def test_add_to_accumulates_weighted_into_existing_buffer(
    quantization: Quantization, topk: float | None
) -> None:
    encoded = _encode(X, quantization, block_size=4, topk_fraction=topk)
    update = open_update(
        encoded.descriptor, encoded.body, num_params=X.size, max_decompressed=LIMIT
    )
    delta = update.to_dense()
    acc = np.arange(X.size, dtype=np.float32)

    update.add_to(acc, 0.5)
    update.add_to(acc, -2.0)

    expected = np.arange(X.size, dtype=np.float32) + 0.5 * delta - 2.0 * delta
    np.testing.assert_allclose(acc, expected, rtol=1e-6, atol=1e-6)


def test_add_to_weight_zero_and_one() -> None:
    encoded = _encode(X, Quantization.FP32)
    update = open_update(
        encoded.descriptor, encoded.body, num_params=X.size, max_decompressed=LIMIT
    )
    acc = np.ones(X.size, dtype=np.float32)

    update.add_to(acc, 0.0)
    np.testing.assert_array_equal(acc, 1.0)
    update.add_to(acc, 1.0)
    np.testing.assert_array_equal(acc, 1.0 + X)


@pytest.mark.parametrize(
    "bad_out",
    [
        np.zeros(10, dtype=np.float64),
        np.zeros(11, dtype=np.float32),
        np.zeros((2, 5), dtype=np.float32),
        np.zeros(20, dtype=np.float32)[::2],
        [0.0] * 10,
    ],
)
def test_add_to_rejects_bad_accumulator(bad_out: object) -> None:
    encoded = _encode(X, Quantization.INT8)
    update = open_update(
        encoded.descriptor, encoded.body, num_params=X.size, max_decompressed=LIMIT
    )

    with pytest.raises(CodecError) as info:
        update.add_to(bad_out, 1.0)  # type: ignore[arg-type]

    assert info.value.reason is RejectReason.SHAPE_MISMATCH


def test_add_to_rejects_read_only_accumulator_and_bad_weight() -> None:
    encoded = _encode(X, Quantization.INT8)
    update = open_update(
        encoded.descriptor, encoded.body, num_params=X.size, max_decompressed=LIMIT
    )
    frozen = np.zeros(X.size, dtype=np.float32)
    frozen.setflags(write=False)

    with pytest.raises(CodecError):
        update.add_to(frozen, 1.0)
    with pytest.raises(CodecError) as info:
        update.add_to(np.zeros(X.size, dtype=np.float32), float("nan"))
    assert info.value.reason is RejectReason.NON_FINITE


# ---------------------------------------------------------------------------------------------
# encoder input checks


def test_encode_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    config = CodecConfig()
    cases: list[tuple[object, RejectReason]] = [
        (np.array([1.0, np.nan], dtype=np.float32), RejectReason.NON_FINITE),
        (np.array([1.0, np.inf]), RejectReason.NON_FINITE),
        (np.zeros((2, 2), dtype=np.float32), RejectReason.SHAPE_MISMATCH),
        (np.zeros(0, dtype=np.float32), RejectReason.SHAPE_MISMATCH),
    ]
    for delta, reason in cases:
        with pytest.raises(CodecError) as info:
            encode_update(delta, config, rng=rng)  # type: ignore[arg-type]
        assert info.value.reason is reason

    with pytest.raises(CodecError) as info:
        encode_update(np.array([1e5], dtype=np.float32), CodecConfig(Quantization.FP16), rng=rng)
    assert info.value.reason is RejectReason.NON_FINITE


@pytest.mark.parametrize("quantization", list(Quantization))
@pytest.mark.parametrize("topk", [None, 0.2])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_rejects_non_finite_in_every_configuration(
    quantization: Quantization, topk: float | None, clip: float | None, bad: float
) -> None:
    x = np.linspace(-1, 1, 37, dtype=np.float32)
    x[20] = bad
    config = CodecConfig(quantization, topk_fraction=topk, clip_norm=clip, block_size=8)

    with pytest.raises(CodecError) as info:
        encode_update(x, config, rng=np.random.default_rng(0))

    assert info.value.reason is RejectReason.NON_FINITE


def test_encode_rejects_non_finite_residual() -> None:
    residual = Residual(np.array([0.0, np.nan, 0.0, 0.0], dtype=np.float32))
    config = CodecConfig(Quantization.INT8, topk_fraction=0.25)

    with pytest.raises(CodecError) as info:
        encode_update(
            np.ones(4, dtype=np.float32), config, rng=np.random.default_rng(0), residual=residual
        )

    assert info.value.reason is RejectReason.NON_FINITE


def test_encode_does_not_modify_the_callers_delta() -> None:
    x = X.copy()
    config = CodecConfig(Quantization.INT4, topk_fraction=0.5, clip_norm=1.0)

    encode_update(x, config, rng=np.random.default_rng(0))

    np.testing.assert_array_equal(x, X)


def test_descriptor_survives_json_and_replace() -> None:
    encoded = _encode(X, Quantization.INT2, topk_fraction=0.5)
    wire = json.loads(json.dumps(encoded.descriptor.to_dict()))

    assert CodecDescriptor.from_dict(wire) == encoded.descriptor
    with pytest.raises(CodecError):
        dataclasses.replace(encoded.descriptor, raw_size=encoded.descriptor.raw_size + 8)


# ---------------------------------------------------------------------------------------------
# fuzzing: corrupt bodies either decode to finite values or raise CodecError, nothing else


@settings(max_examples=150, deadline=None)
@given(
    quantization=st.sampled_from(list(Quantization)),
    topk=st.sampled_from([None, 0.3]),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
    compressed=st.booleans(),
)
def test_corrupted_bodies_never_escape_codec_error(
    quantization: Quantization,
    topk: float | None,
    flips: list[tuple[int, int]],
    compressed: bool,
) -> None:
    encoded = _encode(X, quantization, block_size=4, topk_fraction=topk)
    data = bytearray(encoded.body) if compressed else _raw(encoded)
    for position, mask in flips:
        data[position % len(data)] ^= mask
    body = bytes(data) if compressed else _zstd(data)

    try:
        update = open_update(encoded.descriptor, body, num_params=X.size, max_decompressed=LIMIT)
    except CodecError:
        return
    acc = np.zeros(X.size, dtype=np.float32)
    update.add_to(acc, 1.0)
    assert np.isfinite(acc).all()
    assert np.isfinite(update.squared_norm())


def test_open_update_accepts_memoryview_and_bytearray() -> None:
    encoded = _encode(X, Quantization.INT8)

    for body in (memoryview(encoded.body), bytearray(encoded.body)):
        update = open_update(encoded.descriptor, body, num_params=X.size, max_decompressed=LIMIT)
        assert update.num_params == X.size

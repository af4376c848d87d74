"""Block-scaled integer quantization with unbiased stochastic rounding, and its inverse.

Math (for a block ``x_b`` of ``block_size`` consecutive values, ``qmax = 2**(bits-1) - 1``):

* scale:   ``s_b = max|x_b| / qmax · (1 + 2**-12)`` stored as float32 (``s_b = 0`` for an
  all-zero block). The tiny margin keeps ``|x / s_b| < qmax`` under float32 rounding, so the
  codes never leave ``[-qmax, qmax]`` and no clamping pass is needed.
* code:    ``q_i = floor(x_i / s_b + u_i)`` with ``u_i`` uniform on [0, 1).
  Since ``P(q_i = floor(y) + 1) = frac(y)``, ``E[q_i] = x_i / s_b`` and ``E[s_b q_i] = x_i``:
  the decoded value is unbiased.
* error:   ``|x_i - s_b q_i| < s_b`` for every element (a single rounding step of one
  quantum), and ``Var[s_b q_i] = s_b² f(1-f) <= s_b² / 4`` with ``f = frac(x_i / s_b)``.

The uniforms come from 16 random bits per element, ``u = (r + 1/2) / 2**16``, drawn from the
caller's ``numpy.random.Generator`` as raw 64-bit words (three to four times faster than
``Generator.random(dtype=float32)``). That resolution moves the mean by at most ``2**-17 · s_b``
per element, about the size of float32 rounding of ``x / s_b`` itself; it is far below anything
a finite number of updates can resolve (the standard deviation of one value is up to
``s_b / 2``).

All loops work on slices of :data:`CHUNK` values with preallocated scratch, so temporaries stay
cache-sized whatever the model size. Body byte layout: :mod:`edgefl.codec.layout`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import numpy as np
from numpy.typing import NDArray

from edgefl.codec.layout import Quantization
from edgefl.errors import CodecError, RejectReason

__all__ = [
    "CHUNK",
    "SCALE_DTYPE",
    "block_scales",
    "chunk_plan",
    "code_square_sums",
    "dequantize_into",
    "iter_dequantized",
    "max_scale",
    "quantize_into",
]

#: Values per working slice (a multiple of every legal block size up to 2**16, and a divisor of
#: every larger one: block sizes are powers of two).
CHUNK: Final = 1 << 16
SCALE_DTYPE: Final[np.dtype[np.float32]] = np.dtype("<f4")
SCALE_MARGIN: Final = 1.0 + 2.0**-12
_F32_MAX: Final = float(np.finfo(np.float32).max)
_F32_TINY: Final = float(np.finfo(np.float32).tiny)
_DITHER_STEP: Final = np.float32(2.0**-16)
_DITHER_HALF: Final = 2.0**-17


def max_scale(quantization: Quantization) -> float:
    """Largest scale whose product with any code (down to ``-2**(bits-1)``) stays finite."""
    return _F32_MAX / float(1 << (quantization.bits - 1))


def chunk_plan(num_values: int, block_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Slices ``[start, stop)`` of at most CHUNK values, with their block structure.

    Yields ``(start, stop, first_block, full_blocks)``: the slice holds ``full_blocks`` whole
    blocks starting at block ``first_block`` followed by a partial tail (of block
    ``first_block + full_blocks``) of ``stop - start - full_blocks * block_size`` values. When
    ``block_size > CHUNK`` every slice lies inside one block and ``full_blocks`` is 0.
    """
    for start in range(0, num_values, CHUNK):
        stop = min(start + CHUNK, num_values)
        full = (stop - start) // block_size if block_size <= CHUNK else 0
        yield start, stop, start // block_size, full


def _scale_by_block(
    src: NDArray[np.generic],
    factors: NDArray[np.float32],
    first_block: int,
    full_blocks: int,
    block_size: int,
    out: NDArray[np.float32],
) -> None:
    """``out = src * factors[block of each element]`` for one slice of :func:`chunk_plan`.

    Widens ``src`` into ``out`` first, then multiplies float32 by float32 in place: a mixed
    int8 x float32 multiply goes through numpy's buffered casting loop and is ~3x slower.
    """
    if src.dtype != np.float32:
        np.copyto(out, src, casting="unsafe")
        src = out
    full = full_blocks * block_size
    if full:
        np.multiply(
            src[:full].reshape(full_blocks, block_size),
            factors[first_block : first_block + full_blocks, None],
            out=out[:full].reshape(full_blocks, block_size),
        )
    if full < src.size:
        np.multiply(src[full:], factors[first_block + full_blocks], out=out[full:])


def block_scales(
    x: NDArray[np.float32], quantization: Quantization, block_size: int
) -> NDArray[np.float32]:
    """Per-block scales ``max|x_b| / qmax · (1 + 2**-12)`` (0 for all-zero blocks)."""
    m = x.size
    full_blocks = m // block_size
    num_blocks = -(-m // block_size)
    amax = np.empty(num_blocks, dtype=np.float64)
    if full_blocks:
        rows = x[: full_blocks * block_size].reshape(full_blocks, block_size)
        np.maximum(rows.max(axis=1), -rows.min(axis=1), out=amax[:full_blocks])
    if full_blocks < num_blocks:
        tail = x[full_blocks * block_size :]
        amax[-1] = np.maximum(tail.max(), -tail.min())
    scales = amax * (SCALE_MARGIN / quantization.qmax)
    # a block of subnormals would underflow to a zero scale: keep it representable
    np.maximum(scales, _F32_TINY, out=scales, where=amax > 0)
    if not np.isfinite(amax).all():
        raise CodecError(RejectReason.NON_FINITE, "values contain NaN or Inf")
    if num_blocks and float(scales.max()) > max_scale(quantization):
        raise CodecError(
            RejectReason.NON_FINITE, "values too large to quantize without overflowing float32"
        )
    return scales.astype(np.float32)


def quantize_into(
    x: NDArray[np.float32],
    scales: NDArray[np.float32],
    quantization: Quantization,
    block_size: int,
    rng: np.random.Generator,
    codes: NDArray[np.uint8],
) -> None:
    """Stochastically round ``x / scale`` and write the packed codes into ``codes``.

    ``codes`` is the code section of the body (``ceil(m · bits / 8)`` bytes).
    """
    m = x.size
    bits = quantization.bits
    inverse = np.zeros(scales.size, dtype=np.float64)
    np.divide(1.0, scales, out=inverse, where=scales > 0)
    inv = inverse.astype(np.float32)
    scratch = min(CHUNK, m)
    y = np.empty(scratch, dtype=np.float32)
    u = np.empty(scratch, dtype=np.float32)
    per_byte = 8 // bits
    offset = 1 << (bits - 1)
    small = np.empty(scratch + 3, dtype=np.uint8) if bits < 8 else None
    int8_codes = codes[:m].view(np.int8) if bits == 8 else None
    for start, stop, first_block, full_blocks in chunk_plan(m, block_size):
        n = stop - start
        yv, uv = y[:n], u[:n]
        words = rng.integers(0, 1 << 64, size=-(-n // 4), dtype=np.uint64)
        np.multiply(words.view(np.uint16)[:n], _DITHER_STEP, out=uv)
        _scale_by_block(x[start:stop], inv, first_block, full_blocks, block_size, yv)
        np.add(yv, uv, out=yv)
        if int8_codes is not None:
            # floor(y + u) with u = (r + 1/2) / 2**16; |y| < 127 keeps the result in int8
            np.add(yv, _DITHER_HALF, out=yv)
            np.floor(yv, out=yv)
            np.copyto(int8_codes[start:stop], yv, casting="unsafe")
            continue
        assert small is not None
        # offset binary: y + u + offset > 0, so truncation toward zero is floor
        np.add(yv, offset + _DITHER_HALF, out=yv)
        padded = -(-n // per_byte) * per_byte
        np.copyto(small[:n], yv, casting="unsafe")
        small[n:padded] = offset  # unused slots carry the code of 0
        _pack(
            small[:padded], bits, codes[start // per_byte : start // per_byte + padded // per_byte]
        )


def _pack(small: NDArray[np.uint8], bits: int, out: NDArray[np.uint8]) -> None:
    """Pack codes (< 2**bits each) little-end first into ``out``."""
    per_byte = 8 // bits
    groups = small.reshape(-1, per_byte)
    np.copyto(out, groups[:, 0])
    shifted = np.empty_like(out)
    for j in range(1, per_byte):
        np.left_shift(groups[:, j], bits * j, out=shifted)
        np.bitwise_or(out, shifted, out=out)


def _build_luts() -> tuple[NDArray[np.uint16], NDArray[np.uint32], NDArray[np.int32]]:
    byte = np.arange(256, dtype=np.int32)
    int4 = np.stack([(byte & 0xF) - 8, (byte >> 4) - 8], axis=1).astype(np.int8)
    int2 = np.stack([((byte >> (2 * j)) & 0x3) - 2 for j in range(4)], axis=1).astype(np.int8)
    squares = byte.astype(np.uint8).view(np.int8).astype(np.int32) ** 2
    # a row of int8 codes viewed as one machine word: take() then copies whole rows at once
    return (
        np.ascontiguousarray(int4).view(np.uint16).ravel(),
        np.ascontiguousarray(int2).view(np.uint32).ravel(),
        squares,
    )


_LUT_INT4, _LUT_INT2, _SQUARES = _build_luts()


class _Unpacker:
    """Turns a slice of the code section into int8 codes, reusing one scratch buffer."""

    def __init__(self, codes: NDArray[np.uint8], quantization: Quantization, num_values: int):
        self._codes = codes
        self._bits = quantization.bits
        words = -(-min(CHUNK, num_values) // (8 // self._bits))
        if self._bits == 4:
            self._scratch: NDArray[np.unsignedinteger] = np.empty(words, dtype=np.uint16)
        elif self._bits == 2:
            self._scratch = np.empty(words, dtype=np.uint32)
        else:
            self._scratch = np.empty(0, dtype=np.uint8)

    def __call__(self, start: int, stop: int) -> NDArray[np.int8]:
        if self._bits == 8:
            return self._codes[start:stop].view(np.int8)
        per_byte = 8 // self._bits
        packed = self._codes[start // per_byte : -(-stop // per_byte)]
        lut = _LUT_INT4 if self._bits == 4 else _LUT_INT2
        out = self._scratch[: packed.size]
        np.take(lut, packed, out=out, mode="clip")
        return out.view(np.int8)[: stop - start]


def iter_dequantized(
    codes: NDArray[np.uint8],
    factors: NDArray[np.float32],
    quantization: Quantization,
    block_size: int,
    num_values: int,
) -> Iterator[tuple[int, int, NDArray[np.float32]]]:
    """Yield ``(start, stop, factors[block] * q[start:stop])`` slice by slice.

    ``factors`` is usually ``weight · scales``. The yielded array is a scratch buffer reused
    for the next slice: consume it before advancing.
    """
    unpack = _Unpacker(codes, quantization, num_values)
    tmp = np.empty(min(CHUNK, num_values), dtype=np.float32)
    for start, stop, first_block, full_blocks in chunk_plan(num_values, block_size):
        out = tmp[: stop - start]
        _scale_by_block(unpack(start, stop), factors, first_block, full_blocks, block_size, out)
        yield start, stop, out


def dequantize_into(
    codes: NDArray[np.uint8],
    factors: NDArray[np.float32],
    quantization: Quantization,
    block_size: int,
    out: NDArray[np.float32],
) -> None:
    """``out[i] = factors[block of i] · q[i]`` for all ``out.size`` values, written in place
    (the same float32 values :func:`iter_dequantized` yields, without a scratch slice)."""
    unpack = _Unpacker(codes, quantization, out.size)
    for start, stop, first_block, full_blocks in chunk_plan(out.size, block_size):
        target = out[start:stop]
        _scale_by_block(unpack(start, stop), factors, first_block, full_blocks, block_size, target)


def code_square_sums(
    codes: NDArray[np.uint8], quantization: Quantization, block_size: int, num_values: int
) -> NDArray[np.int64]:
    """Exact per-block ``Σ q_i²`` (so ``‖x̂‖² = Σ_b s_b² · Σ q²``) without dequantizing."""
    unpack = _Unpacker(codes, quantization, num_values)
    sums = np.zeros(-(-num_values // block_size), dtype=np.int64)
    squares = np.empty(min(CHUNK, num_values), dtype=np.int32)
    for start, stop, first_block, full_blocks in chunk_plan(num_values, block_size):
        sq = squares[: stop - start]
        np.take(_SQUARES, unpack(start, stop).view(np.uint8), out=sq, mode="clip")
        full = full_blocks * block_size
        if full:
            rows = sq[:full].reshape(full_blocks, block_size)
            sums[first_block : first_block + full_blocks] += rows.sum(axis=1, dtype=np.int64)
        if full < sq.size:
            sums[first_block + full_blocks] += int(sq[full:].sum(dtype=np.int64))
    return sums

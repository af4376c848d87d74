"""Encode a model delta into a compact body; open a body safely and add it into an accumulator.

Sign convention (used everywhere): ``delta = local_weights - base_weights``.

Device side::

    encoded, residual = encode_update(delta, config, rng=rng, residual=residual)
    # ship encoded.descriptor.to_dict() in the envelope header and encoded.body as payload

Aggregator side::

    descriptor = CodecDescriptor.from_dict(header["codec"])       # validates, BAD_CODEC
    update = open_update(descriptor, body, num_params=spec.num_params,
                         max_decompressed=limit)                # bounded, checked
    update.add_to(buffer, weight)                               # buffer += weight * delta

:class:`DecodedUpdate` keeps the update in its coded form (scales + int codes, fp16 values,
...) and works in slices of :data:`~edgefl.codec.quantize.CHUNK` values, so adding it to an
accumulator needs only a few hundred KiB of scratch whatever the model size. Only
:meth:`DecodedUpdate.to_dense` materialises a dense float32 vector.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from edgefl.codec.compress import compress, decompress_bounded
from edgefl.codec.config import CodecConfig, CodecDescriptor
from edgefl.codec.layout import MAX_NUM_PARAMS, BodyLayout, Quantization, body_layout
from edgefl.codec.quantize import (
    CHUNK,
    SCALE_DTYPE,
    block_scales,
    code_square_sums,
    dequantize_into,
    iter_dequantized,
    max_scale,
    quantize_into,
)
from edgefl.codec.sparsify import Residual, clip_l2, decode_gaps, encode_gaps, select_topk
from edgefl.errors import CodecError, RejectReason

__all__ = [
    "DecodedUpdate",
    "EncodedUpdate",
    "decode_update",
    "encode_update",
    "inflate_body",
    "open_inflated",
    "open_update",
]

_FP_DTYPES: Final[dict[Quantization, np.dtype[np.floating]]] = {
    Quantization.FP32: np.dtype("<f4"),
    Quantization.FP16: np.dtype("<f2"),
}
_FP16_EXPONENT: Final = 0x7C00


@dataclass(frozen=True, slots=True)
class EncodedUpdate:
    """An encoded update: the header descriptor and the zstd-compressed body."""

    descriptor: CodecDescriptor
    body: bytes

    @property
    def body_size(self) -> int:
        """Bytes of the compressed body (the envelope payload)."""
        return len(self.body)

    @property
    def descriptor_size(self) -> int:
        """Bytes of the descriptor as compact JSON (its share of the envelope header)."""
        return len(json.dumps(self.descriptor.to_dict(), separators=(",", ":")))

    @property
    def encoded_size(self) -> int:
        """Body plus descriptor: what this update adds to an envelope."""
        return self.body_size + self.descriptor_size

    @property
    def dense_size(self) -> int:
        """Bytes of the same delta as raw float32."""
        return 4 * self.descriptor.num_params

    @property
    def compression_ratio(self) -> float:
        """``dense_size / body_size``: how many times smaller than float32 the body is."""
        return self.dense_size / max(1, self.body_size)


class _CodedValues:
    """The ``m`` coded values of a body (dense: all of them, sparse: the kept ones)."""

    def __init__(self, layout: BodyLayout, raw: NDArray[np.uint8]) -> None:
        self.quantization = layout.quantization
        self.num_values = layout.num_values
        self.block_size = layout.block_size
        floats = raw[layout.floats.offset : layout.floats.end]
        self.floats: NDArray[np.floating] = floats.view(
            _FP_DTYPES.get(layout.quantization, SCALE_DTYPE)
        )
        self.codes: NDArray[np.uint8] = (
            raw[layout.codes.offset : layout.codes.end]
            if layout.codes is not None
            else np.empty(0, dtype=np.uint8)
        )

    def iter_scaled(self, weight: float) -> Iterator[tuple[int, int, NDArray[np.float32]]]:
        """Yield ``(start, stop, weight · value[start:stop])``; the array is reused scratch."""
        if self.quantization.is_integer:
            factors = (self.floats.astype(np.float64) * weight).astype(np.float32)
            yield from iter_dequantized(
                self.codes, factors, self.quantization, self.block_size, self.num_values
            )
            return
        tmp = np.empty(min(CHUNK, self.num_values), dtype=np.float32)
        w = np.float32(weight)
        half = self.quantization is Quantization.FP16
        for start in range(0, self.num_values, CHUNK):
            stop = min(start + CHUNK, self.num_values)
            out = tmp[: stop - start]
            if half:  # a table lookup widens fp16 ~2.5x faster than numpy's cast
                np.take(
                    _fp16_table(), self.floats[start:stop].view(np.uint16), out=out, mode="clip"
                )
                np.multiply(out, w, out=out)
            else:
                np.multiply(self.floats[start:stop], w, out=out)
            yield start, stop, out

    def write_into(self, out: NDArray[np.float32]) -> None:
        """``out[:] = value`` for all ``m`` coded values, in place (``out.size == m``)."""
        if self.quantization.is_integer:
            scales = self.floats.astype(np.float32, copy=False)
            dequantize_into(self.codes, scales, self.quantization, self.block_size, out)
        elif self.quantization is Quantization.FP16:
            np.take(_fp16_table(), self.floats.view(np.uint16), out=out, mode="clip")
        else:
            np.copyto(out, self.floats)

    def values(self) -> NDArray[np.float32]:
        """All ``m`` decoded values (for sparse bodies, where ``m`` is small)."""
        out = np.empty(self.num_values, dtype=np.float32)
        for start, stop, chunk in self.iter_scaled(1.0):
            out[start:stop] = chunk
        return out

    def squared_norm(self) -> float:
        if self.quantization.is_integer:
            sums = code_square_sums(self.codes, self.quantization, self.block_size, self.num_values)
            scales = self.floats.astype(np.float64)
            return float(np.dot(scales * scales, sums.astype(np.float64)))
        total = 0.0
        tmp = np.empty(min(CHUNK, self.num_values), dtype=np.float64)
        for start, stop, chunk in self.iter_scaled(1.0):
            wide = tmp[: stop - start]
            np.copyto(wide, chunk)
            total += float(np.dot(wide, wide))
        return total

    def validate(self) -> None:
        """Refuse NaN/Inf values or scales, negative scales, and scales that would overflow."""
        if self.quantization.is_integer:
            scales = self.floats
            if not scales.size:
                return
            # min/max propagate NaN and surface +-Inf: two reductions instead of three
            low, high = float(scales.min()), float(scales.max())
            if not (math.isfinite(low) and math.isfinite(high)):
                raise CodecError(RejectReason.NON_FINITE, "NaN or Inf in the block scales")
            if low < 0.0:
                raise CodecError(RejectReason.BAD_CODEC, "negative block scale")
            if high > max_scale(self.quantization):
                raise CodecError(RejectReason.NON_FINITE, "block scale overflows float32")
        elif self.quantization is Quantization.FP32:
            if not _all_finite_f32(self.floats):
                raise CodecError(RejectReason.NON_FINITE, "NaN or Inf in the fp32 values")
        elif not _all_finite_f16(self.floats):
            raise CodecError(RejectReason.NON_FINITE, "NaN or Inf in the fp16 values")


@functools.cache
def _fp16_table() -> NDArray[np.float32]:
    """float32 value of every fp16 bit pattern (256 KiB)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _all_finite_f32(values: NDArray[np.floating]) -> bool:
    # max/min propagate NaN and surface +-Inf; two vectorised reductions, no temporary
    return bool(np.isfinite(values.max()) and np.isfinite(values.min()))


def _all_finite_f16(values: NDArray[np.floating]) -> bool:
    bits = values.view(np.uint16)
    tmp = np.empty(min(CHUNK, bits.size), dtype=np.uint16)
    for start in range(0, bits.size, CHUNK):
        chunk = tmp[: min(CHUNK, bits.size - start)]
        np.bitwise_and(bits[start : start + chunk.size], _FP16_EXPONENT, out=chunk)
        if int(chunk.max()) == _FP16_EXPONENT:  # all exponent bits set: Inf or NaN
            return False
    return True


class DecodedUpdate:
    """A validated update in coded form; created by :func:`open_update`.

    ``num_params`` is the dense length. Nothing here holds a dense float32 copy except the
    result of :meth:`to_dense`.
    """

    __slots__ = ("_indices", "_squared_norm", "_values", "descriptor", "num_params")

    def __init__(
        self,
        descriptor: CodecDescriptor,
        values: _CodedValues,
        indices: NDArray[np.intp] | None,
    ) -> None:
        self.descriptor = descriptor
        self.num_params = descriptor.num_params
        self._values = values
        self._indices = indices
        self._squared_norm: float | None = None

    @property
    def quantization(self) -> Quantization:
        return self.descriptor.quantization

    @property
    def is_sparse(self) -> bool:
        return self._indices is not None

    @property
    def nnz(self) -> int:
        """Number of coded values (top-k count for sparse updates, else num_params)."""
        return self._values.num_values

    @property
    def indices(self) -> NDArray[np.intp] | None:
        """Sorted positions of a sparse update (read-only), or None for a dense one."""
        return self._indices

    def squared_norm(self) -> float:
        """``‖delta‖²`` computed from the coded data (``Σ_b s_b² Σ q²`` for int codecs)."""
        if self._squared_norm is None:
            self._squared_norm = self._values.squared_norm()
        return self._squared_norm

    def add_to(self, out: NDArray[np.float32], weight: float) -> None:
        """``out += weight * delta`` in place, slice by slice.

        ``out`` must be a writeable, C-contiguous float32 vector of length ``num_params``
        (else ``CodecError(SHAPE_MISMATCH)``); ``weight`` must be finite.
        """
        self._check_out(out)
        if not math.isfinite(weight):
            raise CodecError(RejectReason.NON_FINITE, f"weight {weight!r} is not finite")
        indices = self._indices
        if indices is None:
            for start, stop, chunk in self._values.iter_scaled(weight):
                target = out[start:stop]
                np.add(target, chunk, out=target)
        else:
            for start, stop, chunk in self._values.iter_scaled(weight):
                positions = indices[start:stop]
                out[positions] += chunk  # positions are unique, so fancy += is exact

    def _check_out(self, out: NDArray[np.float32]) -> None:
        if not (
            isinstance(out, np.ndarray)
            and out.dtype == np.float32
            and out.shape == (self.num_params,)
            and out.flags.c_contiguous
            and out.flags.writeable
        ):
            got = f"{out.dtype}{list(out.shape)}" if isinstance(out, np.ndarray) else type(out)
            raise CodecError(
                RejectReason.SHAPE_MISMATCH,
                f"accumulator must be writeable C-contiguous float32[{self.num_params}], got {got}",
            )

    def write_dense(self, out: NDArray[np.float32]) -> None:
        """``out[:] = delta`` in place (overwrites; same requirements on ``out`` as
        :meth:`add_to`). The same values as zeroing ``out`` and calling ``add_to(out, 1.0)``
        (up to the sign of zeros), in one pass and without scratch."""
        self._check_out(out)
        indices = self._indices
        if indices is None:
            self._values.write_into(out)
            return
        out.fill(0.0)
        for start, stop, chunk in self._values.iter_scaled(1.0):
            out[indices[start:stop]] = chunk

    def to_dense(self) -> NDArray[np.float32]:
        """The decoded delta as a new dense float32 vector."""
        out = np.zeros(self.num_params, dtype=np.float32)
        self.add_to(out, 1.0)
        return out


def _as_vector(delta: ArrayLike) -> NDArray[np.float32]:
    x = np.ascontiguousarray(delta, dtype=np.float32)
    if x.ndim != 1 or not 1 <= x.size <= MAX_NUM_PARAMS:
        raise CodecError(
            RejectReason.SHAPE_MISMATCH, f"delta must be a non-empty 1-D vector, got {x.shape}"
        )
    return x  # finiteness is checked on the values actually coded (see encode_update)


def encode_update(
    delta: ArrayLike,
    config: CodecConfig,
    *,
    rng: np.random.Generator,
    residual: Residual | None = None,
) -> tuple[EncodedUpdate, Residual | None]:
    """Encode ``delta`` (``local - base``, flat float32) following ``config``.

    Steps: clip to ``config.clip_norm`` (L2) → add ``residual`` → keep the top-k magnitudes →
    quantize (stochastic rounding for int codecs, driven by ``rng``) → zstd.

    Returns the encoded update and, when top-k is on, the new error-feedback residual
    (``clip(delta) + residual - reconstruction``) to pass to the next call; otherwise None
    (a given residual is still added in, and so delivered).

    Raises ``CodecError``: ``SHAPE_MISMATCH`` for a non-vector or a residual of another
    length, ``NON_FINITE`` for NaN/Inf input or values too large for the chosen codec.
    Finiteness is checked on the values that are coded (with top-k, NaN/Inf sort as the
    largest magnitudes, so they are always among them) to save a pass over the input.
    The caller's ``delta`` is never modified.
    """
    x, owned = _clipped_with_residual(_as_vector(delta), config.clip_norm, residual)
    num_params = x.size
    k = config.topk_count(num_params)
    idx = None if k is None else select_topk(x, k)
    values = x if idx is None else x[idx]
    gaps, index_dtype = (None, None) if idx is None else encode_gaps(idx)
    layout = body_layout(
        config.quantization,
        num_values=values.size,
        block_size=config.block_size,
        index_dtype=index_dtype,
    )
    raw = np.zeros(layout.raw_size, dtype=np.uint8)  # zero padding between sections
    _write_values(raw, layout, values, config, rng)
    if gaps is not None:
        assert layout.indices is not None
        raw[layout.indices.offset : layout.indices.end].view(gaps.dtype)[:] = gaps
    descriptor = CodecDescriptor(
        quantization=config.quantization,
        num_params=num_params,
        block_size=config.block_size,
        raw_size=layout.raw_size,
        topk=k,
        index_dtype=index_dtype,
    )
    encoded = EncodedUpdate(descriptor, compress(raw.data, config.zstd_level))
    if idx is None:
        return encoded, None
    kept = x if owned else x.copy()
    kept[idx] -= _CodedValues(layout, raw).values()
    kept.setflags(write=False)
    return encoded, Residual(kept)


def _clipped_with_residual(
    x: NDArray[np.float32], clip_norm: float | None, residual: Residual | None
) -> tuple[NDArray[np.float32], bool]:
    """``clip(x) + residual`` and whether that is a new array (the caller's ``x`` is never
    modified, so only an owned one may be reused for the next residual)."""
    owned = False
    if clip_norm is not None:
        clipped = clip_l2(x, clip_norm)
        owned, x = clipped is not x, clipped
    if residual is not None:
        if residual.num_params != x.size:
            raise CodecError(
                RejectReason.SHAPE_MISMATCH,
                f"residual has {residual.num_params} values, delta has {x.size}",
            )
        x = x + residual.values
        owned = True
    return x, owned


def _write_values(
    raw: NDArray[np.uint8],
    layout: BodyLayout,
    values: NDArray[np.float32],
    config: CodecConfig,
    rng: np.random.Generator,
) -> None:
    """Quantize ``values`` into ``raw``: block scales and codes for an integer codec (stochastic
    rounding from ``rng``), else the floats themselves; NaN/Inf (or out of the float range):
    ``CodecError(NON_FINITE)``."""
    quantization = config.quantization
    floats = raw[layout.floats.offset : layout.floats.end]
    if quantization.is_integer:
        assert layout.codes is not None
        scales = block_scales(values, quantization, config.block_size)
        floats.view(SCALE_DTYPE)[:] = scales
        codes = raw[layout.codes.offset : layout.codes.end]
        quantize_into(values, scales, quantization, config.block_size, rng, codes)
        return
    fp = floats.view(_FP_DTYPES[quantization])
    with np.errstate(over="ignore", invalid="ignore"):  # Inf/NaN are refused just below
        np.copyto(fp, values, casting="same_kind")
    finite = _all_finite_f32(fp) if quantization is Quantization.FP32 else _all_finite_f16(fp)
    if not finite:
        raise CodecError(
            RejectReason.NON_FINITE, f"delta has NaN/Inf or exceeds the {quantization} range"
        )


def open_update(
    descriptor: CodecDescriptor,
    body: bytes | bytearray | memoryview,
    *,
    num_params: int,
    max_decompressed: int,
) -> DecodedUpdate:
    """Decompress and validate an update body without ever trusting it.

    Checks, in order: ``descriptor.num_params == num_params`` (``SHAPE_MISMATCH``); the
    declared raw size against ``max_decompressed`` and the zstd frame header
    (``DECOMPRESSION_BOMB``), then bounded decompression (``BAD_COMPRESSION``); zero padding
    (``BAD_CODEC``); scales and fp values finite (``NON_FINITE``); top-k indices strictly
    increasing and in range (``BAD_CODEC``). The same as :func:`open_inflated` of
    :func:`inflate_body`.
    """
    raw = inflate_body(descriptor, body, num_params=num_params, max_decompressed=max_decompressed)
    return open_inflated(descriptor, raw, num_params=num_params)


def inflate_body(
    descriptor: CodecDescriptor,
    body: bytes | bytearray | memoryview,
    *,
    num_params: int,
    max_decompressed: int,
) -> bytes:
    """The first half of :func:`open_update`: the shape check and the bounded decompression.
    One call into zstd that releases the GIL for all of its work (so it can run on another
    thread at little cost)."""
    if descriptor.num_params != num_params:
        raise CodecError(
            RejectReason.SHAPE_MISMATCH,
            f"update has {descriptor.num_params} parameters, the model has {num_params}",
        )
    layout = _layout_of(descriptor)
    return decompress_bounded(
        body, expected_size=layout.raw_size, max_decompressed=max_decompressed
    )


def open_inflated(
    descriptor: CodecDescriptor, raw_bytes: bytes, *, num_params: int
) -> DecodedUpdate:
    """The second half of :func:`open_update`: validate the decompressed body (padding, scales
    or values, top-k indices) and wrap it; ``raw_bytes`` comes from :func:`inflate_body`."""
    layout = _layout_of(descriptor)
    if len(raw_bytes) != layout.raw_size or descriptor.num_params != num_params:
        raise CodecError(RejectReason.BAD_COMPRESSION, "inflated body does not fit the descriptor")
    raw = np.frombuffer(raw_bytes, dtype=np.uint8)
    _check_padding(layout, raw)
    values = _CodedValues(layout, raw)
    values.validate()
    indices = None
    if layout.indices is not None:
        assert layout.index_dtype is not None
        gaps = raw[layout.indices.offset : layout.indices.end].view(layout.index_dtype.numpy)
        indices = decode_gaps(gaps, num_params)
        indices.setflags(write=False)
    return DecodedUpdate(descriptor, values, indices)


def _layout_of(descriptor: CodecDescriptor) -> BodyLayout:
    return body_layout(
        descriptor.quantization,
        num_values=descriptor.num_values,
        block_size=descriptor.block_size,
        index_dtype=descriptor.index_dtype,
    )


def _check_padding(layout: BodyLayout, raw: NDArray[np.uint8]) -> None:
    sections = [s for s in (layout.floats, layout.indices, layout.codes) if s is not None]
    starts = [s.offset for s in sections[1:]] + [layout.raw_size]
    data = raw.data
    for section, next_start in zip(sections, starts, strict=True):
        gap = data[section.end : next_start]
        # padding is a few bytes: comparing bytes beats a numpy reduction's call overhead
        if gap.nbytes and gap != bytes(gap.nbytes):
            raise CodecError(RejectReason.BAD_CODEC, "non-zero padding between body sections")


def decode_update(
    descriptor: CodecDescriptor,
    body: bytes | bytearray | memoryview,
    *,
    num_params: int,
    max_decompressed: int,
) -> NDArray[np.float32]:
    """Convenience: :func:`open_update` then :meth:`DecodedUpdate.to_dense`."""
    return open_update(
        descriptor, body, num_params=num_params, max_decompressed=max_decompressed
    ).to_dense()

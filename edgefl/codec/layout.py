"""Wire layout of a decompressed update body (codec format 1).

A body is a concatenation of up to three *sections*, each starting at a multiple of 8 bytes and
zero-padded up to the next multiple of 8 (so every section is aligned for its dtype when the
buffer is). All multi-byte numbers are little-endian. With ``m`` coded values (``m = num_params``
for a dense body, ``m = topk`` for a sparse one) and ``B = ceil(m / block_size)`` blocks:

====================  =====================  ============================  ===================
quantization          float section          index section (sparse only)   code section
====================  =====================  ============================  ===================
fp32                  m × float32 values     m × gap (index_dtype)         —
fp16                  m × float16 values     m × gap (index_dtype)         —
int8                  B × float32 scales     m × gap (index_dtype)         m × int8
int4                  B × float32 scales     m × gap (index_dtype)         ceil(m/2) bytes
int2                  B × float32 scales     m × gap (index_dtype)         ceil(m/4) bytes
====================  =====================  ============================  ===================

*Codes.* int8 codes are two's-complement ``q`` in [-127, 127]. int4 and int2 codes are stored
in offset binary, ``code = q + 2**(bits-1)`` (int4: ``q + 8`` in [1, 15]; int2: ``q + 2`` in
[1, 3]), packed little-end first: value ``2i`` is the low nibble of byte ``i`` (int4), value
``4i + j`` occupies bits ``2j..2j+1`` of byte ``i`` (int2). In every width the most negative
code (-128, 0, 0) is never produced by the encoder; decoders accept it and decode it as
``-2**(bits-1)``. The unused slots of the last byte are filled with the code of 0 and ignored.
Value ``i`` of block ``b = i // block_size`` decodes to ``scales[b] * q_i``.

*Indices.* A sparse body carries the kept positions as gaps: ``gap[0] = index[0]``,
``gap[i] = index[i] - index[i-1]`` (so ``gap[i] >= 1`` for ``i >= 1``: strictly increasing),
in the smallest unsigned dtype that holds the largest gap. Values are in index order.

``raw_size`` in the descriptor is the total, padding included; receivers recompute it from the
other fields and refuse a descriptor whose ``raw_size`` disagrees.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import numpy as np

__all__ = [
    "MAX_BLOCK_SIZE",
    "MAX_NUM_PARAMS",
    "MIN_BLOCK_SIZE",
    "SECTION_ALIGN",
    "BodyLayout",
    "IndexDtype",
    "Quantization",
    "Section",
    "body_layout",
]

SECTION_ALIGN: Final = 8
MIN_BLOCK_SIZE: Final = 4
MAX_BLOCK_SIZE: Final = 1 << 24
#: Largest dense length a descriptor may declare (gaps then always fit in uint32).
MAX_NUM_PARAMS: Final = 2**32 - 1


class Quantization(StrEnum):
    """Value encoding of an update body."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"
    INT2 = "int2"

    @property
    def bits(self) -> int:
        """Bits per coded value."""
        return _BITS[self]

    @property
    def is_integer(self) -> bool:
        """True for the block-scaled integer encodings (int8/int4/int2)."""
        return self in _QMAX

    @property
    def qmax(self) -> int:
        """Largest code magnitude the encoder emits: 127, 7, 1 (``2**(bits-1) - 1``)."""
        return _QMAX[self]


_BITS: Final = {
    Quantization.FP32: 32,
    Quantization.FP16: 16,
    Quantization.INT8: 8,
    Quantization.INT4: 4,
    Quantization.INT2: 2,
}
_QMAX: Final = {Quantization.INT8: 127, Quantization.INT4: 7, Quantization.INT2: 1}


class IndexDtype(StrEnum):
    """Unsigned little-endian dtype of the index gaps of a sparse body."""

    UINT8 = "uint8"
    UINT16 = "uint16"
    UINT32 = "uint32"

    @property
    def numpy(self) -> np.dtype[np.unsignedinteger]:
        return np.dtype(self.value).newbyteorder("<")

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @classmethod
    def smallest_for(cls, max_gap: int) -> IndexDtype:
        """The narrowest dtype that can hold ``max_gap``."""
        for candidate in cls:
            if max_gap <= np.iinfo(candidate.numpy).max:
                return candidate
        raise ValueError(f"gap {max_gap} does not fit in uint32")


@dataclass(frozen=True, slots=True)
class Section:
    """Byte range ``[offset, offset + size)`` of one section (padding not included)."""

    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class BodyLayout:
    """Where each section of a body lives; see the module docstring."""

    quantization: Quantization
    num_values: int
    block_size: int
    index_dtype: IndexDtype | None
    floats: Section
    indices: Section | None
    codes: Section | None
    raw_size: int

    @property
    def num_blocks(self) -> int:
        """Number of scales (int quantizations); 0 for fp32/fp16."""
        if not self.quantization.is_integer:
            return 0
        return -(-self.num_values // self.block_size)


def _align(offset: int) -> int:
    return -(-offset // SECTION_ALIGN) * SECTION_ALIGN


@functools.lru_cache(maxsize=256)
def body_layout(
    quantization: Quantization,
    *,
    num_values: int,
    block_size: int,
    index_dtype: IndexDtype | None,
) -> BodyLayout:
    """Compute the section offsets and the exact raw size of a body (memoised: a fleet
    uses a few geometries, and the aggregator asks for one per update)."""
    if quantization.is_integer:
        float_size = 4 * -(-num_values // block_size)
        code_size: int | None = -(-num_values * quantization.bits // 8)
    else:
        float_size = num_values * quantization.bits // 8
        code_size = None
    floats = Section(0, float_size)
    offset = _align(floats.end)
    indices = None
    if index_dtype is not None:
        indices = Section(offset, num_values * index_dtype.itemsize)
        offset = _align(indices.end)
    codes = None
    if code_size is not None:
        codes = Section(offset, code_size)
        offset = _align(codes.end)
    return BodyLayout(
        quantization=quantization,
        num_values=num_values,
        block_size=block_size,
        index_dtype=index_dtype,
        floats=floats,
        indices=indices,
        codes=codes,
        raw_size=offset,
    )

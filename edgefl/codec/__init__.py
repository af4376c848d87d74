"""Update codec: fp32/fp16/int8/int4/int2 with unbiased stochastic rounding and per-block scales,
top-k sparsification with error feedback, zstd, and bounded decoding straight into an
accumulator.

Sign convention: ``delta = local_weights - base_weights``. Module map:

* :mod:`~edgefl.codec.config` — :class:`Quantization`, :class:`CodecConfig`,
  :class:`CodecDescriptor` (validated JSON header);
* :mod:`~edgefl.codec.layout` — byte layout of a body (sections, packing, sizes);
* :mod:`~edgefl.codec.quantize` — stochastic rounding, packing, slice-wise dequantization;
* :mod:`~edgefl.codec.sparsify` — clipping, top-k, index gaps, :class:`Residual`;
* :mod:`~edgefl.codec.compress` — zstd with bounded decompression;
* :mod:`~edgefl.codec.bounds` — :func:`max_decompressed`, the one decompression bound of every
  receiver (aggregator and simulator);
* :mod:`~edgefl.codec.update` — :func:`encode_update`, :func:`open_update`,
  :class:`DecodedUpdate`, :func:`decode_update`.

numpy and zstandard only; no torch.
"""

from edgefl.codec.bounds import DECOMPRESSION_SLACK, max_body_size, max_decompressed
from edgefl.codec.config import (
    CODEC_FORMAT,
    CodecConfig,
    CodecDescriptor,
    Compression,
    IndexDtype,
    JSONValue,
    Quantization,
)
from edgefl.codec.sparsify import Residual
from edgefl.codec.update import (
    DecodedUpdate,
    EncodedUpdate,
    decode_update,
    encode_update,
    inflate_body,
    open_inflated,
    open_update,
)

__all__ = [
    "CODEC_FORMAT",
    "DECOMPRESSION_SLACK",
    "CodecConfig",
    "CodecDescriptor",
    "Compression",
    "DecodedUpdate",
    "EncodedUpdate",
    "IndexDtype",
    "JSONValue",
    "Quantization",
    "Residual",
    "decode_update",
    "encode_update",
    "inflate_body",
    "max_body_size",
    "max_decompressed",
    "open_inflated",
    "open_update",
]

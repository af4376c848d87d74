"""The decompression bound: how many bytes a receiver agrees to inflate for one update body.

One function, :func:`max_decompressed`, used by every receiver (the aggregator's ingest and the
virtual simulator's decode path), so the simulator predicts the service: an update is a
``DECOMPRESSION_BOMB`` for one exactly when it is for the other.
"""

from __future__ import annotations

import functools
from typing import Final

from edgefl.codec.layout import (
    MAX_NUM_PARAMS,
    MIN_BLOCK_SIZE,
    IndexDtype,
    Quantization,
    body_layout,
)

__all__ = ["DECOMPRESSION_SLACK", "max_body_size", "max_decompressed"]

DECOMPRESSION_SLACK: Final = 65536
"""Bytes allowed above the largest legitimate body (room for a future header or section)."""


@functools.lru_cache(maxsize=64)
def max_body_size(num_params: int) -> int:
    """The largest decompressed body any valid codec configuration produces for a model of
    ``num_params`` parameters (exact, padding included).

    A body is up to three 8-byte aligned sections (see :mod:`edgefl.codec.layout`). With
    ``m <= P`` coded values (``m = P`` dense, ``m = topk <= P`` sparse) every section grows with
    ``m``, so the maximum is at ``m = P`` and is the largest of, over the quantizations:

    * fp32 sparse:  ``align8(4 P) + align8(4 P)``  (values, uint32 gaps) ``<= 8 P + 8``;
    * fp16 sparse:  ``align8(2 P) + align8(4 P)``;
    * int8 sparse:  ``align8(4 ceil(P / 4)) + align8(4 P) + align8(P)``  (scales with the
      smallest block, 4; gaps; codes) ``<= 6 P + 24``; int4/int2 are smaller;
    * every dense body is smaller than the sparse body of the same quantization.

    The gaps take the widest index dtype (uint32, the widest a descriptor may declare). So the
    bound is fp32-sparse's ``8 P`` (even ``P``) or ``8 P + 8`` (odd) from a dozen parameters on,
    and int8-sparse's ``<= 6 P + 24`` below; ``<= 8 P + 24`` always. It is computed from
    :func:`~edgefl.codec.layout.body_layout` itself, not from a formula that could drift.
    Raises ``ValueError`` for ``num_params`` outside ``[1, MAX_NUM_PARAMS]``.
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int):
        raise ValueError(f"num_params must be an integer, got {num_params!r}")
    if not 1 <= num_params <= MAX_NUM_PARAMS:
        raise ValueError(f"num_params must be in [1, {MAX_NUM_PARAMS}], got {num_params}")
    return max(
        body_layout(
            q, num_values=num_params, block_size=MIN_BLOCK_SIZE, index_dtype=IndexDtype.UINT32
        ).raw_size
        for q in Quantization
    )


def max_decompressed(num_params: int) -> int:
    """The ``max_decompressed`` budget of :func:`~edgefl.codec.open_update` for a model of
    ``num_params`` parameters: :func:`max_body_size` plus :data:`DECOMPRESSION_SLACK`.

    Every legitimate update (any quantization, any top-k fraction, any block size, any zstd
    level) fits: a descriptor's ``raw_size`` must equal its layout's size, which is at most
    :func:`max_body_size`. A body declaring more is refused before anything is inflated; one
    whose zstd frame inflates beyond its declared size is refused while inflating. Both are
    ``DECOMPRESSION_BOMB``. For ``P`` parameters the budget is about ``8 P + 64 KiB``.
    """
    return max_body_size(num_params) + DECOMPRESSION_SLACK

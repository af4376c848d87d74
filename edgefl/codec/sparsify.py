"""L2 clipping, top-k selection, index gap coding, and the error-feedback residual.

Error feedback (EF): a device keeps what it did not manage to send and adds it to the next
update. With ``a_t = clip(delta_t) + r_{t-1}`` and ``sent_t`` the vector the receiver will
reconstruct (top-k positions, *after* quantization), the new residual is
``r_t = a_t - sent_t``. Telescoping gives, for any number of rounds ``T``,

    Σ_t sent_t + r_T = Σ_t clip(delta_t)      (with r_0 = 0)

so nothing is lost, only delayed; quantization error is fed back as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from edgefl.codec.layout import IndexDtype
from edgefl.errors import CodecError, RejectReason

__all__ = ["Residual", "clip_l2", "decode_gaps", "encode_gaps", "select_topk"]


@dataclass(frozen=True, eq=False, slots=True)
class Residual:
    """Error-feedback state a device keeps between updates (read-only float32 vector).

    Pass it back as ``encode_update(..., residual=...)``; it is added to the next delta before
    top-k selection. It carries both the unsent coordinates and the quantization error of the
    sent ones.
    """

    values: NDArray[np.float32]

    def __post_init__(self) -> None:
        values = self.values
        frozen = (
            isinstance(values, np.ndarray)
            and values.dtype == np.float32
            and values.ndim == 1
            and not values.flags.writeable
            and values.flags.owndata
        )
        if not frozen:  # take a private, read-only copy of anything the caller may still mutate
            values = np.array(values, dtype=np.float32, copy=True).reshape(-1)
            values.setflags(write=False)
            object.__setattr__(self, "values", values)

    @classmethod
    def zeros(cls, num_params: int) -> Residual:
        return cls(np.zeros(num_params, dtype=np.float32))

    @property
    def num_params(self) -> int:
        return int(self.values.size)

    def squared_norm(self) -> float:
        return float(np.dot(self.values.astype(np.float64), self.values.astype(np.float64)))


def clip_l2(x: NDArray[np.float32], clip_norm: float) -> NDArray[np.float32]:
    """``x · min(1, clip_norm / ‖x‖₂)``; returns ``x`` itself when no clipping is needed.

    Raises ``CodecError(NON_FINITE)`` when ``x`` holds NaN or Inf.
    """
    x64 = x.astype(np.float64)
    norm = math.sqrt(float(np.dot(x64, x64)))
    if not math.isfinite(norm):
        raise CodecError(RejectReason.NON_FINITE, "delta contains NaN or Inf")
    if norm <= clip_norm:
        return x
    return (x64 * (clip_norm / norm)).astype(np.float32)


def select_topk(x: NDArray[np.float32], k: int) -> NDArray[np.intp]:
    """Sorted positions of the ``k`` largest ``|x_i|`` (ties broken arbitrarily)."""
    n = x.size
    if k >= n:
        return np.arange(n, dtype=np.intp)
    idx = np.argpartition(np.abs(x), n - k)[n - k :]
    idx.sort()
    return idx.astype(np.intp, copy=False)


def encode_gaps(idx: NDArray[np.intp]) -> tuple[NDArray[np.unsignedinteger], IndexDtype]:
    """Gap-code strictly increasing indices in the narrowest unsigned dtype."""
    gaps = np.diff(idx, prepend=0)
    dtype = IndexDtype.smallest_for(int(gaps.max()) if gaps.size else 0)
    return gaps.astype(dtype.numpy), dtype


def decode_gaps(gaps: NDArray[np.unsignedinteger], num_params: int) -> NDArray[np.intp]:
    """Inverse of :func:`encode_gaps`, validating untrusted input.

    Raises ``CodecError(BAD_CODEC)`` unless the indices are strictly increasing and all lie in
    ``[0, num_params)``. Gaps are < 2**32 and counts < 2**32, so the uint64 prefix sum cannot
    wrap.
    """
    k = gaps.size
    if k > 1 and np.count_nonzero(gaps[1:]) != k - 1:
        raise CodecError(RejectReason.BAD_CODEC, "top-k indices are not strictly increasing")
    idx = np.cumsum(gaps, dtype=np.uint64)
    if k and int(idx[-1]) >= num_params:
        raise CodecError(
            RejectReason.BAD_CODEC, f"top-k index {int(idx[-1])} out of range [0, {num_params})"
        )
    return idx.astype(np.intp)

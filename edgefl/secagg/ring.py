"""Fixed-point encoding of a clipped update on the ring ``Z_(2^b)``, and decoding of a weighted sum.

Device side (``x`` the flat float32 delta, ``C`` the clip norm, ``s`` the fleet-wide scale, a
power of two)::

    x' = x · min(1, C / ‖x‖₂)                      (L2 clip, the codec's clip_l2)
    q_j = floor(s · x'_j + u_j),  u_j ~ U[0, 1)     (stochastic rounding: E[q_j] = s · x'_j)
    e_j = q_j mod 2^b                               (two's-complement embedding)

Every code is bounded: ``|x'_j| ≤ ‖x'‖₂ ≤ C`` (float32 rounding of the clip adds at most a relative
``2^-23``, covered by ``CLIP_SLACK``), so ``|q_j| ≤ Q = floor(s · C · (1 + CLIP_SLACK)) + 1``
(:attr:`RingSpec.max_code`); :func:`encode` checks it.

Aggregator side: with public integer weights ``w_i`` the ring sum ``S = Σ_i w_i e_i mod 2^b`` is
decoded as the signed representative ``v ∈ [-2^(b-1), 2^(b-1))`` of ``S``, and
``v / s ≈ Σ_i w_i x'_i``. The decoding is exact (``v = Σ_i w_i q_i`` over the integers) whenever

    Σ_i w_i · Q  ≤  2^(b-1) - 1                                       (headroom)

For a buffer of ``K`` updates with weights ``1 ≤ w_i ≤ W_max`` it suffices that
``K · W_max · Q ≤ 2^(b-1) - 1``; :meth:`RingSpec.fit` picks the largest power-of-two scale
meeting it, so ``s ≈ 2^(b-1) / (K · W_max · C)``. Example, ``b = 32``, ``C = 1``, ``K = 10``,
``W_max = 256``: ``s = 2^19``, a rounding step of 1.9e-6 per coordinate.

The **range check** of :func:`decode_sum` refuses (``OVERFLOW``) a sum with a coordinate
``|v_j| > Σ_i w_i Q`` or an L2 norm ``‖v‖₂ > Σ_i w_i (s C (1 + CLIP_SLACK) + sqrt(P))`` (each
``q_i`` is within ``sqrt(P)`` of ``s x'_i``). An honest buffer always passes. A device that did not
clip, or sent arbitrary ring elements, wraps the sum: the coordinate check then fails unless every
wrapped coordinate lands back in the narrow valid band (probability ``(2 Σ w Q + 1) / 2^b`` per
coordinate), and the norm check bounds what an in-range cheat can add. This is detection on the
sum, not a proof about each update (Prio's SNIPs / the VDAF L2 checks are not implemented).

Why ``b = 32`` by default: a share costs ``b`` bits per parameter and does not compress, so 32 bits
is the size of raw float32, and the headroom above still leaves a rounding step far below int8's
(block max / 127) for realistic ``K · W_max ≤ 2^17``. ``b = 64`` doubles the upload and is there
for buffers whose ``K · W_max`` leaves too little scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from edgefl.codec.sparsify import clip_l2
from edgefl.secagg.errors import SecAggError, SecAggReason

__all__ = [
    "CLIP_SLACK",
    "RING_BITS",
    "RingSpec",
    "decode_signed",
    "decode_sum",
    "encode",
    "fixed_point_weight",
    "from_bytes",
    "to_bytes",
    "weighted_add",
]

RING_BITS: Final = (32, 64)
CLIP_SLACK: Final = 2.0**-20
"""Relative slack on ``C`` for the float32 rounding of the clip (which is at most ``2^-23``)."""

RingArray = NDArray[np.unsignedinteger]


@dataclass(frozen=True, slots=True)
class RingSpec:
    """The fleet-wide ring: ``bits`` (32 or 64), ``scale`` (a power of two), ``clip_norm`` C."""

    bits: int = 32
    scale: int = 2**19
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.bits not in RING_BITS:
            raise ValueError(f"bits must be 32 or 64, got {self.bits!r}")
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, int) or s < 1 or s & (s - 1):
            raise ValueError(f"scale must be a power of two >= 1, got {s!r}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm!r}")
        if self.max_code > self.half:
            raise ValueError("scale * clip_norm does not fit the ring")

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        """Little-endian ``uint32`` or ``uint64``: the wire and the arithmetic type."""
        return np.dtype("<u4") if self.bits == 32 else np.dtype("<u8")

    @property
    def signed(self) -> np.dtype[np.signedinteger]:
        return np.dtype("<i4") if self.bits == 32 else np.dtype("<i8")

    @property
    def half(self) -> int:
        """``2^(b-1) - 1``: the largest magnitude a decoded coordinate may have."""
        return (1 << (self.bits - 1)) - 1

    @property
    def max_code(self) -> int:
        """``Q = floor(s · C · (1 + CLIP_SLACK)) + 1``, the bound on every ``|q_j|``."""
        return math.floor(self.scale * self.clip_norm * (1.0 + CLIP_SLACK)) + 1

    def update_norm_bound(self, num_params: int) -> float:
        """``C · (1 + CLIP_SLACK) + sqrt(P) / s``: the bound on ``‖q / s‖₂`` of one encoded update
        of ``P`` values (the clip, plus at most one rounding step ``1 / s`` per coordinate). It is
        the L2 sensitivity of a decoded sum to one update of weight 1 (docs/PRIVACY.md)."""
        return self.clip_norm * (1.0 + CLIP_SLACK) + math.sqrt(num_params) / self.scale

    def bytes_per_share(self, num_params: int) -> int:
        return num_params * self.bits // 8

    def sum_bound(self, weights: Sequence[int]) -> int:
        """``Σ_i w_i · Q``: the coordinate bound of a decoded sum with these weights."""
        return sum(weights) * self.max_code

    def fits(self, weights: Sequence[int]) -> bool:
        """The headroom condition ``Σ_i w_i Q ≤ 2^(b-1) - 1``."""
        return self.sum_bound(weights) <= self.half

    @classmethod
    def fit(cls, *, bits: int, clip_norm: float, buffer_size: int, w_max: int) -> RingSpec:
        """The largest power-of-two scale with ``buffer_size · w_max · Q ≤ 2^(b-1) - 1``."""
        if buffer_size < 1 or w_max < 1:
            raise ValueError("buffer_size and w_max must be >= 1")
        for exponent in range(bits - 1, -1, -1):
            try:
                spec = cls(bits=bits, scale=1 << exponent, clip_norm=clip_norm)
            except ValueError:
                continue
            if buffer_size * w_max * spec.max_code <= spec.half:
                return spec
        raise ValueError(f"no scale fits K={buffer_size}, W_max={w_max}, C={clip_norm} in b={bits}")


def fixed_point_weight(weight: float, weight_scale: int) -> int:
    """A public integer weight: ``max(1, round(weight · weight_scale))`` (ties to even).

    ``weight`` is FedBuff's example weight × staleness weight; ``weight_scale`` (e.g. 256) sets
    its resolution. The aggregate's normalisation divides by the integer weight sum, so the
    common factor ``weight_scale`` cancels under ``mean``.
    """
    if not (math.isfinite(weight) and weight > 0) or weight_scale < 1:
        raise ValueError(f"weight must be finite and > 0, got {weight!r}")
    return max(1, round(weight * weight_scale))


def encode(delta: ArrayLike, spec: RingSpec, rng: np.random.Generator) -> RingArray:
    """Clip to ``C``, scale, stochastically round with ``rng``, embed in ``Z_(2^b)``.

    Raises ``CodecError(NON_FINITE)`` for NaN/Inf (from the clip) and ``ValueError`` for a
    non-vector.
    """
    x = np.ascontiguousarray(delta, dtype=np.float32)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"delta must be a non-empty 1-D vector, got shape {x.shape}")
    clipped = clip_l2(x, spec.clip_norm).astype(np.float64)
    clipped *= spec.scale
    clipped += rng.random(clipped.size)
    codes = np.floor(clipped).astype(np.int64)
    peak = int(np.abs(codes).max())
    if peak > spec.max_code:  # cannot happen after the clip; a guard for the bound above
        raise ValueError(f"code {peak} exceeds the bound {spec.max_code}")
    return codes.astype(spec.dtype)  # integer casts wrap: the two's-complement embedding


def weighted_add(acc: RingArray, values: RingArray, weight: int, scratch: RingArray) -> None:
    """``acc += weight · values mod 2^b`` in place (unsigned numpy arithmetic wraps)."""
    np.multiply(values, acc.dtype.type(weight), out=scratch)
    np.add(acc, scratch, out=acc)


def decode_signed(total: RingArray, spec: RingSpec, weights: Sequence[int]) -> NDArray[np.int64]:
    """The signed representative ``v = Σ_i w_i q_i`` of ``total = Σ_i w_i e_i mod 2^b``, exact.

    Raises ``SecAggError(HEADROOM)`` when the weights break the headroom condition, and
    ``SecAggError(OVERFLOW)`` when the range check fails (see the module docstring).
    """
    if not spec.fits(weights):
        raise SecAggError(SecAggReason.HEADROOM, f"weights sum {sum(weights)} overflow the ring")
    signed = total.view(spec.signed).astype(np.int64)
    bound = spec.sum_bound(weights)
    peak = int(np.abs(signed).max()) if signed.size else 0
    if peak > bound:
        raise SecAggError(SecAggReason.OVERFLOW, f"decoded |v| {peak} > range bound {bound}")
    norm_bound = sum(weights) * spec.scale * spec.update_norm_bound(signed.size)
    values = signed.astype(np.float64)
    norm = math.sqrt(float(np.dot(values, values)))
    if norm > norm_bound * (1 + 1e-12):
        raise SecAggError(SecAggReason.OVERFLOW, f"decoded norm {norm:.6g} > {norm_bound:.6g}")
    return signed


def decode_sum(total: RingArray, spec: RingSpec, weights: Sequence[int]) -> NDArray[np.float64]:
    """``v / s ≈ Σ_i w_i x'_i`` in float64 (:func:`decode_signed`, then one division; exact
    while ``|v| < 2^53``, i.e. always for ``b = 32``)."""
    values = decode_signed(total, spec, weights).astype(np.float64)
    values /= spec.scale
    return values


def to_bytes(values: RingArray) -> bytes:
    """The wire form of a ring vector: little-endian, ``b / 8`` bytes per element."""
    return values.tobytes()


def from_bytes(data: bytes | bytearray | memoryview, spec: RingSpec, num_params: int) -> RingArray:
    """A read-only ring vector over ``data``; ``SecAggError(BAD_SHARE)`` for a wrong length."""
    expected = spec.bytes_per_share(num_params)
    if len(data) != expected:
        raise SecAggError(SecAggReason.BAD_SHARE, f"share has {len(data)} B, expected {expected}")
    return np.frombuffer(data, dtype=spec.dtype)

"""Central noise on the decoded sum: the leader-side DP hook of :class:`LeaderConfig`.

``GaussianSumNoise(stddev)`` adds ``N(0, stddev² I)`` to ``Σ_i w_i x_i``. For the DP guarantee
of docs/PRIVACY.md (``sum`` normalisation, equal weighting, one update per device per buffer)
``stddev`` is ``z · W_max · C_q`` (:class:`~edgefl.secagg.privacy.LeaderPrivacy`): the noise
multiplier times the sensitivity of the integer-weighted sum, the largest weight ``W_max``
(``weight_scale``) times :meth:`~edgefl.secagg.ring.RingSpec.update_norm_bound`
``C_q = C (1 + 2^-20) + sqrt(P) / s``, the clip plus the stochastic rounding (``C_q / C - 1`` is
6·10⁻⁴ for 100k parameters at ``C = 1``, ``K = 10``, ``W_max = 256``, ``b = 32``).

Each buffer's noise comes from its own generator (:meth:`edgefl.privacy.GaussianNoise.generator`,
the plaintext aggregator's): 256 bits of OS entropy per buffer, or, with a ``seed`` (tests and
simulations only: anyone who knows it can subtract the noise), ``[seed, buffer_id]``, so a
restarted leader draws the same noise for the same buffer. numpy float64 draws (not a hardened
DP sampler; see PRIVACY.md). The leader sees the noise-free sum before adding it: the guarantee
is against everyone downstream of the leader, not against the leader. Distributed discrete
Gaussian noise added by the devices in the ring (Kairouz, Liu and Steinke 2021) would hide the
sum from the leader too; not done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from edgefl.privacy import GaussianNoise
from edgefl.secagg.decision import BufferDecision

__all__ = ["GaussianSumNoise"]


@dataclass(frozen=True)
class GaussianSumNoise:
    """Adds ``N(0, stddev²)`` to every coordinate; ``seed`` only in tests and simulations."""

    stddev: float
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.stddev) and self.stddev >= 0):
            raise ValueError(f"stddev must be finite and >= 0, got {self.stddev!r}")

    def __call__(self, total: NDArray[np.float64], decision: BufferDecision) -> None:
        rng = GaussianNoise(self.stddev, self.seed).generator(decision.buffer_id)
        total += rng.normal(0.0, self.stddev, size=total.shape)

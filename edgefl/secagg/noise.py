"""Central noise on the decoded sum: the leader-side DP hook of :class:`LeaderConfig`.

``GaussianSumNoise(stddev)`` adds ``N(0, stddev² I)`` to ``Σ_i w_i x_i``. For the DP guarantee
of docs/PRIVACY.md (``sum`` normalisation, one update per device per buffer) ``stddev`` must be
``z · C · w_max``, the largest weight times the clip norm times the noise multiplier, because
here the weights are integers up to ``w_max`` (with DP: equal weighting, ``w_max`` =
``weight_scale``). The accountant is the caller's (edgefl.privacy on the DP branch).

The noise is drawn by numpy in float64 (not a hardened DP sampler; see PRIVACY.md), and the
leader sees the noise-free sum before adding it: the guarantee is against everyone downstream
of the leader, not against the leader. Distributed discrete Gaussian noise added by the devices
in the ring (Kairouz, Liu and Steinke 2021) would hide the sum from the leader too; not done.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from edgefl.secagg.decision import BufferDecision

__all__ = ["GaussianSumNoise"]


@dataclass
class GaussianSumNoise:
    """Adds ``N(0, stddev²)`` to every coordinate; ``seed`` only in tests."""

    stddev: float
    seed: int | None = None
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.stddev) and self.stddev >= 0):
            raise ValueError(f"stddev must be finite and >= 0, got {self.stddev!r}")
        seed = secrets.randbits(256) if self.seed is None else self.seed
        self._rng = np.random.default_rng(seed)

    def __call__(self, total: NDArray[np.float64], decision: BufferDecision) -> None:
        total += self._rng.normal(0.0, self.stddev, size=total.shape)

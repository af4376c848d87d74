"""Central differential privacy at the aggregator: trusted aggregator, user-level guarantee.

Mechanism (applied by :class:`~edgefl.aggregation.FedBuff` when ``FedBuffConfig.privacy`` is a
:class:`CentralDP`). For every update ``i`` that enters the buffer, *after* decoding::

    w_i' = min(w_i, 1)                         (example x staleness weight, bounded)
    c_i  = min(1, (1 - 1e-6) C / ||delta_i||)  (clip to L2 norm C, on the decoded update)
    A    = sum_i w_i' c_i delta_i

and each flush (server step) releases ``a = (A + N(0, (z C)^2 I)) / K`` to the server optimizer.

Why the clip is repeated at the aggregator: the device clips before encoding, but int8/int4
quantization with stochastic rounding rounds each value up or down at random, which can make the
decoded update longer than the one that was clipped. The bound must hold on what is summed, so
the aggregator clips the decoded update (the ``1e-6`` margin absorbs float32 rounding).

Sensitivity (what one device can change in one flush). Neighbouring runs differ in one device's
data: its updates are replaced by zero vectors ("zero-out" adjacency), everything else -- which
devices send when, their example counts, the arrival order -- is the same (it is public, see
docs/PRIVACY.md). So the buffer boundaries do not move, and in one buffer:

* at most one update per device is accepted (a second is rejected,
  ``RejectReason.DP_ONE_PER_BUFFER``), so a device appears at most once in a sum;
* its contribution ``w' c delta`` has norm ``<= 1 * C``; nobody else's contribution depends on
  it (the clip is a fixed C, not the adaptive norm bound, which follows the median of everyone's
  norms and is therefore refused with DP);
* hence ``||A - A'|| <= C`` and the flush is the Gaussian mechanism with noise multiplier ``z``.

The server optimizer (momentum, Adam) and the division by ``K`` only post-process the noisy sum.
DP requires ``sum`` normalisation: under ``mean`` the released ``A / W`` divides by the weight
sum ``W``, which itself depends on the device (its weight is in it), so neither the numerator's
``C`` nor a fixed denominator bounds the change; ``K`` is a constant. Robust modes (median,
trimmed mean) are refused too: one update can move them by more than ``C / K``.

Accounting: a device's guarantee is the composition of the flushes it took part in
(:mod:`edgefl.privacy.accountant`); the cap on that number (``max_participations``, or the
largest number within ``target_epsilon``) is enforced by
:class:`~edgefl.privacy.ledger.ParticipationLedger`.

Noise comes from a numpy ``Generator`` seeded with 256 bits of ``os.urandom`` at every flush.
A fixed ``seed`` (noise of flush ``v`` drawn from ``[seed, v]``) is for tests and simulations
only: anyone who knows it can subtract the noise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from edgefl.privacy.accountant import AccountantKind, epsilon, participation_cap

__all__ = ["CLIP_MARGIN", "CentralDP", "GaussianNoise"]

CLIP_MARGIN: Final = 1e-6
"""Relative margin of the aggregator's clip: the float32 sum stays within ``C``."""
_MASK64: Final = (1 << 64) - 1
_STREAM_NOISE: Final = 0xD1FF_9A55


@dataclass(frozen=True)
class CentralDP:
    """Central DP settings: clip ``C``, noise multiplier ``z``, ``delta``, and the cap.

    Give ``max_participations`` (flushes per device), ``target_epsilon`` (the cap is the largest
    count whose epsilon at ``delta`` is within it), or both (the smaller cap wins).
    """

    clip_norm: float = 1.0  # set it near the median update norm of your model
    noise_multiplier: float = 3.0  # with target 8: 22 flushes per device (RDP)
    delta: float = 1e-5  # keep it below 1 / (number of devices)
    target_epsilon: float | None = 8.0
    max_participations: int | None = None
    accountant: AccountantKind = AccountantKind.RDP
    seed: int | None = None  # None: OS entropy per flush; an int only for tests / simulation

    def __post_init__(self) -> None:
        object.__setattr__(self, "accountant", AccountantKind(self.accountant))
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0.0):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm!r}")
        cap = self.max_participations
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"max_participations must be None or an integer >= 1, got {cap!r}")
        if self.target_epsilon is None and cap is None:
            raise ValueError("central DP needs target_epsilon or max_participations (or both)")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be None or an integer, got {self.seed!r}")
        epsilon(0, self.noise_multiplier, self.delta)  # validates z and delta
        if self.participation_cap < 1:
            raise ValueError(
                f"one participation at z={self.noise_multiplier:g} already costs epsilon "
                f"{self.epsilon(1):.3g} > target {self.target_epsilon:g} at delta={self.delta:g}; "
                "raise the noise multiplier or the target"
            )

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of the buffer sum: ``z * C``."""
        return self.noise_multiplier * self.clip_norm

    @property
    def participation_cap(self) -> int:
        """Flushes a device may take part in (cached by the accountant)."""
        caps = []
        if self.max_participations is not None:
            caps.append(self.max_participations)
        if self.target_epsilon is not None:
            caps.append(
                participation_cap(
                    self.target_epsilon,
                    noise_multiplier=self.noise_multiplier,
                    delta=self.delta,
                    kind=self.accountant,
                )
            )
        return min(caps)

    def epsilon(self, participations: int) -> float:
        """Epsilon at :attr:`delta` of a device that took part in ``participations`` flushes."""
        return epsilon(participations, self.noise_multiplier, self.delta, self.accountant)

    def bounded_weight(self, weight: float) -> float:
        """The weight an update enters the sum with: ``min(weight, 1)``."""
        return min(float(weight), 1.0)

    def clip_factor(self, norm: float) -> float:
        """``c`` such that ``c * norm <= C`` (1 when the update is already short enough)."""
        limit = self.clip_norm * (1.0 - CLIP_MARGIN)
        return 1.0 if norm <= limit else limit / norm

    def noise(self) -> GaussianNoise:
        return GaussianNoise(self.noise_std, self.seed)


class GaussianNoise:
    """``N(0, std^2)`` noise vectors for the flushes (see the module docstring for seeding)."""

    def __init__(self, std: float, seed: int | None = None) -> None:
        if not (math.isfinite(std) and std >= 0.0):
            raise ValueError(f"noise std must be finite and >= 0, got {std!r}")
        self.std = std
        self._seed = seed

    def generator(self, flush: int) -> np.random.Generator:
        """The generator of flush ``flush``: fresh OS entropy, or ``[seed, flush]`` when fixed."""
        if self._seed is None:
            entropy = int.from_bytes(os.urandom(32), "little")
            return np.random.default_rng(np.random.SeedSequence(entropy))
        return np.random.default_rng([self._seed & _MASK64, _STREAM_NOISE, flush & _MASK64])

    def sample(self, flush: int, size: int) -> NDArray[np.float32]:
        """A float32 noise vector of ``size`` values for flush number ``flush``."""
        out = self.generator(flush).standard_normal(size, dtype=np.float32)
        out *= np.float32(self.std)
        return out

"""Local differential privacy on the device: trust no one, not even the aggregator.

The device clips its update and adds noise *before* encoding, so nothing that leaves it (the
MQTT payload, whatever the broker stores, what the aggregator sees) is the raw update. Sans-IO:
the agent calls these functions and persists :class:`LocalSpend`; nothing here reads a file or a
clock.

Neighbouring inputs: any two updates the device could produce (its whole local data set
changes). After clipping both lie in a ball of radius ``C``, so they differ by at most ``2 C``:
the sensitivity is ``2 C`` (L2 for Gaussian, L1 for Laplace).

* ``gaussian``: clip to L2 norm ``C``, add ``N(0, sigma^2 I)`` with ``sigma = 2 C sigma_1``,
  where ``sigma_1`` is the analytic Gaussian mechanism's calibration for the per-update
  ``(epsilon, delta)`` (:func:`edgefl.privacy.analytic.gaussian_sigma`: exact, smaller than
  the classical ``sqrt(2 ln(1.25/delta)) / epsilon``).
* ``laplace``: clip to L1 norm ``C``, add Laplace noise of scale ``b = 2 C / epsilon`` to each
  value (``delta = 0``).

Total over the device's updates (:class:`LocalSpend`): the Gaussian releases compose exactly
(``mu^2`` adds up: ``mu_i = 2 C / sigma_i``; the total epsilon at ``delta`` is the analytic
formula at ``sigma = 1/mu``), the Laplace ones by adding their epsilons; a device that used both
adds the two parts. :func:`may_train` tells whether one more update stays within the budget.

Noise comes from a generator seeded with 256 bits of ``os.urandom`` unless a generator is given
(tests and simulation only).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from edgefl.privacy.analytic import gaussian_epsilon, gaussian_sigma

__all__ = ["LocalDP", "LocalMechanism", "LocalRelease", "LocalSpend", "may_train", "updates_left"]


class LocalMechanism(StrEnum):
    GAUSSIAN = "gaussian"  # L2 clip, analytic Gaussian mechanism
    LAPLACE = "laplace"  # L1 clip, Laplace mechanism (delta = 0)


@dataclass(frozen=True)
class LocalDP:
    """Per-update local DP settings and the device's total budget (``None``: unlimited)."""

    mechanism: LocalMechanism = LocalMechanism.GAUSSIAN
    clip_norm: float = 1.0  # L2 (gaussian) or L1 (laplace) norm bound C
    epsilon: float = 1.0  # per update
    delta: float = 1e-5  # per update (gaussian); the total is reported at this delta too
    budget_epsilon: float | None = None  # total epsilon the device may spend

    def __post_init__(self) -> None:
        object.__setattr__(self, "mechanism", LocalMechanism(self.mechanism))
        for name in ("clip_norm", "epsilon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        if not (0.0 < self.delta < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        b = self.budget_epsilon
        if b is not None and not (math.isfinite(b) and b > 0.0):
            raise ValueError(f"budget_epsilon must be None or finite and > 0, got {b!r}")

    @property
    def sensitivity(self) -> float:
        """``2 C``: how far apart two clipped updates can be."""
        return 2.0 * self.clip_norm

    @functools.cached_property
    def noise_scale(self) -> float:
        """Gaussian: the noise std ``sigma``; Laplace: the scale ``b``."""
        if self.mechanism is LocalMechanism.LAPLACE:
            return self.sensitivity / self.epsilon
        return self.sensitivity * gaussian_sigma(self.epsilon, self.delta)

    def privatize(self, delta: ArrayLike, rng: np.random.Generator | None = None) -> LocalRelease:
        """Clip ``delta`` (a flat update) and add noise: what the agent encodes and sends."""
        x = np.array(delta, dtype=np.float32, copy=True)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"need a non-empty flat update, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("the update is not finite")
        gen = rng if rng is not None else _os_generator()
        wide = x.astype(np.float64)
        if self.mechanism is LocalMechanism.LAPLACE:
            norm = float(np.abs(wide).sum())
            noise = gen.laplace(0.0, self.noise_scale, x.size)
        else:
            norm = float(math.sqrt(np.dot(wide, wide)))
            noise = gen.normal(0.0, self.noise_scale, x.size)
        factor = 1.0 if norm <= self.clip_norm else self.clip_norm / norm
        out = (wide * factor + noise).astype(np.float32)
        return LocalRelease(
            update=out,
            mechanism=self.mechanism,
            epsilon=self.epsilon,
            delta=0.0 if self.mechanism is LocalMechanism.LAPLACE else self.delta,
            noise_scale=self.noise_scale,
            sensitivity=self.sensitivity,
            clip_factor=factor,
        )

    def may_train(self, spent: LocalSpend) -> bool:
        """Whether one more update keeps the total within :attr:`budget_epsilon`."""
        return may_train(spent, self)


@dataclass(frozen=True, eq=False)
class LocalRelease:
    """A privatized update and its per-update cost."""

    update: NDArray[np.float32]  # clipped + noise: the only thing to encode and send
    mechanism: LocalMechanism
    epsilon: float
    delta: float
    noise_scale: float
    sensitivity: float
    clip_factor: float


@dataclass(frozen=True)
class LocalSpend:
    """The device's running total (persist it; report it in the device state)."""

    updates: int = 0
    gaussian_mu_squared: float = 0.0  # sum of (2C / sigma_i)^2 over Gaussian releases
    laplace_epsilon: float = 0.0  # sum of epsilon_i over Laplace releases

    def add(self, release: LocalRelease) -> LocalSpend:
        """The total after ``release``."""
        return self.charged(
            release.mechanism, release.epsilon, release.sensitivity / release.noise_scale
        )

    def charged(
        self, mechanism: LocalMechanism, epsilon: float, mu: float, times: int = 1
    ) -> LocalSpend:
        """The total after ``times`` more releases: each Laplace one adds ``epsilon``, each
        Gaussian one adds ``mu^2`` (``mu = sensitivity / sigma``)."""
        if mechanism is LocalMechanism.LAPLACE:
            return LocalSpend(
                self.updates + times,
                self.gaussian_mu_squared,
                self.laplace_epsilon + times * epsilon,
            )
        return LocalSpend(
            self.updates + times, self.gaussian_mu_squared + times * mu * mu, self.laplace_epsilon
        )

    def epsilon(self, delta: float) -> float:
        """Total epsilon at ``delta`` (exact composition of the Gaussian part, plus Laplace)."""
        gauss = 0.0
        if self.gaussian_mu_squared > 0.0:
            gauss = gaussian_epsilon(1.0 / math.sqrt(self.gaussian_mu_squared), delta)
        return gauss + self.laplace_epsilon

    def to_json(self) -> dict[str, Any]:
        return {
            "updates": self.updates,
            "gaussian_mu_squared": self.gaussian_mu_squared,
            "laplace_epsilon": self.laplace_epsilon,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LocalSpend:
        spend = cls(
            int(data.get("updates", 0)),
            float(data.get("gaussian_mu_squared", 0.0)),
            float(data.get("laplace_epsilon", 0.0)),
        )
        if spend.updates < 0 or spend.gaussian_mu_squared < 0 or spend.laplace_epsilon < 0:
            raise ValueError("local DP spend must be >= 0")
        return spend


def may_train(spent: LocalSpend, config: LocalDP) -> bool:
    """Whether one more update under ``config`` keeps ``spent`` within its budget (always true
    without ``budget_epsilon``). Call it *before* training: a refused device does not train."""
    return config.budget_epsilon is None or _within_budget(spent, config, 1)


def updates_left(spent: LocalSpend, config: LocalDP) -> int | None:
    """How many more updates under ``config`` stay within its budget (``None``: no budget).

    The total only grows, so this is the largest ``k`` such that ``k`` more updates fit:
    doubling, then bisection (``O(log k)`` evaluations of the total epsilon)."""
    if config.budget_epsilon is None:
        return None
    if not _within_budget(spent, config, 1):
        return 0
    low, high = 1, 2
    while _within_budget(spent, config, high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if _within_budget(spent, config, mid) else (low, mid)
    return low


def _within_budget(spent: LocalSpend, config: LocalDP, more: int) -> bool:
    """Whether ``more`` updates under ``config`` after ``spent`` keep the total within budget."""
    assert config.budget_epsilon is not None
    mu = config.sensitivity / config.noise_scale
    after = spent.charged(config.mechanism, config.epsilon, mu, more)
    return after.epsilon(config.delta) <= config.budget_epsilon


def _os_generator() -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(os.urandom(32), "little")))

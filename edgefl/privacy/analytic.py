"""The analytic Gaussian mechanism (Balle & Wang, ICML 2018) in plain ``math``: no scipy.

For the Gaussian mechanism with L2 sensitivity 1 and noise standard deviation ``sigma``, the
exact (tight) ``delta`` at a given ``epsilon`` is (Balle & Wang, Theorem 8)::

    delta(eps; sigma) = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma)

``delta`` falls as ``epsilon`` or ``sigma`` grows, so :func:`gaussian_epsilon` (the smallest
epsilon for a sigma) and :func:`gaussian_sigma` (the smallest sigma for an epsilon) are found by
bisection on this formula, computed in log space (``Phi`` through ``math.erfc``, and its
asymptotic series far in the lower tail where ``erfc`` underflows). For sensitivity ``s`` use
``sigma / s``.

It also gives the exact composition of Gaussian mechanisms: ``k`` of them with noise
``sigma_1..sigma_k`` are together exactly one of noise ``(sum_i sigma_i^-2)^-1/2`` (they are
``mu``-GDP with ``mu^2 = sum_i sigma_i^-2``; Dong, Roth & Su 2019, Corollary 3.3).

This runs on devices, where scipy (and ``dp-accounting``) may be absent; the tests check it
against ``dp_accounting.get_epsilon_gaussian`` / ``get_sigma_gaussian``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

__all__ = ["gaussian_delta", "gaussian_epsilon", "gaussian_sigma", "log_phi"]

_LOG_SQRT_2PI: Final = 0.5 * math.log(2.0 * math.pi)
_ITERATIONS: Final = 200
_SQRT2: Final = math.sqrt(2.0)


def log_phi(x: float) -> float:
    """``log Phi(x)`` for the standard normal CDF, accurate in both tails."""
    if x > 0.0:
        return math.log1p(-0.5 * math.erfc(x / _SQRT2))
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / _SQRT2))
    # Phi(x) = phi(x)/(-x) * (1 - 1/x^2 + 3/x^4 - 15/x^6 + ...), |x| >= 30: 4 terms are plenty
    r = 1.0 / (x * x)
    series = 1.0 - r + 3.0 * r * r - 15.0 * r * r * r
    return -0.5 * x * x - math.log(-x) - _LOG_SQRT_2PI + math.log(series)


def _log_delta(epsilon: float, sigma: float) -> float:
    a = 0.5 / sigma - epsilon * sigma
    b = -0.5 / sigma - epsilon * sigma
    x = log_phi(a)
    y = epsilon + log_phi(b)
    return x + math.log1p(-math.exp(y - x)) if y < x else -math.inf


def gaussian_delta(epsilon: float, sigma: float) -> float:
    """Exact ``delta`` of the Gaussian mechanism (sensitivity 1, std ``sigma``) at ``epsilon``."""
    _positive("sigma", sigma)
    if not (math.isfinite(epsilon) and epsilon >= 0.0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    return math.exp(_log_delta(epsilon, sigma))


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """The smallest ``epsilon`` with ``delta(epsilon; sigma) <= delta`` (sensitivity 1)."""
    _positive("sigma", sigma)
    _probability(delta)
    target = math.log(delta)
    if _log_delta(0.0, sigma) <= target:
        return 0.0
    return _bisect(lambda eps: _log_delta(eps, sigma) <= target, 0.0, 1.0)


def gaussian_sigma(epsilon: float, delta: float) -> float:
    """The smallest noise std ``sigma`` with ``delta(epsilon; sigma) <= delta`` (sensitivity 1)."""
    _positive("epsilon", epsilon)
    _probability(delta)
    target = math.log(delta)
    return _bisect(lambda sigma: _log_delta(epsilon, sigma) <= target, 1e-3, 1.0)


def _bisect(ok: Callable[[float], bool], low: float, high: float) -> float:
    """The boundary of a monotone predicate (false below, true above) from ``[low, high]``;
    ``high`` is doubled until ``ok(high)``. Returns the ``ok`` end (conservative)."""
    while not ok(high):
        low, high = high, high * 2.0
        if high > 1e12:
            raise ValueError("no finite solution (delta too small?)")
    for _ in range(_ITERATIONS):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if ok(mid):
            high = mid
        else:
            low = mid
    return high


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def _probability(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")

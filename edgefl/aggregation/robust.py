"""Robustness: the update-norm bound (on by default) and robust aggregators over a buffer.

Norm bound
    Every update's L2 norm ``||delta||`` is compared with a bound ``B``:

    * static: ``B = max_norm``;
    * adaptive: ``B = multiplier * median(last `window` recorded norms)``, applied once at least
      ``warmup`` norms are recorded (before that only the static bound, if any, applies);
    * both: ``B = min(static, adaptive)``.

    An update with ``||delta|| > B`` is rejected (``mode = reject``, reason NORM_BOUND) or clipped
    (``mode = clip``): its delta is scaled by ``c = B / ||delta||``, i.e. FedBuff adds
    ``weight * c * delta`` to the accumulator while ``weight`` (not ``weight * c``) enters the
    weight sum -- exactly as if the device had sent the clipped delta. The recorded norm is
    ``min(||delta||, B)``, so an attacker cannot ratchet the adaptive bound up with huge updates.

    Default (:class:`NormBound` ``()``): adaptive, multiplier 5, window 100, warm-up 10, clip. It is
    a safety net against gross faults (a x100 update, a broken device) that leaves honest
    heterogeneity alone; a static ``max_norm`` needs knowledge of the model and is opt-in.

Robust aggregators (``RobustMode``)
    ``trimmed_mean(beta)``: per coordinate, sort the ``n`` values, drop ``k = floor(beta * n)`` from
    each end, average the rest (Yin et al. 2018). ``median``: per-coordinate median (the mean of
    the two middle values for even ``n``). Both are **unweighted** statistics over the (clipped)
    deltas: weights -- examples and staleness -- do not enter them; see ``FedBuff`` for how the
    weights still scale the result under ``sum`` normalisation.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import numpy as np
from numpy.typing import NDArray

#: Coordinates per block when sorting a stacked buffer (bounds the temporary copy).
SORT_BLOCK: Final = 1 << 16


class RobustMode(StrEnum):
    """Which statistic of the buffered deltas becomes the aggregate."""

    NONE = "none"  # streaming weighted sum; never keeps the updates
    TRIMMED_MEAN = "trimmed_mean"
    MEDIAN = "median"


class NormBoundMode(StrEnum):
    REJECT = "reject"
    CLIP = "clip"


@dataclass(frozen=True)
class NormBound:
    """Configuration of the update-norm bound (see module docstring for the rule)."""

    max_norm: float | None = None
    mode: NormBoundMode = NormBoundMode.CLIP
    adaptive_multiplier: float | None = 5.0
    adaptive_window: int = 100
    adaptive_warmup: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", NormBoundMode(self.mode))
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ValueError(f"max_norm must be None or finite and > 0, got {self.max_norm!r}")
        m = self.adaptive_multiplier
        if m is not None and not (math.isfinite(m) and m > 0):
            raise ValueError(f"adaptive_multiplier must be None or finite and > 0, got {m!r}")
        if self.adaptive_warmup < 1:
            raise ValueError(f"adaptive_warmup must be >= 1, got {self.adaptive_warmup}")
        if self.adaptive_window < self.adaptive_warmup:
            raise ValueError(
                f"adaptive_window ({self.adaptive_window}) must be >= adaptive_warmup "
                f"({self.adaptive_warmup})"
            )

    @classmethod
    def off(cls) -> NormBound:
        """No bound at all."""
        return cls(max_norm=None, adaptive_multiplier=None)

    @classmethod
    def static(cls, max_norm: float, mode: NormBoundMode = NormBoundMode.CLIP) -> NormBound:
        """A fixed bound ``max_norm``, no adaptive part."""
        return cls(max_norm=max_norm, mode=mode, adaptive_multiplier=None)

    @property
    def enabled(self) -> bool:
        return self.max_norm is not None or self.adaptive_multiplier is not None


@dataclass(frozen=True)
class NormDecision:
    """What the bound says about one update: ``clip_factor`` is 1.0 unless clipped."""

    norm: float
    bound: float | None
    clip_factor: float
    reject: bool

    @property
    def clipped(self) -> bool:
        return self.clip_factor < 1.0


class NormTracker:
    """Mutable state of the norm bound: the window of recent accepted norms."""

    def __init__(self, config: NormBound, history: Iterable[float] = ()) -> None:
        self._config = config
        self._history: deque[float] = deque(maxlen=config.adaptive_window)
        self._sorted: list[float] = []  # the same values, ascending: the median in O(1)
        for value in history:
            v = float(value)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"norm history must hold finite values >= 0, got {v}")
            self._append(v)

    @property
    def config(self) -> NormBound:
        return self._config

    def median(self) -> float | None:
        """Median of the recorded norms (``None`` while empty)."""
        values = self._sorted
        n = len(values)
        if n == 0:
            return None
        k = n // 2
        if n % 2:
            return values[k]
        return (values[k - 1] + values[k]) / 2.0

    def _append(self, value: float) -> None:
        history = self._history
        if history.maxlen is not None and len(history) == history.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, history[0])]
        history.append(value)
        bisect.insort(self._sorted, value)

    def bound(self) -> float | None:
        """The bound ``B`` in force now, ``None`` when nothing bounds the norm."""
        cfg = self._config
        bound = cfg.max_norm
        if cfg.adaptive_multiplier is not None and len(self._history) >= cfg.adaptive_warmup:
            median = self.median()
            # A zero median (all-zero updates so far) carries no scale information.
            if median is not None and median > 0.0:
                adaptive = cfg.adaptive_multiplier * median
                bound = adaptive if bound is None else min(bound, adaptive)
        return bound

    def decide(self, norm: float) -> NormDecision:
        """Judge an update of L2 norm ``norm`` (does not change the state)."""
        bound = self.bound()
        if bound is None or norm <= bound:
            return NormDecision(norm=norm, bound=bound, clip_factor=1.0, reject=False)
        if self._config.mode is NormBoundMode.REJECT:
            return NormDecision(norm=norm, bound=bound, clip_factor=1.0, reject=True)
        return NormDecision(norm=norm, bound=bound, clip_factor=bound / norm, reject=False)

    def record(self, decision: NormDecision) -> None:
        """Record an accepted update: ``min(norm, bound)`` enters the adaptive window."""
        if decision.reject or self._config.adaptive_multiplier is None:
            return
        norm = decision.norm if decision.bound is None else min(decision.norm, decision.bound)
        self._append(norm)

    def history(self) -> NDArray[np.float64]:
        """The window, oldest first (for snapshots)."""
        return np.fromiter(self._history, dtype=np.float64, count=len(self._history))


def trim_count(n: int, beta: float) -> int:
    """Values dropped from *each* end by :func:`trimmed_mean`: ``floor(beta * n)``."""
    if not (0.0 <= beta < 0.5):
        raise ValueError(f"trim beta must be in [0, 0.5), got {beta}")
    return math.floor(beta * n)


def _check_stack(stack: NDArray[np.float32]) -> None:
    if stack.ndim != 2 or stack.shape[0] < 1:
        raise ValueError(f"expected a stack of shape (n >= 1, num_params), got {stack.shape}")


def trimmed_mean(stack: NDArray[np.float32], beta: float) -> NDArray[np.float32]:
    """Coordinate-wise ``beta``-trimmed mean of the rows of ``stack`` (shape ``(n, P)``)."""
    _check_stack(stack)
    n, p = stack.shape
    k = trim_count(n, beta)
    out = np.empty(p, dtype=np.float32)
    for start in range(0, p, SORT_BLOCK):
        block = stack[:, start : start + SORT_BLOCK]
        kept = np.sort(block, axis=0)[k : n - k] if k > 0 else block
        out[start : start + SORT_BLOCK] = kept.mean(axis=0, dtype=np.float64)
    return out


def coordinate_median(stack: NDArray[np.float32]) -> NDArray[np.float32]:
    """Coordinate-wise median of the rows of ``stack`` (shape ``(n, P)``)."""
    _check_stack(stack)
    p = stack.shape[1]
    out = np.empty(p, dtype=np.float32)
    for start in range(0, p, SORT_BLOCK):
        block = stack[:, start : start + SORT_BLOCK].astype(np.float64)
        out[start : start + SORT_BLOCK] = np.median(block, axis=0)
    return out


def robust_center(stack: NDArray[np.float32], mode: RobustMode, beta: float) -> NDArray[np.float32]:
    """The robust statistic selected by ``mode`` (``NONE`` is the plain unweighted mean)."""
    if mode is RobustMode.TRIMMED_MEAN:
        return trimmed_mean(stack, beta)
    if mode is RobustMode.MEDIAN:
        return coordinate_median(stack)
    return trimmed_mean(stack, 0.0)

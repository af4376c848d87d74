"""Hostile devices: which devices attack and how they transform their deltas.

A fraction ``f`` of the fleet is malicious: device ``d`` is an attacker iff ``d`` is among the
first ``round(f · N)`` entries of a seeded permutation of ``0..N-1`` (exactly ``round(f · N)``
attackers, chosen uniformly). An attacker trains honestly, then replaces its delta ``δ`` by

* ``scale``:    ``s · δ``                     (boosted update, model replacement style);
* ``signflip``: ``-s · δ``                    (gradient ascent, scaled);
* ``noise``:    ``ξ · s · ||δ|| / ||ξ||`` with ``ξ ~ N(0, I)`` (random direction, ``s`` times the
  honest norm; a zero ``δ`` gives noise of norm ``s``),

where ``s`` is :attr:`AttackConfig.scale`. The transformed delta then goes through the normal
codec, so the aggregator sees exactly what a compromised device would send. Defences live on the
aggregator side (norm bound, trimmed mean, coordinate median); nothing here knows about them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

__all__ = ["AttackConfig", "AttackKind", "apply_attack", "malicious_mask"]

_STREAM_MALICIOUS = 0xBAD_5EED


class AttackKind(StrEnum):
    """How an attacker transforms its delta (see module docstring)."""

    SCALE = "scale"
    SIGNFLIP = "signflip"
    NOISE = "noise"


@dataclass(frozen=True)
class AttackConfig:
    """``fraction`` of devices attack with ``kind`` and factor ``scale`` (> 0)."""

    fraction: float = 0.0
    kind: AttackKind = AttackKind.SCALE
    scale: float = 20.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", AttackKind(self.kind))
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"malicious fraction must be in [0, 1], got {self.fraction}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"attack scale must be finite and > 0, got {self.scale}")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0.0


def malicious_mask(num_devices: int, fraction: float, seed: int) -> NDArray[np.bool_]:
    """Boolean mask with exactly ``round(fraction · num_devices)`` attackers (O(N) numpy)."""
    mask = np.zeros(num_devices, dtype=np.bool_)
    count = round(fraction * num_devices)
    if count > 0:
        rng = np.random.default_rng([seed & ((1 << 64) - 1), _STREAM_MALICIOUS])
        mask[rng.permutation(num_devices)[:count]] = True
    return mask


def apply_attack(
    delta: NDArray[np.float32], attack: AttackConfig, rng: np.random.Generator
) -> NDArray[np.float32]:
    """The delta an attacker sends instead of ``delta`` (a new array; ``delta`` is untouched)."""
    s = np.float32(attack.scale)
    if attack.kind is AttackKind.SCALE:
        return (delta * s).astype(np.float32, copy=False)
    if attack.kind is AttackKind.SIGNFLIP:
        return (delta * -s).astype(np.float32, copy=False)
    noise = rng.standard_normal(size=delta.shape[0])
    honest = float(np.linalg.norm(delta.astype(np.float64)))
    target = attack.scale * (honest if honest > 0 else 1.0)
    norm = float(np.linalg.norm(noise))
    factor = target / norm if norm > 0 else 0.0
    out: NDArray[np.float32] = np.multiply(noise, factor, dtype=np.float32)
    return out

"""Typed results and the persisted state of the aggregation core (frozen dataclasses)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from edgefl.aggregation.robust import RobustMode
from edgefl.aggregation.server_opt import OptimizerState
from edgefl.errors import RejectReason
from edgefl.privacy.ledger import PrivacyState, PrivacyStatistics


@dataclass(frozen=True)
class AddOutcome:
    """An accepted update: its weight factors, norm, clipping, and the buffer fill after it."""

    staleness: int
    example_weight: float
    staleness_weight: float
    weight: float  # example_weight * staleness_weight (enters W)
    norm: float  # ||delta|| before clipping
    norm_bound: float | None  # bound in force when the update arrived
    clip_factor: float  # c: the delta entered the buffer as c * delta
    clipped: bool
    buffer_fill: int
    buffer_size: int
    ready: bool  # buffer_fill >= buffer_size: time to call step()


@dataclass(frozen=True)
class StepResult:
    """One server step: ``previous_version -> version`` from ``num_updates`` buffered updates."""

    version: int
    previous_version: int
    num_updates: int
    weight_sum: float
    aggregate_norm: float  # ||a|| handed to the optimizer
    mean_staleness: float
    max_staleness: int
    clipped: int
    robust: RobustMode
    noise_std: float | None = None  # central DP: std of the noise added to the buffer sum (zC)


@dataclass(frozen=True)
class FedBuffStatistics:
    version: int
    buffer_fill: int
    buffer_size: int
    buffer_weight_sum: float
    accepted_total: int
    clipped_total: int
    steps_total: int
    rejected: Mapping[RejectReason, int]
    norm_bound: float | None
    norm_median: float | None
    privacy: PrivacyStatistics | None = None  # central DP on: epsilon, z, C, participations


@dataclass(frozen=True, eq=False)
class FedBuffState:
    """Everything needed to resume a FedBuff exactly (arrays are private copies).

    ``accumulator`` is set in non-robust mode; ``kept_deltas`` (n x P dense float32, unclipped),
    ``kept_weights`` and ``kept_clip`` (float64, length n) in robust mode. ``privacy`` is set
    when central DP is on (:class:`~edgefl.privacy.PrivacyState`; its ``to_json`` is the
    form to persist).
    """

    version: int
    weights: NDArray[np.float32]
    accumulator: NDArray[np.float32] | None
    kept_deltas: NDArray[np.float32] | None
    kept_weights: NDArray[np.float64] | None
    kept_clip: NDArray[np.float64] | None
    weight_sum: float
    count: int
    staleness_sum: int
    staleness_max: int
    clipped_in_buffer: int
    optimizer_kind: str
    optimizer_state: OptimizerState
    norm_history: NDArray[np.float64]
    accepted_total: int
    clipped_total: int
    steps_total: int
    rejected: dict[str, int]
    privacy: PrivacyState | None = None  # central DP: participations, the buffer's devices

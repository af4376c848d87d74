"""The sections of :class:`~firmware_sim.scenario.SimConfig`, each a small frozen record
validated at construction.

- :class:`FleetMix`: the device profile mix and its overrides (speed, dropout, crash).
- :class:`RunAggregation`: the run's aggregation options as the command line spells them
  (staleness and norm bound as text), how many devices train at once (FedBuff's concurrency,
  FedAvg's cohort and over-selection) and central DP. :meth:`RunAggregation.settings` is the one
  translation of them into the resolved :class:`~edgefl.aggregation.AggregationSettings` that
  the virtual simulator and the live aggregator both run.
- :class:`StopRule`: when a run stops (target accuracy, time, update and wall-clock budgets)
  and how often it measures.

The text parsers (:func:`parse_norm_bound`, the staleness text's
:func:`~edgefl.aggregation.parse_staleness`) live here, beside the record that validates with
them; :mod:`firmware_sim.scenario` re-exports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgefl.aggregation import (
    AggregationSettings,
    Algorithm,
    ExampleWeighting,
    Normalisation,
    NormBound,
    RobustMode,
    ServerOptimizerConfig,
    parse_staleness,
)
from edgefl.privacy.central import CentralDP
from firmware_sim.profiles import parse_distribution

__all__ = ["FleetMix", "RunAggregation", "StopRule", "parse_norm_bound", "reporting_goal"]


def parse_norm_bound(text: str) -> NormBound:
    """``auto`` (adaptive: 5x the median of recent norms, clip), ``off``, or a static ``MAX``."""
    value = text.strip().lower()
    if value in ("auto", "adaptive", "default"):
        return NormBound()
    if value in ("off", "none", "0"):
        return NormBound.off()
    return NormBound.static(float(value))


def reporting_goal(selected: int, overselect: float) -> int:
    """``max(1, ceil(selected / overselect))`` (a tolerance keeps ``13 / 1.3`` at 10)."""
    return max(1, math.ceil(selected / overselect - 1e-9))


@dataclass(frozen=True)
class FleetMix:
    """Which devices: a profile mix (``firmware_sim.profiles``) and overrides of it."""

    profile: str = "mixed"
    speed: str | None = None  # e.g. "lognormal:0,1": overrides every profile's compute speed
    dropout: float | None = None  # overrides every profile's dropout probability
    crash: float | None = None

    def __post_init__(self) -> None:
        if self.speed is not None:
            parse_distribution(self.speed)


@dataclass(frozen=True)
class RunAggregation:
    """The run's aggregation and participation options (see the module docstring)."""

    algorithm: Algorithm = Algorithm.FEDBUFF
    # K from bench/fedbuff_sweep.py and the regime table (docs/SIMULATOR.md "Defaults"): 4 is
    # the smallest K that reaches the target on every fleet where K 5 did (K 3 stalled at chance
    # on 1,000+ phones and vehicles; K 5 fell under 4x on lab)
    buffer_size: int = 4
    concurrency: int = 20
    staleness: str = "polynomial:0.5"
    max_staleness: int | None = 100
    server_lr: float = 1.0  # both algorithms; bench/fedbuff_sweep.py, docs/SIMULATOR.md "Defaults"
    server_momentum: float = 0.0
    # FedBuff buffer normalisation: "mean" (weighted mean, FedAvg-compatible) or "sum" (divide
    # by K with equal example weights, as in the FedBuff paper: stale buffers take smaller steps)
    normalisation: Normalisation = Normalisation.MEAN
    norm_bound: str = "auto"
    robust: RobustMode = RobustMode.NONE
    trim_beta: float = 0.2
    cohort_size: int | None = None  # FedAvg: devices selected per round, default = concurrency
    overselect: float = 1.3  # FedAvg: select this many times the reporting goal (Bonawitz 2019)
    round_deadline_s: float | None = None  # FedAvg: default automatic (see virtual.py)
    lease_s: float | None = None  # FedBuff: participation lease, default automatic (virtual.py)
    min_fraction: float = 0.5
    privacy: CentralDP | None = None  # central DP at the simulated aggregator (docs/PRIVACY.md)

    def __post_init__(self) -> None:
        object.__setattr__(self, "algorithm", Algorithm(self.algorithm))
        object.__setattr__(self, "robust", RobustMode(self.robust))
        if self.concurrency < 1 or self.buffer_size < 1:
            raise ValueError("concurrency and buffer_size must be >= 1")
        if self.cohort_size is not None and self.cohort_size < 1:
            raise ValueError("cohort_size must be >= 1")
        if not (math.isfinite(self.overselect) and self.overselect >= 1.0):
            raise ValueError(f"overselect must be >= 1, got {self.overselect}")
        parse_norm_bound(self.norm_bound)
        parse_staleness(self.staleness).weight()

    @property
    def effective_cohort(self) -> int:
        """FedAvg: devices selected per round (default: FedBuff's ``concurrency``, so both
        algorithms have the same number of devices training at once)."""
        return self.cohort_size or self.concurrency

    @property
    def reporting_goal(self) -> int:
        """FedAvg: accepted updates that close a round, ``ceil(cohort / overselect)``; the
        over-selected rest are stragglers whose work is discarded (Bonawitz et al. 2019)."""
        return reporting_goal(self.effective_cohort, self.overselect)

    @property
    def example_weighting(self) -> ExampleWeighting:
        """Equal weights under ``sum`` normalisation (else the step scales with the mean example
        count); example-count weights under ``mean``."""
        if Normalisation(self.normalisation) is Normalisation.SUM:
            return ExampleWeighting.EQUAL
        return ExampleWeighting.EXAMPLES

    def server_optimizer(self) -> ServerOptimizerConfig:
        return ServerOptimizerConfig.sgd(lr=self.server_lr, momentum=self.server_momentum)

    def settings(self) -> AggregationSettings:
        """The run's aggregation, resolved: what the virtual simulator builds its core from and
        what the live aggregator is configured with (the FedAvg cohort is
        :attr:`reporting_goal`; FedAvg weighs by examples whatever the normalisation)."""
        fedavg = self.algorithm is Algorithm.FEDAVG
        return AggregationSettings(
            algorithm=self.algorithm,
            buffer_size=self.reporting_goal if fedavg else self.buffer_size,
            staleness=parse_staleness(self.staleness),
            max_staleness=self.max_staleness,
            example_weighting=ExampleWeighting.EXAMPLES if fedavg else self.example_weighting,
            normalisation=Normalisation(self.normalisation),
            norm_bound=parse_norm_bound(self.norm_bound),
            robust=self.robust,
            trim_beta=self.trim_beta,
            server_optimizer=self.server_optimizer(),
            min_fraction=self.min_fraction,
            privacy=self.privacy,
        )


@dataclass(frozen=True)
class StopRule:
    """When a run stops, and how often it measures the model."""

    target: float = 0.9
    stop_at_target: bool = True
    max_time_s: float | None = None
    max_updates: int | None = None
    max_wall_s: float | None = None
    eval_every_updates: int = 20

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target accuracy must be in (0, 1], got {self.target}")
        if self.eval_every_updates < 1:
            raise ValueError("eval_every_updates must be >= 1")

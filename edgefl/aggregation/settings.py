"""The aggregation knobs, resolved, and the one translation of them into the core's configs.

:class:`AggregationSettings` is what both front ends reduce their options to: the aggregator
service (:meth:`edgefl.aggregator.AggregatorConfig.aggregation_settings`, from its flat CLI-level
knobs) and the fleet simulator (``firmware_sim.scenario.SimConfig.aggregation_settings``, from
its run description). :meth:`AggregationSettings.core_config` is the only place those knobs
become a :class:`~edgefl.aggregation.FedBuffConfig` or a
:class:`~edgefl.aggregation.SyncFedAvgConfig`, so the virtual simulator and the live service run
the same aggregation for the same run description (a unit test compares them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgefl.aggregation.core import Algorithm, CoreConfig
from edgefl.aggregation.fedavg import SyncFedAvgConfig
from edgefl.aggregation.fedbuff import DEFAULT_MAX_STALENESS, FedBuffConfig, Normalisation
from edgefl.aggregation.robust import NormBound, RobustMode
from edgefl.aggregation.server_opt import ServerOptimizerConfig
from edgefl.aggregation.staleness import StalenessKind, StalenessSetting
from edgefl.aggregation.weighting import DEFAULT_EXAMPLE_CAP, ExampleWeighting
from edgefl.privacy.central import CentralDP

__all__ = ["AggregationSettings"]

_SHARED = (
    "example_weighting",
    "example_cap",
    "norm_bound",
    "robust",
    "trim_beta",
    "server_optimizer",
)


@dataclass(frozen=True)
class AggregationSettings:
    """Frozen, resolved aggregation knobs. ``buffer_size`` is FedBuff's K, and FedAvg's cohort
    size when the cohort is anonymous (the service); the FedAvg fields are ignored by FedBuff and
    the staleness fields by FedAvg (whose updates all have ``tau = 0``). Validated by building
    the core config."""

    algorithm: Algorithm = Algorithm.FEDBUFF
    buffer_size: int = 10
    staleness: StalenessSetting = field(
        default_factory=lambda: StalenessSetting(StalenessKind.POLYNOMIAL)
    )
    max_staleness: int | None = DEFAULT_MAX_STALENESS
    example_weighting: ExampleWeighting = ExampleWeighting.EXAMPLES
    example_cap: int | None = DEFAULT_EXAMPLE_CAP
    normalisation: Normalisation = Normalisation.MEAN
    norm_bound: NormBound = field(default_factory=NormBound)
    robust: RobustMode = RobustMode.NONE
    trim_beta: float = 0.2
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)
    min_fraction: float = 0.5
    privacy: CentralDP | None = None  # central DP (FedBuff only; docs/PRIVACY.md)

    def __post_init__(self) -> None:
        object.__setattr__(self, "algorithm", Algorithm(self.algorithm))
        self.core_config()

    def fedbuff_config(self) -> FedBuffConfig:
        return FedBuffConfig(
            buffer_size=self.buffer_size,
            staleness=self.staleness.weight(),
            max_staleness=self.max_staleness,
            normalisation=self.normalisation,
            privacy=self.privacy,
            **self._shared(),
        )

    def sync_config(self) -> SyncFedAvgConfig:
        return SyncFedAvgConfig(min_fraction=self.min_fraction, **self._shared())

    def _shared(self) -> dict[str, Any]:
        """The fields both algorithms' configs take, by name."""
        return {name: getattr(self, name) for name in _SHARED}

    def core_config(self) -> CoreConfig:
        """The config of :attr:`algorithm` (what :func:`~edgefl.aggregation.make_core` takes)."""
        if self.algorithm is Algorithm.FEDBUFF:
            return self.fedbuff_config()
        if self.privacy is not None:
            raise ValueError("differential privacy is implemented for fedbuff only")
        return self.sync_config()

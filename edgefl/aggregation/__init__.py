"""Sans-IO aggregation core: staleness and example weights, the FedBuff buffer, server optimizers,
the synchronous FedAvg baseline and robust aggregation. numpy only: no torch, no I/O, no clocks.

Sign convention: ``delta = local_weights - base_weights``; the server moves *along* the aggregate
(``w <- w + lr * a`` for SGD), FedAdam treats ``g = -a`` as the gradient.

Modules: :mod:`.updates` (the ``AddableUpdate`` seam), :mod:`.staleness`, :mod:`.weighting`,
:mod:`.server_opt`, :mod:`.robust`, :mod:`.fedbuff`, :mod:`.outcomes` (results and
persisted state), :mod:`.fedavg`, :mod:`.core` (:class:`Algorithm`, the :class:`AggregationCore`
seam both the service and the simulator drive, :func:`make_core`), (with the one parser of the
staleness text, :func:`parse_staleness`), :mod:`.settings` (:class:`AggregationSettings`: the
resolved knobs and their one translation into the core's configs).
"""

from __future__ import annotations

from edgefl.aggregation.core import (
    AggregationCore,
    Algorithm,
    CoreAdd,
    CoreConfig,
    FedBuffCore,
    SyncCore,
    make_core,
)
from edgefl.aggregation.fedavg import (
    RoundResult,
    RoundStatus,
    SyncAddOutcome,
    SyncFedAvg,
    SyncFedAvgConfig,
    SyncFedAvgStatistics,
    required_updates,
)
from edgefl.aggregation.fedbuff import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_MAX_STALENESS,
    MAX_CONTRIBUTION_NORM,
    FedBuff,
    FedBuffConfig,
    Normalisation,
)
from edgefl.aggregation.outcomes import AddOutcome, FedBuffState, FedBuffStatistics, StepResult
from edgefl.aggregation.robust import (
    NormBound,
    NormBoundMode,
    NormDecision,
    NormTracker,
    RobustMode,
    coordinate_median,
    robust_center,
    trim_count,
    trimmed_mean,
)
from edgefl.aggregation.server_opt import (
    OptimizerState,
    ServerAdam,
    ServerOptimizer,
    ServerOptimizerConfig,
    ServerOptimizerKind,
    ServerSGD,
)
from edgefl.aggregation.settings import AggregationSettings
from edgefl.aggregation.staleness import (
    ConstantStaleness,
    HingeStaleness,
    PolynomialStaleness,
    StalenessKind,
    StalenessSetting,
    StalenessWeight,
    make_staleness,
    parse_staleness,
)
from edgefl.aggregation.updates import AddableUpdate, DenseUpdate
from edgefl.aggregation.weighting import (
    DEFAULT_EXAMPLE_CAP,
    ExampleWeighting,
    UpdateWeight,
    example_weight,
    update_weight,
)

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_EXAMPLE_CAP",
    "DEFAULT_MAX_STALENESS",
    "MAX_CONTRIBUTION_NORM",
    "AddOutcome",
    "AddableUpdate",
    "AggregationCore",
    "AggregationSettings",
    "Algorithm",
    "ConstantStaleness",
    "CoreAdd",
    "CoreConfig",
    "DenseUpdate",
    "ExampleWeighting",
    "FedBuff",
    "FedBuffConfig",
    "FedBuffCore",
    "FedBuffState",
    "FedBuffStatistics",
    "HingeStaleness",
    "NormBound",
    "NormBoundMode",
    "NormDecision",
    "NormTracker",
    "Normalisation",
    "OptimizerState",
    "PolynomialStaleness",
    "RobustMode",
    "RoundResult",
    "RoundStatus",
    "ServerAdam",
    "ServerOptimizer",
    "ServerOptimizerConfig",
    "ServerOptimizerKind",
    "ServerSGD",
    "StalenessKind",
    "StalenessSetting",
    "StalenessWeight",
    "StepResult",
    "SyncAddOutcome",
    "SyncCore",
    "SyncFedAvg",
    "SyncFedAvgConfig",
    "SyncFedAvgStatistics",
    "UpdateWeight",
    "coordinate_median",
    "example_weight",
    "make_core",
    "make_staleness",
    "parse_staleness",
    "required_updates",
    "robust_center",
    "trim_count",
    "trimmed_mean",
    "update_weight",
]

"""Sans-IO aggregation core: staleness and example weights, the FedBuff buffer, server optimizers,
the synchronous FedAvg baseline and robust aggregation. numpy only: no torch, no I/O, no clocks.

Sign convention: ``delta = local_weights - base_weights``; the server moves *along* the aggregate
(``w <- w + lr * a`` for SGD), FedAdam treats ``g = -a`` as the gradient.

Modules: :mod:`.updates` (the ``AddableUpdate`` seam), :mod:`.staleness`, :mod:`.weighting`,
:mod:`.server_opt`, :mod:`.robust`, :mod:`.fedbuff`, :mod:`.outcomes` (results and
persisted state), :mod:`.fedavg`.
"""

from __future__ import annotations

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
from edgefl.aggregation.staleness import (
    ConstantStaleness,
    HingeStaleness,
    PolynomialStaleness,
    StalenessKind,
    StalenessWeight,
    make_staleness,
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
    "ConstantStaleness",
    "DenseUpdate",
    "ExampleWeighting",
    "FedBuff",
    "FedBuffConfig",
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
    "StalenessWeight",
    "StepResult",
    "SyncAddOutcome",
    "SyncFedAvg",
    "SyncFedAvgConfig",
    "SyncFedAvgStatistics",
    "UpdateWeight",
    "coordinate_median",
    "example_weight",
    "make_staleness",
    "required_updates",
    "robust_center",
    "trim_count",
    "trimmed_mean",
    "update_weight",
]

"""One seam over the two aggregation algorithms: :class:`AggregationCore`, from :func:`make_core`.

The aggregator service (:class:`edgefl.aggregator.engine.Engine`) and the virtual simulator
(:mod:`firmware_sim.virtual`) both drive an :class:`AggregationCore` and never branch on the
algorithm to add an update, step, close a round or snapshot the model:

* :class:`FedBuffCore` -- asynchronous FedBuff: every accepted update goes into the buffer, and
  the step happens inside :meth:`~AggregationCore.add` as soon as ``K`` are buffered. It has no
  rounds: :attr:`~AggregationCore.round_open` is always true, :meth:`~AggregationCore.open_round`
  and :meth:`~AggregationCore.deadline_passed` do nothing.
* :class:`SyncCore` -- synchronous FedAvg (:class:`~edgefl.aggregation.SyncFedAvg`): a round at
  the current version for a cohort, closed when the whole cohort was accepted (inside ``add``)
  or when the caller reports its deadline passed. A cohort is either a set of device ids (the
  simulator samples devices) or a number ``K`` of anonymous slots (the service: the first ``K``
  distinct devices whose update trained from the round's version take them; a second update of
  a device in the same round is ``DUPLICATE``).

:class:`Algorithm` is the one name of the algorithms (the service's config, the simulator's config
and its run record all use it). Sans-IO: no clock is read, deadlines use the caller's ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from edgefl.aggregation.fedavg import (
    RoundResult,
    SyncFedAvg,
    SyncFedAvgConfig,
    SyncFedAvgStatistics,
)
from edgefl.aggregation.fedbuff import FedBuff, FedBuffConfig
from edgefl.aggregation.outcomes import AddOutcome, FedBuffState, FedBuffStatistics, StepResult
from edgefl.aggregation.robust import RobustMode
from edgefl.aggregation.updates import AddableUpdate
from edgefl.aggregation.view import ModelView
from edgefl.errors import RejectReason, UpdateRejected

__all__ = [
    "AggregationCore",
    "Algorithm",
    "CoreAdd",
    "CoreConfig",
    "FedBuffCore",
    "SyncCore",
    "make_core",
]


class Algorithm(StrEnum):
    """Aggregation algorithm: asynchronous FedBuff, or the synchronous FedAvg baseline."""

    FEDBUFF = "fedbuff"
    FEDAVG = "fedavg"


CoreConfig = FedBuffConfig | SyncFedAvgConfig
"""What :func:`make_core` builds from: the config type chooses the algorithm."""


@dataclass(frozen=True)
class CoreAdd:
    """An accepted update, and what it triggered: a server step, and (FedAvg) the closed round
    (``round.step`` is ``step``; a failed round has a ``round`` and no ``step``)."""

    outcome: AddOutcome
    step: StepResult | None = None
    round: RoundResult | None = None


class AggregationCore(Protocol):
    """What the service and the simulator drive (see the module docstring)."""

    @property
    def algorithm(self) -> Algorithm: ...

    @property
    def version(self) -> int: ...

    @property
    def weights(self) -> NDArray[np.float32]:
        """Read-only view of the current weights (changes in place at each step)."""
        ...

    @property
    def buffer_fill(self) -> int: ...

    @property
    def round_open(self) -> bool:
        """Whether updates can be accepted now (FedBuff: always)."""
        ...

    @property
    def deadline(self) -> float | None:
        """The open round's deadline (FedBuff: ``None``)."""
        ...

    @property
    def can_checkpoint(self) -> bool:
        """Whether :meth:`snapshot` with its buffer is compact (a streaming accumulator)."""
        ...

    def add(
        self, device_id: str, update: AddableUpdate, *, base_version: int, num_examples: int
    ) -> CoreAdd:
        """Add one update (stepping / closing the round when it completes one); raises
        ``UpdateRejected`` and changes nothing then."""
        ...

    def open_round(self, cohort: Iterable[str] | int, *, deadline: float | None) -> None:
        """Open a round for ``cohort`` (device ids, or a number of anonymous slots)."""
        ...

    def deadline_passed(self, now: float) -> RoundResult | None:
        """Close the open round if its deadline passed; ``None`` if nothing closed."""
        ...

    def flush(self) -> StepResult | None:
        """Step on a partly filled buffer now (FedBuff; a flush deadline); ``None`` when there
        is nothing to step (an empty buffer, or FedAvg, whose rounds have deadlines)."""
        ...

    def snapshot(self, *, buffer: bool = True) -> FedBuffState: ...

    def statistics(self) -> FedBuffStatistics | SyncFedAvgStatistics: ...

    def privacy_admits(self, device_id: str) -> bool:
        """Whether central DP would accept an update of ``device_id`` now (always without DP):
        a scheduler grants no lease to a device refused here."""
        ...


class FedBuffCore(ModelView[FedBuff]):
    """:class:`AggregationCore` over :class:`~edgefl.aggregation.FedBuff`."""

    algorithm = Algorithm.FEDBUFF

    def __init__(self, fedbuff: FedBuff) -> None:
        self._core = fedbuff

    @property
    def round_open(self) -> bool:
        return True

    @property
    def deadline(self) -> float | None:
        return None

    @property
    def can_checkpoint(self) -> bool:
        return self._core.config.robust is RobustMode.NONE

    def add(
        self, device_id: str, update: AddableUpdate, *, base_version: int, num_examples: int
    ) -> CoreAdd:
        outcome = self._core.add(
            update, base_version=base_version, num_examples=num_examples, device_id=device_id
        )
        return CoreAdd(outcome, step=self._core.step() if self._core.ready else None)

    def open_round(self, cohort: Iterable[str] | int, *, deadline: float | None) -> None:
        """FedBuff has no rounds: nothing to open."""

    def deadline_passed(self, now: float) -> RoundResult | None:
        return None

    def flush(self) -> StepResult | None:
        return self._core.step() if self._core.buffer_fill else None

    def snapshot(self, *, buffer: bool = True) -> FedBuffState:
        return self._core.snapshot(buffer=buffer)

    def statistics(self) -> FedBuffStatistics:
        return self._core.statistics()

    def privacy_admits(self, device_id: str) -> bool:
        return self._core.privacy_admits(device_id)


class SyncCore(ModelView[SyncFedAvg]):
    """:class:`AggregationCore` over :class:`~edgefl.aggregation.SyncFedAvg`."""

    algorithm = Algorithm.FEDAVG

    def __init__(self, sync: SyncFedAvg) -> None:
        self._core = sync
        self._slots = 0  # > 0: the open round has this many anonymous slots
        self._devices: set[str] = set()  # devices that took a slot in the open round

    @property
    def round_open(self) -> bool:
        return self._core.round_open

    @property
    def deadline(self) -> float | None:
        return self._core.deadline

    @property
    def can_checkpoint(self) -> bool:
        return False

    def open_round(self, cohort: Iterable[str] | int, *, deadline: float | None) -> None:
        if isinstance(cohort, int):
            self._slots = cohort
            cohort = [f"slot-{i}" for i in range(cohort)]
        else:
            self._slots = 0
        self._devices = set()
        self._core.open_round(cohort, deadline=deadline)

    def add(
        self, device_id: str, update: AddableUpdate, *, base_version: int, num_examples: int
    ) -> CoreAdd:
        member = device_id
        if self._slots:
            if base_version == self._core.version and device_id in self._devices:
                raise UpdateRejected(
                    RejectReason.DUPLICATE,
                    f"device {device_id!r} already delivered for {self._core.version}",
                )
            member = f"slot-{len(self._devices)}"
        added = self._core.add(member, update, base_version=base_version, num_examples=num_examples)
        if self._slots:
            self._devices.add(device_id)
        result = added.result
        return CoreAdd(added.outcome, step=None if result is None else result.step, round=result)

    def deadline_passed(self, now: float) -> RoundResult | None:
        return self._core.deadline_passed(now)

    def flush(self) -> StepResult | None:
        return None

    def snapshot(self, *, buffer: bool = True) -> FedBuffState:
        return self._core.snapshot(buffer=buffer)

    def statistics(self) -> SyncFedAvgStatistics:
        return self._core.statistics()

    def privacy_admits(self, device_id: str) -> bool:
        return True  # no DP with FedAvg (AggregationSettings refuses it)


def make_core(config: CoreConfig, initial: ArrayLike | FedBuffState) -> AggregationCore:
    """The core for ``config`` (a :class:`FedBuffConfig` or a :class:`SyncFedAvgConfig`), from
    version-0 weights or restored from a snapshot (``FedBuffState``; raises ``ValueError`` when
    it does not fit ``config``). A FedAvg core starts with no round open."""
    if isinstance(config, FedBuffConfig):
        if isinstance(initial, FedBuffState):
            return FedBuffCore(FedBuff.restore(config, initial))
        return FedBuffCore(FedBuff(config, initial))
    if isinstance(initial, FedBuffState):
        return SyncCore(SyncFedAvg.restore(config, initial))
    return SyncCore(SyncFedAvg(config, initial))

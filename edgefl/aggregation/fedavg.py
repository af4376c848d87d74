"""Synchronous FedAvg baseline: the FedBuff machinery behind a cohort barrier.

A round opens at the current version ``v`` with a cohort of device ids and an optional deadline
(a number on the caller's clock; this module never reads a clock). Cohort members send updates
trained from ``v``; each is weighed (examples, capped), norm-bounded and streamed into the buffer
exactly as in FedBuff, with ``tau = 0`` by construction and ``mean`` normalisation, so one round
is weighted FedAvg ``w <- w + lr * sum n_i delta_i / sum n_i`` (optionally with server momentum,
FedAdam, or a robust aggregator).

The round closes

* when every cohort member's update has been **accepted** (``add`` returns the result), or
* when the caller reports ``deadline_passed(now)`` with ``now >= deadline``, or calls
  ``close_round()``.

At close it steps if ``accepted >= max(1, ceil(min_fraction * cohort_size))`` (status
``complete`` when the whole cohort was accepted, else ``partial``); otherwise the round
``failed``: the buffer is dropped and the version stays, so the caller opens a new round.

Rejections (``UpdateRejected``): wrong version -> STALE / FUTURE_VERSION; a device outside the
cohort, or no round open -> UNKNOWN_DEVICE (detail says which); a second update from a member ->
DUPLICATE; plus everything ``FedBuff.add`` rejects. A member whose update is rejected does not
count as arrived: the round then closes at its deadline (or ``close_round()``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from numpy.typing import ArrayLike

from edgefl.aggregation.fedbuff import FedBuff, FedBuffConfig, Normalisation
from edgefl.aggregation.outcomes import AddOutcome, FedBuffState, FedBuffStatistics, StepResult
from edgefl.aggregation.robust import NormBound, RobustMode
from edgefl.aggregation.server_opt import ServerOptimizerConfig
from edgefl.aggregation.staleness import ConstantStaleness
from edgefl.aggregation.updates import AddableUpdate
from edgefl.aggregation.view import ModelView
from edgefl.aggregation.weighting import DEFAULT_EXAMPLE_CAP, ExampleWeighting
from edgefl.errors import RejectReason, UpdateRejected


@dataclass(frozen=True)
class SyncFedAvgConfig:
    """Frozen configuration of the synchronous baseline."""

    min_fraction: float = 0.5
    example_weighting: ExampleWeighting = ExampleWeighting.EXAMPLES
    example_cap: int | None = DEFAULT_EXAMPLE_CAP
    norm_bound: NormBound = field(default_factory=NormBound)
    robust: RobustMode = RobustMode.NONE
    trim_beta: float = 0.2
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_fraction) and 0.0 < self.min_fraction <= 1.0):
            raise ValueError(f"min_fraction must be in (0, 1], got {self.min_fraction}")
        self.fedbuff_config()  # validates the shared fields

    def fedbuff_config(self) -> FedBuffConfig:
        """The FedBuff configuration the barrier drives (``buffer_size`` is unused: the barrier
        decides when to step, and ``mean`` normalisation does not depend on K)."""
        return FedBuffConfig(
            buffer_size=1,
            staleness=ConstantStaleness(),
            max_staleness=0,
            example_weighting=self.example_weighting,
            example_cap=self.example_cap,
            normalisation=Normalisation.MEAN,
            norm_bound=self.norm_bound,
            robust=self.robust,
            trim_beta=self.trim_beta,
            server_optimizer=self.server_optimizer,
        )


class RoundStatus(StrEnum):
    COMPLETE = "complete"  # every cohort member accepted; stepped
    PARTIAL = "partial"  # closed early (deadline) with enough members; stepped
    FAILED = "failed"  # closed with too few members; no step, version unchanged


@dataclass(frozen=True)
class RoundResult:
    status: RoundStatus
    round_version: int  # the version the cohort trained from
    version: int  # the model version after the round
    cohort_size: int
    accepted: int
    required: int
    missing: frozenset[str]
    step: StepResult | None


@dataclass(frozen=True)
class SyncAddOutcome:
    outcome: AddOutcome
    accepted: int  # accepted in this round so far, including this update
    cohort_size: int
    result: RoundResult | None  # set when this update completed the barrier


@dataclass(frozen=True)
class SyncFedAvgStatistics:
    fedbuff: FedBuffStatistics
    rounds: Mapping[RoundStatus, int]
    rejected: Mapping[RejectReason, int]  # barrier rejections plus FedBuff's own


def required_updates(cohort_size: int, min_fraction: float) -> int:
    """``max(1, ceil(min_fraction * cohort_size))`` (robust to float round-off)."""
    return max(1, math.ceil(min_fraction * cohort_size - 1e-9))


class SyncFedAvg(ModelView[FedBuff]):
    """Round-based synchronous FedAvg over the FedBuff core."""

    def __init__(self, config: SyncFedAvgConfig, initial_weights: ArrayLike, *, version: int = 0):
        self._config = config
        self._core = FedBuff(config.fedbuff_config(), initial_weights, version=version)
        self._cohort: frozenset[str] | None = None
        self._arrived: set[str] = set()
        self._deadline: float | None = None
        self._rounds: Counter[RoundStatus] = Counter()
        self._rejected: Counter[RejectReason] = Counter()

    @property
    def config(self) -> SyncFedAvgConfig:
        return self._config

    @property
    def round_open(self) -> bool:
        return self._cohort is not None

    @property
    def cohort(self) -> frozenset[str]:
        return self._cohort if self._cohort is not None else frozenset()

    @property
    def arrived(self) -> frozenset[str]:
        return frozenset(self._arrived)

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def open_round(self, cohort: Iterable[str], *, deadline: float | None = None) -> int:
        """Open a round at the current version for ``cohort``; returns that version.

        Raises ``RuntimeError`` if a round is already open, ``ValueError`` for an empty cohort.
        """
        if self._cohort is not None:
            raise RuntimeError(f"round for version {self.version} is still open")
        members = frozenset(cohort)
        if not members:
            raise ValueError("a round needs a non-empty cohort")
        if deadline is not None and not math.isfinite(deadline):
            raise ValueError(f"deadline must be finite, got {deadline}")
        self._core.clear_buffer()
        self._cohort = members
        self._arrived = set()
        self._deadline = deadline
        return self.version

    def add(
        self, device_id: str, update: AddableUpdate, *, base_version: int, num_examples: int
    ) -> SyncAddOutcome:
        """Accept a cohort member's update; closes the round when the last member arrives."""
        try:
            self._admit(device_id, base_version)
        except UpdateRejected as exc:
            self._rejected[exc.reason] += 1
            raise
        outcome = self._core.add(update, base_version=base_version, num_examples=num_examples)
        self._arrived.add(device_id)
        cohort_size = len(self.cohort)
        accepted = len(self._arrived)
        result = self._close() if accepted == cohort_size else None
        return SyncAddOutcome(outcome, accepted, cohort_size, result)

    def _admit(self, device_id: str, base_version: int) -> None:
        v = self.version
        if base_version < v:
            raise UpdateRejected(RejectReason.STALE, f"base_version {base_version} < round {v}")
        if base_version > v:
            raise UpdateRejected(
                RejectReason.FUTURE_VERSION, f"base_version {base_version} > round {v}"
            )
        if self._cohort is None:
            raise UpdateRejected(RejectReason.UNKNOWN_DEVICE, f"no round open at version {v}")
        if device_id not in self._cohort:
            raise UpdateRejected(
                RejectReason.UNKNOWN_DEVICE, f"device {device_id!r} is not in the cohort of {v}"
            )
        if device_id in self._arrived:
            raise UpdateRejected(
                RejectReason.DUPLICATE, f"device {device_id!r} already delivered for {v}"
            )

    def deadline_passed(self, now: float) -> RoundResult | None:
        """Close the open round if ``now >= deadline``; ``None`` if nothing closed."""
        if self._cohort is None or self._deadline is None or now < self._deadline:
            return None
        return self._close()

    def close_round(self) -> RoundResult:
        """Close the open round now (operator stop, or a round without deadline)."""
        if self._cohort is None:
            raise RuntimeError("no round is open")
        return self._close()

    def _close(self) -> RoundResult:
        assert self._cohort is not None
        cohort = self._cohort
        round_version = self.version
        accepted = len(self._arrived)
        required = required_updates(len(cohort), self._config.min_fraction)
        step: StepResult | None = None
        if accepted >= required:
            step = self._core.step()
            status = RoundStatus.COMPLETE if accepted == len(cohort) else RoundStatus.PARTIAL
        else:
            self._core.clear_buffer()
            status = RoundStatus.FAILED
        self._rounds[status] += 1
        result = RoundResult(
            status=status,
            round_version=round_version,
            version=self.version,
            cohort_size=len(cohort),
            accepted=accepted,
            required=required,
            missing=cohort - self._arrived,
            step=step,
        )
        self._cohort = None
        self._arrived = set()
        self._deadline = None
        return result

    # ------------------------------------------------------------------ persistence
    def snapshot(self, *, buffer: bool = True) -> FedBuffState:
        """The model state of the barrier: weights, version, optimizer moments, norm history and
        counters (FedBuff's :meth:`~edgefl.aggregation.FedBuff.snapshot` of the core; with
        ``buffer=True`` also the open round's buffer).

        The round itself (cohort, arrivals, deadline) and the round/rejection tallies are not
        part of it: :meth:`restore` gives a barrier with no round open, and the caller opens one
        (a restarted service starts a fresh round; the buffered updates of a round are
        persisted and replayed by the caller, see :class:`edgefl.aggregator.engine.Engine`).
        """
        return self._core.snapshot(buffer=buffer)

    @classmethod
    def restore(cls, config: SyncFedAvgConfig, state: FedBuffState) -> SyncFedAvg:
        """Rebuild a barrier from ``config`` and a :meth:`snapshot` (no round open; the restored
        buffer, if any, is cleared by the next :meth:`open_round`). Raises ``ValueError`` as
        :meth:`FedBuff.restore` does."""
        sync = cls(config, state.weights, version=state.version)
        sync._core = FedBuff.restore(config.fedbuff_config(), state)
        return sync

    def statistics(self) -> SyncFedAvgStatistics:
        core = self._core.statistics()
        rejected = Counter(self._rejected)
        rejected.update(core.rejected)
        return SyncFedAvgStatistics(
            fedbuff=core,
            rounds=MappingProxyType(dict(self._rounds)),
            rejected=MappingProxyType(dict(rejected)),
        )

"""One sans-IO interface over the two aggregation algorithms the service runs.

:class:`Engine` hides whether updates go into :class:`~edgefl.aggregation.FedBuff` (asynchronous:
a server step as soon as K updates are buffered) or into
:class:`~edgefl.aggregation.SyncFedAvg` (synchronous FedAvg: a round at the current version
that closes when K updates arrived or at its deadline). Both keep the model, the optimizer state
and a streaming buffer; the engine adds what the service needs around them:

* ``generation``: a counter bumped every time the buffer is emptied (a step, or a failed FedAvg
  round). The service stores each accepted encoded update with the generation it entered, so a
  restart restores the last model snapshot and replays exactly the updates of the current
  generation, in order, through :meth:`Engine.add` -- the same inputs in the same order give the
  same buffer, bit for bit (FedBuff's weights, clipping and norm history are deterministic).
* FedAvg cohorts: a round's cohort is ``K`` anonymous slots; the first ``K`` distinct devices whose
  update trained from the round's version take them. A second update of a device in the same
  round is ``DUPLICATE``; an update from another version is ``STALE`` / ``FUTURE_VERSION``.

The algorithm itself is an :class:`~edgefl.aggregation.AggregationCore` from
:func:`~edgefl.aggregation.make_core` (the same seam the virtual simulator drives); the engine
never branches on the algorithm. Never reads a clock: FedAvg deadlines use the ``now`` the
caller passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefl.aggregation import (
    AddableUpdate,
    AddOutcome,
    AggregationCore,
    FedBuffState,
    FedBuffStatistics,
    RoundResult,
    RoundStatus,
    StepResult,
    make_core,
)
from edgefl.aggregation.view import ModelView
from edgefl.aggregator.config import AggregatorConfig, Algorithm
from edgefl.participation import flush_due
from edgefl.privacy import PrivacyStatistics

__all__ = ["AddResult", "Engine"]


@dataclass(frozen=True)
class AddResult:
    """An accepted update, and what it triggered (a step, or a closed FedAvg round)."""

    outcome: AddOutcome
    step: StepResult | None = None
    round: RoundResult | None = None


class Engine(ModelView[AggregationCore]):
    """FedBuff or synchronous FedAvg behind one interface (see the module docstring)."""

    def __init__(
        self,
        config: AggregatorConfig,
        state: FedBuffState,
        *,
        generation: int = 0,
        now: float = 0.0,
    ) -> None:
        self._config = config
        self._generation = generation
        self._discarded = 0
        self._rounds: dict[str, int] = {}
        self._privacy: tuple[int, PrivacyStatistics | None] | None = None  # (version, figures)
        self._core = make_core(config.aggregation_settings().core_config(), state)
        part = config.participation
        flushes = part is not None and self._core.algorithm is Algorithm.FEDBUFF  # FedAvg: rounds
        self._flush_after = part.flush_after_s if part is not None and flushes else None
        # when the buffer last became non-empty (a restored checkpoint's buffer: now)
        self._first_buffered_at = now if self._core.buffer_fill else None
        self._open_round(now)

    # ------------------------------------------------------------------ properties
    @property
    def algorithm(self) -> Algorithm:
        return self._core.algorithm

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def buffer_size(self) -> int:
        return self._config.aggregation.buffer_size

    @property
    def discarded(self) -> int:
        """Accepted updates dropped with a failed FedAvg round (too few arrived by the deadline)."""
        return self._discarded

    @property
    def rounds(self) -> dict[str, int]:
        """FedAvg rounds closed, by :class:`RoundStatus` value."""
        return dict(self._rounds)

    @property
    def deadline(self) -> float | None:
        return self._core.deadline

    @property
    def flush_deadline(self) -> float | None:
        """When a partly filled buffer steps (``participation.flush_after_s``; None: never)."""
        if self._flush_after is None or self._first_buffered_at is None:
            return None
        return self._first_buffered_at + self._flush_after

    # ------------------------------------------------------------------ ingest
    def add(
        self,
        device_id: str,
        update: AddableUpdate,
        *,
        base_version: int,
        num_examples: int,
        now: float = 0.0,
    ) -> AddResult:
        """Add one update; raises ``UpdateRejected`` (nothing changes then)."""
        added = self._core.add(
            device_id, update, base_version=base_version, num_examples=num_examples
        )
        if added.round is not None:
            self._closed(added.round, now)
        elif added.step is not None:
            self._generation += 1
        if self._core.buffer_fill == 0:
            self._first_buffered_at = None
        elif self._first_buffered_at is None:
            self._first_buffered_at = now
        return AddResult(added.outcome, step=added.step, round=added.round)

    def tick(self, now: float) -> RoundResult | StepResult | None:
        """FedAvg: close the round when its deadline passed (and open the next one). FedBuff
        with a flush deadline: step on the partly filled buffer when its first update waited
        ``flush_after_s`` (:func:`~edgefl.participation.flush_due`). Returns what happened."""
        result = self._core.deadline_passed(now)
        if result is not None:
            self._closed(result, now)
            return result
        due = flush_due(
            buffer_fill=self._core.buffer_fill,
            first_buffered_at=self._first_buffered_at,
            now=now,
            flush_after_s=self._flush_after,
        )
        step = self._core.flush() if due else None
        if step is not None:
            self._generation += 1
            self._first_buffered_at = None
        return step

    def _closed(self, result: RoundResult, now: float) -> None:
        self._rounds[result.status.value] = self._rounds.get(result.status.value, 0) + 1
        if result.status is RoundStatus.FAILED:
            self._discarded += result.accepted
        self._generation += 1
        self._open_round(now)

    def _open_round(self, now: float) -> None:
        """A round of ``buffer_size`` anonymous slots (FedAvg; FedBuff has no rounds)."""
        if not self._core.round_open:
            deadline = now + self._config.round_deadline_s
            self._core.open_round(self._config.aggregation.buffer_size, deadline=deadline)

    # ------------------------------------------------------------------ central DP
    def privacy_admits(self, device_id: str) -> bool:
        """Whether central DP would accept an update of ``device_id`` now (always without DP):
        not at its participation cap, no update in the open buffer. The lease desk's filter."""
        return self._core.privacy_admits(device_id)

    def privacy(self) -> PrivacyStatistics | None:
        """The central DP figures (None: DP off), computed once per version: the participation
        counts change only at a step."""
        if self._config.aggregation.privacy is None:
            return None
        cached = self._privacy
        if cached is None or cached[0] != self._core.version:
            stats = self._core.statistics()
            privacy = stats.privacy if isinstance(stats, FedBuffStatistics) else None
            cached = self._privacy = (self._core.version, privacy)
        return cached[1]

    # ------------------------------------------------------------------ persistence
    def snapshot(self) -> FedBuffState:
        """The model part of the state: weights, optimizer moments, norm history, counters.

        The buffer is *not* included (the service persists the encoded updates instead): the
        snapshot is restored with an empty buffer and the current generation's updates are
        replayed through :meth:`add`.
        """
        return self._core.snapshot(buffer=False)

    @property
    def can_checkpoint(self) -> bool:
        """FedBuff with a streaming accumulator (no robust mode) can store its buffer compactly."""
        return self._core.can_checkpoint

    def checkpoint(self) -> FedBuffState:
        """The full state *including* the buffer's accumulator, and a new generation: the
        updates buffered so far are inside the checkpoint and need no replay. Only when
        :attr:`can_checkpoint`."""
        if not self.can_checkpoint:
            raise RuntimeError("checkpoints need FedBuff without a robust mode")
        self._generation += 1
        return self._core.snapshot()

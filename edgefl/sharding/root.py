"""The root of hierarchical FedBuff: adds shards' partials exactly once, steps at K updates.

The root keeps FedBuff's buffer as sums of partials::

    A = sum_p A_p      W = sum_p W_p      count = sum_p count_p

and when ``count >= K`` (:attr:`ready`) :meth:`step` hands exactly that buffer to a
:class:`~edgefl.aggregation.fedbuff.FedBuff` (``restore`` + ``step``), so the aggregate
(``mean``: ``A / W``; ``sum``: ``A / K``), the server optimizer, the version bump and the
:class:`~edgefl.aggregation.outcomes.StepResult` are FedBuff's own code.

Exactly once (docs/SCALING.md, "Exactly once across the tree"). :meth:`add_partial` applies a
partial only if

1. its id was never applied (a re-forwarded copy is ``DUPLICATE``: the shard is confirmed
   again, nothing is added);
2. its owner epoch is the partition's current one, set by :meth:`take_over` (a deposed or dead
   owner's partial is ``STALE_EPOCH``: its updates were never acknowledged to the broker, which
   redelivers them to the new owner);
3. it covers no update already counted (``OVERLAP``, a protocol violation: counted, refused) and
   only devices of its partition (``WRONG_PARTITION``);
4. its version is not ahead of the root's (``FUTURE_VERSION``). A partial against an older
   version is applied as it is and counted as ``late`` (its staleness weights were computed
   when the shard accepted the updates).

Applying records every covered ``(device_id, seq)`` in the partition's high-water map, which
:meth:`take_over` hands to the next owner, so an update applied under an old epoch and
redelivered to the new owner is a ``REPLAY`` there. Every verdict is counted.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from enum import StrEnum
from types import MappingProxyType

import numpy as np
from numpy.typing import ArrayLike, NDArray

from edgefl.aggregation.fedbuff import FedBuff, FedBuffConfig
from edgefl.aggregation.outcomes import FedBuffState, StepResult
from edgefl.sharding.partial import PartialId, PartialSum, check_presummable
from edgefl.sharding.partitions import check_partitions, partition_of
from edgefl.sharding.seqwindow import SeqWindow


class PartialVerdict(StrEnum):
    """What :meth:`RootBuffer.add_partial` did with a partial (stable metric labels)."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE_EPOCH = "stale_epoch"
    FUTURE_VERSION = "future_version"
    OVERLAP = "overlap"
    WRONG_PARTITION = "wrong_partition"
    SHAPE_MISMATCH = "shape_mismatch"


@dataclasses.dataclass(frozen=True)
class RootState:
    """Everything a root must commit to resume exactly (private copies): the model (a FedBuff
    snapshot without buffer), the summed partials, the owner epochs, the applied partial ids,
    the per-partition high-water marks and the verdict counters. The root shell commits it in
    the same transaction as, and before confirming, each applied partial."""

    model: FedBuffState
    accumulator: NDArray[np.float32]
    weight_sum: float
    count: int
    staleness_sum: int
    staleness_max: int
    clipped: int
    epochs: dict[int, int]
    applied: frozenset[PartialId]
    high_water: dict[int, dict[str, SeqWindow]]
    verdicts: dict[str, int]


@dataclasses.dataclass
class _Buffer:
    """The summed partials since the last step."""

    acc: NDArray[np.float32]
    weight_sum: float = 0.0
    count: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    clipped: int = 0

    def add(self, partial: PartialSum) -> None:
        self.acc += partial.accumulator
        self.weight_sum += partial.weight_sum
        self.count += partial.count
        self.staleness_sum += partial.staleness_sum
        self.staleness_max = max(self.staleness_max, partial.staleness_max)
        self.clipped += partial.clipped


class RootBuffer:
    """See the module docstring. Not thread-safe."""

    def __init__(
        self,
        config: FedBuffConfig,
        initial_weights: ArrayLike,
        *,
        partitions: int,
        version: int = 0,
    ) -> None:
        check_presummable(config)
        self._config = config
        self._partitions = check_partitions(partitions)
        self._model = FedBuff(config, initial_weights, version=version)
        self._buffer = _Buffer(np.zeros(self._model.num_params, np.float32))
        self._epochs: dict[int, int] = {}
        self._applied: set[PartialId] = set()
        self._high_water: dict[int, dict[str, SeqWindow]] = {}
        self._verdicts: Counter[PartialVerdict] = Counter()
        self._late = 0

    # ------------------------------------------------------------------ state
    @property
    def version(self) -> int:
        return self._model.version

    @property
    def weights(self) -> NDArray[np.float32]:
        return self._model.weights

    @property
    def buffer_fill(self) -> int:
        return self._buffer.count

    @property
    def ready(self) -> bool:
        return self._buffer.count >= self._config.buffer_size

    def epoch(self, partition: int) -> int | None:
        """The partition's current owner epoch (None before the first take-over)."""
        return self._epochs.get(partition)

    @property
    def epochs(self) -> MappingProxyType[int, int]:
        """Current owner epoch of every partition taken over so far."""
        return MappingProxyType(dict(self._epochs))

    def verdicts(self) -> MappingProxyType[str, int]:
        """Partials by verdict, plus ``late`` (applied against an older version)."""
        counts = {str(v): n for v, n in self._verdicts.items()}
        return MappingProxyType({**counts, "late": self._late})

    # ------------------------------------------------------------------ ownership
    def take_over(self, partition: int, epoch: int) -> dict[str, SeqWindow]:
        """Make ``epoch`` the partition's owner epoch; returns its per-device windows of the
        ``seq`` applied (copies) for the new owner. ``ValueError`` unless the epoch is newer
        than the current one."""
        if not 0 <= partition < self._partitions:
            raise ValueError(f"partition {partition} outside [0, {self._partitions})")
        current = self._epochs.get(partition, -1)
        if epoch <= current:
            raise ValueError(f"epoch {epoch} of partition {partition} is not after {current}")
        self._epochs[partition] = epoch
        self._applied = {i for i in self._applied if i.partition != partition or i.epoch >= epoch}
        return {d: w.copy() for d, w in self._high_water.get(partition, {}).items()}

    # ------------------------------------------------------------------ ingest
    def add_partial(self, partial: PartialSum) -> PartialVerdict:
        """Apply ``partial`` exactly once (see the module docstring); the verdict is counted."""
        verdict = self._judge(partial)
        if verdict is PartialVerdict.APPLIED:
            self._buffer.add(partial)
            self._applied.add(partial.id)
            marks = self._high_water.setdefault(partial.id.partition, {})
            for device, seq in partial.covered:
                marks.setdefault(device, SeqWindow()).record(seq)
            self._late += partial.version < self.version
        self._verdicts[verdict] += 1
        return verdict

    def _judge(self, partial: PartialSum) -> PartialVerdict:
        pid = partial.id
        if pid in self._applied:
            return PartialVerdict.DUPLICATE
        if self._epochs.get(pid.partition) != pid.epoch:
            return PartialVerdict.STALE_EPOCH
        if partial.version > self.version:
            return PartialVerdict.FUTURE_VERSION
        if partial.accumulator.shape != (self._model.num_params,):
            return PartialVerdict.SHAPE_MISMATCH
        marks = self._high_water.get(pid.partition, {})
        for device, seq in partial.covered:
            if partition_of(device, self._partitions) != pid.partition:
                return PartialVerdict.WRONG_PARTITION
            window = marks.get(device)
            if window is not None and window.counted(seq):
                return PartialVerdict.OVERLAP
        return PartialVerdict.APPLIED

    # ------------------------------------------------------------------ step
    def step(self) -> StepResult:
        """FedBuff's step on the summed buffer (``RuntimeError`` when it is empty)."""
        buf = self._buffer
        state = dataclasses.replace(
            self._model.snapshot(buffer=False),
            accumulator=buf.acc,
            weight_sum=buf.weight_sum,
            count=buf.count,
            staleness_sum=buf.staleness_sum,
            staleness_max=buf.staleness_max,
            clipped_in_buffer=buf.clipped,
        )
        model = FedBuff.restore(self._config, state)
        result = model.step()
        self._model = model
        self._buffer = _Buffer(np.zeros(model.num_params, np.float32))
        return result

    # ------------------------------------------------------------------ persistence
    def snapshot(self) -> RootState:
        """A self-contained copy of the state (see :class:`RootState`)."""
        buf = self._buffer
        return RootState(
            model=self._model.snapshot(buffer=False),
            accumulator=buf.acc.copy(),
            weight_sum=buf.weight_sum,
            count=buf.count,
            staleness_sum=buf.staleness_sum,
            staleness_max=buf.staleness_max,
            clipped=buf.clipped,
            epochs=dict(self._epochs),
            applied=frozenset(self._applied),
            high_water={
                k: {d: w.copy() for d, w in v.items()} for k, v in self._high_water.items()
            },
            verdicts={**{str(v): n for v, n in self._verdicts.items()}, "late": self._late},
        )

    @classmethod
    def restore(cls, config: FedBuffConfig, state: RootState, *, partitions: int) -> RootBuffer:
        """Rebuild a root from :meth:`snapshot`; ``ValueError`` for an inconsistent state."""
        model = FedBuff.restore(config, state.model)
        if state.accumulator.shape != (model.num_params,):
            raise ValueError("accumulator shape does not match the model")
        root = cls(config, model.weights, partitions=partitions, version=model.version)
        root._model = model
        root._buffer = _Buffer(
            state.accumulator.astype(np.float32, copy=True),
            state.weight_sum,
            state.count,
            state.staleness_sum,
            state.staleness_max,
            state.clipped,
        )
        root._epochs = dict(state.epochs)
        root._applied = set(state.applied)
        root._high_water = {
            k: {d: w.copy() for d, w in v.items()} for k, v in state.high_water.items()
        }
        counts = dict(state.verdicts)
        root._late = counts.pop("late", 0)
        root._verdicts = Counter({PartialVerdict(v): n for v, n in counts.items()})
        return root

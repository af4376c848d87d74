"""A shard's partial sum of one partition against one model version, and its accumulator.

For the updates ``i`` a shard accepted for partition ``k`` against model version ``v`` (weights
``w_i``, clip factors ``c_i``, staleness ``tau_i = v - base_i``, all exactly as single-process
FedBuff computes them: the accumulator *is* a :class:`~edgefl.aggregation.fedbuff.FedBuff`)::

    A_s = sum_i w_i c_i delta_i  (float32)     W_s = sum_i w_i     count_s
    staleness_sum_s = sum_i tau_i              staleness_max_s = max_i tau_i

plus the ids ``(device_id, seq)`` of the updates it covers. The root adds partials
(:mod:`~edgefl.sharding.root`): ``A = sum_s A_s``, ``W = sum_s W_s``, ``count = sum_s count_s``,
which are FedBuff's ``A``, ``W`` and ``count`` over the union of the updates, up to the order
of the float32 additions (docs/SCALING.md, "Why the sharded aggregate equals FedBuff's").

Robust modes (trimmed mean, median) cannot be pre-summed: a coordinate-wise order statistic of
the union is no function of per-shard sums, so :class:`ShardAccumulator` refuses them. For
equality the norm bound must not be adaptive (``adaptive_multiplier=None``): an adaptive bound
follows the history of the norms a process saw, and each shard sees only its own
(:func:`presum_is_exact`).

Duplicates: a shard keeps, per device of its partition, which ``seq`` were counted (a
:class:`~edgefl.sharding.seqwindow.SeqWindow`, seeded at take-over with the root's,
:meth:`RootBuffer.take_over`); a ``seq`` counted before is a ``REPLAY``. The window, not a bare
high-water mark, because brokers may redeliver out of order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefl.aggregation.fedbuff import FedBuff, FedBuffConfig
from edgefl.aggregation.outcomes import AddOutcome
from edgefl.aggregation.robust import RobustMode
from edgefl.aggregation.updates import AddableUpdate
from edgefl.errors import RejectReason, UpdateRejected
from edgefl.protocol.topics import validate_name
from edgefl.sharding.seqwindow import SeqWindow

UpdateId = tuple[str, int]
"""``(device_id, seq)``: what the root counts at most once."""


@dataclass(frozen=True, order=True)
class PartialId:
    """Who made a partial: shard, partition, owner epoch and the shard's counter (from 0)."""

    shard: str
    partition: int
    epoch: int
    number: int

    def __str__(self) -> str:
        return f"{self.shard}/{self.partition}/{self.epoch}/{self.number}"


@dataclass(frozen=True)
class PartialSum:
    """One partial; see the module docstring. ``accumulator`` is a private float32 copy."""

    id: PartialId
    version: int
    accumulator: NDArray[np.float32] = field(repr=False)
    weight_sum: float
    count: int
    staleness_sum: int
    staleness_max: int
    clipped: int
    covered: tuple[UpdateId, ...]

    def __post_init__(self) -> None:
        if self.count != len(self.covered) or self.count < 1:
            raise ValueError("a partial covers count >= 1 distinct updates")
        if len(set(self.covered)) != self.count:
            raise ValueError("a partial covers an update twice")


def check_presummable(config: FedBuffConfig) -> None:
    """``ValueError`` unless ``config`` can be pre-summed (no robust mode)."""
    if config.robust is not RobustMode.NONE:
        raise ValueError(
            f"robust mode {config.robust} cannot be pre-summed: an order statistic of all "
            "updates is no function of per-shard sums (forward the updates instead)"
        )


def presum_is_exact(config: FedBuffConfig) -> bool:
    """True when sharding changes nothing but the float32 summation order: no adaptive norm
    bound (each shard would bound by the median of the norms *it* saw)."""
    return config.robust is RobustMode.NONE and config.norm_bound.adaptive_multiplier is None


class ShardAccumulator:
    """Pre-sums one partition's updates against one model version (not thread-safe)."""

    def __init__(
        self,
        config: FedBuffConfig,
        *,
        num_params: int,
        version: int,
        id_prefix: PartialId,
        high_water: Mapping[str, SeqWindow] | None = None,
    ) -> None:
        check_presummable(config)
        validate_name(id_prefix.shard, "shard id")
        self._config = config
        self._num_params = num_params
        self._fedbuff = FedBuff(config, np.zeros(num_params, np.float32), version=version)
        self._next = id_prefix
        self._windows = {d: w.copy() for d, w in (high_water or {}).items()}
        self._covered: list[UpdateId] = []

    @property
    def version(self) -> int:
        return self._fedbuff.version

    @property
    def pending(self) -> int:
        """Updates accepted since the last :meth:`close`."""
        return len(self._covered)

    def high_water(self, device_id: str) -> int:
        """The highest ``seq`` counted for ``device_id`` (``-1``: none)."""
        window = self._windows.get(device_id)
        return -1 if window is None else window.high

    def add(
        self,
        device_id: str,
        seq: int,
        update: AddableUpdate | NDArray[np.floating[Any]],
        *,
        base_version: int,
        num_examples: int,
    ) -> AddOutcome:
        """Accept one update (``REPLAY`` for a ``seq`` already counted, then FedBuff's checks)."""
        window = self._windows.setdefault(device_id, SeqWindow())
        if window.counted(seq):
            raise UpdateRejected(RejectReason.REPLAY, f"{device_id} seq {seq} already counted")
        outcome = self._fedbuff.add(update, base_version=base_version, num_examples=num_examples)
        window.record(seq)
        self._covered.append((device_id, seq))
        return outcome

    def close(self) -> PartialSum | None:
        """The partial of everything accepted since the last close (None if nothing was)."""
        if not self._covered:
            return None
        state = self._fedbuff.snapshot()
        assert state.accumulator is not None  # non-robust: checked in __init__
        partial = PartialSum(
            id=self._next,
            version=state.version,
            accumulator=state.accumulator,
            weight_sum=state.weight_sum,
            count=state.count,
            staleness_sum=state.staleness_sum,
            staleness_max=state.staleness_max,
            clipped=state.clipped_in_buffer,
            covered=tuple(self._covered),
        )
        self._fedbuff.clear_buffer()
        self._covered.clear()
        n = self._next
        self._next = PartialId(n.shard, n.partition, n.epoch, n.number + 1)
        return partial

    def advance(self, version: int) -> PartialSum | None:
        """Move to model ``version`` (a new manifest): closes and returns the open partial."""
        partial = self.close()
        if version != self.version:
            self._fedbuff = FedBuff(
                self._config, np.zeros(self._num_params, np.float32), version=version
            )
        return partial

"""FedBuff: buffered asynchronous aggregation (Nguyen et al., AISTATS 2022), sans-IO.

For each accepted update ``i`` (``delta_i = local - base``, staleness ``tau_i = version -
base_version``) with weight ``w_i = example_weight(n_i) * s(tau_i)`` and norm-bound clip factor
``c_i`` (1 unless clipped), the buffer keeps, streaming and in float32::

    A = sum_i w_i * c_i * delta_i          W = sum_i w_i          count

When ``count >= K`` (``buffer_size``) the caller calls :meth:`FedBuff.step`, which forms the
aggregate ``a`` and hands it to the server optimizer (``w <- w + lr * a`` for SGD without
momentum), increments ``version`` and clears the buffer:

* ``normalisation = mean`` (default): ``a = A / W``. The weighted mean -- FedAvg-compatible: with
  K = cohort size, all ``tau = 0``, ``examples`` weighting (no ``n`` above the cap), server SGD lr 1
  and momentum 0, one step is exactly weighted FedAvg ``w + sum n_i delta_i / sum n_i``. Only the
  ratios of staleness weights matter: a buffer of uniformly stale updates is not shrunk.
* ``normalisation = sum``: ``a = A / K``. FLSim's FedBuff applies the plain sum ``A`` and lets the
  server learning rate absorb ``1/K``; dividing by the configured K keeps the lr scale independent
  of K. Absolute staleness then matters (stale buffers take smaller steps). Pair it with ``equal``
  example weighting (FLSim's default), or ``a`` is scaled by the mean example count.

Robust modes (``trimmed_mean`` / ``median``) keep the accepted update objects (quantized form as
the codec delivers them, never densified until the step) plus ``w_i`` and ``c_i``. At the step
they are materialised into an ``(n, P)`` float32 stack of ``c_i * delta_i`` and the aggregate is::

    a = robust_center(c_1 delta_1, ..., c_n delta_n) * scale,
    scale = 1 (mean)  or  W / K (sum)

i.e. the unweighted robust statistic, scaled so that it equals the non-robust aggregate whenever
all buffered deltas are identical. Staleness therefore only matters through ``max_staleness`` and,
under ``sum``, through the mean weight.

Central differential privacy (``FedBuffConfig.privacy``, a :class:`~edgefl.privacy.CentralDP`;
``None`` by default, and then nothing below applies and every result is bit-identical to a
FedBuff without it). Each update is admitted only if its device has no update in the open buffer
(``DP_ONE_PER_BUFFER``) and took part in fewer than the cap's flushes (``DP_BUDGET_EXHAUSTED``),
enters with ``w_i' = min(w_i, 1)`` and ``c_i = min(c_i, C / ||delta_i||)`` (the decoded update
clipped to ``C``), and each step adds ``N(0, (zC)^2 I)`` to ``A`` before the division by ``K``::

    a = (sum_i w_i' c_i delta_i + N(0, (zC)^2 I)) / K

It requires ``sum`` normalisation, no robust mode and a norm bound without its adaptive part
(see :mod:`edgefl.privacy.central` for the sensitivity argument). The participation counts and
the open buffer's devices are in :meth:`FedBuff.snapshot` (``FedBuffState.privacy``).

Rejections raise :class:`~edgefl.errors.UpdateRejected` (and are counted by reason in
:meth:`FedBuff.statistics`); an :class:`AddOutcome` always means "accepted". ``add`` keeps
accepting after the buffer is full; ``step`` aggregates everything buffered. Not thread-safe.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from edgefl.aggregation.outcomes import AddOutcome, FedBuffState, FedBuffStatistics, StepResult
from edgefl.aggregation.robust import (
    NormBound,
    NormDecision,
    NormTracker,
    RobustMode,
    robust_center,
    trim_count,
)
from edgefl.aggregation.server_opt import ServerOptimizerConfig
from edgefl.aggregation.staleness import PolynomialStaleness, StalenessWeight
from edgefl.aggregation.updates import AddableUpdate, DenseUpdate
from edgefl.aggregation.weighting import (
    DEFAULT_EXAMPLE_CAP,
    ExampleWeighting,
    check_example_cap,
    update_weight,
)
from edgefl.errors import RejectReason, UpdateRejected
from edgefl.privacy.central import CentralDP, GaussianNoise
from edgefl.privacy.ledger import ParticipationLedger

DEFAULT_BUFFER_SIZE: Final = 5
DEFAULT_MAX_STALENESS: Final = 100
#: Upper limit of ``weight * c * ||delta||``: far above any sane update, far below float32 overflow.
MAX_CONTRIBUTION_NORM: Final = 1e30


class Normalisation(StrEnum):
    """How the buffer sum becomes the aggregate: ``A / W`` (mean) or ``A / K`` (sum)."""

    MEAN = "mean"
    SUM = "sum"


@dataclass(frozen=True)
class FedBuffConfig:
    """Frozen FedBuff configuration; see the module docstring for the math."""

    buffer_size: int = DEFAULT_BUFFER_SIZE
    staleness: StalenessWeight = field(default_factory=PolynomialStaleness)
    max_staleness: int | None = DEFAULT_MAX_STALENESS
    example_weighting: ExampleWeighting = ExampleWeighting.EXAMPLES
    example_cap: int | None = DEFAULT_EXAMPLE_CAP
    normalisation: Normalisation = Normalisation.MEAN
    norm_bound: NormBound = field(default_factory=NormBound)
    robust: RobustMode = RobustMode.NONE
    trim_beta: float = 0.2
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)
    privacy: CentralDP | None = None  # central DP (module docstring); None: off

    def __post_init__(self) -> None:
        if isinstance(self.buffer_size, bool) or not isinstance(self.buffer_size, int):
            raise ValueError(f"buffer_size must be an integer, got {self.buffer_size!r}")
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {self.buffer_size}")
        ms = self.max_staleness
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, int) or ms < 0):
            raise ValueError(f"max_staleness must be None or an integer >= 0, got {ms!r}")
        if not callable(self.staleness):
            raise ValueError(f"staleness must be a StalenessWeight, got {self.staleness!r}")
        check_example_cap(self.example_cap)
        object.__setattr__(self, "example_weighting", ExampleWeighting(self.example_weighting))
        object.__setattr__(self, "normalisation", Normalisation(self.normalisation))
        object.__setattr__(self, "robust", RobustMode(self.robust))
        trim_count(self.buffer_size, self.trim_beta)  # validates beta in [0, 0.5)
        if self.privacy is not None:
            _check_privacy(self)


def _check_privacy(config: FedBuffConfig) -> None:
    """Central DP's sensitivity argument holds only with these settings; raises ``ValueError``."""
    if not isinstance(config.privacy, CentralDP):
        raise ValueError(f"privacy must be a CentralDP or None, got {config.privacy!r}")
    if config.normalisation is not Normalisation.SUM:
        raise ValueError(
            "differential privacy needs normalisation 'sum': under 'mean' the buffer is divided "
            "by the weight sum W, which depends on each device's own weight, so one device's "
            "influence on the released aggregate is not bounded by the clip C"
        )
    if config.robust is not RobustMode.NONE:
        raise ValueError(
            "differential privacy needs robust 'none' (a robust statistic of the "
            "buffer is not a sum whose sensitivity is the clip C)"
        )
    if config.norm_bound.adaptive_multiplier is not None:
        raise ValueError(
            "differential privacy needs a norm bound without the adaptive part (off or static): "
            "the adaptive bound follows the median of all devices' norms, so one device would "
            "change how the others are clipped; the DP clip C bounds every update already"
        )


@dataclass(frozen=True)
class _Kept:
    update: AddableUpdate
    weight: float
    clip: float


def _as_weights(values: ArrayLike) -> NDArray[np.float32]:
    w = np.array(values, dtype=np.float32, copy=True)
    if w.ndim != 1 or w.shape[0] == 0:
        raise ValueError(f"weights must be a non-empty flat vector, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weights must be finite")
    return w


class FedBuff:
    """The FedBuff state machine: ``add`` updates, ``step`` when ``ready``."""

    def __init__(self, config: FedBuffConfig, initial_weights: ArrayLike, *, version: int = 0):
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be an integer >= 0, got {version!r}")
        self._config = config
        self._weights = _as_weights(initial_weights)
        self._version = version
        self._optimizer = config.server_optimizer.build()
        self._norms = NormTracker(config.norm_bound)
        self._robust = config.robust is not RobustMode.NONE
        p = self._weights.shape[0]
        self._acc: NDArray[np.float32] | None = None if self._robust else np.zeros(p, np.float32)
        self._kept: list[_Kept] = []
        self._weight_sum = 0.0
        self._count = 0
        self._staleness_sum = 0
        self._staleness_max = 0
        self._clipped_in_buffer = 0
        self._accepted_total = 0
        self._clipped_total = 0
        self._steps_total = 0
        self._rejected: Counter[RejectReason] = Counter()
        privacy = config.privacy
        self._ledger = None if privacy is None else ParticipationLedger(privacy.participation_cap)
        self._noise: GaussianNoise | None = None if privacy is None else privacy.noise()

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> FedBuffConfig:
        return self._config

    @property
    def weights(self) -> NDArray[np.float32]:
        """Read-only view of the current weights; ``step()`` changes it in place (copy to keep)."""
        view = self._weights.view()
        view.setflags(write=False)
        return view

    @property
    def version(self) -> int:
        return self._version

    @property
    def num_params(self) -> int:
        return int(self._weights.shape[0])

    @property
    def buffer_fill(self) -> int:
        return self._count

    @property
    def ready(self) -> bool:
        return self._count >= self._config.buffer_size

    def privacy_admits(self, device_id: str) -> bool:
        """Whether central DP would let an update of ``device_id`` into the buffer now (not
        already in it, under its participation cap); always true without DP. For schedulers:
        a device refused here would train for nothing."""
        return self._ledger is None or self._ledger.admissible(device_id)

    # ------------------------------------------------------------------ ingest
    def add(
        self,
        update: AddableUpdate | NDArray[np.floating[Any]],
        *,
        base_version: int,
        num_examples: int,
        device_id: str | None = None,
    ) -> AddOutcome:
        """Weigh, bound and buffer one update; raises ``UpdateRejected`` (counted) on refusal.

        ``update`` is an :class:`AddableUpdate` (e.g. the codec's ``DecodedUpdate``) or a dense
        1-D numpy delta, which is wrapped in a :class:`DenseUpdate` (one copy). ``device_id`` is
        required with central DP (``ValueError`` without it) and unused otherwise.

        Reasons: SHAPE_MISMATCH (``num_params``), BAD_HEADER (negative ``base_version``),
        FUTURE_VERSION (``base_version > version``), STALE (``tau > max_staleness``), BAD_EXAMPLES,
        NON_FINITE (NaN/Inf delta, or ``weight * ||delta||`` above ``MAX_CONTRIBUTION_NORM``),
        NORM_BOUND (reject mode); with DP also DP_ONE_PER_BUFFER and DP_BUDGET_EXHAUSTED.
        Nothing is changed when an update is rejected.
        """
        if self._ledger is not None and device_id is None:
            raise ValueError("FedBuff with differential privacy needs the update's device_id")
        try:
            if isinstance(update, np.ndarray):
                if update.ndim != 1:
                    raise UpdateRejected(
                        RejectReason.SHAPE_MISMATCH, f"dense delta has shape {update.shape}"
                    )
                update = DenseUpdate(update)
            return self._add(update, base_version, num_examples, device_id)
        except UpdateRejected as exc:
            self._rejected[exc.reason] += 1
            raise

    def _add(
        self, update: AddableUpdate, base_version: int, num_examples: int, device_id: str | None
    ) -> AddOutcome:
        cfg = self._config
        if update.num_params != self.num_params:
            raise UpdateRejected(
                RejectReason.SHAPE_MISMATCH,
                f"update has {update.num_params} parameters, model has {self.num_params}",
            )
        tau = self._staleness_of(base_version)
        weight = update_weight(
            num_examples,
            tau,
            weighting=cfg.example_weighting,
            cap=cfg.example_cap,
            staleness=cfg.staleness,
        )
        squared = float(update.squared_norm())
        if not math.isfinite(squared) or squared < 0.0:
            raise UpdateRejected(RejectReason.NON_FINITE, f"delta has squared norm {squared}")
        norm = math.sqrt(squared)
        decision = self._norms.decide(norm)
        if decision.reject:
            raise UpdateRejected(
                RejectReason.NORM_BOUND,
                f"update norm {norm:.6g} exceeds bound {decision.bound:.6g}",
            )
        w = weight.total
        if cfg.privacy is not None:
            w, decision = cfg.privacy.bounded_weight(w), _dp_clip(decision, cfg.privacy)
        if w * decision.clip_factor * norm > MAX_CONTRIBUTION_NORM:
            raise UpdateRejected(
                RejectReason.NON_FINITE,
                f"weighted norm {w * decision.clip_factor * norm:.3g} would overflow float32",
            )
        if self._ledger is not None:
            assert device_id is not None  # checked by add()
            self._ledger.admit(device_id)
            self._ledger.enter(device_id)
        self._buffer(update, w, decision)
        self._staleness_sum += tau
        self._staleness_max = max(self._staleness_max, tau)
        self._accepted_total += 1
        return AddOutcome(
            staleness=tau,
            example_weight=weight.example,
            staleness_weight=weight.staleness,
            weight=w,
            norm=norm,
            norm_bound=decision.bound,
            clip_factor=decision.clip_factor,
            clipped=decision.clipped,
            buffer_fill=self._count,
            buffer_size=cfg.buffer_size,
            ready=self.ready,
        )

    def _staleness_of(self, base_version: int) -> int:
        """``tau = version - base_version``; raises BAD_HEADER, FUTURE_VERSION or STALE."""
        if isinstance(base_version, bool) or not isinstance(base_version, int | np.integer):
            raise UpdateRejected(RejectReason.BAD_HEADER, f"base_version {base_version!r}")
        base_version = int(base_version)
        if base_version < 0:
            raise UpdateRejected(RejectReason.BAD_HEADER, f"negative base_version {base_version}")
        if base_version > self._version:
            raise UpdateRejected(
                RejectReason.FUTURE_VERSION,
                f"base_version {base_version} is ahead of the server's version {self._version}",
            )
        tau = self._version - base_version
        limit = self._config.max_staleness
        if limit is not None and tau > limit:
            raise UpdateRejected(
                RejectReason.STALE, f"staleness {tau} exceeds max_staleness {limit}"
            )
        return tau

    def _buffer(self, update: AddableUpdate, weight: float, decision: NormDecision) -> None:
        if self._acc is not None:
            update.add_to(self._acc, weight * decision.clip_factor)
        else:
            self._kept.append(_Kept(update, weight, decision.clip_factor))
        self._norms.record(decision)
        self._weight_sum += weight
        self._count += 1
        if decision.clipped:
            self._clipped_in_buffer += 1
            self._clipped_total += 1

    # ------------------------------------------------------------------ step
    def aggregate(self) -> NDArray[np.float32]:
        """The aggregate ``a`` the next ``step()`` would apply (a fresh array)."""
        if self._count == 0:
            raise RuntimeError("the buffer is empty: nothing to aggregate")
        cfg = self._config
        if self._acc is not None:
            divisor = (
                self._weight_sum if cfg.normalisation is Normalisation.MEAN else cfg.buffer_size
            )
            out: NDArray[np.float32] = self._acc / np.float32(divisor)
            return out
        stack = np.empty((len(self._kept), self.num_params), dtype=np.float32)
        for row, kept in zip(stack, self._kept, strict=True):
            row[:] = kept.update.to_dense()
            if kept.clip != 1.0:
                row *= np.float32(kept.clip)
        center = robust_center(stack, cfg.robust, cfg.trim_beta)
        del stack
        if cfg.normalisation is Normalisation.SUM:
            center *= np.float32(self._weight_sum / cfg.buffer_size)
        return center

    def step(self) -> StepResult:
        """Apply the server optimizer to the aggregate, bump the version, clear the buffer.

        Works on a partly filled buffer too (a flush; ``sum`` normalisation still divides by the
        configured K there); raises ``RuntimeError`` when the buffer is empty.
        """
        aggregate = self.aggregate()
        if self._noise is not None:  # (A + N(0, (zC)^2 I)) / K: noise on the sum, then / K
            noise = self._noise.sample(self._version, self.num_params)
            noise /= np.float32(self._config.buffer_size)
            aggregate += noise
            del noise
        agg64 = aggregate.astype(np.float64)
        aggregate_norm = float(math.sqrt(np.dot(agg64, agg64)))
        del agg64
        self._optimizer.step(self._weights, aggregate)
        previous = self._version
        self._version += 1
        self._steps_total += 1
        result = StepResult(
            version=self._version,
            previous_version=previous,
            num_updates=self._count,
            weight_sum=self._weight_sum,
            aggregate_norm=aggregate_norm,
            mean_staleness=self._staleness_sum / self._count,
            max_staleness=self._staleness_max,
            clipped=self._clipped_in_buffer,
            robust=self._config.robust,
            noise_std=None if self._noise is None else self._noise.std,
        )
        if self._ledger is not None:
            self._ledger.flush()
        self.clear_buffer()
        return result

    def clear_buffer(self) -> int:
        """Drop the buffered updates without a step (version unchanged); returns how many."""
        dropped = self._count
        if self._acc is not None:
            self._acc.fill(0.0)
        self._kept.clear()
        self._weight_sum = 0.0
        self._count = 0
        self._staleness_sum = 0
        self._staleness_max = 0
        self._clipped_in_buffer = 0
        if self._ledger is not None:
            self._ledger.drop_buffer()
        return dropped

    # ------------------------------------------------------------------ observability
    def statistics(self) -> FedBuffStatistics:
        return FedBuffStatistics(
            version=self._version,
            buffer_fill=self._count,
            buffer_size=self._config.buffer_size,
            buffer_weight_sum=self._weight_sum,
            accepted_total=self._accepted_total,
            clipped_total=self._clipped_total,
            steps_total=self._steps_total,
            rejected=MappingProxyType(dict(self._rejected)),
            norm_bound=self._norms.bound(),
            norm_median=self._norms.median(),
            privacy=None
            if self._ledger is None or self._config.privacy is None
            else self._ledger.statistics(self._config.privacy),
        )

    # ------------------------------------------------------------------ persistence
    def snapshot(self, *, buffer: bool = True) -> FedBuffState:
        """A self-contained copy of the full state (robust mode densifies the buffered updates).

        ``buffer=False`` leaves the buffer out (no accumulator or kept updates are copied; the
        buffer fields read as empty): the model part alone, for callers that persist the
        buffered updates another way."""
        kept_deltas = kept_weights = kept_clip = None
        if self._robust and buffer:
            kept_deltas = np.empty((len(self._kept), self.num_params), dtype=np.float32)
            for row, kept in zip(kept_deltas, self._kept, strict=True):
                row[:] = kept.update.to_dense()
            kept_weights = np.array([k.weight for k in self._kept], dtype=np.float64)
            kept_clip = np.array([k.clip for k in self._kept], dtype=np.float64)
        return FedBuffState(
            version=self._version,
            weights=self._weights.copy(),
            accumulator=None if self._acc is None or not buffer else self._acc.copy(),
            kept_deltas=kept_deltas,
            kept_weights=kept_weights,
            kept_clip=kept_clip,
            weight_sum=self._weight_sum if buffer else 0.0,
            count=self._count if buffer else 0,
            staleness_sum=self._staleness_sum if buffer else 0,
            staleness_max=self._staleness_max if buffer else 0,
            clipped_in_buffer=self._clipped_in_buffer if buffer else 0,
            optimizer_kind=str(self._optimizer.kind),
            optimizer_state=self._optimizer.state_dict(),
            norm_history=self._norms.history(),
            accepted_total=self._accepted_total,
            clipped_total=self._clipped_total,
            steps_total=self._steps_total,
            rejected={str(r): n for r, n in self._rejected.items()},
            privacy=None if self._ledger is None else self._ledger.state(buffer=buffer),
        )

    @classmethod
    def restore(cls, config: FedBuffConfig, state: FedBuffState) -> FedBuff:
        """Rebuild a FedBuff from ``config`` and a :meth:`snapshot`; raises ``ValueError``.

        The optimizer kind and the robust/non-robust buffer layout must match ``config`` (other
        settings, e.g. lr or K, may change across a restart).
        """
        fb = cls(config, state.weights, version=state.version)
        if state.optimizer_kind != str(config.server_optimizer.kind):
            raise ValueError(
                f"snapshot has a {state.optimizer_kind} optimizer, config asks for "
                f"{config.server_optimizer.kind}"
            )
        fb._optimizer.load_state_dict(state.optimizer_state)
        fb._norms = NormTracker(config.norm_bound, state.norm_history.tolist())
        if state.count < 0 or state.staleness_sum < 0 or state.staleness_max < 0:
            raise ValueError("snapshot counters must be >= 0")
        p = fb.num_params
        if fb._acc is not None:
            if state.kept_deltas is not None and len(state.kept_deltas) > 0:
                raise ValueError("snapshot buffers robust updates but config.robust is none")
            if state.accumulator is not None:
                if state.accumulator.shape != (p,):
                    raise ValueError(f"accumulator shape {state.accumulator.shape} != ({p},)")
                if not np.isfinite(state.accumulator).all():
                    raise ValueError("snapshot accumulator is not finite")
                fb._acc[:] = state.accumulator
            elif state.count > 0:
                raise ValueError("snapshot has buffered updates but no accumulator")
        else:
            if state.count > 0 and state.kept_deltas is None:
                raise ValueError("config.robust needs kept updates the snapshot does not have")
            if state.kept_deltas is not None:
                fb._kept = _restore_kept(state, p)
            if len(fb._kept) != state.count:
                raise ValueError(f"snapshot count {state.count} != {len(fb._kept)} kept updates")
        fb._weight_sum = float(state.weight_sum)
        fb._count = state.count
        fb._staleness_sum = state.staleness_sum
        fb._staleness_max = state.staleness_max
        fb._clipped_in_buffer = state.clipped_in_buffer
        fb._accepted_total = state.accepted_total
        fb._clipped_total = state.clipped_total
        fb._steps_total = state.steps_total
        fb._rejected = Counter({RejectReason(r): n for r, n in state.rejected.items()})
        fb._restore_privacy(state)
        return fb

    def _restore_privacy(self, state: FedBuffState) -> None:
        """The participation ledger of ``state`` (DP on); a DP-less snapshot starts it empty,
        unless it has buffered updates whose devices are unknown (``ValueError``)."""
        privacy = self._config.privacy
        if privacy is None:
            return
        if state.privacy is None:
            if state.count > 0:
                raise ValueError("snapshot buffers updates but has no privacy state (DP is on)")
            return
        if len(state.privacy.buffer_devices) != state.count:
            raise ValueError(
                f"snapshot buffers {state.count} updates from "
                f"{len(state.privacy.buffer_devices)} devices (DP: one update per device)"
            )
        self._ledger = ParticipationLedger(privacy.participation_cap, state.privacy)


def _dp_clip(decision: NormDecision, privacy: CentralDP) -> NormDecision:
    """``decision`` with the DP clip to ``C`` applied on top (the smaller factor wins)."""
    factor = min(decision.clip_factor, privacy.clip_factor(decision.norm))
    bound = privacy.clip_norm if decision.bound is None else min(decision.bound, privacy.clip_norm)
    return NormDecision(norm=decision.norm, bound=bound, clip_factor=factor, reject=False)


def _restore_kept(state: FedBuffState, num_params: int) -> list[_Kept]:
    deltas, weights, clips = state.kept_deltas, state.kept_weights, state.kept_clip
    if deltas is None or weights is None or clips is None:
        raise ValueError("robust snapshot needs kept_deltas, kept_weights and kept_clip")
    n = deltas.shape[0]
    if (
        deltas.ndim != 2
        or deltas.shape[1] != num_params
        or weights.shape != (n,)
        or clips.shape != (n,)
    ):
        raise ValueError("kept_deltas / kept_weights / kept_clip have inconsistent shapes")
    return [_Kept(DenseUpdate(deltas[i]), float(weights[i]), float(clips[i])) for i in range(n)]

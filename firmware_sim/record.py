"""The run record both simulator modes fill in, and its summary.

A :class:`RunRecord` is an append-only log of what happened in one simulated run: evaluations,
every update that reached (or was meant to reach) the aggregator with its outcome, periodic
counts of device states, and dropouts/crashes. Events go into typed ``array.array`` columns (a few
bytes each, one C append per column), so a run with 100,000 updates stays a few megabytes and the
summary is computed with numpy over zero-copy views.

Outcomes of an update are normalised strings (see :func:`normalize_outcome`):
``applied`` (accepted into aggregation), ``stale`` (rejected for staleness), ``dropped`` (sent
but lost before the aggregator judged it) and ``rejected:<reason>`` (``reason`` a
:class:`edgefl.errors.RejectReason` value or any free tag). A device that vanishes *mid-training*
never produces an update: record it with :meth:`RunRecord.dropout` (or :meth:`RunRecord.crash`).

A run with central differential privacy also records, after every flush, the ε spent so far
(:meth:`RunRecord.dp_flush`, from the core's :class:`~edgefl.privacy.PrivacyStatistics` or a
server state's :class:`~edgefl.protocol.messages.CentralPrivacy`): the report plots accuracy
against ε, and the summary carries the final ε, δ, z, C and participations. A run with local
differential privacy records the devices' ε at the end (:meth:`RunRecord.set_local_dp`, a
:class:`firmware_sim.local_dp.LocalDpSummary` as JSON).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from edgefl.aggregation import Algorithm  # re-exported: the one enum, owned by the core
from edgefl.errors import RejectReason
from firmware_sim.slots import SlotSeries

__all__ = [
    "Algorithm",
    "EvalSeries",
    "Mode",
    "Outcome",
    "PrivacyFigures",
    "PrivacySeries",
    "RunRecord",
    "StateSeries",
    "UpdateSeries",
    "normalize_outcome",
]


class Mode(StrEnum):
    """Which simulator produced the record."""

    VIRTUAL = "virtual"
    LIVE = "live"


class Outcome(StrEnum):
    """Outcome of an update (``rejected`` is a prefix: ``rejected:<reason>``)."""

    APPLIED = "applied"
    STALE = "stale"
    DROPPED = "dropped"
    REJECTED = "rejected"


_REJECT_PREFIX = "rejected:"
_REASONS = frozenset(r.value for r in RejectReason)


def normalize_outcome(outcome: str) -> str:
    """Canonical outcome string.

    ``applied``/``stale``/``dropped`` stay; ``rejected:stale`` and ``RejectReason.STALE`` become
    ``stale``; a bare :class:`RejectReason` value ``r`` becomes ``rejected:r``; ``rejected:<tag>``
    stays. Anything else raises ValueError (outcomes are counted by reason, never free-form).
    """
    text = str(outcome).strip().lower()
    if text in (Outcome.APPLIED, Outcome.STALE, Outcome.DROPPED):
        return text
    if text.startswith(_REJECT_PREFIX):
        reason = text[len(_REJECT_PREFIX) :]
        if not reason:
            raise ValueError("rejected outcome needs a reason: 'rejected:<reason>'")
        return Outcome.STALE.value if reason == RejectReason.STALE else text
    if text in _REASONS:
        return Outcome.STALE.value if text == RejectReason.STALE else _REJECT_PREFIX + text
    raise ValueError(
        f"unknown update outcome {outcome!r}; expected applied, stale, dropped or rejected:<reason>"
    )


@dataclass(frozen=True)
class EvalSeries:
    """Evaluations in time order (``loss`` is NaN when unknown)."""

    t: NDArray[np.float64]
    version: NDArray[np.int64]
    accuracy: NDArray[np.float64]
    loss: NDArray[np.float64]
    updates_applied: NDArray[np.int64]


@dataclass(frozen=True)
class UpdateSeries:
    """Updates in the order recorded. ``outcome`` indexes ``outcomes``; ``staleness`` is -1
    when unknown."""

    t: NDArray[np.float64]
    device: NDArray[np.int64]
    outcome: NDArray[np.int16]
    outcomes: tuple[str, ...]
    staleness: NDArray[np.int64]
    nbytes: NDArray[np.int64]
    fp32_bytes: NDArray[np.int64]


@dataclass(frozen=True)
class StateSeries:
    """Device-state counts over time: ``counts[i, j]`` devices in ``states[j]`` at ``t[i]``."""

    t: NDArray[np.float64]
    states: tuple[str, ...]
    counts: NDArray[np.int64]


class PrivacyFigures(Protocol):
    """Central DP figures after a flush: the fields :class:`~edgefl.privacy.PrivacyStatistics`
    (the aggregation core's) and :class:`~edgefl.protocol.messages.CentralPrivacy` (the server
    state's) share. ``epsilon`` (at ``delta``) is the largest a device spent so far."""

    @property
    def epsilon(self) -> float: ...
    @property
    def delta(self) -> float: ...
    @property
    def noise_multiplier(self) -> float: ...
    @property
    def clip_norm(self) -> float: ...
    @property
    def participation_cap(self) -> int: ...
    @property
    def participation_max(self) -> int: ...
    @property
    def devices(self) -> int: ...
    @property
    def participation_histogram(self) -> Mapping[int, int]: ...
    @property
    def accountant(self) -> str: ...


@dataclass(frozen=True)
class PrivacySeries:
    """ε after each flush of a central-DP run, in flush order: the flush's time ``t``, the
    model ``version`` it made, the largest ``epsilon`` a device had spent, and the most
    participations of a device (``participation_max``)."""

    t: NDArray[np.float64]
    version: NDArray[np.int64]
    epsilon: NDArray[np.float64]
    participation_max: NDArray[np.int64]

    def epsilon_at(self, versions: NDArray[np.int64]) -> NDArray[np.float64]:
        """The ε spent when the model had each of ``versions``: that of the last flush that made
        a version ``<=`` it (versions grow with the flushes); 0 before the first flush."""
        index = np.searchsorted(self.version, versions, side="right") - 1
        spent = self.epsilon[np.maximum(index, 0)] if len(self.epsilon) else np.zeros(len(index))
        return np.where(index >= 0, spent, 0.0)


def _f64(a: array[float]) -> NDArray[np.float64]:
    return np.frombuffer(a, dtype=np.float64) if len(a) else np.zeros(0, dtype=np.float64)


def _i64(a: array[int]) -> NDArray[np.int64]:
    return np.frombuffer(a, dtype=np.int64) if len(a) else np.zeros(0, dtype=np.int64)


def _json_float(x: float | np.floating[Any] | None) -> float | None:
    if x is None:
        return None
    value = float(x)
    return value if np.isfinite(value) else None


def _doubles() -> array[float]:
    return array("d")


def _longs() -> array[int]:
    return array("q")


@dataclass(eq=False)
class _EvalColumns:
    t: array[float] = field(default_factory=_doubles)
    version: array[int] = field(default_factory=_longs)
    accuracy: array[float] = field(default_factory=_doubles)
    loss: array[float] = field(default_factory=_doubles)  # NaN when unknown
    updates_applied: array[int] = field(default_factory=_longs)

    def append(
        self, t: float, version: int, accuracy: float, loss: float | None, updates_applied: int
    ) -> None:
        self.t.append(float(t))
        self.version.append(int(version))
        self.accuracy.append(float(accuracy))
        self.loss.append(float("nan") if loss is None else float(loss))
        self.updates_applied.append(int(updates_applied))

    def series(self) -> EvalSeries:
        """Sorted by time (stable)."""
        t = _f64(self.t)
        order = np.argsort(t, kind="stable")
        return EvalSeries(
            t=t[order],
            version=_i64(self.version)[order],
            accuracy=_f64(self.accuracy)[order],
            loss=_f64(self.loss)[order],
            updates_applied=_i64(self.updates_applied)[order],
        )


@dataclass(eq=False)
class _UpdateColumns:
    t: array[float] = field(default_factory=_doubles)
    device: array[int] = field(default_factory=_longs)
    outcome: array[int] = field(default_factory=lambda: array("h"))  # index into ``names``
    staleness: array[int] = field(default_factory=_longs)  # -1 when unknown
    nbytes: array[int] = field(default_factory=_longs)
    fp32: array[int] = field(default_factory=_longs)
    codes: dict[str, int] = field(default_factory=dict)  # outcome as given -> code
    names: list[str] = field(default_factory=list)  # code -> normalised outcome

    def append(
        self,
        t: float,
        device: int,
        outcome: str,
        staleness: int | None,
        nbytes: int,
        fp32_bytes: int,
    ) -> None:
        code = self.codes.get(outcome)
        if code is None:
            name = normalize_outcome(outcome)
            if name not in self.names:
                self.names.append(name)
            code = self.names.index(name)
            self.codes[outcome] = code
        self.t.append(float(t))
        self.device.append(int(device))
        self.outcome.append(code)
        self.staleness.append(-1 if staleness is None else int(staleness))
        self.nbytes.append(int(nbytes))
        self.fp32.append(int(fp32_bytes))

    def series(self) -> UpdateSeries:
        """Zero-copy views over the columns."""
        outcome = (
            np.frombuffer(self.outcome, dtype=np.int16)
            if len(self.outcome)
            else np.zeros(0, dtype=np.int16)
        )
        return UpdateSeries(
            t=_f64(self.t),
            device=_i64(self.device),
            outcome=outcome,
            outcomes=tuple(self.names),
            staleness=_i64(self.staleness),
            nbytes=_i64(self.nbytes),
            fp32_bytes=_i64(self.fp32),
        )


@dataclass(eq=False)
class _StateColumns:
    t: array[float] = field(default_factory=_doubles)
    rows: list[dict[str, int]] = field(default_factory=list)

    def append(self, t: float, counts: dict[str, int]) -> None:
        self.t.append(float(t))
        self.rows.append({str(k): int(v) for k, v in counts.items()})

    def series(self) -> StateSeries:
        """States in first-seen order, missing counts are 0."""
        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys(row))
        states = tuple(names)
        counts = np.array(
            [[row.get(s, 0) for s in states] for row in self.rows], dtype=np.int64
        ).reshape(len(self.rows), len(states))
        return StateSeries(t=_f64(self.t).copy(), states=states, counts=counts)


@dataclass(eq=False)
class _PrivacyColumns:
    t: array[float] = field(default_factory=_doubles)
    version: array[int] = field(default_factory=_longs)
    epsilon: array[float] = field(default_factory=_doubles)
    participation_max: array[int] = field(default_factory=_longs)
    last: PrivacyFigures | None = None

    def append(self, t: float, version: int, figures: PrivacyFigures) -> None:
        self.t.append(float(t))
        self.version.append(int(version))
        self.epsilon.append(float(figures.epsilon))
        self.participation_max.append(int(figures.participation_max))
        self.last = figures

    def series(self) -> PrivacySeries:
        return PrivacySeries(
            t=_f64(self.t),
            version=_i64(self.version),
            epsilon=_f64(self.epsilon),
            participation_max=_i64(self.participation_max),
        )


@dataclass(eq=False)
class _DeviceEvents:
    """Times and devices of one kind of device event (dropouts, crashes)."""

    t: array[float] = field(default_factory=_doubles)
    device: array[int] = field(default_factory=_longs)

    def append(self, t: float, device: int) -> None:
        self.t.append(float(t))
        self.device.append(int(device))


@dataclass(eq=False)
class RunRecord:
    """Append-only log of one run (times ``t`` in seconds: virtual for ``virtual`` mode, since
    start for ``live`` mode). ``label`` names the run in reports (defaults to the algorithm)."""

    config: dict[str, Any]
    mode: Mode
    algorithm: Algorithm
    devices: int = 0
    label: str = ""
    final_accuracy: float | None = None
    final_loss: float | None = None
    model_versions: int | None = None
    wall_time_s: float | None = None
    started_at: float = field(default_factory=time.perf_counter, repr=False)

    _evals: _EvalColumns = field(default_factory=_EvalColumns, repr=False)
    _updates: _UpdateColumns = field(default_factory=_UpdateColumns, repr=False)
    _states: _StateColumns = field(default_factory=_StateColumns, repr=False)
    _dropouts: _DeviceEvents = field(default_factory=_DeviceEvents, repr=False)
    _crashes: _DeviceEvents = field(default_factory=_DeviceEvents, repr=False)
    _privacy: _PrivacyColumns = field(default_factory=_PrivacyColumns, repr=False)
    _local_dp: dict[str, Any] | None = field(default=None, repr=False)
    utilisation: dict[str, Any] | None = field(default=None, repr=False)
    bottleneck: str | None = None
    slot_series: SlotSeries | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)
        self.algorithm = Algorithm(self.algorithm)
        if not self.label:
            self.label = self.algorithm.value

    # ---------------------------------------------------------------- appending

    def eval(
        self,
        t: float,
        version: int,
        accuracy: float,
        loss: float | None = None,
        updates_applied: int = 0,
    ) -> None:
        """An evaluation of model ``version`` at ``t`` after ``updates_applied`` applied updates."""
        self._evals.append(t, version, accuracy, loss, updates_applied)

    def update(
        self,
        t: float,
        device: int,
        outcome: str,
        staleness: int | None = None,
        nbytes: int = 0,
        fp32_bytes: int = 0,
    ) -> None:
        """An update from ``device`` judged at ``t`` (see :func:`normalize_outcome`);
        ``nbytes`` encoded bytes on the wire, ``fp32_bytes`` what plain float32 would cost."""
        self._updates.append(t, device, outcome, staleness, nbytes, fp32_bytes)

    def device_states(self, t: float, counts: dict[str, int]) -> None:
        """How many devices are in each state (idle, training, offline, ...) at ``t``."""
        self._states.append(t, counts)

    def dropout(self, t: float, device: int) -> None:
        """``device`` vanished mid-training at ``t`` (its update never comes)."""
        self._dropouts.append(t, device)

    def crash(self, t: float, device: int) -> None:
        """``device``'s agent crashed at ``t`` and lost its in-flight work."""
        self._crashes.append(t, device)

    def dp_flush(self, t: float, version: int, figures: PrivacyFigures | None) -> None:
        """Central DP: the figures after the flush at ``t`` that made model ``version`` (versions
        grow from flush to flush); ``None`` (DP off) records nothing."""
        if figures is not None:
            self._privacy.append(t, version, figures)

    def set_local_dp(self, figures: dict[str, Any]) -> None:
        """Local DP: the devices' ε at the end of the run (the summary's ``local_privacy``)."""
        self._local_dp = dict(figures)

    def set_utilisation(
        self, utilisation: dict[str, Any], bottleneck: str, series: SlotSeries
    ) -> None:
        """Where the run's time went (see :mod:`firmware_sim.slots`): the summary's
        ``utilisation`` and ``bottleneck``, and the slot counts over time for the report."""
        self.utilisation = utilisation
        self.bottleneck = bottleneck
        self.slot_series = series

    def finish(
        self,
        *,
        wall_time_s: float | None = None,
        model_versions: int | None = None,
        final_accuracy: float | None = None,
        final_loss: float | None = None,
    ) -> None:
        """Close the run. Without ``wall_time_s``, the time since the record was created."""
        self.wall_time_s = (
            time.perf_counter() - self.started_at if wall_time_s is None else float(wall_time_s)
        )
        if model_versions is not None:
            self.model_versions = int(model_versions)
        if final_accuracy is not None:
            self.final_accuracy = float(final_accuracy)
        if final_loss is not None:
            self.final_loss = float(final_loss)

    # ---------------------------------------------------------------- views

    def evals(self) -> EvalSeries:
        """Evaluations sorted by time (stable)."""
        return self._evals.series()

    def updates(self) -> UpdateSeries:
        """All updates (zero-copy views over the columns; do not append while holding them)."""
        return self._updates.series()

    def states(self) -> StateSeries:
        """Device-state samples; states in first-seen order, missing counts are 0."""
        return self._states.series()

    def privacy(self) -> PrivacySeries:
        """ε after each recorded flush (empty without central DP)."""
        return self._privacy.series()

    def dropout_times(self) -> NDArray[np.float64]:
        """Times of the recorded mid-training dropouts."""
        return _f64(self._dropouts.t)

    def outcome_counts(self) -> dict[str, int]:
        """``{normalised outcome: count}`` over all updates."""
        up = self.updates()
        counts = np.bincount(up.outcome, minlength=len(up.outcomes))
        return {name: int(c) for name, c in zip(up.outcomes, counts, strict=True)}

    # ---------------------------------------------------------------- summary

    def summary(self, target_accuracy: float) -> dict[str, Any]:
        """JSON-ready numbers of the run.

        * ``time_to_target_s``: time of the first evaluation (in time order) with accuracy
          ``>= target_accuracy``; ``updates_to_target`` its ``updates_applied`` and
          ``updates_received_to_target`` the updates recorded up to then; all ``None`` and
          ``reached_target`` false when never reached.
        * ``final_accuracy``: given to :meth:`finish`, else the latest evaluation's.
        * ``updates_rejected``: ``{reason: count}``, including ``stale``; ``dropped`` updates and
          mid-training ``dropouts`` are counted separately.
        * ``bytes_uploaded`` sums ``nbytes`` over all updates; ``compression_ratio`` =
          ``bytes_fp32_equivalent / bytes_uploaded``.
        * ``staleness`` (over updates with known staleness, any outcome) and
          ``staleness_applied``: count, mean, p50, p90 (linear interpolation), max.
        * ``utilisation`` and ``bottleneck`` when the simulator measured them
          (:meth:`set_utilisation`; :mod:`firmware_sim.slots`).
        * ``privacy`` when flushes under central DP were recorded (:meth:`dp_flush`): the last
          flush's ``epsilon`` (at ``delta``), ``noise_multiplier``, ``clip_norm``,
          ``participation_cap``, ``participation_max``, ``devices``,
          ``participation_histogram`` (participations -> devices), ``accountant``, the number
          of ``flushes``, and ``epsilon_to_target``, the ε spent when the target was reached.
        * ``local_privacy`` under local DP (:meth:`set_local_dp`): the mechanism, the per-update
          ε, the devices' largest and mean total ε, updates, exhausted budgets and refusals.
        """
        ev = self.evals()
        up = self.updates()
        counts = self.outcome_counts()
        return {
            "label": self.label,
            "mode": self.mode.value,
            "algorithm": self.algorithm.value,
            "devices": self.devices,
            **self._final_metrics(),
            "target_accuracy": float(target_accuracy),
            **_time_to_target(ev, up, target_accuracy),
            "model_versions": self._model_versions(ev),
            **self._update_counts(counts),
            **_traffic(up),
            **_staleness(up),
            "evaluations": len(self._evals.t),
            "duration_s": self._duration(ev, up),
            "wall_time_s": self.wall_time_s,
            **self._utilisation(),
            **self._privacy_summary(ev, target_accuracy),
            **({} if self._local_dp is None else {"local_privacy": dict(self._local_dp)}),
            "config": self.config,
        }

    def _utilisation(self) -> dict[str, Any]:
        if self.utilisation is None:
            return {}
        return {"bottleneck": self.bottleneck, "utilisation": self.utilisation}

    def _privacy_summary(self, ev: EvalSeries, target_accuracy: float) -> dict[str, Any]:
        p = self._privacy.last
        if p is None:
            return {}
        reached = ev.accuracy >= target_accuracy
        at_target = None
        if reached.any():
            i = int(np.argmax(reached))
            at_target = float(self.privacy().epsilon_at(ev.version[i : i + 1])[0])
        return {
            "privacy": {
                "epsilon": float(p.epsilon),
                "delta": float(p.delta),
                "noise_multiplier": float(p.noise_multiplier),
                "clip_norm": float(p.clip_norm),
                "participation_cap": int(p.participation_cap),
                "participation_max": int(p.participation_max),
                "devices": int(p.devices),
                "participation_histogram": {
                    str(k): int(n) for k, n in sorted(p.participation_histogram.items())
                },
                "accountant": str(p.accountant),
                "flushes": len(self._privacy.t),
                "epsilon_to_target": at_target,
            }
        }

    def _final_metrics(self) -> dict[str, float | None]:
        """``final_accuracy``/``final_loss``: given to :meth:`finish`, else the latest
        evaluation's (in recording order)."""
        final_accuracy = self.final_accuracy
        if final_accuracy is None and len(self._evals.accuracy):
            final_accuracy = self._evals.accuracy[-1]
        final_loss = self.final_loss
        if final_loss is None and len(self._evals.loss):
            final_loss = self._evals.loss[-1]
        return {
            "final_accuracy": _json_float(final_accuracy),
            "final_loss": _json_float(final_loss),
        }

    def _model_versions(self, ev: EvalSeries) -> int | None:
        """Given to :meth:`finish`, else the highest evaluated version."""
        if self.model_versions is None and len(ev.version):
            return int(ev.version.max())
        return self.model_versions

    def _update_counts(self, counts: dict[str, int]) -> dict[str, Any]:
        """Updates by outcome (rejections by reason, ``stale`` included), dropouts, crashes."""
        rejected = {
            name.removeprefix(_REJECT_PREFIX): n
            for name, n in counts.items()
            if name == Outcome.STALE or name.startswith(_REJECT_PREFIX)
        }
        return {
            "updates_received": len(self._updates.t),
            "updates_applied": counts.get(Outcome.APPLIED, 0),
            "updates_rejected": dict(sorted(rejected.items())),
            "updates_dropped": counts.get(Outcome.DROPPED, 0),
            "dropouts": len(self._dropouts.t),
            "crashes": len(self._crashes.t),
        }

    def _duration(self, ev: EvalSeries, up: UpdateSeries) -> float:
        """Time of the last recorded update, evaluation or dropout (0 for an empty record)."""
        last_times = [float(a[-1]) for a in (up.t, ev.t, _f64(self._dropouts.t)) if len(a)]
        return max(last_times) if last_times else 0.0


def _time_to_target(
    ev: EvalSeries, up: UpdateSeries, target_accuracy: float
) -> dict[str, bool | float | int | None]:
    """The first evaluation (in time order) at or above the target: its time, its
    ``updates_applied`` and the updates recorded up to then (all None when never reached)."""
    reached = ev.accuracy >= target_accuracy
    time_to_target: float | None = None
    updates_to_target: int | None = None
    received_to_target: int | None = None
    if reached.any():
        i = int(np.argmax(reached))
        time_to_target = float(ev.t[i])
        updates_to_target = int(ev.updates_applied[i])
        received_to_target = int(np.count_nonzero(up.t <= time_to_target))
    return {
        "reached_target": time_to_target is not None,
        "time_to_target_s": time_to_target,
        "updates_to_target": updates_to_target,
        "updates_received_to_target": received_to_target,
    }


def _traffic(up: UpdateSeries) -> dict[str, int | float | None]:
    """Bytes on the wire, what float32 would have cost, and their ratio."""
    nbytes = int(up.nbytes.sum())
    fp32 = int(up.fp32_bytes.sum())
    return {
        "bytes_uploaded": nbytes,
        "bytes_fp32_equivalent": fp32,
        "compression_ratio": fp32 / nbytes if nbytes > 0 else None,
    }


def _staleness(up: UpdateSeries) -> dict[str, dict[str, float | int | None]]:
    """Staleness statistics over the updates with known staleness: all, and applied ones."""
    applied_code = up.outcomes.index(Outcome.APPLIED) if Outcome.APPLIED in up.outcomes else -1
    known = up.staleness >= 0
    return {
        "staleness": _staleness_stats(up.staleness[known]),
        "staleness_applied": _staleness_stats(up.staleness[known & (up.outcome == applied_code)]),
    }


def _staleness_stats(values: NDArray[np.int64]) -> dict[str, float | int | None]:
    if len(values) == 0:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "max": None}
    p50, p90 = np.percentile(values, [50, 90])
    return {
        "count": len(values),
        "mean": float(values.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "max": int(values.max()),
    }

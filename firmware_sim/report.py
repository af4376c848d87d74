"""Simulator report: ``summary.json`` plus PNG plots, for one run or a comparison of runs.

``write_report(records, out_dir, target_accuracy)`` writes

* ``summary.json``: for one run its :meth:`RunRecord.summary`; for several
  ``{"target_accuracy", "runs": {label: summary}, "speedup_vs_fedavg", "speedup_vs_fedavg_by_run"}``
  where speedup = FedAvg's ``time_to_target_s`` / the other run's (``null`` when either never
  reached the target);
* ``accuracy_vs_time.png``, ``staleness_hist.png``, ``bytes_uploaded.png``,
  ``updates_by_outcome.png``, ``device_states.png``, and ``slots.png`` (where the time went:
  slots training, held by lost devices, waiting for a device, idle at the round barrier, against
  the target; see :mod:`firmware_sim.slots`);
* ``accuracy_vs_epsilon.png`` when a run used central differential privacy: test accuracy
  against the ε spent when the evaluated model was released (the largest over devices, from
  :meth:`RunRecord.privacy`), one line per private run.

A comparison whose runs were *starved* (their slots waited for a device at least
:data:`~firmware_sim.slots.STARVED_FRACTION` of the time) carries ``warnings``: such a
comparison measures the fleet's availability, not the algorithms.

Matplotlib is imported lazily and only through the Agg canvas (no pyplot, no global backend
switch), so importing this module is cheap and it is safe in headless processes and threads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from firmware_sim.progress import Sample, format_duration
from firmware_sim.record import Algorithm, Mode, Outcome, RunRecord
from firmware_sim.slots import starved

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "ReportPaths",
    "build_summary",
    "partial_line",
    "speedup_vs_fedavg",
    "starvation_warnings",
    "summary_lines",
    "summary_object",
    "write_report",
]

_DPI = 110
_STATE_ORDER = (
    "training",
    "uploading",
    "downloading",
    "waiting",
    "idle",
    "online",
    "restarting",
    "crashed",
    "offline",
    "lost",
)


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` put each file."""

    out_dir: Path
    summary: Path
    accuracy_vs_time: Path
    staleness_hist: Path
    bytes_uploaded: Path
    updates_by_outcome: Path
    device_states: Path
    slots: Path
    accuracy_vs_epsilon: Path | None = None  # only when a run used central DP

    def plots(self) -> tuple[Path, ...]:
        """The PNG files."""
        private = () if self.accuracy_vs_epsilon is None else (self.accuracy_vs_epsilon,)
        return (
            self.accuracy_vs_time,
            self.staleness_hist,
            self.bytes_uploaded,
            self.updates_by_outcome,
            self.device_states,
            self.slots,
            *private,
        )

    def all(self) -> tuple[Path, ...]:
        """Every file written."""
        return (self.summary, *self.plots())


# -------------------------------------------------------------------------------- summary


def _labels(records: Sequence[RunRecord]) -> list[str]:
    """Run labels made unique with ``#2``, ``#3`` suffixes."""
    seen: dict[str, int] = {}
    out = []
    for r in records:
        seen[r.label] = seen.get(r.label, 0) + 1
        out.append(r.label if seen[r.label] == 1 else f"{r.label}#{seen[r.label]}")
    return out


def _speedup(fedavg_time: float | None, other_time: float | None) -> float | None:
    if fedavg_time is None or other_time is None:
        return None
    if other_time <= 0:
        return math.inf if fedavg_time > 0 else 1.0
    return fedavg_time / other_time


def speedup_vs_fedavg(records: Sequence[RunRecord], target_accuracy: float) -> float | None:
    """FedAvg's time to target divided by the first FedBuff run's (``> 1``: FedBuff is faster).

    Uses the first run of each algorithm; ``None`` when either is missing or never reached
    ``target_accuracy``.
    """
    fedavg = next((r for r in records if r.algorithm is Algorithm.FEDAVG), None)
    fedbuff = next((r for r in records if r.algorithm is Algorithm.FEDBUFF), None)
    if fedavg is None or fedbuff is None:
        return None
    return _speedup(
        fedavg.summary(target_accuracy)["time_to_target_s"],
        fedbuff.summary(target_accuracy)["time_to_target_s"],
    )


def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, non-finite floats to ``None``."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def build_summary(records: Sequence[RunRecord], target_accuracy: float) -> dict[str, Any]:
    """The content of ``summary.json`` (see module docstring)."""
    if not records:
        raise ValueError("a report needs at least one run record")
    if len(records) == 1:
        single: dict[str, Any] = _jsonable(records[0].summary(target_accuracy))
        return single
    runs = {
        label: r.summary(target_accuracy)
        for label, r in zip(_labels(records), records, strict=True)
    }
    fedavg_time = next(
        (s["time_to_target_s"] for s in runs.values() if s["algorithm"] == Algorithm.FEDAVG),
        None,
    )
    has_fedavg = any(r.algorithm is Algorithm.FEDAVG for r in records)
    by_run = {
        label: _speedup(fedavg_time, s["time_to_target_s"])
        for label, s in runs.items()
        if s["algorithm"] != Algorithm.FEDAVG and has_fedavg
    }
    out = {
        "target_accuracy": float(target_accuracy),
        "runs": runs,
        "speedup_vs_fedavg": speedup_vs_fedavg(records, target_accuracy),
        "speedup_vs_fedavg_by_run": by_run,
        "warnings": starvation_warnings(records),
    }
    result: dict[str, Any] = _jsonable(out)
    return result


def starvation_warnings(records: Sequence[RunRecord]) -> list[str]:
    """One warning per starved run of a comparison (none for a single run)."""
    if len(records) < 2:
        return []
    return [
        f"{label} was starved ({r.bottleneck}): this comparison measures the fleet's "
        "availability, not the algorithm"
        for label, r in zip(_labels(records), records, strict=True)
        if r.utilisation is not None and starved(r.utilisation)
    ]


def summary_object(
    records: list[RunRecord], target: float, *, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``--json`` object of ``edgefl sim`` and ``edgefl demo``: the first run's summary at
    top level (minus its bulky config, but with its ``concurrency`` and ``buffer_size``); with
    several runs also ``runs`` (label -> summary) and ``speedup_vs_fedavg``; then ``extra``."""
    first: dict[str, Any] = build_summary(records[:1], target)
    config = first.pop("config", None) or {}
    for knob in ("concurrency", "buffer_size"):  # C and K: staleness is about C / K
        first[knob] = config.get(knob)
    if len(records) > 1:
        full = build_summary(records, target)
        for run in full["runs"].values():
            run.pop("config", None)
        first["runs"] = full["runs"]
        first["speedup_vs_fedavg"] = speedup_vs_fedavg(records, target)
        first["warnings"] = full["warnings"]
    if extra:
        first.update(extra)
    return first


def summary_lines(records: list[RunRecord], target: float, summary: dict[str, Any]) -> list[str]:
    """The human summary of finished (or interrupted) runs, one line per run (+ the speed-up)."""
    lines = []
    for r in records:
        s = r.summary(target)
        ttt = s["time_to_target_s"]
        lines.append(
            f"{s['label']}: final accuracy {100 * (s['final_accuracy'] or 0):.1f}%, "
            + (f"target reached at {ttt:,.0f}s" if ttt is not None else "target not reached")
            + f", {s['updates_applied']:,} updates applied, {s['model_versions']} versions"
        )
        if r.bottleneck is not None:
            lines.append(f"  {s['label']} bottleneck: {r.bottleneck}")
        dp = s.get("privacy")
        if dp is not None:
            lines.append(
                f"  {s['label']} privacy: ε {dp['epsilon']:.3g} at δ {dp['delta']:g}"
                f" (z {dp['noise_multiplier']:g}, C {dp['clip_norm']:g}),"
                f" max {dp['participation_max']}/{dp['participation_cap']} flushes per device"
            )
        local = s.get("local_privacy")
        if local is not None:
            budget = "no budget" if local["budget"] is None else f"budget {local['budget']:g}"
            lines.append(
                f"  {s['label']} local DP ({local['mechanism']}, ε {local['epsilon_per_update']:g}"
                f" per update, C {local['clip_norm']:g}): devices' ε max"
                f" {local['epsilon_max']:.3g}, mean {local['epsilon_mean']:.3g} at δ"
                f" {local['delta']:g}; {budget}, {local['exhausted']} devices exhausted,"
                f" {local['refused']} trainings refused"
            )
    if summary.get("speedup_vs_fedavg") is not None:
        lines.append(
            f"FedBuff speed-up vs FedAvg (time to target): {summary['speedup_vs_fedavg']:.2f}x"
        )
    lines.extend(f"warning: {w}" for w in summary.get("warnings", ()))
    return lines


def partial_line(prog: str, why: str, last: Sample | None, target: float) -> str:
    """What an interrupted command prints: ``edgefl sim: stopped by SIGTERM while training
    (12.3 s, acc 71.2% / 90%, 812 updates, version 81)``."""
    text = f"{prog}: stopped by {why}"
    if last is not None:
        acc = "--" if last.accuracy is None else f"{100 * last.accuracy:.1f}%"
        text += (
            f" ({format_duration(last.elapsed_s)}, acc {acc} / {100 * target:g}%, "
            f"{last.updates:,} updates, version {last.version})"
        )
    return text


# -------------------------------------------------------------------------------- plotting


def _new_figure(width: float = 8.0, height: float = 5.0, nrows: int = 1) -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _time_axis(records: Sequence[RunRecord]) -> tuple[float, str, str]:
    """(divisor, unit, axis label) for times in seconds."""
    t_max = 0.0
    for r in records:
        for arr in (r.evals().t, r.updates().t, r.states().t):
            if len(arr):
                t_max = max(t_max, float(arr.max()))
    unit, div = ("s", 1.0)
    if t_max > 2 * 3600:
        unit, div = ("h", 3600.0)
    elif t_max > 120:
        unit, div = ("min", 60.0)
    modes = {r.mode for r in records}
    what = "virtual time" if modes == {Mode.VIRTUAL} else "time"
    if modes == {Mode.LIVE}:
        what = "wall-clock time since start"
    return div, unit, f"{what} ({unit})"


def _bytes_unit(n: float) -> tuple[float, str]:
    for div, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= div:
            return div, unit
    return 1.0, "B"


class _Timed(Protocol):
    @property
    def t(self) -> NDArray[np.float64]: ...


_T = TypeVar("_T", bound=_Timed)


def _with_points(
    records: Sequence[RunRecord], labels: list[str], series: Callable[[RunRecord], _T]
) -> list[tuple[RunRecord, str, Any, _T]]:
    """Each run whose ``series`` has points, with its label, colour (the run's own, whether or
    not the others have points) and that series; empty when no run has any."""
    colored = zip(records, labels, _colors(len(records)), strict=True)
    picked = [(r, label, color, series(r)) for r, label, color in colored]
    return [entry for entry in picked if len(entry[3].t)]


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes)


def _plot_accuracy(
    records: Sequence[RunRecord], labels: list[str], target: float, path: Path
) -> Path:
    fig, (ax,) = _new_figure()
    div, unit, xlabel = _time_axis(records)
    lowest = 100.0
    plotted = _with_points(records, labels, RunRecord.evals)
    for r, label, color, ev in plotted:
        acc = 100.0 * ev.accuracy
        lowest = min(lowest, float(acc.min()))
        ttt = r.summary(target)["time_to_target_s"]
        note = "target not reached" if ttt is None else f"target at {ttt / div:.3g} {unit}"
        ax.plot(ev.t / div, acc, color=color, lw=1.8, marker=".", ms=3, label=f"{label} ({note})")
        if ttt is not None:
            ax.axvline(ttt / div, color=color, ls=":", lw=1.2)
    ax.axhline(100.0 * target, color="gray", ls="--", lw=1.2, label=f"target {100 * target:.3g}%")
    if not plotted:
        _no_data(ax, "evaluations")
    ax.set_ylim(max(0.0, min(lowest, 100.0 * target) - 5.0), 100.0)
    ax.set_title("Test accuracy vs time")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def _plot_epsilon(
    records: Sequence[RunRecord], labels: list[str], target: float, path: Path
) -> Path:
    """Accuracy against the ε spent when the evaluated version was released, per private run."""
    fig, (ax,) = _new_figure()
    lowest = 100.0
    for r, label, color in zip(records, labels, _colors(len(records)), strict=True):
        series = r.privacy()
        ev = r.evals()
        if not len(series.t) or not len(ev.t):
            continue
        dp = r.summary(target)["privacy"]
        acc = 100.0 * ev.accuracy
        lowest = min(lowest, float(acc.min()))
        note = f"ε {dp['epsilon']:.3g} at δ {dp['delta']:g}, z {dp['noise_multiplier']:g}"
        note += f", C {dp['clip_norm']:g}"
        eps = series.epsilon_at(ev.version)
        ax.plot(eps, acc, color=color, lw=1.8, marker=".", ms=4, label=f"{label} ({note})")
        if dp["epsilon_to_target"] is not None:
            ax.axvline(dp["epsilon_to_target"], color=color, ls=":", lw=1.2)
    ax.axhline(100.0 * target, color="gray", ls="--", lw=1.2, label=f"target {100 * target:.3g}%")
    ax.set_ylim(max(0.0, min(lowest, 100.0 * target) - 5.0), 100.0)
    ax.set_xlim(left=0.0)
    ax.set_title("Test accuracy vs privacy spent (ε of the most frequent participant)")
    ax.set_xlabel("ε spent (central DP, largest over devices)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def _plot_staleness(records: Sequence[RunRecord], labels: list[str], path: Path) -> Path:
    fig, (ax,) = _new_figure()
    series = []
    for r in records:
        s = r.updates().staleness
        series.append(s[s >= 0])
    top = max((int(s.max()) for s in series if len(s)), default=-1)
    if top < 0:
        _no_data(ax, "staleness")
    else:
        width = max(1, math.ceil((top + 1) / 60))
        bins = np.arange(0, top + width + 1, width) - 0.5
        for s, label, color in zip(series, labels, _colors(len(records)), strict=True):
            if not len(s):
                continue
            stats = f"mean {s.mean():.2f}, p90 {np.percentile(s, 90):.3g}, max {s.max()}"
            ax.hist(s, bins=bins, color=color, alpha=0.35, label=f"{label} ({stats})")
            ax.hist(s, bins=bins, color=color, histtype="step", lw=1.5)
        ax.legend(loc="upper right")
    ax.set_title("Staleness of received updates")
    ax.set_xlabel("staleness (model versions behind the server)")
    ax.set_ylabel("updates")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _plot_bytes(records: Sequence[RunRecord], labels: list[str], path: Path) -> Path:
    fig, (ax,) = _new_figure()
    div_t, _, xlabel = _time_axis(records)
    top = max((float(r.updates().fp32_bytes.sum()) for r in records), default=0.0)
    top = max(top, max((float(r.updates().nbytes.sum()) for r in records), default=0.0))
    div_b, unit = _bytes_unit(top)
    plotted = _with_points(records, labels, RunRecord.updates)
    for r, label, color, up in plotted:
        order = np.argsort(up.t, kind="stable")
        t = np.concatenate(([0.0], up.t[order])) / div_t
        enc = np.concatenate(([0], np.cumsum(up.nbytes[order]))) / div_b
        fp32 = np.concatenate(([0], np.cumsum(up.fp32_bytes[order]))) / div_b
        ratio = r.summary(0.0)["compression_ratio"]
        ratio_note = "" if ratio is None else f", {ratio:.2f}x smaller"
        ax.step(t, enc, where="post", color=color, lw=1.8, label=f"{label} encoded{ratio_note}")
        ax.step(t, fp32, where="post", color=color, lw=1.2, ls="--", label=f"{label} fp32 equiv.")
    if not plotted:
        _no_data(ax, "updates")
    else:
        ax.legend(loc="upper left")
    ax.set_title("Cumulative bytes uploaded: encoded vs float32 equivalent")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"cumulative upload ({unit})")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _outcome_categories(records: Sequence[RunRecord]) -> tuple[list[str], list[list[int]]]:
    per_run: list[dict[str, int]] = []
    for r in records:
        counts = r.outcome_counts()
        counts["dropout (mid-training)"] = len(r.dropout_times())
        counts["crashed"] = r.summary(0.0)["crashes"]
        if Outcome.DROPPED in counts:
            counts["dropped (in flight)"] = counts.pop(Outcome.DROPPED)
        per_run.append(counts)
    rejected = sorted({k for c in per_run for k in c if k.startswith("rejected:")})
    order = [
        Outcome.APPLIED.value,
        Outcome.STALE.value,
        *rejected,
        "dropped (in flight)",
        "dropout (mid-training)",
        "crashed",
    ]
    cats = [c for c in order if c == Outcome.APPLIED or any(run.get(c, 0) for run in per_run)]
    return cats, [[run.get(c, 0) for c in cats] for run in per_run]


def _plot_outcomes(records: Sequence[RunRecord], labels: list[str], path: Path) -> Path:
    cats, values = _outcome_categories(records)
    fig, (ax,) = _new_figure(width=max(8.0, 1.1 * len(cats) + 2.0))
    x = np.arange(len(cats), dtype=np.float64)
    width = 0.8 / len(records)
    for i, (vals, label, color) in enumerate(
        zip(values, labels, _colors(len(records)), strict=True)
    ):
        bars = ax.bar(
            x + (i - (len(records) - 1) / 2) * width, vals, width, color=color, label=label
        )
        ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_xticks(x, [c.replace("rejected:", "rejected:\n").replace(" (", "\n(") for c in cats])
    ax.margins(y=0.12)
    ax.set_title("Updates by outcome")
    ax.set_xlabel("outcome")
    ax.set_ylabel("count (updates or trainings)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    return _save(fig, path)


def _plot_states(records: Sequence[RunRecord], labels: list[str], path: Path) -> Path:
    series = [r.states() for r in records]
    seen: dict[str, None] = {}
    for s in series:
        seen.update(dict.fromkeys(s.states))
    states = [s for s in _STATE_ORDER if s in seen] + [s for s in seen if s not in _STATE_ORDER]
    palette = dict(zip(states, _colors(len(states)), strict=True))
    fig, axes = _new_figure(height=max(4.0, 2.6 * len(records) + 1.0), nrows=len(records))
    div, _, xlabel = _time_axis(records)
    for ax, s, label in zip(axes, series, labels, strict=True):
        if not len(s.t):
            _no_data(ax, "device states")
        else:
            cols = [s.states.index(name) if name in s.states else -1 for name in states]
            stack = [s.counts[:, c] if c >= 0 else np.zeros(len(s.t)) for c in cols]
            ax.stackplot(
                s.t / div, *stack, labels=states, colors=[palette[n] for n in states], alpha=0.85
            )
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        ax.set_title(f"Device states over time: {label}")
        ax.set_ylabel("devices")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel(xlabel)
    return _save(fig, path)


_SLOT_STATES = ("training", "lost lease", "waiting for a device", "round barrier")


def _plot_slots(records: Sequence[RunRecord], labels: list[str], path: Path) -> Path:
    """Per run: slots training / held by lost devices / waiting for a device / idle at the round
    barrier over time (steps), stacked up to the target."""
    fig, axes = _new_figure(height=max(4.0, 2.6 * len(records) + 1.0), nrows=len(records))
    div, _, xlabel = _time_axis(records)
    palette = _colors(len(_SLOT_STATES))
    for ax, r, label in zip(axes, records, labels, strict=True):
        s = r.slot_series
        if s is None or not len(s.t):
            _no_data(ax, "slots")
        else:
            barrier = np.maximum(0, s.target - s.training - s.lost_lease - s.waiting)
            ax.stackplot(
                s.t / div,
                s.training,
                s.lost_lease,
                s.waiting,
                barrier,
                labels=_SLOT_STATES,
                colors=palette,
                step="post",
                alpha=0.85,
            )
            ax.axhline(s.target, color="black", ls="--", lw=1.0, label=f"target {s.target}")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        title = f"Slots over time: {label}"
        if r.bottleneck:
            title += f"\n{r.bottleneck}"
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("slots")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel(xlabel)
    return _save(fig, path)


def write_report(
    records: Sequence[RunRecord], out_dir: Path, target_accuracy: float
) -> ReportPaths:
    """Write ``summary.json`` and the six PNG plots (seven with central DP) into ``out_dir``
    (created if missing)."""
    if not records:
        raise ValueError("a report needs at least one run record")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels(records)
    paths = ReportPaths(
        out_dir=out,
        summary=out / "summary.json",
        accuracy_vs_time=out / "accuracy_vs_time.png",
        staleness_hist=out / "staleness_hist.png",
        bytes_uploaded=out / "bytes_uploaded.png",
        updates_by_outcome=out / "updates_by_outcome.png",
        device_states=out / "device_states.png",
        slots=out / "slots.png",
        accuracy_vs_epsilon=(
            out / "accuracy_vs_epsilon.png" if any(len(r.privacy().t) for r in records) else None
        ),
    )
    summary = build_summary(records, target_accuracy)
    paths.summary.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    _plot_accuracy(records, labels, target_accuracy, paths.accuracy_vs_time)
    _plot_staleness(records, labels, paths.staleness_hist)
    _plot_bytes(records, labels, paths.bytes_uploaded)
    _plot_outcomes(records, labels, paths.updates_by_outcome)
    _plot_states(records, labels, paths.device_states)
    _plot_slots(records, labels, paths.slots)
    if paths.accuracy_vs_epsilon is not None:
        _plot_epsilon(records, labels, target_accuracy, paths.accuracy_vs_epsilon)
    return paths

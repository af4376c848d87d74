"""Progress of ``edgefl sim`` and ``edgefl demo``: accuracy against the target, updates, model
version, elapsed time and an ETA to the target, on a terminal or in a pipe.

Pure core: :class:`Sample` (one observation of a run), :func:`eta_to_target` (seconds until the
accuracy reaches the target, from the least-squares slope of accuracy over the last
``window_s`` seconds), :func:`format_eta` and :func:`progress_line` (the plain text line).

Shell: :class:`ProgressReporter` writes to stderr. On a terminal it shows a rich progress bar
(accuracy / target) with the figures beside it; otherwise it prints each phase change at once and
one plain line every ``interval_s`` seconds, e.g.::

    edgefl demo: 34.5 s  acc 71.2% / 90%  updates 812  version 81  eta ~20 s
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = [
    "ProgressReporter",
    "ProgressTracker",
    "Sample",
    "eta_to_target",
    "format_duration",
    "format_eta",
    "progress_line",
]


@dataclass(frozen=True)
class Sample:
    """One look at a running simulation. ``elapsed_s`` is wall-clock time since the run started;
    ``accuracy`` is None before the first evaluation; ``detail`` is extra text (e.g. the virtual
    time or the devices online)."""

    elapsed_s: float
    accuracy: float | None
    updates: int
    version: int
    detail: str = ""


def eta_to_target(
    samples: Sequence[Sample], target: float, *, window_s: float = 30.0
) -> float | None:
    """Wall seconds until the accuracy reaches ``target``, or None when unknown.

    ``0.0`` when the newest accuracy is at or above the target. Otherwise the accuracies of the
    samples in the last ``window_s`` seconds (relative to the newest sample) are fitted with a
    least-squares line ``acc = a + slope * t``; with a positive slope the ETA is
    ``(target - newest accuracy) / slope``. None with fewer than two samples with an accuracy at
    distinct times in the window, or a slope that is not positive (accuracy flat or falling).
    With the accuracy of every version as the input, noisy but honest: the slope of the recent
    past, extrapolated in a straight line (an underestimate as the curve flattens).
    """
    points = [(s.elapsed_s, s.accuracy) for s in samples if s.accuracy is not None]
    if not points:
        return None
    t_last, acc_last = points[-1]
    if acc_last >= target:
        return 0.0
    recent = [(t, a) for t, a in points if t >= t_last - window_s]
    if len(recent) < 2:
        return None
    if max(a for _, a in recent) - min(a for _, a in recent) < 1e-9:
        return None  # flat (an exact test: the fitted slope of equal values is rounding noise)
    n = len(recent)
    mean_t = sum(t for t, _ in recent) / n
    mean_a = sum(a for _, a in recent) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in recent)
    if var_t <= 0.0:
        return None
    slope = sum((t - mean_t) * (a - mean_a) for t, a in recent) / var_t
    if slope <= 0.0:
        return None
    return (target - acc_last) / slope


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"3 min 20 s"``, ``"2 h 05 min"`` (rounded to whole seconds)."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total} s"
    if total < 3600:
        return f"{total // 60} min {total % 60:02d} s"
    return f"{total // 3600} h {(total % 3600) // 60:02d} min"


def format_eta(eta: float | None) -> str:
    """``"eta ?"`` (unknown), ``"target reached"`` (0) or ``"eta ~20 s"``."""
    if eta is None:
        return "eta ?"
    if eta <= 0.0:
        return "target reached"
    return f"eta ~{format_duration(eta)}"


def progress_line(prog: str, sample: Sample, target: float, eta: float | None) -> str:
    """The plain progress line, e.g.
    ``edgefl demo: 34.5 s  acc 71.2% / 90%  updates 812  version 81  eta ~20 s``."""
    return _with_detail(
        f"{prog}: {sample.elapsed_s:.1f} s  {_accuracy_text(sample, target)}  "
        f"updates {sample.updates:,}  version {sample.version}  {format_eta(eta)}",
        sample,
    )


def _accuracy_text(sample: Sample, target: float) -> str:
    """``acc 71.2% / 90%`` (``acc -- / 90%`` before the first evaluation)."""
    acc = "--" if sample.accuracy is None else f"{100 * sample.accuracy:.1f}%"
    return f"acc {acc} / {100 * target:g}%"


def _with_detail(text: str, sample: Sample) -> str:
    """``text``, then the sample's detail (if any) after two spaces."""
    return f"{text}  {sample.detail}" if sample.detail else text


class ProgressTracker:
    """The samples of the last ``window_s`` seconds of one run, and the ETA they give."""

    def __init__(self, target: float, *, window_s: float = 30.0) -> None:
        self.target = target
        self.window_s = window_s
        self._samples: deque[Sample] = deque()

    def add(self, sample: Sample) -> float | None:
        """Record ``sample``; returns the ETA to the target (:func:`eta_to_target`)."""
        self._samples.append(sample)
        while self._samples and self._samples[0].elapsed_s < sample.elapsed_s - self.window_s:
            self._samples.popleft()
        return eta_to_target(self._samples, self.target, window_s=self.window_s)

    @property
    def last(self) -> Sample | None:
        return self._samples[-1] if self._samples else None

    def reset(self) -> None:
        self._samples.clear()


class ProgressReporter:
    """Progress on stderr: a rich bar on a terminal, plain lines otherwise (see module doc).

    ``phase(text)`` announces what the command is doing (on a pipe: one line at once, so a
    caller can wait for it); ``update(sample)`` reports a sample (on a pipe: at most one line per
    ``interval_s``; the first sample of a run is always printed); ``message(text)`` prints a line
    that is not progress. Use as a context manager; ``close()`` ends the display.
    """

    def __init__(
        self,
        prog: str,
        target: float,
        *,
        tty: bool | None = None,
        interval_s: float = 5.0,
        stream: TextIO | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self.prog = prog
        self.target = target
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval_s = interval_s
        self.tracker = ProgressTracker(target)
        self._clock = clock
        self._last_line = -float("inf")
        self._phase = ""
        self._progress: Any = None
        self._task: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                console=Console(file=self.stream, force_terminal=True),
                transient=False,
            )
            self._task = self._progress.add_task(prog, total=100 * target, stats="")
            self._progress.start()

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last(self) -> Sample | None:
        """The newest sample of the current run."""
        return self.tracker.last

    @property
    def current_phase(self) -> str:
        """The text of the newest :meth:`phase`."""
        return self._phase

    def new_run(self, label: str) -> None:
        """A new run starts (``--compare``): forget the previous run's samples."""
        self.tracker.reset()
        self._last_line = -float("inf")
        self.phase(label)

    def phase(self, text: str) -> None:
        self._phase = text
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self.prog}: {text}")
        else:
            self._write(f"{self.prog}: {text}")

    def update(self, sample: Sample) -> None:
        eta = self.tracker.add(sample)
        if self._progress is not None:
            stats = _with_detail(
                f"{_accuracy_text(sample, self.target)}  updates {sample.updates:,}  "
                f"v{sample.version}  {format_duration(sample.elapsed_s)}  {format_eta(eta)}",
                sample,
            )
            self._progress.update(
                self._task, completed=100 * min(sample.accuracy or 0.0, self.target), stats=stats
            )
            return
        now = self._clock()
        if now - self._last_line >= self.interval_s:
            self._last_line = now
            self._write(progress_line(self.prog, sample, self.target, eta))

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, highlight=False, markup=False)
        else:
            self._write(text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # reader gone or stream closed: progress is optional
            pass

"""Progress of ``edgefl sim``/``edgefl demo``: the ETA math and the plain line, on small
hand-checkable inputs, and the pipe (non-terminal) reporter's throttling."""

from __future__ import annotations

import io

import pytest

from firmware_sim.progress import (
    ProgressReporter,
    ProgressTracker,
    Sample,
    eta_to_target,
    format_duration,
    format_eta,
    progress_line,
)


def _s(t: float, acc: float | None, updates: int = 0, version: int = 0) -> Sample:
    return Sample(elapsed_s=t, accuracy=acc, updates=updates, version=version)


def test_eta_from_two_points() -> None:
    # 0.5 -> 0.6 in 10 s: slope 0.01/s; 0.3 to go -> 30 s
    assert eta_to_target([_s(0, 0.5), _s(10, 0.6)], 0.9) == pytest.approx(30.0)


def test_eta_uses_the_least_squares_slope_and_the_newest_accuracy() -> None:
    # points (0, .4), (10, .6), (20, .6): mean t 10, mean a 8/15; slope =
    # ((-10)(.4-.5333) + 0 + (10)(.6-.5333)) / 200 = (1.3333 + 0.6667) / 200 = 0.01/s
    # newest accuracy 0.6, target 0.9 -> 0.3 / 0.01 = 30 s
    samples = [_s(0, 0.4), _s(10, 0.6), _s(20, 0.6)]
    assert eta_to_target(samples, 0.9) == pytest.approx(30.0)


def test_eta_only_looks_at_the_window() -> None:
    # the old point (0, 0.0) would make the slope 0.6/100; inside 30 s it is 0.1/20 = 0.005/s
    samples = [_s(0, 0.0), _s(80, 0.5), _s(100, 0.6)]
    assert eta_to_target(samples, 0.9, window_s=30.0) == pytest.approx(0.3 / 0.005)
    assert eta_to_target(samples, 0.9, window_s=1000.0) == pytest.approx(
        0.3 / _slope(samples), rel=1e-9
    )


def _slope(samples: list[Sample]) -> float:
    ts = [s.elapsed_s for s in samples]
    accs = [s.accuracy or 0.0 for s in samples]
    mt, ma = sum(ts) / len(ts), sum(accs) / len(accs)
    num = sum((t - mt) * (a - ma) for t, a in zip(ts, accs, strict=True))
    return num / sum((t - mt) ** 2 for t in ts)


@pytest.mark.parametrize(
    "samples",
    [
        [],  # nothing yet
        [_s(0, None), _s(5, None)],  # no evaluation yet
        [_s(3, 0.5)],  # one point: no slope
        [_s(3, 0.5), _s(3, 0.6)],  # two points at one time
        [_s(0, 0.6), _s(10, 0.6)],  # flat
        # flat, 8 equal values: the fitted slope is rounding noise of 4e-32 (seen: "eta ~1e29 h")
        [_s(0.6 + 0.5 * i, 0.10925) for i in range(8)],
        [_s(0, 0.7), _s(10, 0.6)],  # falling
    ],
)
def test_eta_unknown(samples: list[Sample]) -> None:
    assert eta_to_target(samples, 0.9) is None


def test_eta_zero_once_the_target_is_reached() -> None:
    assert eta_to_target([_s(0, 0.95)], 0.9) == 0.0
    assert eta_to_target([_s(0, 0.5), _s(10, 0.9)], 0.9) == 0.0


def test_formatting() -> None:
    assert format_duration(44.6) == "45 s"
    assert format_duration(200) == "3 min 20 s"
    assert format_duration(7500) == "2 h 05 min"
    assert format_eta(None) == "eta ?"
    assert format_eta(0.0) == "target reached"
    assert format_eta(20.2) == "eta ~20 s"
    line = progress_line("edgefl demo", _s(34.5, 0.712, 812, 81), 0.9, 20.0)
    assert line == "edgefl demo: 34.5 s  acc 71.2% / 90%  updates 812  version 81  eta ~20 s"
    line = progress_line("edgefl sim", _s(1.0, None, 0, 0), 0.85, None)
    assert line == "edgefl sim: 1.0 s  acc -- / 85%  updates 0  version 0  eta ?"
    detailed = Sample(elapsed_s=2.0, accuracy=0.5, updates=3, version=1, detail="t=40 s")
    line = progress_line("edgefl sim", detailed, 0.85, None)
    assert line == "edgefl sim: 2.0 s  acc 50.0% / 85%  updates 3  version 1  eta ?  t=40 s"


def test_tracker_drops_samples_older_than_the_window() -> None:
    tracker = ProgressTracker(0.9, window_s=10.0)
    assert tracker.add(_s(0, 0.0)) is None
    assert tracker.add(_s(100, 0.5)) is None  # the first point left the window
    assert tracker.add(_s(105, 0.55)) == pytest.approx(0.35 / 0.01)
    assert tracker.last == _s(105, 0.55)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pipe_reporter_prints_phases_at_once_and_samples_every_interval() -> None:
    out = io.StringIO()
    clock = _Clock()
    rep = ProgressReporter("edgefl sim", 0.9, tty=False, interval_s=5.0, stream=out, clock=clock)
    rep.phase("training")
    rep.update(_s(0.0, 0.5, 10, 1))  # first sample: printed
    clock.now = 2.0
    rep.update(_s(2.0, 0.6, 20, 2))  # within 5 s: not printed
    clock.now = 5.5
    rep.update(_s(5.5, 0.7, 30, 3))  # printed, with the ETA of the last three samples
    rep.close()
    lines = out.getvalue().splitlines()
    eta = eta_to_target([_s(0.0, 0.5), _s(2.0, 0.6), _s(5.5, 0.7)], 0.9)
    assert eta is not None
    assert lines == [
        "edgefl sim: training",
        "edgefl sim: 0.0 s  acc 50.0% / 90%  updates 10  version 1  eta ?",
        f"edgefl sim: 5.5 s  acc 70.0% / 90%  updates 30  version 3  {format_eta(eta)}",
    ]
    assert "\x1b" not in out.getvalue()  # no escape codes in a pipe


def test_terminal_reporter_shows_accuracy_target_updates_version_and_eta() -> None:
    out = io.StringIO()
    rep = ProgressReporter("edgefl demo", 0.9, tty=True, stream=out)
    rep.phase("training")
    rep.update(_s(0.0, 0.5, 10, 1))
    rep.update(_s(10.0, 0.6, 812, 81))
    rep.close()
    text = out.getvalue()
    assert "edgefl demo: training" in text
    assert "acc 60.0% / 90%" in text
    assert "updates 812" in text
    assert "v81" in text
    assert "10 s" in text
    assert "eta ~30 s" in text  # 0.5 -> 0.6 in 10 s, 0.3 to go

"""Run record summaries and the simulator report (summary.json + PNG plots)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefl.errors import RejectReason
from firmware_sim.record import Algorithm, Mode, RunRecord, normalize_outcome
from firmware_sim.report import ReportPaths, build_summary, speedup_vs_fedavg, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _hand_made_record() -> RunRecord:
    r = RunRecord({"k": 5}, Mode.VIRTUAL, Algorithm.FEDBUFF, devices=10)
    r.eval(10.0, 1, 0.50, 1.2, updates_applied=2)
    r.eval(20.0, 2, 0.85, 0.6, updates_applied=4)
    r.eval(30.0, 3, 0.90, 0.4, updates_applied=7)  # exactly at target
    r.eval(40.0, 4, 0.95, 0.3, updates_applied=9)
    for i, (outcome, staleness) in enumerate(
        [
            ("applied", 0),
            ("applied", 1),
            ("stale", 12),
            ("applied", 2),
            ("rejected:norm_bound", 3),
            (RejectReason.DUPLICATE, None),
            ("dropped", None),
            ("applied", 4),
        ]
    ):
        r.update(5.0 * (i + 1), i, outcome, staleness, nbytes=100, fp32_bytes=400)
    r.dropout(12.0, 3)
    r.dropout(33.0, 4)
    r.crash(34.0, 5)
    r.device_states(0.0, {"idle": 10})
    r.device_states(10.0, {"idle": 6, "training": 4})
    r.finish(wall_time_s=1.5)
    return r


def _run(algorithm: Algorithm, reach_at: float | None, seed: int) -> RunRecord:
    """A synthetic run whose accuracy crosses 0.9 at ``reach_at`` (never when None)."""
    rng = np.random.default_rng(seed)
    r = RunRecord({"seed": seed}, Mode.VIRTUAL, algorithm, devices=100)
    horizon = 2 * (reach_at or 500.0)
    applied = 0
    for i, t in enumerate(np.sort(rng.uniform(0, horizon, 400))):
        stale = int(rng.poisson(2)) if algorithm is Algorithm.FEDBUFF else 0
        outcome = "applied" if stale < 6 else "stale"
        applied += outcome == "applied"
        r.update(float(t), int(rng.integers(100)), outcome, stale, 4400, 17192)
        if i % 40 == 0:
            r.dropout(float(t), int(rng.integers(100)))
            r.device_states(float(t), {"idle": 60 - i % 20, "training": 20 + i % 20, "offline": 20})
    for v, t in enumerate(np.linspace(0, horizon, 21)):
        acc = 0.8 * t / horizon if reach_at is None else 0.9 * t / reach_at
        r.eval(float(t), v, min(acc, 0.97), 1.0 - min(acc, 0.97), updates_applied=v * 10)
    r.finish(model_versions=20)
    return r


# ------------------------------------------------------------------------------ outcomes


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("applied", "applied"),
        ("stale", "stale"),
        ("dropped", "dropped"),
        ("rejected:stale", "stale"),
        (RejectReason.STALE, "stale"),
        ("rejected:norm_bound", "rejected:norm_bound"),
        (RejectReason.NORM_BOUND, "rejected:norm_bound"),
        ("rejected:custom_tag", "rejected:custom_tag"),
        ("  APPLIED ", "applied"),
    ],
)
def test_normalize_outcome(raw: str, expected: str) -> None:
    assert normalize_outcome(raw) == expected


@pytest.mark.parametrize("raw", ["", "ok", "rejected:", "accepted"])
def test_normalize_outcome_rejects_free_form_strings(raw: str) -> None:
    with pytest.raises(ValueError, match="outcome"):
        normalize_outcome(raw)


# ------------------------------------------------------------------------------ summary


def test_summary_of_hand_made_record() -> None:
    # Arrange
    record = _hand_made_record()

    # Act
    s = record.summary(target_accuracy=0.9)

    # Assert
    assert s["mode"] == "virtual"
    assert s["algorithm"] == "fedbuff"
    assert s["devices"] == 10
    assert s["final_accuracy"] == 0.95
    assert s["final_loss"] == 0.3
    assert s["target_accuracy"] == 0.9
    assert s["reached_target"] is True
    assert s["time_to_target_s"] == 30.0
    assert s["updates_to_target"] == 7
    assert s["updates_received_to_target"] == 6  # updates at t = 5..30
    assert s["model_versions"] == 4
    assert s["updates_received"] == 8
    assert s["updates_applied"] == 4
    assert s["updates_rejected"] == {"duplicate": 1, "norm_bound": 1, "stale": 1}
    assert s["updates_dropped"] == 1
    assert s["dropouts"] == 2
    assert s["crashes"] == 1
    assert s["bytes_uploaded"] == 800
    assert s["bytes_fp32_equivalent"] == 3200
    assert s["compression_ratio"] == 4.0
    # known staleness: [0, 1, 12, 2, 3, 4]; percentiles interpolate linearly
    assert s["staleness"] == pytest.approx(
        {"count": 6, "mean": 22 / 6, "p50": 2.5, "p90": 8.0, "max": 12}
    )
    assert s["staleness_applied"] == pytest.approx(
        {"count": 4, "mean": 1.75, "p50": 1.5, "p90": 3.4, "max": 4}
    )
    assert s["wall_time_s"] == 1.5
    assert s["duration_s"] == 40.0
    assert s["config"] == {"k": 5}
    json.dumps(s, allow_nan=False)


def test_summary_when_target_never_reached() -> None:
    record = _hand_made_record()

    s = record.summary(target_accuracy=0.99)

    assert s["reached_target"] is False
    assert s["time_to_target_s"] is None
    assert s["updates_to_target"] is None
    assert s["final_accuracy"] == 0.95


def test_time_to_target_uses_time_order_not_append_order() -> None:
    record = RunRecord({}, "live", "fedavg")  # type: ignore[arg-type]  # strings are coerced
    record.eval(50.0, 5, 0.95)
    record.eval(20.0, 2, 0.92)
    record.eval(10.0, 1, 0.10)

    s = record.summary(0.9)

    assert s["time_to_target_s"] == 20.0
    assert s["mode"] == "live"
    assert s["label"] == "fedavg"


def test_empty_record_summary_is_valid_json() -> None:
    record = RunRecord({}, Mode.VIRTUAL, Algorithm.FEDBUFF)

    s = record.summary(0.9)

    assert s["final_accuracy"] is None
    assert s["compression_ratio"] is None
    assert s["staleness"]["count"] == 0
    json.dumps(s, allow_nan=False)


def test_record_appends_100k_updates_cheaply() -> None:
    # Arrange
    record = RunRecord({}, Mode.VIRTUAL, Algorithm.FEDBUFF)

    # Act
    for i in range(100_000):
        record.update(float(i), i % 1000, "applied" if i % 10 else "stale", i % 7, 4400, 17192)
    s = record.summary(0.9)

    # Assert: stored in compact typed columns (8 bytes per float/int), no per-update objects
    series = record.updates()
    assert series.t.dtype == np.float64
    assert series.t.nbytes == 8 * 100_000
    assert series.outcome.nbytes == 2 * 100_000
    assert s["updates_applied"] == 90_000
    assert s["updates_rejected"] == {"stale": 10_000}
    assert record.updates().t.nbytes == 800_000  # 8 bytes per update per column


# ------------------------------------------------------------------------------ report


def _assert_png(path: Path) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3
    assert pixels.shape[0] > 300
    assert pixels.shape[1] > 500
    assert float(np.var(pixels)) > 1e-3


def test_write_report_single_run(tmp_path: Path) -> None:
    # Arrange
    record = _run(Algorithm.FEDBUFF, reach_at=300.0, seed=0)

    # Act
    paths = write_report([record], tmp_path / "out", target_accuracy=0.9)

    # Assert
    assert isinstance(paths, ReportPaths)
    assert paths.out_dir == tmp_path / "out"
    assert {p.name for p in paths.all()} == {
        "summary.json",
        "accuracy_vs_time.png",
        "staleness_hist.png",
        "bytes_uploaded.png",
        "updates_by_outcome.png",
        "device_states.png",
        "slots.png",
    }
    summary = json.loads(paths.summary.read_text())
    assert summary == json.loads(json.dumps(record.summary(0.9)))
    assert summary["reached_target"] is True
    for png in paths.plots():
        _assert_png(png)


def test_write_report_compare_includes_speedup(tmp_path: Path) -> None:
    # Arrange
    fedbuff = _run(Algorithm.FEDBUFF, reach_at=100.0, seed=1)
    fedavg = _run(Algorithm.FEDAVG, reach_at=300.0, seed=2)

    # Act
    paths = write_report([fedbuff, fedavg], tmp_path, target_accuracy=0.9)

    # Assert
    summary = json.loads(paths.summary.read_text())
    assert set(summary["runs"]) == {"fedbuff", "fedavg"}
    assert summary["runs"]["fedavg"]["time_to_target_s"] == pytest.approx(300.0)
    assert summary["speedup_vs_fedavg"] == pytest.approx(3.0)
    assert summary["speedup_vs_fedavg_by_run"] == {"fedbuff": pytest.approx(3.0)}
    for png in paths.plots():
        _assert_png(png)


def test_speedup_is_null_when_a_run_never_reaches_target() -> None:
    fedbuff = _run(Algorithm.FEDBUFF, reach_at=100.0, seed=1)
    never = _run(Algorithm.FEDAVG, reach_at=None, seed=2)

    assert speedup_vs_fedavg([fedbuff, never], 0.9) is None
    assert build_summary([fedbuff, never], 0.9)["speedup_vs_fedavg"] is None
    assert speedup_vs_fedavg([fedbuff], 0.9) is None


def test_duplicate_labels_are_made_unique() -> None:
    a = _run(Algorithm.FEDBUFF, reach_at=100.0, seed=1)
    b = _run(Algorithm.FEDBUFF, reach_at=200.0, seed=2)

    summary = build_summary([a, b], 0.9)

    assert set(summary["runs"]) == {"fedbuff", "fedbuff#2"}
    assert summary["speedup_vs_fedavg"] is None
    assert summary["speedup_vs_fedavg_by_run"] == {}


def test_write_report_survives_empty_records(tmp_path: Path) -> None:
    record = RunRecord({}, Mode.LIVE, Algorithm.FEDBUFF)

    paths = write_report([record], tmp_path, target_accuracy=0.9)

    assert all(p.stat().st_size > 0 for p in paths.all())
    assert json.loads(paths.summary.read_text())["reached_target"] is False


def test_write_report_needs_a_record(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        write_report([], tmp_path, 0.9)

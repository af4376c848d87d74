"""Central DP in the simulator's record and report: ε after every flush, the summary's final
figures, and the accuracy-against-ε plot."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sim_samples import private_sim_config

from edgefl.privacy import CentralDP, PrivacyStatistics
from edgefl.privacy import epsilon as accountant_epsilon
from firmware_sim.record import Algorithm, Mode, PrivacySeries, RunRecord
from firmware_sim.report import summary_lines, write_report
from firmware_sim.scenario import build_scenario
from firmware_sim.virtual import VirtualSimulator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
K = 2  # buffer size: a flush every 2 applied updates
DP = CentralDP(
    clip_norm=0.5,
    noise_multiplier=2.0,
    delta=1e-5,
    target_epsilon=None,
    max_participations=3,
    seed=1,
)


def _private_run() -> RunRecord:
    cfg = private_sim_config(DP, buffer_size=K, eval_every_updates=4)
    return VirtualSimulator(build_scenario(cfg)).run().record


@pytest.fixture(scope="module")
def private_run() -> RunRecord:
    return _private_run()


def _participations_per_flush(record: RunRecord, flushes: int) -> list[int]:
    """From the recorded updates alone: after each flush, the most flushes one device took
    part in (the i-th flush holds applied updates i*K .. i*K+K-1, in recording order)."""
    up = record.updates()
    applied = up.device[up.outcome == up.outcomes.index("applied")]
    counts: Counter[int] = Counter()
    most = []
    for i in range(flushes):
        counts.update(int(d) for d in applied[i * K : (i + 1) * K])
        most.append(max(counts.values()))
    return most


def test_a_private_run_records_epsilon_after_every_flush(private_run: RunRecord) -> None:
    series = private_run.privacy()
    summary = private_run.summary(0.9)
    flushes = summary["updates_applied"] // K

    assert len(series.t) == flushes > 5
    assert series.version.tolist() == list(range(1, flushes + 1))  # the version each made
    assert np.all(np.diff(series.epsilon) >= 0.0)  # ε never decreases
    most = _participations_per_flush(private_run, flushes)
    assert series.participation_max.tolist() == most
    expected = [accountant_epsilon(k, DP.noise_multiplier, DP.delta) for k in most]
    assert series.epsilon.tolist() == pytest.approx(expected, rel=1e-12)
    assert most[-1] == DP.participation_cap  # 40 updates from 8 devices reach the cap of 3


def test_the_summary_carries_the_final_privacy_figures(private_run: RunRecord) -> None:
    summary = json.loads(json.dumps(private_run.summary(0.9), allow_nan=False))
    dp = summary["privacy"]

    assert dp["epsilon"] == pytest.approx(accountant_epsilon(3, 2.0, 1e-5))
    assert (dp["delta"], dp["noise_multiplier"], dp["clip_norm"]) == (1e-5, 2.0, 0.5)
    assert (dp["participation_cap"], dp["participation_max"]) == (3, 3)
    assert dp["flushes"] == len(private_run.privacy().t)
    assert sum(dp["participation_histogram"].values()) == dp["devices"] <= 8
    assert dp["accountant"] == "rdp"
    assert "privacy: ε" in "\n".join(summary_lines([private_run], 0.9, summary))


def test_the_report_plots_accuracy_against_epsilon(private_run: RunRecord, tmp_path: Path) -> None:
    paths = write_report([private_run], tmp_path, target_accuracy=0.9)

    assert paths.accuracy_vs_epsilon == tmp_path / "accuracy_vs_epsilon.png"
    assert paths.accuracy_vs_epsilon in paths.plots()
    png = paths.accuracy_vs_epsilon.read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    assert len(png) > 10_000
    assert json.loads(paths.summary.read_text())["privacy"]["flushes"] > 5


def test_no_epsilon_plot_or_privacy_summary_without_dp(tmp_path: Path) -> None:
    record = RunRecord({}, Mode.VIRTUAL, Algorithm.FEDBUFF)
    record.eval(0.0, 0, 0.1)
    record.dp_flush(1.0, 1, None)  # what the simulator passes with DP off: nothing recorded

    paths = write_report([record], tmp_path, target_accuracy=0.9)

    assert paths.accuracy_vs_epsilon is None
    assert not (tmp_path / "accuracy_vs_epsilon.png").exists()
    assert "privacy" not in record.summary(0.9)


def test_epsilon_at_a_version_is_that_of_the_last_flush_up_to_it() -> None:
    series = PrivacySeries(
        t=np.array([1.0, 2.0, 3.0]),
        version=np.array([1, 2, 4], dtype=np.int64),
        epsilon=np.array([0.5, 0.9, 1.4]),
        participation_max=np.array([1, 2, 3], dtype=np.int64),
    )
    versions = np.array([0, 1, 2, 3, 4, 9], dtype=np.int64)
    assert series.epsilon_at(versions).tolist() == [0.0, 0.5, 0.9, 0.9, 1.4, 1.4]
    empty = PrivacySeries(np.zeros(0), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
    assert empty.epsilon_at(versions).tolist() == [0.0] * 6


def test_epsilon_to_target_is_the_epsilon_of_the_first_version_at_the_target() -> None:
    record = RunRecord({}, Mode.VIRTUAL, Algorithm.FEDBUFF)
    stats = DP.epsilon
    for version, acc in ((1, 0.5), (2, 0.92), (3, 0.95)):
        record.dp_flush(float(version), version, _figures(stats(version), version))
        record.eval(float(version), version, acc)

    dp = record.summary(0.9)["privacy"]

    assert dp["epsilon_to_target"] == pytest.approx(stats(2))
    assert dp["epsilon"] == pytest.approx(stats(3))
    assert record.summary(0.99)["privacy"]["epsilon_to_target"] is None


def _figures(epsilon: float, participations: int) -> PrivacyStatistics:
    return PrivacyStatistics(
        epsilon=epsilon,
        delta=DP.delta,
        noise_multiplier=DP.noise_multiplier,
        clip_norm=DP.clip_norm,
        participation_cap=DP.participation_cap,
        participation_max=participations,
        devices=1,
        participation_histogram={participations: 1},
        accountant="rdp",
    )

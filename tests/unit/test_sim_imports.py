"""Module seams of the simulator: what the report, demo and CLI modules import."""

from __future__ import annotations

import subprocess
import sys

from firmware_sim import cli, report
from firmware_sim.record import Algorithm, Mode, RunRecord


def test_demo_does_not_import_the_cli() -> None:
    # arrange: a fresh interpreter (this one may have imported the CLI already)
    code = "import sys, firmware_sim.demo; print('firmware_sim.cli' in sys.modules)"

    # act
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()

    # assert
    assert out == "False"


def test_the_cli_re_exports_the_summary_helpers_of_the_report() -> None:
    assert cli.summary_object is report.summary_object
    assert cli.summary_lines is report.summary_lines
    assert cli.partial_line is report.partial_line


def test_summary_object_puts_the_first_run_on_top_and_both_runs_under_runs() -> None:
    # arrange: FedBuff reaches 90% at t=10, FedAvg at t=40
    fedbuff = RunRecord({"k": 1}, Mode.VIRTUAL, Algorithm.FEDBUFF, devices=4)
    fedbuff.eval(10.0, 1, 0.9, updates_applied=3)
    fedavg = RunRecord({"k": 2}, Mode.VIRTUAL, Algorithm.FEDAVG, devices=4)
    fedavg.eval(40.0, 1, 0.95, updates_applied=4)

    # act
    summary = report.summary_object([fedbuff, fedavg], 0.9, extra={"report": "out"})

    # assert
    assert summary["label"] == "fedbuff"
    assert summary["time_to_target_s"] == 10.0
    assert "config" not in summary
    assert set(summary["runs"]) == {"fedbuff", "fedavg"}
    assert all("config" not in run for run in summary["runs"].values())
    assert summary["speedup_vs_fedavg"] == 4.0
    assert summary["report"] == "out"

"""The demo path end to end, scaled down (digits, 20 devices) so it stays quick in CI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from firmware_sim.demo import DEMO_CONFIG, run_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_live_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = DEMO_CONFIG.replace(
        dataset="digits",
        concurrency=6,
        buffer_size=6,
        local=replace(DEMO_CONFIG.local, epochs=2),
        target=0.85,
        max_wall_s=90.0,
    )
    summary = run_demo(devices=20, report=tmp_path / "report", json_out=True, config=small)
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    assert json.loads(last) == summary
    assert summary["reached_target"] is True
    assert summary["final_accuracy"] >= small.stop.target  # the final model is at the target
    assert summary["mode"] == "live"
    assert summary["devices"] == 20
    assert (tmp_path / "report" / "summary.json").exists()
    # the yardstick: FedAvg's (and FedBuff's) time from a virtual run of the same fleet
    detail = summary["estimate"]
    assert detail["available"] is True, detail
    scale = detail["time_scale"]
    assert summary["estimated_fedavg_time_to_target_s"] == detail["fedavg_virtual_s"] * scale
    assert summary["estimated_fedbuff_time_to_target_s"] == detail["fedbuff_virtual_s"] * scale
    assert summary["estimated_speedup_vs_fedavg"] == (
        detail["fedavg_virtual_s"] / detail["fedbuff_virtual_s"]
    )
    # the human summary goes to stderr with --json
    assert "estimate from a virtual run of this fleet: FedAvg would need ~" in captured.err
    png = (tmp_path / "report" / "accuracy_vs_time.png").read_bytes()
    assert png.startswith(b"\x89PNG")

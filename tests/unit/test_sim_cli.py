"""``sim_command`` through typer's CliRunner: the ``--json`` last-line contract and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from firmware_sim.cli import sim_command

REQUIRED = {
    "final_accuracy",
    "target_accuracy",
    "reached_target",
    "time_to_target_s",
    "mode",
    "model_versions",
    "updates_applied",
    "updates_rejected",
    "bytes_uploaded",
    "bytes_fp32_equivalent",
    "devices",
    "dropouts",
    "algorithm",
}

SMALL = ["--devices", "20", "--dataset", "digits", "--profile", "lab", "--concurrency", "8"]


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(sim_command)
    return app


def test_json_summary_is_the_last_stdout_line() -> None:
    result = CliRunner().invoke(
        _app(), [*SMALL, "--buffer-size", "4", "--target", "0.8", "--dropout", "0.3", "--json"]
    )
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary.keys() >= REQUIRED
    assert summary["mode"] == "virtual"
    assert summary["algorithm"] == "fedbuff"
    assert summary["devices"] == 20
    assert summary["reached_target"] is True
    assert summary["bytes_uploaded"] < summary["bytes_fp32_equivalent"]
    assert isinstance(summary["updates_rejected"], dict)


def test_compare_reports_both_runs_and_the_speedup(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(
        _app(),
        [*SMALL, "--target", "0.8", "--compare", "fedbuff,fedavg", "--report", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["runs"]) == {"fedbuff", "fedavg"}
    assert summary["speedup_vs_fedavg"] is not None
    assert summary["speedup_vs_fedavg"] > 0
    assert summary["report"] == str(out)
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk["runs"]) == {"fedbuff", "fedavg"}
    for name in (
        "accuracy_vs_time",
        "staleness_hist",
        "bytes_uploaded",
        "updates_by_outcome",
        "device_states",
    ):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(png) > 5_000


def test_bad_options_are_usage_errors() -> None:
    from edgefl.clierror import UsageError

    result = CliRunner().invoke(_app(), [*SMALL, "--codec", "int9"])
    assert isinstance(result.exception, UsageError)  # edgefl.cli.main maps it to exit 2
    assert "--codec" in str(result.exception)
    result = CliRunner().invoke(_app(), [*SMALL, "--compare", "fedbuff"])
    assert isinstance(result.exception, UsageError)
    assert "--compare" in str(result.exception)


def test_summary_is_printed_without_json_and_without_a_terminal() -> None:
    result = CliRunner().invoke(_app(), [*SMALL, "--target", "0.8"])
    assert result.exit_code == 0, result.output
    assert "fedbuff: final accuracy" in result.stdout
    assert "edgefl sim: building the scenario" in result.stderr
    assert "edgefl sim: done" in result.stderr


def test_demo_no_estimate_is_passed_to_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    import firmware_sim.demo
    from firmware_sim.cli import demo_command

    seen: list[bool] = []
    monkeypatch.setattr(
        firmware_sim.demo, "run_demo", lambda **kwargs: seen.append(kwargs["estimate"])
    )
    app = typer.Typer()
    app.command()(demo_command)

    for flag, expected in (("--no-estimate", False), ("--estimate", True)):
        result = CliRunner().invoke(app, [flag, "--broker", "mqtt://127.0.0.1:1"])
        assert result.exit_code == 0, result.output
        assert seen.pop() is expected

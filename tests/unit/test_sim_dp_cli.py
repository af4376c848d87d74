"""``edgefl sim --dp``: the aggregator's DP text reaches both simulators' aggregation.

The virtual run honours it (participation caps reject updates); the live run hands the same
:class:`~edgefl.privacy.CentralDP` to the aggregator config it builds (the live round trip is
tests/integration/test_sim_live_roles.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from edgefl.aggregation import Normalisation
from edgefl.aggregator import NormBoundSetting
from edgefl.privacy import CentralDP, parse_dp
from firmware_sim.cli import (
    AlgorithmOptions,
    AttackOptions,
    DataOptions,
    FleetOptions,
    LimitOptions,
    SimOptions,
    TrainingOptions,
    sim_command,
    sim_config_from_options,
)
from firmware_sim.live import LiveOptions, _aggregator_config

DP_TEXT = "central:z=1.0,C=1.0,cap=2,seed=1"


def _options(dp: str | None, *, norm_bound: str | None = None) -> SimOptions:
    return SimOptions(
        mode="virtual",
        fleet=FleetOptions(devices=10, dropout=None, profile="lab", speed=None),
        algorithm=AlgorithmOptions("fedbuff", 4, 6, "polynomial:0.5", 100),
        data=DataOptions(dataset="digits", partition="iid", codec="int8", samples=None),
        limits=LimitOptions(target=0.9, max_time=None, max_updates=40, seed=0),
        attack=AttackOptions(0.0, "scale", 20.0, "none", norm_bound),
        training=TrainingOptions(
            epochs=1,
            lr=0.1,
            batch_size=32,
            server_lr=1.0,
            normalisation=None,
            round_deadline=None,
        ),
        dp=dp,
    )


def test_dp_sets_the_privacy_and_its_defaults() -> None:
    cfg = sim_config_from_options(_options(DP_TEXT))

    assert cfg.aggregation.privacy == parse_dp(DP_TEXT)
    assert cfg.aggregation.normalisation is Normalisation.SUM  # the aggregator's --dp defaults
    assert cfg.aggregation.norm_bound == "off"


def test_without_dp_the_defaults_stay() -> None:
    cfg = sim_config_from_options(_options(None))

    assert cfg.aggregation.privacy is None
    assert cfg.aggregation.normalisation is Normalisation.MEAN
    assert cfg.aggregation.norm_bound == "auto"


def test_a_static_norm_bound_is_kept_with_dp() -> None:
    cfg = sim_config_from_options(_options(DP_TEXT, norm_bound="3"))

    assert cfg.aggregation.norm_bound == "3"


def test_the_live_aggregator_gets_the_same_privacy(tmp_path: Path) -> None:
    cfg = sim_config_from_options(_options(DP_TEXT))

    agg = _aggregator_config(cfg, LiveOptions(), "mqtt://127.0.0.1:1883", tmp_path)

    assert isinstance(agg.aggregation.privacy, CentralDP)
    assert agg.aggregation.privacy == cfg.aggregation.privacy
    assert agg.aggregation.normalisation is Normalisation.SUM
    assert agg.options()["norm_bound"] is NormBoundSetting.OFF


def test_a_virtual_run_with_dp_enforces_the_cap() -> None:
    app = typer.Typer()
    app.command()(sim_command)
    argv = ["--devices", "10", "--dataset", "digits", "--profile", "lab", "--concurrency", "6"]
    argv += ["--buffer-size", "3", "--max-updates", "40", "--dp", DP_TEXT, "--json"]

    result = CliRunner().invoke(app, argv)

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # 10 devices under a cap of 2 flushes each (one update per device per flush): at most 20
    # updates count, so the run ends short of its 40; as in the service's lease draw, a device
    # at its cap is never drawn again, so none is refused for it
    assert summary["privacy"]["participation_max"] == 2
    assert summary["updates_applied"] <= 10 * 2 < 40
    assert summary["updates_rejected"].get("dp_budget_exhausted", 0) == 0

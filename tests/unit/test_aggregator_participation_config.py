"""The ``[participation]`` settings of the aggregator command: on by default (C = 20), the TOML
table, the flags, ``check-config``, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.aggregator.config_file import describe, load_aggregator_config
from edgefl.clierror import ConfigError, UsageError
from edgefl.participation import ParticipationConfig

REQUIRED = 'fleet = "f1"\nmodel = "digits-mlp"\nstate_dir = "state"\n[broker]\nurl = "mqtt://127.0.0.1:9"\n'


def _file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "aggregator.toml"
    path.write_text(REQUIRED + body)
    return path


def test_the_command_leases_by_default(tmp_path: Path) -> None:
    loaded = load_aggregator_config(_file(tmp_path, ""), {}, {})
    assert loaded.aggregator.participation == ParticipationConfig(
        concurrency=20, lease_s=600.0, lease_grace=0.1, checkin_ttl_s=3600.0, flush_after_s=120.0
    )


def test_the_table_sets_every_field_and_zero_turns_the_flush_off(tmp_path: Path) -> None:
    body = (
        "[participation]\nconcurrency = 5\nlease_s = 90.0\nlease_grace = 0.25\n"
        "checkin_ttl_s = 300.0\nflush_after_s = 0\n"
    )
    loaded = load_aggregator_config(_file(tmp_path, body), {}, {})
    assert loaded.aggregator.participation == ParticipationConfig(
        concurrency=5, lease_s=90.0, lease_grace=0.25, checkin_ttl_s=300.0, flush_after_s=None
    )


def test_flags_win_over_the_file_and_can_turn_leases_off(tmp_path: Path) -> None:
    path = _file(tmp_path, "[participation]\nconcurrency = 5\n")
    flags = {"participation.concurrency": 7, "participation.flush_after_s": 3.0}
    on = load_aggregator_config(path, {}, flags).aggregator.participation
    off = load_aggregator_config(path, {}, {"participation.enabled": False}).aggregator
    env = {"EDGEFL_AGG_PARTICIPATION__ENABLED": "false"}
    assert (on.concurrency, on.flush_after_s) == (7, 3.0)  # type: ignore[union-attr]
    assert off.participation is None
    assert load_aggregator_config(path, env, {}).aggregator.participation is None


def test_a_bad_value_names_its_key_or_flag(tmp_path: Path) -> None:
    path = _file(tmp_path, "[participation]\nlease_s = -1.0\n")
    with pytest.raises(ConfigError, match=r"participation\.lease_s"):
        load_aggregator_config(path, {}, {})
    with pytest.raises(UsageError, match="--concurrency"):
        load_aggregator_config(_file(tmp_path, ""), {}, {"participation.concurrency": 0})


def test_check_config_shows_the_participation_settings(tmp_path: Path) -> None:
    """``check-config`` prints :func:`describe` of the loaded settings."""
    loaded = load_aggregator_config(_file(tmp_path, ""), {}, {"participation.concurrency": 8})
    shown = {k: v for k, v in describe(loaded).items() if k.startswith("participation.")}
    assert shown == {
        "participation.enabled": True,
        "participation.concurrency": 8,
        "participation.lease_s": 600.0,
        "participation.lease_grace": 0.1,
        "participation.checkin_ttl_s": 3600.0,
        "participation.flush_after_s": 120.0,
    }

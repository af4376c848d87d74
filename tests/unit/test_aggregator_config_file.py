"""The aggregator's layered configuration: TOML file < EDGEFL_AGG_* environment < flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefl.aggregation import RobustMode
from edgefl.aggregator.config import AggregatorConfig
from edgefl.aggregator.config_file import known_keys, load_aggregator_config
from edgefl.cli import main
from edgefl.clierror import ConfigError, UsageError
from edgefl.participation import ParticipationConfig
from edgefl.transport.config import MqttProtocol

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "edgefl" / "aggregator" / "examples" / "aggregator.toml"


def write(tmp: Path, body: str) -> Path:
    path = tmp / "aggregator.toml"
    path.write_text(
        'fleet = "f1"\nmodel = "digits-mlp"\nstate_dir = "state"\n'
        '[broker]\nurl = "mqtt://127.0.0.1:9"\n' + body
    )
    return path


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    # Arrange
    path = write(tmp_path, "[aggregation]\nbuffer_size = 5\n")
    env = {"EDGEFL_AGG_AGGREGATION__BUFFER_SIZE": "6"}

    # Act
    file_only = load_aggregator_config(path, {}, {})
    with_env = load_aggregator_config(path, env, {})
    with_flag = load_aggregator_config(path, env, {"aggregation.buffer_size": 7})
    flag_not_given = load_aggregator_config(path, env, {"aggregation.buffer_size": None})

    # Assert
    assert file_only.aggregator.aggregation.buffer_size == 5
    assert with_env.aggregator.aggregation.buffer_size == 6
    assert with_flag.aggregator.aggregation.buffer_size == 7
    assert flag_not_given.aggregator.aggregation.buffer_size == 6
    assert with_flag.sources["aggregation.buffer_size"] == "command line (--buffer-size)"
    assert with_env.sources["aggregation.buffer_size"] == (
        "environment variable EDGEFL_AGG_AGGREGATION__BUFFER_SIZE"
    )


def test_file_values_reach_the_service_config(tmp_path: Path) -> None:
    # Arrange
    (tmp_path / "pw").write_text("s3cret\n")
    path = write(
        tmp_path,
        'username = "agg"\npassword_file = "pw"\nprotocol = "3.1.1"\nconnect_timeout_s = 4\n'
        '[aggregation]\nrobust = "median"\n[limits]\nmax_inflight_mib = 8\nfsync = false\n'
        '[hints]\nquantization = "int4"\ntopk_fraction = 0.1\n',
    )

    # Act
    cfg = load_aggregator_config(path, {}, {}).aggregator

    # Assert
    assert cfg.state_dir == tmp_path / "state"  # relative to the file
    assert cfg.mqtt.password == "s3cret"  # trailing newline removed
    assert cfg.mqtt.username == "agg"
    assert cfg.mqtt.protocol is MqttProtocol.V311
    assert cfg.mqtt.connect_timeout_s == 4.0
    assert cfg.aggregation.robust is RobustMode.MEDIAN
    assert cfg.ingest.max_inflight_bytes == 8 * 1024 * 1024
    assert cfg.ingest.fsync is False
    assert cfg.task.codec.quantization.value == "int4"
    assert cfg.task.codec.topk_fraction == 0.1
    mqtt = cfg.mqtt_config()
    assert mqtt.protocol is MqttProtocol.V311
    assert mqtt.timing.start_timeout == 4.0
    assert mqtt.password == "s3cret"


def test_flags_only_gives_the_commands_defaults(tmp_path: Path) -> None:
    # Arrange
    flags: dict[str, object] = {
        "broker.url": "mqtt://127.0.0.1:9",
        "fleet": "f1",
        "model": "digits-mlp",
        "state_dir": tmp_path / "s",
    }

    # Act
    cfg = load_aggregator_config(None, {}, flags).aggregator

    # Assert
    expected = AggregatorConfig.build(
        broker_url="mqtt://127.0.0.1:9",
        fleet="f1",
        model="digits-mlp",
        state_dir=tmp_path / "s",
        max_batch=512,  # the command's default since before the config file
        participation=ParticipationConfig(flush_after_s=120.0),  # leases on, C = 20
    )
    assert cfg == expected


def test_state_directory_from_systemd(tmp_path: Path) -> None:
    # Arrange
    flags = {"broker.url": "mqtt://127.0.0.1:9", "fleet": "f1", "model": "digits-mlp"}

    # Act
    cfg = load_aggregator_config(None, {"STATE_DIRECTORY": f"{tmp_path}/a:{tmp_path}/b"}, flags)

    # Assert
    assert cfg.aggregator.state_dir == tmp_path / "a"


def test_password_and_password_file_conflict(tmp_path: Path) -> None:
    # Arrange
    (tmp_path / "pw").write_text("x")
    path = write(tmp_path, 'username = "u"\npassword = "p"\npassword_file = "pw"\n')

    # Act / Assert
    with pytest.raises(ConfigError, match=r"^broker.password_file: conflicts with"):
        load_aggregator_config(path, {}, {})


def test_bad_flag_is_a_usage_error_naming_the_flag(tmp_path: Path) -> None:
    # Arrange
    path = write(tmp_path, "")

    # Act / Assert
    with pytest.raises(UsageError, match=r"^--buffer-size: "):
        load_aggregator_config(path, {}, {"aggregation.buffer_size": "ten"})


def test_env_empty_value_sets_an_optional_key_to_none(tmp_path: Path) -> None:
    # Arrange
    path = write(tmp_path, "[aggregation]\nmax_staleness = 5\n")

    # Act
    cfg = load_aggregator_config(path, {"EDGEFL_AGG_AGGREGATION__MAX_STALENESS": ""}, {})

    # Assert
    assert cfg.aggregator.aggregation.max_staleness is None


def test_every_key_has_an_environment_variable_and_is_in_the_example() -> None:
    # Arrange
    text = EXAMPLE.read_text()

    # Act
    missing = [key for key in known_keys() if key.rsplit(".", 1)[-1] not in text]

    # Assert
    assert missing == []


def test_check_config_prints_the_effective_values_password_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange
    path = write(tmp_path, 'username = "u"\npassword = "hunter2"\n')

    # Act
    with pytest.raises(SystemExit) as info:
        main(["aggregator", "check-config", "--config", str(path), "--json"])
    out = capsys.readouterr().out

    # Assert
    assert info.value.code == 0
    values = json.loads(out)
    assert values["broker.password"] == "***"
    assert "hunter2" not in out
    assert values["aggregation.buffer_size"] == 10
    assert values["state_dir"] == str(tmp_path / "state")
    assert not (tmp_path / "state").exists()


def test_check_config_takes_the_parents_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange
    path = write(tmp_path, "")

    # Act
    with pytest.raises(SystemExit) as info:
        main(["aggregator", "--buffer-size", "3", "check-config", "--config", str(path), "--json"])

    # Assert
    assert info.value.code == 0
    assert json.loads(capsys.readouterr().out)["aggregation.buffer_size"] == 3


def test_the_example_config_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))

    # Act
    with pytest.raises(SystemExit) as info:
        main(["aggregator", "check-config", "--config", str(EXAMPLE)])
    captured = capsys.readouterr()

    # Assert
    assert info.value.code == 0, captured.err
    assert "configuration OK" in captured.err
    assert "greenhouse" in captured.out


def test_check_config_rejects_a_bad_device_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange: a directory with one garbage public key
    keys = tmp_path / "device-keys"
    keys.mkdir()
    (keys / "pi-01.pub").write_text("not a key\n")
    path = write(tmp_path, '[security]\ndevice_keys = "device-keys"\n')

    # Act
    with pytest.raises(SystemExit) as info:
        main(["aggregator", "check-config", "--config", str(path)])
    err = capsys.readouterr().err

    # Assert
    assert info.value.code == 78
    assert "security.device_keys: bad key file pi-01.pub" in err


def test_tls_options_reach_the_transport(tmp_path: Path) -> None:
    # Arrange
    (tmp_path / "ca.crt").write_text("not parsed here: the TLS handshake reads it\n")
    flags: dict[str, object] = {
        "broker.url": "mqtts://127.0.0.1:9",
        "fleet": "f1",
        "model": "digits-mlp",
        "state_dir": tmp_path / "s",
        "broker.tls_insecure": True,
        "broker.ca_file": tmp_path / "ca.crt",
        "broker.protocol": "5",
    }

    # Act
    mqtt = load_aggregator_config(None, {}, flags).aggregator.mqtt_config()

    # Assert
    assert mqtt.tls is True
    assert mqtt.tls_files.tls_insecure is True
    assert mqtt.tls_files.ca_file == tmp_path / "ca.crt"
    assert mqtt.protocol is MqttProtocol.V5


def test_receipts_and_the_seq_window_come_from_file_environment_and_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange
    (tmp_path / "plain").mkdir()
    plain = write(tmp_path / "plain", "")
    path = write(tmp_path, "[aggregation]\nreceipts = false\n[limits]\nmax_seq_jump = 100\n")

    # Act
    default = load_aggregator_config(plain, {}, {})
    from_file = load_aggregator_config(path, {}, {})
    from_env = load_aggregator_config(path, {"EDGEFL_AGG_LIMITS__MAX_SEQ_JUMP": "7"}, {})
    from_flag = load_aggregator_config(path, {}, {"aggregation.receipts": True})
    with pytest.raises(SystemExit) as info:
        main(["aggregator", "--no-receipts", "--max-seq-jump", "9", "check-config",
              "--config", str(path), "--json"])  # fmt: skip
    values = json.loads(capsys.readouterr().out)

    # Assert
    assert (default.aggregator.ingest.receipts, default.aggregator.limits.max_seq_jump) == (
        True,
        2**32,
    )
    assert (from_file.aggregator.ingest.receipts, from_file.aggregator.limits.max_seq_jump) == (
        False,
        100,
    )
    assert from_env.aggregator.limits.max_seq_jump == 7
    assert from_flag.aggregator.ingest.receipts is True
    assert from_flag.sources["aggregation.receipts"] == "command line (--receipts)"
    assert info.value.code == 0
    assert (values["aggregation.receipts"], values["limits.max_seq_jump"]) == (False, 9)


def test_a_seq_window_below_one_names_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nmax_seq_jump = 0\n")
    with pytest.raises(ConfigError) as info:
        load_aggregator_config(path, {}, {})
    assert "limits.max_seq_jump" in info.value.message

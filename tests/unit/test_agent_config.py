"""Agent configuration: precedence, validation messages, secrets, the shipped example."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from agent_files import MINIMAL_AGENT_TOML

from device_agent.config import (
    AgentConfig,
    ConfigError,
    DataKind,
    env_var_name,
    known_keys,
    load_config,
)
from device_agent.eligibility import MeteredSource, TimeWindow

EXAMPLE = Path(__file__).resolve().parents[2] / "device_agent" / "examples" / "agent.toml"

MINIMAL = MINIMAL_AGENT_TOML


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_file_gives_defaults(tmp_path: Path) -> None:
    # Arrange
    path = write(tmp_path, MINIMAL)

    # Act
    cfg = load_config(path, env={}, overrides={})

    # Assert
    assert cfg.fleet == "greenhouse"
    assert cfg.device_id == "pi-07"
    assert cfg.broker.host == "broker.local"
    assert cfg.broker.port == 1883
    assert not cfg.broker.tls
    assert cfg.data.kind is DataKind.NPZ
    assert cfg.data.path == tmp_path / "data/train.npz"  # relative to the file
    assert cfg.training.max_threads == 1
    assert cfg.training.nice == 10
    assert cfg.codec.quantization == "int8"
    assert cfg.codec.topk_fraction is None
    assert cfg.eligibility.require_mains is True
    assert cfg.eligibility.windows == ()
    assert cfg.probes.metered is MeteredSource.NETWORKMANAGER
    assert cfg.state_dir == Path("/var/lib/edgefl")
    assert cfg.log_level == "INFO"
    assert cfg.profile is None


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    # Arrange
    path = write(tmp_path, MINIMAL + "\n[training]\nmax_threads = 2\nbatch_size = 16\n")
    env = {
        "EDGEFL_BROKER__URL": "mqtt://from-env:1883",
        "EDGEFL_TRAINING__MAX_THREADS": "3",
        "EDGEFL_DEVICE_ID": "pi-env",
        "PATH": "/usr/bin",  # unrelated variables are ignored
    }
    overrides: dict[str, object] = {"broker.url": "mqtts://from-flag", "device_id": None}

    # Act
    cfg = load_config(path, env=env, overrides=overrides)

    # Assert
    assert cfg.broker.url == "mqtts://from-flag"  # flag beats env beats file
    assert cfg.broker.port == 8883
    assert cfg.training.max_threads == 3  # env beats file
    assert cfg.training.batch_size == 16  # file only
    assert cfg.device_id == "pi-env"  # None override means "not given"
    assert cfg.fleet == "greenhouse"


def test_everything_from_env_without_a_file() -> None:
    # Arrange
    env = {
        "EDGEFL_BROKER__URL": "mqtt://b",
        "EDGEFL_FLEET": "f",
        "EDGEFL_DEVICE_ID": "d",
        "EDGEFL_DATA__KIND": "ENTRYPOINT",
        "EDGEFL_DATA__ENTRYPOINT": "mysensor.data:load",
        "EDGEFL_ELIGIBILITY__ALLOW_METERED": "yes",
        "EDGEFL_ELIGIBILITY__WINDOWS": "22:00-06:00, 12:00-13:00",
        "EDGEFL_ELIGIBILITY__MAX_TEMP_C": "75",
        "EDGEFL_CODEC__TOPK_FRACTION": "0.05",
        "EDGEFL_TRAINING__MAX_STEPS": "",  # empty: optional key stays None
        "EDGEFL_PROBES__METERED": "no",
        "EDGEFL_CONFIG": "/etc/edgefl/agent.toml",  # read by the CLI, ignored here
    }

    # Act
    cfg = load_config(None, env=env, overrides={})

    # Assert
    assert cfg.data.kind is DataKind.ENTRYPOINT
    assert cfg.data.entrypoint == "mysensor.data:load"
    assert cfg.eligibility.allow_metered is True
    assert cfg.eligibility.windows == (TimeWindow("22:00-06:00"), TimeWindow("12:00-13:00"))
    assert cfg.eligibility.max_temp_c == 75.0
    assert cfg.codec.topk_fraction == 0.05
    assert cfg.training.max_steps is None
    assert cfg.probes.metered is MeteredSource.NO


def test_string_overrides_are_parsed_like_env(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, MINIMAL),
        env={},
        overrides={"training.max_threads": "2", "eligibility.allow_metered": True, "nice": None},
    )
    assert cfg.training.max_threads == 2
    assert cfg.eligibility.allow_metered is True


def test_unknown_key_in_file_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('url = "mqtt', 'urll = "mqtt'))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, overrides={})
    assert info.value.key == "broker.urll"
    assert "did you mean 'broker.url'?" in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_section_and_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^device-id: unknown key; did you mean 'device_id'"):
        load_config(write(tmp_path, 'device-id = "x"\n' + MINIMAL), env={}, overrides={})
    with pytest.raises(
        ConfigError, match=r"^brokr: unknown section \[brokr\]; did you mean \[broker\]"
    ):
        load_config(write(tmp_path, '[brokr]\nurl = "mqtt://x"\n'), env={}, overrides={})


def test_unknown_env_var_suggests_double_underscore(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), env={"EDGEFL_BROKER_URL": "mqtt://x"}, overrides={})
    assert info.value.key == "EDGEFL_BROKER_URL"
    assert "did you mean 'EDGEFL_BROKER__URL'?" in str(info.value)


def test_unknown_override_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'training.max_threads'"):
        load_config(write(tmp_path, MINIMAL), env={}, overrides={"training.max_thread": 2})


def test_bad_url_names_key_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), env={}, overrides={"broker.url": "http://x"})
    assert str(info.value).startswith(
        "broker.url: unsupported broker URL scheme 'http' in 'http://x' (use one of: mqtt,"
    )
    assert info.value.source == "command line"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("mqtt://", "broker URL without host"),
        ("mqtt://host:99999", "bad port"),
        ("mqtt://user:pw@host", "credentials do not belong in the URL"),
        ("mqtt://host/some/path", "only ws:// and wss:// broker URLs take a path"),
        ("ws://host:8080/mqtt?token=1", "no query or fragment"),
    ],
)
def test_bad_url_variants(tmp_path: Path, url: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(write(tmp_path, MINIMAL), env={"EDGEFL_BROKER__URL": url}, overrides={})


@pytest.mark.parametrize("bad", ["-pi", "", "pi 7", "a" * 65, "pi/7", "pi+7"])
def test_bad_device_id(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), env={}, overrides={"device_id": bad})
    assert info.value.key == "device_id"
    assert repr(bad) in str(info.value)


def test_good_ids_accepted(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, MINIMAL), env={}, overrides={"device_id": "Pi_7.b-2", "fleet": "a" * 64}
    )
    assert cfg.device_id == "Pi_7.b-2"


def test_password_file_is_read_and_redacted(tmp_path: Path) -> None:
    # Arrange
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cr3t pw\n")
    text = MINIMAL.replace(
        'url = "mqtt://broker.local:1883"',
        'url = "mqtt://broker.local:1883"\nusername = "pi-07"\npassword_file = "mqtt-password"',
    )

    # Act
    cfg = load_config(write(tmp_path, text), env={}, overrides={})

    # Assert
    assert cfg.broker.password == "s3cr3t pw"
    assert "s3cr3t" not in repr(cfg)
    assert cfg.describe()["broker.password"] == "***"
    assert "broker.password_file" not in cfg.describe()


def test_password_file_errors(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("[data]", 'username = "u"\n\n[data]'))
    with pytest.raises(ConfigError, match=r"^broker\.password_file: cannot read"):
        load_config(
            path, env={"EDGEFL_BROKER__PASSWORD_FILE": str(tmp_path / "nope")}, overrides={}
        )
    (tmp_path / "pw").write_text("x")
    with pytest.raises(ConfigError, match=r"conflicts with broker.password"):
        load_config(
            path,
            env={"EDGEFL_BROKER__PASSWORD_FILE": str(tmp_path / "pw")},
            overrides={"broker.password": "inline"},
        )


def test_password_needs_username(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^broker\.username: a password needs a username"):
        load_config(write(tmp_path, MINIMAL), env={}, overrides={"broker.password": "x"})


def test_tls_files_need_mqtts_and_must_exist(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"^broker\.ca_file: TLS files need an mqtts://"):
        load_config(path, env={}, overrides={"broker.ca_file": "/etc/ssl/ca.pem"})
    with pytest.raises(ConfigError, match=r"^broker\.ca_file: no such file"):
        load_config(
            path,
            env={},
            overrides={"broker.url": "mqtts://b", "broker.ca_file": str(tmp_path / "ca.pem")},
        )
    with pytest.raises(ConfigError, match=r"^broker\.key_file: cert_file and key_file go together"):
        load_config(path, env={}, overrides={"broker.url": "mqtts://b", "broker.cert_file": "c"})


@pytest.mark.parametrize(
    ("snippet", "key", "fragment"),
    [
        ('[training]\nbatch_size = "big"\n', "training.batch_size", "expected an integer"),
        ("[training]\nmax_threads = 0\n", "training.max_threads", "[1, 64]"),
        ("[training]\nnice = true\n", "training.nice", "expected an integer"),
        ("[training]\nlr = 0\n", "training.lr", "(0, 100]"),
        ("[codec]\ntopk_fraction = 1.5\n", "codec.topk_fraction", "(0, 1]"),
        ('[eligibility]\nallow_metered = "yes"\n', "eligibility.allow_metered", "true or false"),
        ("[eligibility]\nresume_temp_c = 80\n", "eligibility.resume_temp_c", "max_temp_c"),
        ("[eligibility]\nmax_load_per_cpu = -1\n", "eligibility.max_load_per_cpu", "[0, 1000]"),
        ("[eligibility]\nallow_battery = true\n", "eligibility.allow_battery", "require_mains"),
        ('[probes]\nmetered = "maybe"\n', "probes.metered", "'networkmanager'"),
        ("[probes]\ninterval_s = 0.5\n", "probes.interval_s", "[1, 3600]"),
    ],
)
def test_type_and_range_errors_name_the_key(
    tmp_path: Path, snippet: str, key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL + snippet), env={}, overrides={})
    assert str(info.value).startswith(key)
    assert fragment in str(info.value)


def test_bad_window_is_reported_with_its_index(tmp_path: Path) -> None:
    text = MINIMAL + '[eligibility]\nwindows = ["22:00-06:00", "25:00-26:00"]\n'
    with pytest.raises(ConfigError, match=r"^eligibility\.windows\[1\]: time of day out of range"):
        load_config(write(tmp_path, text), env={}, overrides={})


def test_required_keys_and_data_kind_rules(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^broker\.url: required setting is missing.*EDGEFL_BROKER__URL"
    ):
        load_config(None, env={}, overrides={"fleet": "f", "device_id": "d", "data.kind": "npz"})
    with pytest.raises(ConfigError, match=r"^data\.path: required for kind = 'csv'"):
        load_config(
            None,
            env={},
            overrides={
                "fleet": "f",
                "device_id": "d",
                "broker.url": "mqtt://b",
                "data.kind": "csv",
            },
        )


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: .* is not valid TOML"):
        load_config(write(tmp_path, "fleet = \n"), env={}, overrides={})
    with pytest.raises(ConfigError, match=r"^config: cannot read"):
        load_config(tmp_path / "missing.toml", env={}, overrides={})


def test_state_directory_from_systemd_unless_configured(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    env = {"STATE_DIRECTORY": "/var/lib/private/edgefl:/var/lib/other"}
    assert load_config(path, env=env, overrides={}).state_dir == Path("/var/lib/private/edgefl")
    cfg = load_config(path, env={**env, "EDGEFL_STATE_DIR": "/srv/edgefl"}, overrides={})
    assert cfg.state_dir == Path("/srv/edgefl")


def test_log_level_is_normalised(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), env={"EDGEFL_LOG_LEVEL": "debug"}, overrides={})
    assert cfg.log_level == "DEBUG"
    with pytest.raises(ConfigError, match=r"^log_level: expected one of"):
        load_config(write(tmp_path, MINIMAL), env={"EDGEFL_LOG_LEVEL": "loud"}, overrides={})


def test_env_var_mapping() -> None:
    assert env_var_name("broker.url") == "EDGEFL_BROKER__URL"
    assert env_var_name("device_id") == "EDGEFL_DEVICE_ID"
    assert env_var_name("eligibility.max_temp_c") == "EDGEFL_ELIGIBILITY__MAX_TEMP_C"


def test_example_covers_every_key_and_loads() -> None:
    # Arrange
    text = EXAMPLE.read_text()
    mentioned = set()
    section = ""
    for line in text.splitlines():
        stripped = line.lstrip("# ").strip()
        if m := re.match(r"^\[(\w+)\]$", stripped):
            section = m.group(1) + "."
        elif m := re.match(r"^(\w+)\s*=", stripped):
            mentioned.add(section + m.group(1) if section else m.group(1))

    # Act
    cfg = load_config(EXAMPLE, env={}, overrides={})

    # Assert
    assert set(known_keys()) <= mentioned, set(known_keys()) - mentioned
    assert isinstance(cfg, AgentConfig)
    assert tomllib.loads(text)  # valid TOML as shipped


def test_websocket_broker_urls_are_accepted(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, MINIMAL),
        env={"EDGEFL_BROKER__URL": "wss://broker.example:443/mqtt"},
        overrides={},
    )
    assert (config.broker.host, config.broker.port, config.broker.tls) == (
        "broker.example",
        443,
        True,
    )

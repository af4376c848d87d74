"""Local DP's configuration (``[privacy] dp``), ``check-config``'s report of the noise and of
the epsilon spent, the ``DeviceState`` fields on the wire, and the updates left in a budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_files import MINIMAL_AGENT_TOML, run_edgefl

from device_agent.config import ConfigError, PrivacyConfig, load_config
from device_agent.local_privacy import LEDGER_FILE, LocalPrivacyLedger, report_of
from edgefl.errors import ProtocolError
from edgefl.privacy import LocalDP, LocalMechanism, LocalSpend, may_train
from edgefl.privacy.local import updates_left
from edgefl.protocol.messages import DeviceState, DeviceStatus, decode_message, encode_message


def test_privacy_section_gives_local_dp(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL_AGENT_TOML + '\n[privacy]\ndp = "local:laplace,eps=2,C=1,budget=20"\n')

    cfg = load_config(path, env={}, overrides={})
    from_env = load_config(
        path, env={"EDGEFL_PRIVACY__DP": "local:eps=1,C=0.3,delta=1e-6"}, overrides={}
    )
    default = load_config(None, env=_env(), overrides={})

    assert cfg.privacy.local == LocalDP(
        mechanism=LocalMechanism.LAPLACE, clip_norm=1.0, epsilon=2.0, budget_epsilon=20.0
    )
    assert cfg.privacy.dp == "local:laplace,eps=2,C=1,delta=1e-05,budget=20"  # normalised
    assert cfg.describe()["privacy.dp"] == cfg.privacy.dp
    assert from_env.privacy.local == LocalDP(clip_norm=0.3, epsilon=1.0, delta=1e-6)
    assert default.privacy.local is None
    assert default.privacy.dp == "off"


def _env() -> dict[str, str]:
    return {
        "EDGEFL_FLEET": "f",
        "EDGEFL_DEVICE_ID": "d",
        "EDGEFL_BROKER__URL": "mqtt://h",
        "EDGEFL_DATA__KIND": "npz",
        "EDGEFL_DATA__PATH": "x.npz",
    }


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("central:z=1,C=1", "central DP is the aggregator's setting"),
        ("local:gaussian,eps=-1", "epsilon must be finite and > 0"),
        ("local:gaussian,eps=1,delta=2", "delta must be in (0, 1)"),
        ("local:uniform,eps=1", "'uniform' is not a valid LocalMechanism"),
        ("local:gaussian,clip=1", "bad dp option 'clip=1'"),
        ("local:laplace,eps=1,budget=0", "budget_epsilon must be None or finite and > 0"),
        ("global:eps=1", "dp mode must be central, local or off"),
        ("local:gaussian,eps=8,budget=4", "budget 4 allows no update of epsilon 8"),
    ],
)
def test_bad_privacy_settings_are_one_line_naming_key_and_source(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={**_env(), "EDGEFL_PRIVACY__DP": text}, overrides={})

    message = str(caught.value)
    assert message.startswith("privacy.dp: ")
    assert fragment in message
    assert "EDGEFL_PRIVACY__DP" in message  # where the value came from
    assert "\n" not in message


def test_privacy_config_rejects_a_non_text_value() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.dp"):
        PrivacyConfig(dp=3)  # type: ignore[arg-type]


def test_check_config_shows_the_noise_and_the_epsilon_spent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # Arrange: a device that already released 3 Laplace updates of epsilon 2
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    env = {
        **_env(),
        "EDGEFL_DATA__PATH": str(tmp_path / "d.npz"),
        "EDGEFL_STATE_DIR": str(tmp_path / "state"),
        "EDGEFL_PRIVACY__DP": "local:laplace,eps=2,C=0.5,budget=10",
    }
    (tmp_path / "state").mkdir()
    LocalPrivacyLedger.in_state_dir(tmp_path / "state").record(
        LocalSpend(updates=3, laplace_epsilon=6.0)
    )

    # Act
    code, out, err = run_edgefl(["agent", "check-config"], env, monkeypatch, capsys)
    jcode, jout, _ = run_edgefl(["agent", "check-config", "--json"], env, monkeypatch, capsys)
    (tmp_path / "state" / LEDGER_FILE).write_text("{not json")
    bad = run_edgefl(["agent", "check-config"], env, monkeypatch, capsys)

    # Assert
    assert code == 0, err
    assert (
        "local DP: laplace, epsilon 2 per update, L1 clip 0.5, noise Laplace scale 0.5 per "
        "value; spent epsilon 6 in 3 updates; budget 10: 2 more updates"
    ) in out
    assert jcode == 0
    local = json.loads(jout)["local_dp"]
    assert (local["local_epsilon_spent"], local["updates_left"], local["noise_scale"]) == (
        6.0,
        2,
        0.5,
    )
    assert bad[0] == 78
    assert bad[2].count("\n") == 1
    assert "state_dir" in bad[2]
    assert "unreadable" in bad[2]


def test_device_state_carries_local_dp_and_old_peers_still_parse() -> None:
    report = report_of(
        LocalDP(clip_norm=1.0, epsilon=1.0, delta=1e-5, budget_epsilon=3.0),
        LocalSpend(updates=2, gaussian_mu_squared=0.5),
    )
    state = DeviceState("f", "d", DeviceStatus.IDLE, 1, 5.0, **report.device_state_fields())

    back = decode_message(encode_message(state), DeviceState)
    plain = DeviceState("f", "d", DeviceStatus.IDLE, 1, 5.0)
    old_header = {k: v for k, v in state.to_header().items() if not k.startswith("local_")}

    assert back == state
    assert (back.local_dp, back.local_dp_updates, back.local_epsilon_budget) == ("gaussian", 2, 3.0)
    assert back.local_epsilon_spent == pytest.approx(report.epsilon_spent)
    assert back.local_budget_exhausted is report.exhausted
    assert "local_dp" not in plain.to_header()  # off: nothing new on the wire
    assert DeviceState.from_header(old_header) == plain  # a state from an older agent


@pytest.mark.parametrize(
    "bad",
    [
        {"local_epsilon_spent": -1.0},
        {"local_delta": 1.5},
        {"local_dp_updates": -2},
        {"local_budget_exhausted": "yes"},
        {"local_dp": ""},
    ],
)
def test_device_state_local_dp_fields_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        DeviceState.from_header(
            {"fleet": "f", "device_id": "d", "status": "idle", "session": 1, "at": 0, **bad}
        )


@pytest.mark.parametrize(
    "config",
    [
        LocalDP(mechanism=LocalMechanism.LAPLACE, epsilon=0.7, budget_epsilon=10.0),
        LocalDP(epsilon=1.0, delta=1e-5, budget_epsilon=8.0),
        LocalDP(epsilon=0.3, delta=1e-6, budget_epsilon=4.0),
        LocalDP(epsilon=5.0, budget_epsilon=4.0),  # not even one
    ],
)
def test_updates_left_is_how_often_may_train_says_yes(config: LocalDP) -> None:
    spend, trained = LocalSpend(), 0
    left = updates_left(spend, config)
    assert left is not None
    mu = config.sensitivity / config.noise_scale
    while may_train(spend, config):
        spend = spend.charged(config.mechanism, config.epsilon, mu)
        trained += 1
        assert updates_left(spend, config) == left - trained

    assert left == trained
    assert updates_left(LocalSpend(), LocalDP()) is None  # no budget


def test_the_device_computes_epsilon_without_dp_accounting_or_scipy() -> None:
    """A Pi's install has neither (the ``aggregator``/``sim`` extras bring dp-accounting)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from device_agent.config import PrivacyConfig\n"
        "from device_agent.local_privacy import report_of\n"
        "from edgefl.privacy import LocalSpend\n"
        "dp = PrivacyConfig(dp='local:gaussian,eps=1,C=1,budget=9').local\n"
        "mu2 = 4 * (2 / dp.noise_scale) ** 2\n"
        "r = report_of(dp, LocalSpend(updates=4, gaussian_mu_squared=mu2))\n"
        "assert 1.0 < r.epsilon_spent < 4.0 and r.updates_left > 0, r\n"
        "try:\n"
        "    PrivacyConfig(dp='central:z=3,C=0.3,eps=8')\n"
        "except Exception as exc:\n"
        "    assert 'aggregator' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('central DP accepted')\n"
        "bad = {'dp_accounting', 'scipy', 'torch'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)

    assert done.returncode == 0, done.stderr
